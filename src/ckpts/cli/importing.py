"""``ckpts import``: turn Hugging Face, Lightning and torch.save checkpoints into a ckpts run.

The command imports torch (through :mod:`ckpts._run.importing`), so it imports it
inside the command, never at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ckpts.cli._common import (
    format_number,
    print_table,
    printable,
    reports_errors,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from ckpts._run.importing import ImportPlan


@reports_errors
def import_(
    source: Annotated[Path, typer.Argument(
        help="A Hugging Face checkpoint-N folder, a Trainer output folder of them, a Lightning "
             ".ckpt file or a torch.save file.")],
    run: Annotated[str, typer.Argument(
        help="The ckpts run to import into: a directory or a URL (created if needed).")],
    step: Annotated[int | None, typer.Option(
        help="Step for a single file that records none (default: its global_step, else 0), "
             "or for the final model at the top of a Trainer output folder that has no "
             "trainer_state.json.",
        min=0)] = None,
) -> None:
    """Import existing checkpoints into a run: one ckpts checkpoint per source checkpoint.

    A Trainer output folder brings every checkpoint-N folder, and the final model
    at its top when that is a step of its own; what is left out is listed, with why.
    Pickles are read with torch.load(weights_only=True) only; a file that needs
    more is refused, naming it. All or nothing: if one checkpoint fails, those
    already imported are removed again.
    """
    from ckpts._run.importing import import_plan, plan_import  # torch: only with work to do

    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True,
                  disable=not stderr.is_terminal) as progress:
        task = progress.add_task("import", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        plan = plan_import(source, step=step)
        imported = import_plan(plan, run, on_progress=advance)
    stdout.print(printable(f"imported {len(imported)} checkpoint(s) from {source} into {run}"))
    print_table(
        [[str(c.step), c.name, _origin(found.path, plan),
          ", ".join(f"{k}={format_number(v)}" for k, v in c.metrics.items())]
         for c, found in zip(imported, plan.checkpoints, strict=True)],
        header=["step", "checkpoint", "from", "metrics"], right={0},
    )
    for reason in plan.skipped:
        stdout.print(printable(f"skipped {reason}"))


def _origin(path: Path, plan: ImportPlan) -> str:
    """Where in the source a checkpoint came from: ``checkpoint-500``, ``top (final model)``
    of a Trainer output folder, or the name of a single file or folder."""
    if path != plan.source:
        return str(path.relative_to(plan.source))
    return "top (final model)" if len(plan.checkpoints) > 1 else path.name
