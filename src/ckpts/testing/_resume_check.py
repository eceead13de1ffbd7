"""Proving that a user's own training command resumes exactly (``ckpts check-resume``).

The command runs three times, each time with ``{run}`` replaced by the same run
location (so a path saved in the state, such as an ``out_dir``, is the same in
both runs): ``WORKDIR/run`` by default, or any path or URL (``s3://bucket/check``):

1. run A: to completion;
2. run B: SIGKILLed (its whole process group) right after its K-th committed
   checkpoint, then run again to completion, so it resumes.

Everything goes through the storage port, so the run may live on any backend. While
run A and the resumed run B go, every checkpoint they commit is exported into the local
work folder (``a/``, ``b/``; hard links for a local run, a download from a store) as
soon as it appears, the command paused (SIGSTOP) for that moment: the command's
retention (``KeepLast(1)``) deletes checkpoints at its next save, and the comparisons
below need the ones it deletes. ``b/`` gets only what B commits after the resume. After
each run the run is destroyed, so the next one starts empty; after the kill, the newest
checkpoint is exported to ``b-at-kill/``, and the check waits until the killed run's
writer lock is free (at once on a local disk; on a store, when the killed writer's
lease expires).

Then the newest checkpoint that A and the resumed B both wrote is compared
with :func:`ckpts._checkpoint.compare.compare_checkpoints`, every tensor and every key of the
non-tensor state. When they differ, two more comparisons tell the likely cause:
the checkpoint of the kill step that both runs wrote before the kill (if that
differs, the command is not deterministic and the resume is not to blame), and
the first checkpoint B wrote after resuming (where the difference starts).

A generator the loop never draws from (numpy or python ``random`` when only torch
is used) starts from OS entropy in each process, so its state differs between two
runs without mattering. Such keys, unchanged within each run, are ignored and
named in a note: ``a/`` holds the reference for A (the kill step when A wrote it),
``b-at-kill/`` the one for B.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckpts._checkpoint.compare import CheckpointComparison, compare_checkpoints
from ckpts._format.index import read_manifest
from ckpts.errors import InvalidArgumentError, LockedError, ResumeCheckError
from ckpts.storage import MANIFEST, Listed, Storage, checkpoint_name, open_storage

log = logging.getLogger("ckpts")

RUN_PLACEHOLDER = "{run}"
_POLL_SECONDS = 0.005
_LOCK_POLL_SECONDS = 0.25
_LOG_TAIL_LINES = 15
_GROUP_EXIT_SECONDS = 5.0
_RNG = "rng"


@dataclass
class ResumeCheck:
    """What :func:`check_resume` found.

    Attributes:
        exact: True when the compared checkpoints are equal in every tensor and key.
        step: the step compared (the newest that run A has and run B wrote after
            resuming).
        killed_after: the newest step run B had committed when it was killed.
        differences: the comparison of ``step`` (ignored generators removed).
        likely_cause: for a failed check, the probable mistake in the loop.
        first_difference_step: the earliest step found to differ.
        differs_before_kill: True when the runs differ already at the checkpoint
            both saved before the kill: the command is not deterministic.
        notes: observations that help (a step saved twice, ignored generators).
        workdir: where the runs' checkpoints and logs are: ``a/`` every checkpoint run
            A committed, ``b/`` those B committed after the resume, ``b-at-kill/`` B's
            newest at the kill; removed after an exact check unless it was given.
    """

    exact: bool
    step: int
    killed_after: int
    differences: CheckpointComparison
    likely_cause: str | None = None
    first_difference_step: int | None = None
    differs_before_kill: bool = False
    notes: list[str] = field(default_factory=list)
    workdir: Path = Path()

    def report(self, *, per_object: int = 4) -> str:
        """The verdict as text: what was compared, what differs (``per_object`` keys of
        each object, with their max |diff|), the first step that differs, the cause."""
        run_b = f"the run killed after step {self.killed_after} and resumed"
        if self.exact:
            lines = [f"bit-exact: at step {self.step}, {run_b} equals the uninterrupted run "
                     f"({len(self.differences.tensors)} tensors and the non-tensor state)"]
        else:
            lines = [f"not exact: at step {self.step}, {run_b} differs from the uninterrupted "
                     f"run in {', '.join(self.differences.differing_objects)}"]
            lines += _difference_lines(self.differences, per_object)
            if self.differs_before_kill:
                lines.append(f"the runs already differ at step {self.first_difference_step}, "
                             "which both saved before the kill")
            elif self.first_difference_step not in (None, self.step):
                lines.append(f"the runs first differ at step {self.first_difference_step}, "
                             "the first checkpoint written after the resume")
            if self.likely_cause:
                lines.append(f"likely cause: {self.likely_cause}")
        lines += [f"note: {note}" for note in self.notes]
        if not self.exact and self.workdir.is_dir():
            name = checkpoint_name(self.step)
            lines.append(f"all differences: ckpts diff {self.workdir / 'a' / name} "
                         f"{self.workdir / 'b' / name}")
        return "\n".join(lines)


def check_resume(
    cmd: Sequence[str],
    *,
    kill_after_saves: int = 2,
    timeout: float = 600.0,
    workdir: str | os.PathLike[str] | None = None,
    run: str | os.PathLike[str] | None = None,
) -> ResumeCheck:
    """Run ``cmd`` whole, and killed then resumed; compare the checkpoints it saved.

    Args:
        cmd: the training command as an argv list; every ``{run}`` in it is
            replaced by the run location its CheckpointManager must use.
        kill_after_saves: SIGKILL the second run right after this many committed
            checkpoints. The command must save more often than that.
        timeout: seconds each of the three runs of the command may take.
        workdir: an empty or new directory for the logs and the checkpoints compared
            (kept afterwards). By default a temporary directory, removed when the
            check passes.
        run: where the command's run lives, a new or empty path or URL (credentials
            from the environment, as the command gets them); ``WORKDIR/run`` by
            default. It is destroyed between the runs and at the end.

    Returns:
        A :class:`ResumeCheck`; ``.exact`` is the verdict, ``.report()`` explains it.

    Raises:
        InvalidArgumentError: no ``{run}`` in ``cmd``, a bad option, or a ``run`` that
            holds checkpoints or folders already.
        ResumeCheckError: the command failed, timed out, never saved, or saved too
            few checkpoints to be killed and resumed; the message ends with its log.

    Example:
        >>> from ckpts.testing import check_resume
        >>> result = check_resume(["python", "train.py", "--out", "{run}"])  # doctest: +SKIP
        >>> assert result.exact, result.report()                                  # doctest: +SKIP
    """
    given = None if run is None else open_storage(run)
    if given is not None and (given.committed() or given.folders()):
        raise InvalidArgumentError(
            f"the run {given.location} already holds checkpoints or folders; pass a new or "
            "empty location (it is destroyed between the runs of the command)")
    argv, work, temporary = _prepare(cmd, kill_after_saves, timeout, workdir)
    live = open_storage(work / "run") if given is None else given
    runs = _Runner([arg.replace(RUN_PLACEHOLDER, live.location) for arg in argv], live,
                   timeout)
    runs.to_completion(work / "a.log", "the uninterrupted run (A)", work / "a")
    if not _committed(open_storage(work / "a")):
        raise ResumeCheckError(
            f"the command ran to completion without committing a checkpoint in {RUN_PLACEHOLDER} "
            "(no step-*/manifest.json appeared), so there is nothing to resume from; pass "
            f"{RUN_PLACEHOLDER} as the directory of its ckpts.CheckpointManager and make it "
            "call save()" + runs.log_tail(work / "a.log"))
    live.destroy()  # run B starts from nothing, as A did
    killed_after = runs.kill_after(kill_after_saves, work / "b-killed.log", work / "b-at-kill")
    runs.to_completion(work / "b-resumed.log", "the resumed run (B)", work / "b")
    live.destroy()
    result = _judge(work, killed_after)
    if result.exact and temporary:
        open_storage(work).destroy()
    return result


def _prepare(
    cmd: Sequence[str], kill_after_saves: int, timeout: float,
    workdir: str | os.PathLike[str] | None,
) -> tuple[list[str], Path, bool]:
    if isinstance(cmd, str) or not all(isinstance(arg, str) for arg in cmd) or not cmd:
        raise InvalidArgumentError(
            f"cmd must be a non-empty list of strings (an argv), got {cmd!r}; "
            "e.g. ['python', 'train.py', '--out', '{run}']")
    if not any(RUN_PLACEHOLDER in arg for arg in cmd):
        raise InvalidArgumentError(
            f"the command {' '.join(cmd)!r} has no {RUN_PLACEHOLDER}: put {RUN_PLACEHOLDER} "
            "where it takes the run directory of its CheckpointManager, so the two runs "
            "save apart, e.g. python train.py --out {run}")
    if type(kill_after_saves) is not int or kill_after_saves < 1:
        raise InvalidArgumentError(
            f"kill_after_saves must be an int >= 1, got {kill_after_saves!r}")
    if not isinstance(timeout, (int, float)) or not timeout > 0 or math.isinf(timeout):
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if workdir is None:
        return list(cmd), Path(tempfile.mkdtemp(prefix="ckpts-check-resume-")), True
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise InvalidArgumentError(
            f"workdir {work} is not empty; pass a new or empty directory (the runs are "
            "written there and kept)")
    return list(cmd), work, False


class _Runner:
    """Runs the command in its own process group, its output going to a log file."""

    def __init__(self, argv: list[str], live: Storage, timeout: float) -> None:
        self.argv = argv
        self.live = live
        self.timeout = timeout

    def to_completion(self, log_path: Path, which: str, taken: Path) -> None:
        """Run the command to its end, exporting each checkpoint it commits into the local
        folder ``taken`` as it appears (see :class:`_Taker`)."""
        taker = _Taker(self.live, taken)
        process = self._start(log_path)
        deadline = time.monotonic() + self.timeout
        try:
            while (code := process.poll()) is None:
                if time.monotonic() > deadline:
                    raise ResumeCheckError(
                        f"{which} did not finish within {self.timeout:g} s and was killed; "
                        "give the check a small configuration (a few dozen steps) or a longer "
                        "--timeout" + self.log_tail(log_path))
                started = time.monotonic()
                new = taker.new()
                listing = time.monotonic() - started
                if new:
                    taker.take(process)
                # a store's listing is a request: polling takes at most a fifth of the time
                time.sleep(max(_POLL_SECONDS, 4 * listing))
        finally:
            _kill_group(process)  # on a timeout; else the leftovers of a shell command
        if code != 0:
            raise ResumeCheckError(
                f"{which} failed with exit status {code}" + self.log_tail(log_path))
        taker.take(None)  # the last checkpoints, committed since the last poll

    def kill_after(self, saves: int, log_path: Path, snapshot: Path) -> int:
        """Start the command, SIGKILL it after ``saves`` new commits; return the newest step
        then, and export that checkpoint to ``snapshot`` (retention or a repeated save may
        remove it later). Returns once the killed run's writer lock is free, for the
        resumed run to take."""
        process = self._start(log_path)
        deadline = time.monotonic() + self.timeout
        seen: set[int] = set()
        try:
            while len(seen) < saves:
                started = time.monotonic()
                seen.update(listed.step for listed in _committed(self.live))
                listing = time.monotonic() - started
                if len(seen) >= saves:
                    break
                code = process.poll()
                if code:
                    raise ResumeCheckError(
                        f"the second run failed with exit status {code} after committing "
                        f"{len(seen)} checkpoint(s), before it could be killed after its "
                        f"checkpoint number {saves}" + self.log_tail(log_path))
                if code == 0:
                    raise ResumeCheckError(
                        f"the command finished after committing only {len(seen)} "
                        f"checkpoint(s), so it cannot be killed after checkpoint number "
                        f"{saves} and resumed; use a smaller --kill-after-saves, or make it "
                        "save more often")
                if time.monotonic() > deadline:
                    raise ResumeCheckError(
                        f"the second run committed only {len(seen)} of {saves} checkpoints "
                        f"within {self.timeout:g} s; use a longer --timeout"
                        + self.log_tail(log_path))
                # a store's listing is a request: polling takes at most a fifth of the time
                time.sleep(max(_POLL_SECONDS, 4 * listing))
        finally:
            _kill_group(process)
        committed = _committed(self.live)
        newest = committed[-1]
        self.live.export(newest.name, list(newest.sizes), snapshot)
        log.info("killed the second run after step %d", newest.step)
        self._await_writer_lock(log_path)
        return newest.step

    def _await_writer_lock(self, log_path: Path) -> None:
        """Wait until the killed run's writer lock is free: at once on a local disk (the
        kernel drops a dead process's flock); on a store, once the killed writer's lease
        expires (up to its lease time after the kill)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.live.lock()
            except LockedError as e:
                if time.monotonic() > deadline:
                    raise ResumeCheckError(
                        f"the killed run's writer lock on {self.live.location} was not freed "
                        f"within {self.timeout:g} s, so it cannot be resumed: {e}. On a store "
                        "the killed writer's lease lasts until it expires: give the command a "
                        "shorter one (FsspecStorage(url, {}, lease_seconds=...)) or a longer "
                        "--timeout" + self.log_tail(log_path)) from e
                time.sleep(_LOCK_POLL_SECONDS)
            else:
                self.live.unlock()
                return

    def _start(self, log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "wb") as log_file:
            try:
                return subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                raise ResumeCheckError(f"cannot start the command {self.argv[0]!r}: {e}") from e

    @staticmethod
    def log_tail(log_path: Path) -> str:
        lines = log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        if not lines:
            return f" (it printed nothing; log: {log_path})"
        return f"; its output ends with ({log_path}):\n" + "\n".join(f"  {x}" for x in lines)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group and wait (a few seconds at most) until it is gone,
    so that nothing of a killed run still writes when the next run starts."""
    with contextlib.suppress(ProcessLookupError):  # the group has ended already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + _GROUP_EXIT_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # anyone left (a shell's child being torn down)?
        except ProcessLookupError:
            return
        time.sleep(_POLL_SECONDS)


class _Taker:
    """Exports each checkpoint a running command commits into a local folder (a run of its
    own), so that the command's retention cannot delete it before the check compares it.

    A checkpoint is new when its name is, or when its manifest changed (the step was saved
    again); those committed when the taker is made (the killed run's, for the resumed run)
    are not taken. While it exports, the command's process group is stopped (SIGSTOP,
    then SIGCONT), so that no save and no retention deletes anything meanwhile; a
    checkpoint deleted between two polls, when the command saves twice in one, is missed.
    """

    def __init__(self, live: Storage, folder: Path) -> None:
        self.live, self.folder = live, folder
        self.taken = open_storage(folder)
        # name -> the manifest of the version seen last
        self.manifests = {listed.name: manifest for listed, manifest in self._manifests()}

    def new(self) -> list[tuple[Listed, bytes]]:
        """The checkpoints not taken yet, with their manifests."""
        return [(listed, manifest) for listed, manifest in self._manifests()
                if self.manifests.get(listed.name) != manifest]

    def take(self, process: subprocess.Popen[bytes] | None) -> None:
        """Export the checkpoints not taken yet; ``process``, while it runs, is stopped
        meanwhile."""
        with _stopped(process):
            for listed, manifest in self.new():  # listed again, now that nothing moves
                if self.taken.sizes(listed.name):  # the step saved again in this run
                    self.taken.delete(listed.name)
                try:
                    self.live.export(listed.name, list(listed.sizes), self.folder / listed.name)
                except FileNotFoundError:  # deleted before the SIGSTOP landed; a newer one is there
                    self.taken.delete(listed.name)
                    continue
                self.manifests[listed.name] = manifest

    def _manifests(self) -> Iterator[tuple[Listed, bytes]]:
        for listed in _committed(self.live):
            try:
                yield listed, self.live.read(listed.name, MANIFEST)
            except FileNotFoundError:  # deleted since the listing
                continue


@contextlib.contextmanager
def _stopped(process: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """Stop the command's process group (SIGSTOP) for the block; ``None``: nothing to stop."""
    if process is None:
        yield
        return
    with contextlib.suppress(ProcessLookupError):  # it has just ended
        os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)


def _committed(run: Storage) -> list[Listed]:
    """The committed checkpoints of a run, oldest first."""
    return sorted(run.committed(), key=lambda listed: listed.step)


def _judge(work: Path, killed_after: int) -> ResumeCheck:
    """Compare the runs' checkpoints, taken into ``work``: ``a/`` every one run A
    committed, ``b/`` those B committed after the resume, ``b-at-kill/`` B's newest at
    the kill."""
    run_a, run_b, at_kill = work / "a", work / "b", work / "b-at-kill"
    steps_a = [listed.step for listed in _committed(open_storage(run_a))]
    written_after = [listed.step for listed in _committed(open_storage(run_b))]
    common = [step for step in written_after if step in steps_a]
    if not common:
        raise ResumeCheckError(
            f"after the resume from step {killed_after}, the command committed no checkpoint "
            f"at a step the uninterrupted run also has (uninterrupted: {steps_a}; resumed: "
            f"{written_after}), so there is nothing to compare; make it save after the kill "
            "point (a smaller --kill-after-saves)")
    notes = []
    repeated = [step for step in written_after if step <= killed_after]
    if repeated:
        notes.append(
            f"after resuming from step {killed_after}, the command saved step(s) "
            f"{', '.join(map(str, repeated))} again: a resumed loop should not repeat the "
            "evaluation and save of the step it restored")
    step = common[-1]
    name = checkpoint_name(step)
    reference_a = next((s for s in [killed_after, *steps_a] if s != step and s in steps_a), None)
    ignored = _unused_generator_keys(
        compare_checkpoints(run_a / name, run_b / name, objects={_RNG}),
        None if reference_a is None else (run_a / name, run_a / checkpoint_name(reference_a)),
        (run_b / name, at_kill))
    if ignored:
        notes.append(f"ignored {', '.join(sorted(ignored))}: they differ between the two "
                     "processes but neither run drew from them (seeded from OS entropy, unused)")
    newest = _without(compare_checkpoints(run_a / name, run_b / name), ignored)
    result = ResumeCheck(exact=newest.equal, step=step, killed_after=killed_after,
                         differences=newest, notes=notes, workdir=work)
    if result.exact:
        return result
    if killed_after in steps_a:
        before = _without(compare_checkpoints(run_a / checkpoint_name(killed_after), at_kill),
                          ignored)
        if not before.equal:
            result.first_difference_step, result.differs_before_kill = killed_after, True
            result.likely_cause = (
                f"the command is not deterministic: both runs saved step {killed_after} before "
                f"the kill, and they already differ there (in "
                f"{', '.join(before.differing_objects)}). Seed every generator (torch, numpy, "
                "random), call torch.use_deterministic_algorithms(True) and fix the data "
                "order; only then can the resume be judged")
            return result
    first = common[0]
    earliest = newest if first == step else _without(
        compare_checkpoints(run_a / checkpoint_name(first), run_b / checkpoint_name(first)),
        ignored)
    diagnosed, result.first_difference_step = \
        (newest, step) if earliest.equal else (earliest, first)
    result.likely_cause = _likely_cause(diagnosed, result.first_difference_step,
                                        read_manifest(open_storage(run_a), name)["objects"])
    return result


def _unused_generator_keys(
    between_runs: CheckpointComparison,
    within_a: tuple[Path, Path] | None,
    within_b: tuple[Path, Path],
) -> set[str]:
    """RNG keys that differ between the runs but did not change within either run."""
    if within_a is None:
        return set()
    differing = _keys(between_runs)
    changed = _keys(compare_checkpoints(*within_a, objects={_RNG})) \
        | _keys(compare_checkpoints(*within_b, objects={_RNG}))
    return differing - changed


def _keys(comparison: CheckpointComparison) -> set[str]:
    """The differing tensor keys (``rng/numpy.keys``) and state paths (``rng.python.1``)."""
    return {row.key for row in comparison.differing_tensors} | {d.path for d in comparison.state}


def _without(comparison: CheckpointComparison, ignored: set[str]) -> CheckpointComparison:
    return CheckpointComparison(
        tensors=[row for row in comparison.tensors
                 if not (row.key in ignored and row.status == "changed")],
        state=[d for d in comparison.state if d.path not in ignored])


def _likely_cause(
    comparison: CheckpointComparison, step: int, objects: dict[str, dict[str, object]]
) -> str:
    """The probable mistake, read from which objects differ at ``step`` (see the README)."""
    differing = set(comparison.differing_objects)
    kinds = {name: str(objects.get(name, {}).get("kind", "object")) for name in differing}
    loaders = {name for name in differing
               if objects.get(name, {}).get("class") == "ResumableLoader"}
    missing = sorted({row.object for row in comparison.differing_tensors
                      if row.status in ("only_in_a", "only_in_b")}
                     | {d.object for d in comparison.state if "." not in d.path})
    weights = {name for name, kind in kinds.items() if kind == "module"}
    if missing:
        return (f"the resumed run saves different state ({', '.join(missing)}): some objects "
                "or keys exist in one run only; build the same TrainState before restore()")
    if loaders:
        return (f"data position: at step {step} the loader state ({', '.join(sorted(loaders))}) "
                "differs, so the resumed run is elsewhere in the data. A batch drawn before "
                "save() and not in the state (a prefetch) is skipped after restore(); or the "
                "loader is re-created or re-iterated after restore()")
    if _RNG in differing and not weights:
        return (f"RNG: at step {step} the random generators differ while the weights are "
                "equal, so between restore() and that save() the resumed run drew another "
                "amount of random numbers than the uninterrupted run did: typically a batch "
                "drawn before save() (a prefetch) and drawn again after restore(), or the "
                "evaluation of the restored step repeated after the resume")
    if _RNG in differing:
        return (f"RNG and weights: by step {step} the resumed run drew different random "
                "numbers (a batch, dropout masks) and trained on them: typically a batch "
                "drawn before save() (a prefetch) that is not in the state and is drawn anew "
                "after restore(), or an evaluation repeated for the restored step")
    if any(row.key.endswith(".step") and kinds.get(row.object) == "optimizer"
           for row in comparison.differing_tensors):
        return (f"optimizer: by step {step} it stepped a different number of times, so the "
                "resumed run repeated or skipped a training step around the restored one")
    if any(kinds.get(d.object) in ("optimizer", "scheduler") for d in comparison.state):
        return (f"optimizer hyperparameters differ at step {step} (e.g. the learning rate): "
                "the LR scheduler is not in the TrainState, or it is stepped differently "
                "after restore()")
    if differing <= {name for name, kind in kinds.items() if kind in ("module", "optimizer")}:
        return (f"only the weights (and optimizer moments) differ at step {step}, with the "
                "same random draws and data position: the resumed run trained on something "
                "else. Work done between the data draw and save() is lost on resume: a "
                "prefetched batch, or an accumulated gradient or loss, that is not in the state")
    return (f"the state of {', '.join(sorted(differing))} differs at step {step}: state kept "
            "outside the saved objects (a plain variable, a config dict) is not restored; "
            "give it a Stateful object in the TrainState")


def _difference_lines(comparison: CheckpointComparison, per_object: int) -> list[str]:
    """The differing keys with their max |diff|, at most ``per_object`` for each object."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for row in comparison.differing_tensors:
        what = (f"{row.max_abs_diff:.3g}" if row.max_abs_diff is not None
                else "nan" if row.status == "changed" else row.status.replace("_", " "))
        rows.setdefault(row.object, []).append((row.key, what))
    for difference in comparison.state:
        rows.setdefault(difference.object, []).append(
            (difference.path, f"{difference.a} -> {difference.b}"))
    shown = [(key, what) for name in sorted(rows) for key, what in rows[name][:per_object]]
    if not shown:
        return []
    width = max(len(key) for key, _ in shown)
    lines = [f"  {'key'.ljust(width)}  max |diff|"]
    for name in sorted(rows):
        lines += [f"  {key.ljust(width)}  {what}" for key, what in rows[name][:per_object]]
        if len(rows[name]) > per_object:
            lines.append(f"  ... and {len(rows[name]) - per_object} more in {name}")
    return lines
