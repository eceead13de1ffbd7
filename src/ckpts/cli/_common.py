"""What every ``ckpts`` command shares: exit codes, error reporting, argument checks, output.

Exit codes: 0 ok, 1 a check failed (``verify`` found problems), 2 bad usage or
input. A :class:`~ckpts.errors.CheckpointError` or ``OSError`` escaping a command
becomes one line on stderr (``error: ...``) and exit code 2, never a traceback; so
does a usage error (a missing option, a bad value: see :class:`Commands`), as
``ckpts best: missing option '--metric'; see ckpts best --help``.

Runs and checkpoints are given as text, a local path or an fsspec URL
(``s3://bucket/run``, ``memory://...``): :func:`open_run`, :func:`open_checkpoint_arg`
and :func:`open_location` turn the text into a storage (see :mod:`ckpts.storage._port`);
credentials for a URL come from the usual variables (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ...). Output files stay local paths.

Everything a run holds (tags, metric, object, file and tensor names, folder names)
is printed through :func:`printable`, and so is every error message: a tag holding
an escape sequence must not clear the user's terminal, nor a lone surrogate crash
the output.

Nothing here imports torch: ``ckpts ls`` must start fast.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
import typer.core
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from ckpts._format.catalog import Checkpoint, is_committed
from ckpts._run.policy import Mode
from ckpts.errors import CheckpointError
from ckpts.storage import open_storage
from ckpts.storage._port import MANIFEST, Storage, split_checkpoint, url_protocol

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2

# click, as typer runs it: vendored as typer._click since typer 0.2x, click itself before
_click: Any = vars(typer.core).get("_click") or vars(typer.core)["click"]

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ModeOption = Annotated[
    Mode | None,
    typer.Option(help="Whether lower (min) or higher (max) values of the metric are better "
                      "(default: known from its name, e.g. max for accuracy; else min)."),
]

EPOCH_METRIC = "epoch"  # a metric Trainer logs: shown in the epoch column, never ranked

# The words of a metric's name that say which end is better (see metric_direction). Rates
# and timings (samples_per_second, runtime), learning rates and norms have no better end.
LOWER_IS_BETTER = frozenset({
    "loss", "perplexity", "ppl", "error", "err", "wer", "cer", "mse", "mae", "rmse", "nll"})
HIGHER_IS_BETTER = frozenset({
    "accuracy", "acc", "f1", "bleu", "rouge", "auc", "precision", "recall", "exact_match",
    "score", "reward"})

# No markup nor emoji codes: paths, tensor keys and tags print as they are, brackets
# and colons included. Soft wrap: a long line stays one line (for grep and cut),
# whatever the terminal width.
stdout = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)

# C0 controls (newline and tab included), DEL, C1 controls, and surrogates (in a str
# from JSON or the file system, a surrogate is always a lone one)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

P = ParamSpec("P")
R = TypeVar("R")


def printable(text: str) -> str:
    r"""``text`` with its control characters and lone surrogates escaped as ``repr``
    writes them (``\x1b``, ``\n``, ``\ud800``); everything else as it is.

    Example:
        >>> printable("best\x1b[2J\ud800 é")
        'best\\x1b[2J\\ud800 é'
    """
    return _UNPRINTABLE.sub(lambda found: repr(found.group())[1:-1], text)


def show_library_warnings() -> None:
    """Print the library's warnings (it logs through ``logging``) on stderr, one escaped
    line each: they name the run's paths and keys."""
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter())
    logging.getLogger("ckpts").addHandler(handler)


class _PrintableFormatter(logging.Formatter):
    """A record's message (and traceback, if any) as one escaped line."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr (escaped, see :func:`printable`) and exit with
    code 2."""
    stderr.print(f"error: {printable(message)}")
    raise typer.Exit(EXIT_BAD_INPUT)


class Commands(typer.core.TyperGroup):
    """The ``ckpts`` command group: a usage error is one line on stderr and exit code 2.

    click (through typer) would print the usage and a boxed message over several
    lines. Here a missing or unknown option or argument, a bad value or an unknown
    command prints ``ckpts best: missing option '--metric'; see ckpts best --help``.
    ``ckpts`` alone still prints the help.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        """Run the command line (see :meth:`click.Command.main`), reporting usage errors
        as one line."""
        if not standalone_mode:  # the caller handles click's exceptions itself
            return super().main(args, prog_name, complete_var, False, windows_expand_args,
                                **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args,
                                **extra)
        except _click.exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `ckpts` alone: the help
                typer.echo(e.format_message(), nl=False)  # (rich prints it, and gives "")
            else:
                stderr.print(usage_error(e))
            sys.exit(EXIT_BAD_INPUT)
        except _click.exceptions.ClickException as e:  # other click errors, as one line
            stderr.print(f"error: {printable(e.format_message())}")
            sys.exit(e.exit_code)
        except _click.exceptions.Abort:
            stderr.print("Aborted!")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_error(error: Any) -> str:
    """A click usage error as one line: ``COMMAND: what is wrong; see COMMAND --help``."""
    command = error.ctx.command_path if error.ctx is not None else "ckpts"
    # typer words a bad value as pydantic does: "Value error, 'mid' is not one of ..."
    message = error.format_message().strip().rstrip(".").replace(": Value error, ", ": ")
    if message[:1].isupper() and message[1:2].islower():  # "Missing option" -> "missing ..."
        message = message[0].lower() + message[1:]
    return printable(f"{command}: {message}; see {command} --help")


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn library and OS errors raised by ``command`` into ``error: ...`` and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (CheckpointError, OSError) as e:
            fail(str(e))

    return wrapper


def open_location(text: str) -> Storage:
    """The storage at ``text``, a local path or an fsspec URL (``s3://bucket/run``).

    A local path must be an existing directory (exit 2 otherwise); a URL is opened
    as it is, so a bad protocol or a missing bucket raises CheckpointError (which
    :func:`reports_errors` prints). Nothing is created, locally or remotely.
    """
    if url_protocol(text) is None:
        path = Path(text)
        if not path.exists():
            fail(f"{text} does not exist")
        if not path.is_dir():
            fail(f"{text} is not a directory")
    return open_storage(text)


def committed_checkpoint(text: str) -> tuple[Storage, str] | None:
    """``(storage of its run, name)`` if ``text`` is a committed checkpoint, else None.

    One small read (see :func:`ckpts._format.catalog.is_committed`), not a listing.
    """
    run, name = split_checkpoint(text)
    if not name:  # a bucket (or a store's root) has no run above it
        return None
    storage = open_storage(run)
    return (storage, name) if is_committed(storage, name) else None


def open_run(text: str) -> Storage:
    """The storage of the run at ``text`` (a path or URL); exit 2 for a missing local
    path, or for a checkpoint given where a run is expected."""
    storage = open_location(text)
    if committed_checkpoint(text) is not None:
        parent, _ = split_checkpoint(text)
        fail(f"{text} is a checkpoint, not a run; pass the run that holds it ({parent})")
    return storage


def open_checkpoint_arg(text: str) -> tuple[Storage, str]:
    """The run's storage and the name of the committed checkpoint at ``text`` (a path or
    URL); exit 2 when there is no committed checkpoint there."""
    found = committed_checkpoint(text)
    if found is None:
        open_location(text)  # a missing path, a bad URL or bucket: say that instead
        fail(f"{text} is not a checkpoint (no {MANIFEST}); pass a step-* folder of a run, "
             f"e.g. the paths `ckpts ls {text}` shows")
    return found


def metric_direction(metric: str) -> Mode | None:
    """Whether lower (``min``) or higher (``max``) values of ``metric`` are better, from the
    words of its name (:data:`LOWER_IS_BETTER`, :data:`HIGHER_IS_BETTER`); None when no
    word says, or words of both kinds do.

    Words are split at non-letters and camelCase, digits at a word's end aside
    (``rouge1``, ``top5_err``); ``exact_match`` counts as one word. The one rule that
    ``ls``, ``best``, ``prune``, ``plot`` and ``report`` apply when ``--mode`` is not given.

    Example:
        >>> [metric_direction(m) for m in ("val_loss", "eval_accuracy", "rouge1", "valPPL")]
        ['min', 'max', 'max', 'min']
        >>> [metric_direction(m) for m in ("eval_samples_per_second", "learning_rate")]
        [None, None]
    """
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", metric).lower()
    words = [word for word in re.split(r"[^a-z0-9]+", spaced) if word]
    if "_exact_match_" in f"_{'_'.join(words)}_":
        words.append("exact_match")
    words += [word.rstrip("0123456789") for word in words]
    lower = not LOWER_IS_BETTER.isdisjoint(words)
    higher = not HIGHER_IS_BETTER.isdisjoint(words)
    return None if lower == higher else "min" if lower else "max"


def ranking_mode(metric: str, mode: Mode | None) -> Mode:
    """The mode to rank ``metric`` by when one must be picked: ``mode`` if given, else the
    metric's known direction (:func:`metric_direction`), else ``min``."""
    return mode or metric_direction(metric) or "min"


def check_metric(metric: str, checkpoints: Iterable[Checkpoint]) -> None:
    """Exit 2 unless some checkpoint has ``metric``; the message lists the metrics present."""
    present = metric_names(checkpoints)
    if metric not in present:
        fail(f"no checkpoint has the metric {metric!r}; metrics present: "
             f"{', '.join(present) or 'none'}")


def metric_names(checkpoints: Iterable[Checkpoint]) -> list[str]:
    """Every metric name seen in ``checkpoints``, in first-seen order."""
    names: dict[str, None] = {}
    for checkpoint in checkpoints:
        names.update(dict.fromkeys(checkpoint.metrics))
    return list(names)


def table_metrics(checkpoints: Iterable[Checkpoint]) -> list[str]:
    """The metrics a table shows as columns: every one but ``epoch``, which Trainer logs
    as a metric and the table's epoch column shows (see :func:`epoch_cell`)."""
    return [name for name in metric_names(checkpoints) if name != EPOCH_METRIC]


def epoch_cell(checkpoint: Checkpoint) -> str:
    """A checkpoint's epoch for a table: its ``epoch`` metric where it has one (Trainer's
    fractional epoch, ``2.5``), else the epoch it was saved with, else empty."""
    if EPOCH_METRIC in checkpoint.metrics:
        return format_number(checkpoint.metrics[EPOCH_METRIC])
    return "" if checkpoint.epoch is None else str(checkpoint.epoch)


def json_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Metrics for JSON output: NaN and infinities (not valid JSON) become null."""
    return {name: value if math.isfinite(value) else None for name, value in metrics.items()}


def format_number(value: float) -> str:
    """A metric value for a table cell: four significant digits."""
    return f"{value:.4g}"


def print_json(data: Any) -> None:
    """Write ``data`` as strict JSON (no NaN) on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


def print_table(
    rows: Iterable[Sequence[str]],
    *,
    header: Sequence[str] | None = None,
    right: Collection[int] = (),
    title: str | None = None,
) -> None:
    """Print rows as aligned columns, two spaces apart, under an optional bold header.

    Why not ``rich.table.Table``: it lays out every cell through its renderer, about
    1 s for the 1,000 rows of a long run's ``ckpts ls``; this takes milliseconds.
    With no rows, nothing is printed (not even the header). Every cell, header and
    title is escaped (see :func:`printable`).

    Args:
        rows: the cells of each row, as text.
        header: column titles, printed in bold.
        right: indices of the columns to right-align (numbers, sizes).
        title: a bold line printed above the table.
    """
    body = [[printable(cell) for cell in row] for row in rows]
    if not body:
        return
    header = None if header is None else [printable(cell) for cell in header]
    lines = [header, *body] if header is not None else body
    widths = [max(cell_len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def layout(cells: list[str]) -> str:
        padded = [" " * (w - cell_len(c)) + c if i in right else c + " " * (w - cell_len(c))
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded).rstrip()

    if title is not None:
        stdout.print(Text(printable(title), style="bold"))
    if header is not None:
        stdout.print(Text(layout(header), style="bold"))
    stdout.print("\n".join(layout(line) for line in body))
