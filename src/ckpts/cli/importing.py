"""``ckpts import``: turn Hugging Face, Lightning and torch.save checkpoints into a ckpts run.

The command imports torch (through :func:`ckpts.import_checkpoints`), so it imports it
inside the command, never at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ckpts.cli._common import format_number, print_table, reports_errors, stderr, stdout


@reports_errors
def import_(
    source: Annotated[Path, typer.Argument(
        help="A Hugging Face checkpoint-N folder, a Trainer output folder of them, a Lightning "
             ".ckpt file or a torch.save file.")],
    run: Annotated[str, typer.Argument(
        help="The ckpts run to import into: a directory or a URL (created if needed).")],
    step: Annotated[int | None, typer.Option(
        help="Step for a single file that records none (default: its global_step, else 0).",
        min=0)] = None,
) -> None:
    """Import existing checkpoints into a run: one ckpts checkpoint per source checkpoint.

    Pickles are read with torch.load(weights_only=True) only; a file that needs
    more is refused, naming it. All or nothing: if one checkpoint fails, those
    already imported are removed again.
    """
    from ckpts._run.importing import import_checkpoints  # imports torch: only once there is work

    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True,
                  disable=not stderr.is_terminal) as progress:
        task = progress.add_task("import", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        imported = import_checkpoints(source, run, step=step, on_progress=advance)
    stdout.print(f"imported {len(imported)} checkpoint(s) from {source} into {run}")
    print_table(
        [[str(c.step), c.name,
          ", ".join(f"{k}={format_number(v)}" for k, v in c.metrics.items())]
         for c in imported],
        header=["step", "checkpoint", "metrics"], right={0},
    )
