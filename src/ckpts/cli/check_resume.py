"""``ckpts check-resume``: prove that a training command resumes exactly.

Exit codes: 0 bit-exact, 1 the resumed run differs (the report names what and the
likely cause), 2 the command could not be checked (it failed, timed out, never
saved, or saved too few checkpoints), with its log's last lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckpts.cli._common import EXIT_CHECK_FAILED, printable, reports_errors, stdout
from ckpts.testing._resume_check import RUN_PLACEHOLDER
from ckpts.testing._resume_check import check_resume as run_check


@reports_errors
def check_resume(
    command: Annotated[list[str], typer.Argument(
        help=f"The training command, after --; {RUN_PLACEHOLDER} is replaced by its run "
             f"directory, inside an argument too (--out_dir={RUN_PLACEHOLDER}).",
        show_default=False)],
    kill_after_saves: Annotated[int, typer.Option(
        help="SIGKILL the second run right after this many committed checkpoints.")] = 2,
    timeout: Annotated[float, typer.Option(
        help="Seconds each of the three runs of the command may take.")] = 600.0,
    workdir: Annotated[Path | None, typer.Option(
        help="An empty directory for the runs and logs, kept afterwards (default: a "
             "temporary one, removed when the check passes).")] = None,
    run: Annotated[str | None, typer.Option(
        help=f"Where {RUN_PLACEHOLDER} points: a new or empty path or URL (s3://...), "
             "destroyed between the runs (default: WORKDIR/run).")] = None,
) -> None:
    """Run COMMAND to completion, then run it again killed and resumed; compare the checkpoints.

    COMMAND must resume by itself: it is run again as is, and restores what it finds in {run}.

    Example: ckpts check-resume -- python train.py --out_dir={run}
    """
    result = run_check(command, kill_after_saves=kill_after_saves, timeout=timeout,
                       workdir=workdir, run=run)
    stdout.print("\n".join(map(printable, result.report().splitlines())))
    if not result.exact:
        raise typer.Exit(EXIT_CHECK_FAILED)
