"""``ckpts check-resume`` on loops whose retention keeps one checkpoint (or the best and the
last): exact loops pass, a loop that loses its prefetched batch is still caught.

The loop is ``resume_loop_keep_one.py``, nanoGPT-shaped with a ``--out_dir=`` option; each
check runs it three times (about 2 s a run, mostly importing torch). Retention deletes
each checkpoint at the next save, so the check must take them as they are committed:
before it did, the unused-generator filter lost its reference in run A and an exact
loop was reported "not exact" in ``rng/numpy.keys`` and ``rng.python.1``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ckpts.storage import MANIFEST, checkpoint_name

CKPTS = str(Path(sys.executable).parent / "ckpts")
LOOP = str(Path(__file__).with_name("resume_loop_keep_one.py"))


def check_resume_cli(work: Path, *loop_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CKPTS, "check-resume", "--workdir", str(work), "--",
         sys.executable, LOOP, "--out_dir={run}", *loop_args],
        capture_output=True, text=True, timeout=240)


def taken(folder: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step-"))
                  for p in folder.glob(f"step-*/{MANIFEST}"))


def test_a_loop_that_keeps_its_last_checkpoint_only_resumes_bit_exact(tmp_path: Path) -> None:
    work = tmp_path / "work"

    result = check_resume_cli(work, "--keep=last")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("bit-exact: at step 24, the run killed after step ")
    assert "note: ignored rng.python.1, rng/numpy.keys" in result.stdout
    killed_after = int(result.stdout.split("killed after step ")[1].split()[0])
    # the run kept step 24 alone; the check took the others as they were committed
    assert taken(work / "a") == [6, 12, 18, 24]
    # b/ holds what the resumed run wrote, nothing from before the kill
    assert taken(work / "b")[0] > killed_after and taken(work / "b")[-1] == 24
    assert (work / "b-at-kill" / MANIFEST).is_file()


def test_a_loop_that_keeps_the_best_and_the_last_resumes_bit_exact(tmp_path: Path) -> None:
    result = check_resume_cli(tmp_path / "work", "--keep=best_and_last")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("bit-exact: at step 24, the run killed after step ")


def test_a_loop_that_keeps_one_checkpoint_and_loses_its_prefetch_is_not_exact(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"

    result = check_resume_cli(work, "--keep=last", "--lose_prefetch")

    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("not exact: at step 24, the run killed after step ")
    assert lines[0].endswith("differs from the uninterrupted run in model, optimizer")
    # the generators the loop never draws from are still told apart from the real difference
    assert "note: ignored rng.python.1, rng/numpy.keys" in result.stdout
    # the first checkpoint after the resume differs already, although retention deleted
    # it from the run: it was taken when it was committed
    first = taken(work / "b")[0]
    assert f"the runs first differ at step {first}, the first checkpoint written after" \
        in result.stdout
    assert "likely cause: only the weights (and optimizer moments) differ" in result.stdout
    assert lines[-1] == (f"all differences: ckpts diff {work / 'a' / checkpoint_name(24)} "
                         f"{work / 'b' / checkpoint_name(24)}")
