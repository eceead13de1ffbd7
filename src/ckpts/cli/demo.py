"""``ckpts demo``: train a tiny model, SIGKILL it mid-run, resume it, prove the resume bit-exact.

The training happens in worker processes (``python -m ckpts.cli.demo_training``, see
:mod:`ckpts.cli.demo_training`). This module starts them, kills the first one a few steps after
a checkpoint, starts a second one that resumes, runs an uninterrupted reference
run beside them, and renders what happened with rich: the run's ``ckpts ls``
table, what retention kept, the bit-exact check and the best checkpoint.

torch is imported only when the command runs (``ckpts.cli.demo_training`` is imported
inside the functions), so registering the command keeps ``ckpts --help`` fast.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
)
from rich.syntax import Syntax
from rich.text import Text

import ckpts
from ckpts.cli import listing
from ckpts.cli._common import EXIT_CHECK_FAILED, reports_errors, stderr
from ckpts.cli._common import stdout as ls_stdout
from ckpts.errors import InvalidArgumentError

if TYPE_CHECKING:
    from ckpts.cli.demo_training import KillPlan, Saved, TrainEvent

MARKER = ".ckpts-demo"  # written into every demo directory: only such a directory is ever wiped
REFERENCE = "reference"  # subdirectory of the uninterrupted reference run
SAMPLE_PROMPT = "the cat "


@reports_errors
def demo(
    directory: Annotated[
        Path, typer.Argument(help="Where to write the runs; an earlier demo's is replaced.")
    ] = Path("demo-run"),
    steps: Annotated[int | None, typer.Option(hidden=True, help="Steps per run.")] = None,
) -> None:
    """Train a tiny language model, kill it mid-run, resume it, and check the result bit-exact."""
    try:
        result = run_demo(directory, console=Console(), steps=steps)
    except RuntimeError as e:
        stderr.print(f"the demo failed: {e}")
        raise typer.Exit(EXIT_CHECK_FAILED) from e
    if not result.bit_exact:
        raise typer.Exit(EXIT_CHECK_FAILED)


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` found.

    Attributes:
        bit_exact: the resumed run ended bit-identical to the reference run: the
            same final weights and the same train loss at every step after the resume.
        runs: the three workers, with everything they printed.
    """

    bit_exact: bool
    runs: Runs


def run_demo(directory: Path, *, console: Console, steps: int | None = None) -> DemoResult:
    """Run the whole demo in ``directory`` and show it on ``console``.

    Args:
        directory: created, or replaced if it holds an earlier demo (the
            :data:`MARKER` file); the interrupted run's checkpoints go straight
            into it, the reference run's into ``reference/``.
        console: where everything is shown.
        steps: training steps of each run (default: ``ckpts.cli.demo_training.STEPS``).

    Returns:
        Whether the resume was bit-exact, and the workers' records.

    Raises:
        InvalidArgumentError: ``directory`` exists and was not made by the demo, or
            ``steps`` is too short to interrupt the run between two checkpoints.
        RuntimeError: a worker process failed (its output is in the message).
    """
    from ckpts.cli import demo_training as _demo

    steps = _demo.STEPS if steps is None else steps
    plan = _demo.plan_kill(steps)
    prepare_directory(directory)
    started = time.monotonic()
    corpus = _demo.make_corpus()
    per_epoch = _demo.batches_per_epoch(corpus)
    model = _demo.build_model(corpus)
    console.print(
        f"Training a {sum(p.numel() for p in model.parameters()):,}-parameter character-level "
        f"transformer for {steps} steps ({per_epoch} batches per epoch) on "
        f"{len(corpus.train_text):,} characters of generated text in [bold]{directory}"
        f"[/bold]. Every {_demo.EVAL_EVERY} steps it computes the validation loss and saves "
        f"a checkpoint if val_loss improved or {_demo.SAVE_EVERY} steps have passed; "
        f"retention keeps the {_demo.BEST_KEPT} best by val_loss plus the latest. An "
        f"uninterrupted reference run trains in {directory / REFERENCE} at the same time.\n",
        highlight=False,
    )
    runs = _train_all(directory, steps=steps, plan=plan, console=console, per_epoch=per_epoch)

    manager = ckpts.CheckpointManager(directory)
    checkpoints = manager.checkpoints()
    best = manager.best("val_loss")
    if best is not None and math.isnan(best.metrics["val_loss"]):
        best = None  # best() ranks NaN last but still returns it when nothing else is left
    final = checkpoints[-1] if checkpoints else None
    reference = ckpts.CheckpointManager(directory / REFERENCE).latest()
    if final is None or final.step != steps or reference is None or reference.step != steps:
        raise RuntimeError(f"the runs ended without a checkpoint of step {steps} in each")
    console.print()
    console.print(f"[bold]ckpts ls {directory}[/bold]", highlight=False)
    console.print(_ls_table(checkpoints), soft_wrap=True)
    console.print()
    _show_retention(console, runs, kept=[c.step for c in checkpoints],
                    best_kept=_demo.BEST_KEPT)
    console.print()
    different = _demo.differing_weights(final, reference)
    _show_comparison(console, runs, different=different, tensors=len(model.state_dict()),
                     step=final.step)
    if best is not None:
        ckpts.load_weights(best, model)
        sample = _demo.generate(model, corpus, SAMPLE_PROMPT, length=60)
        _show_best(console, best=best, last=final, sample=sample,
                   train_sentences=_demo.TRAIN_SENTENCES)
    console.print(f"\nfinished in {time.monotonic() - started:.1f} s", highlight=False)
    return DemoResult(bit_exact=not different and runs.losses_match_reference(), runs=runs)


def prepare_directory(directory: Path) -> None:
    """Make ``directory`` an empty demo directory holding only the marker file.

    An existing directory is removed only if it holds :data:`MARKER` (an earlier
    demo made it); an empty one is used as it is; anything else is refused untouched.

    Raises:
        InvalidArgumentError: ``directory`` is a file, a symlink, or a non-empty
            directory that the demo did not make.
    """
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise InvalidArgumentError(
            f"{directory} exists and is not a directory; pass another path to `ckpts demo`"
        )
    if directory.is_dir():
        if (directory / MARKER).is_file():
            shutil.rmtree(directory)
        elif any(directory.iterdir()):
            raise InvalidArgumentError(
                f"{directory} already exists and was not made by `ckpts demo` (it has no "
                f"{MARKER} file), so the demo will not delete it; pass a new directory, "
                "e.g. `ckpts demo demo-run2`"
            )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text(
        "Made by `ckpts demo`, which deletes this directory when it runs here again.\n"
    )


# --- the worker processes -------------------------------------------------------------


@dataclass
class Worker:
    """One ``python -m ckpts.cli.demo_training`` process and what it reported on stdout."""

    process: subprocess.Popen[str]
    stdout: IO[str]
    start: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    saved: list[Saved] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    @classmethod
    def launch(cls, run_dir: Path, steps: int) -> Worker:
        process = subprocess.Popen(
            [sys.executable, "-m", "ckpts.cli.demo_training", str(run_dir), "--steps", str(steps)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        if process.stdout is None:  # unreachable with stdout=PIPE; narrows the type
            raise RuntimeError("the worker has no stdout pipe")
        return cls(process, process.stdout)

    @property
    def last_step(self) -> int:
        return max(self.losses, default=self.start)

    def follow(self, on_event: Callable[[TrainEvent], None]) -> int:
        """Read stdout to the end, recording each event; returns the exit code."""
        from ckpts.cli.demo_training import Resumed, Saved, StepDone, parse_event

        for line in self.stdout:
            self.output.append(line.rstrip("\n"))
            event = parse_event(line)
            if isinstance(event, Resumed):
                self.start = event.step
            elif isinstance(event, StepDone):
                self.losses[event.step] = event.train_loss
            elif isinstance(event, Saved):
                self.saved.append(event)
            if event is not None:
                on_event(event)
        return self.process.wait()

    def failure(self, what: str) -> RuntimeError:
        tail = "\n".join(self.output[-15:])
        return RuntimeError(f"{what} (exit code {self.process.returncode}); last output:\n{tail}")


@dataclass
class Runs:
    """The three workers of a demo, once they have all exited."""

    killed: Worker
    resumed: Worker
    reference: Worker

    def written(self) -> list[Saved]:
        """Every checkpoint the interrupted run wrote (its two workers), by step."""
        return sorted({s.step: s for s in [*self.killed.saved, *self.resumed.saved]}.values(),
                      key=lambda s: s.step)

    def redone_steps(self) -> list[int]:
        return sorted(s for s in self.killed.losses if s > self.resumed.start)

    def losses_match_reference(self) -> bool:
        return all(loss == self.reference.losses.get(step)
                   for step, loss in self.resumed.losses.items())


def _train_all(directory: Path, *, steps: int, plan: KillPlan, console: Console,
               per_epoch: int) -> Runs:
    """Run the killed, then the resumed worker, and the reference worker alongside."""
    progress = Progress(
        # The bar takes what is left, so 80 columns hold every column.
        TextColumn("{task.description:<20}"), BarColumn(bar_width=None), MofNCompleteColumn(),
        TextColumn("{task.fields[status]:<16}"), TextColumn("{task.fields[saved]}"),
        console=console,
    )
    workers: list[Worker] = []
    reference_thread: threading.Thread | None = None
    try:
        with progress:
            run_task = progress.add_task("run", total=steps, status="starting", saved="")
            reference_task = progress.add_task("reference run", total=steps, status="starting",
                                               saved="")
            reference = Worker.launch(directory / REFERENCE, steps)
            workers.append(reference)
            # Its pipe must be drained while the main thread follows the other workers.
            reference_thread = threading.Thread(
                target=reference.follow, args=(_show_in(progress, reference_task),), daemon=True
            )
            reference_thread.start()

            killed = Worker.launch(directory, steps)
            workers.append(killed)
            show_run = _show_in(progress, run_task)

            def kill_when_due(event: TrainEvent) -> None:
                show_run(event)
                if event.step == plan.kill_step:  # every step is reported, so it is seen
                    os.kill(killed.process.pid, signal.SIGKILL)

            if killed.follow(kill_when_due) != -signal.SIGKILL:
                raise killed.failure("the first worker was not killed as planned")
            newest = ckpts.CheckpointManager(directory).latest()
            saved = newest.step if newest else 0
            progress.console.print(
                f"[bold red]✗ SIGKILL[/bold red] after step {killed.last_step} "
                f"({_position(killed.last_step, per_epoch)}); the newest checkpoint is step "
                f"{saved}, so the {killed.last_step - saved} steps after it are lost",
                highlight=False,
            )
            progress.update(run_task, description="run (after SIGKILL)")

            resumed = Worker.launch(directory, steps)
            workers.append(resumed)
            if resumed.follow(show_run) != 0:
                raise resumed.failure("the resumed worker failed")
            reference_thread.join()
            if reference.process.returncode != 0:
                raise reference.failure("the reference worker failed")
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        if reference_thread is not None:
            reference_thread.join()  # it reads to the end of the pipe, now closed by the kill
        for worker in workers:
            worker.stdout.close()
    runs = Runs(killed=killed, resumed=resumed, reference=reference)
    _show_resume(console, runs, per_epoch)
    return runs


def _show_in(progress: Progress, task: TaskID) -> Callable[[TrainEvent], None]:
    from ckpts.cli.demo_training import Resumed, Saved, StepDone

    def show(event: TrainEvent) -> None:
        if isinstance(event, Resumed):
            status = f"resumed from step {event.step}" if event.step else ""
            progress.update(task, completed=event.step, status=status)
        elif isinstance(event, StepDone):
            progress.update(task, completed=event.step,
                            status=f"train_loss {event.train_loss:.3f}")
        elif isinstance(event, Saved):
            progress.update(task, saved=f"ckpt {event.step} val_loss {event.val_loss:.3f}")

    return show


def _position(step: int, per_epoch: int) -> str:
    """Where step ``step`` (1-based) falls: 'batch 3/9 of epoch 14'."""
    if step == 0:
        return "before the first batch"
    return f"batch {(step - 1) % per_epoch + 1}/{per_epoch} of epoch {(step - 1) // per_epoch + 1}"


# --- rendering the results ------------------------------------------------------------


def _show_resume(console: Console, runs: Runs, per_epoch: int) -> None:
    start = runs.resumed.start
    console.print(
        f"[bold green]↻ resumed[/bold green] in a fresh process from the checkpoint of step "
        f"{start} ({_position(start, per_epoch)})", highlight=False,
    )
    redone = runs.redone_steps()
    if redone:
        same = all(runs.killed.losses[s] == runs.resumed.losses.get(s) for s in redone)
        verdict = "[green]the same[/green]" if same else "[red]different[/red]"
        console.print(
            f"  and redid steps {redone[0]} to {redone[-1]}: {verdict} train losses as before "
            "the kill", highlight=False,
        )


def _ls_table(checkpoints: list[ckpts.Checkpoint]) -> Text:
    """The table ``ckpts ls`` prints for these checkpoints, made by its own code.

    That code prints on the CLI's stdout console; capturing it there and showing it on
    the demo's console keeps everything the demo prints on one console.
    """
    with ls_stdout.capture() as captured:
        listing.print_checkpoint_table(listing.mark(checkpoints))
    return Text.from_ansi(captured.get().rstrip("\n"))


def _show_retention(console: Console, runs: Runs, *, kept: list[int], best_kept: int) -> None:
    """How many checkpoints were written and kept, and why each kept one is there."""
    written = runs.written()
    # The policy itself, applied to everything ever written (retention ran on fewer at a
    # time, but each of the best so far was always kept, so the result is the same).
    best = sorted(ckpts.KeepBest(best_kept, "val_loss").keeps(_as_checkpoints(written)))
    latest = written[-1].step if written else 0
    resumed_from = runs.resumed.start
    console.print(f"The run resumed from step {resumed_from} after the SIGKILL.",
                  highlight=False)
    console.print(
        f"Retention (KeepBest({best_kept}, \"val_loss\") + KeepLast(1)) kept {len(kept)} of "
        f"the {len(written)} checkpoints written: the {best_kept} best by val_loss (steps "
        f"{', '.join(map(str, best))}) and the latest (step {latest}), as an uninterrupted "
        "run would; the others were deleted as training went on.",
        highlight=False,
    )
    expected = sorted({*best, latest})
    if kept != expected:
        console.print(f"[red]unexpected:[/red] steps {expected} should be kept, the run "
                      f"holds {kept}", highlight=False)


def _as_checkpoints(saved: list[Saved]) -> list[ckpts.Checkpoint]:
    """Records of the checkpoints a worker reported, for a retention policy (no paths)."""
    return [ckpts.Checkpoint(step=s.step, path=Path(), metrics={"val_loss": s.val_loss})
            for s in saved]


def _metric(checkpoint: ckpts.Checkpoint, name: str) -> str:
    value = checkpoint.metrics.get(name, math.nan)
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _show_comparison(console: Console, runs: Runs, *, different: list[str], tensors: int,
                     step: int) -> None:
    if different:
        console.print(
            f"bit-exact: [bold red]NO[/bold red] - {len(different)} of {tensors} weight tensors "
            f"of step {step} differ from the reference run's: {', '.join(different[:5])}",
            highlight=False,
        )
    else:
        console.print(
            f"bit-exact: [bold green]yes[/bold green] - all {tensors} weight tensors of step "
            f"{step} equal the uninterrupted reference run's (torch.equal)",
            highlight=False,
        )
    after = sorted(runs.resumed.losses)
    matching = sum(runs.reference.losses.get(s) == runs.resumed.losses[s] for s in after)
    console.print(
        f"train losses after the resume: {matching}/{len(after)} steps "
        f"({after[0]} to {after[-1]}) identical to the reference run's",
        highlight=False,
    )


def _show_best(console: Console, *, best: ckpts.Checkpoint, last: ckpts.Checkpoint,
               sample: str, train_sentences: int) -> None:
    console.print(
        f"\nbest checkpoint: step {best.step} (val_loss {_metric(best, 'val_loss')}); "
        f"last: step {last.step} (val_loss {_metric(last, 'val_loss')})",
        highlight=False,
    )
    if best.step != last.step:
        console.print(
            f"  The model overfits its {train_sentences} training sentences: train_loss keeps "
            "falling while val_loss turns up, so the weights to keep are an earlier "
            "checkpoint, not the last one.",
            highlight=False,
        )
    console.print(f"  It continues {SAMPLE_PROMPT!r} as: [italic]{sample!r}[/italic]",
                  highlight=False)
    run = str(best.path).rsplit("/", 1)[0]
    console.print("\nShip it: export its weights (never the optimizer's), or see the run:")
    shell = (
        f"ckpts export {best.path} demo-model.safetensors --format safetensors\n"
        f"ckpts report {run} -o report.html   # curves, table, the recommendation and why\n"
    )
    _show_code(console, shell, "bash")
    console.print("Or load it into your model in Python (reads the model's file only):")
    code = (
        "import ckpts\n\n"
        f'best = ckpts.CheckpointManager("{run}").best("val_loss")\n'
        "ckpts.load_weights(best, model)  # model: a module of the same architecture\n"
    )
    _show_code(console, code, "python")


def _show_code(console: Console, code: str, language: str) -> None:
    """Code to copy: highlighted on a terminal, wrapped rather than cut; elsewhere (a pipe,
    a log file) plain, each line whole whatever the width."""
    if console.is_terminal:
        console.print(Syntax(code, language, theme="ansi_dark", word_wrap=True))
    else:
        console.print(code, soft_wrap=True, markup=False, highlight=False)
