"""The ``ckpts`` command line: one typer app, one module per command group.

Each command lives in its own module (``demo.py``, ...) and is registered below, so
a new command is a new module plus one line here. The commands print; the library
they call does not. The group (:class:`ckpts.cli._common.Commands`) prints a usage
error as one line on stderr, with exit code 2.
"""

from __future__ import annotations

import typer

from ckpts.cli import (
    check_resume,
    compare,
    demo,
    export,
    importing,
    inspection,
    listing,
    maintenance,
    selection,
)
from ckpts.cli._common import Commands, show_library_warnings

app = typer.Typer(
    cls=Commands,
    name="ckpts",
    help="Checkpoint manager for PyTorch training: atomic, verified, bit-exact resume.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Checkpoint manager for PyTorch training: atomic, verified, bit-exact resume."""
    # A callback keeps `ckpts demo` a subcommand even while it is the only command.


app.command("demo")(demo.demo)
app.command("ls")(listing.ls)
app.command("best")(listing.best)
app.command("show")(inspection.show)
app.command("du")(inspection.du)
app.command("diff")(compare.diff)
app.command("check-resume")(check_resume.check_resume)
app.command("verify")(maintenance.verify)
app.command("prune")(maintenance.prune)
app.command("pin")(maintenance.pin)
app.command("unpin")(maintenance.unpin)
app.command("plot")(selection.plot)
app.command("report")(selection.report)
app.command("export")(export.export)
app.command("evaluate")(export.evaluate)
app.command("import")(importing.import_)


def main() -> None:
    """Entry point of the ``ckpts`` console script."""
    show_library_warnings()
    app()
