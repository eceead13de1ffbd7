"""Where checkpoint bytes go: a local run directory with an atomic, durable commit.

Layout of a run directory::

    run/
      step-00000500/            committed: holds manifest.json (written last)
      .tmp-step-00000600-ab12/  a save in progress (or killed): never listed
      .trash-step-00000100-cd34/ a checkpoint being deleted: never listed
      .replaced-step-00000500-ef56/ an older checkpoint of a step being saved again

A save writes into a ``.tmp-`` sibling, fsyncs every file and the directory, then
renames it into place and fsyncs the parent, so a checkpoint either exists whole
or not at all. Deletion renames to ``.trash-`` first, then removes, so no reader
sees a half-deleted checkpoint as valid.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from ckpts._manifest import MANIFEST
from ckpts._parallel import run_parallel

log = logging.getLogger("ckpts")

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_REPLACED_PREFIX = ".replaced-"
# Enough concurrent fsyncs to share one journal commit, few enough to stay cheap.
_FSYNC_THREADS = 16


def checkpoint_name(step: int) -> str:
    """Directory name for a step: ``step-00000500``."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step in a checkpoint directory name, or None if it is not one."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def committed_dirs(run: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint directories (those with a manifest), ascending by step.

    A symlink is never a checkpoint: it could point anywhere.
    """
    found = []
    with os.scandir(run) as entries:
        for entry in entries:
            step = parse_step(entry.name)
            if step is not None and not entry.is_symlink() \
                    and os.path.isfile(os.path.join(entry.path, MANIFEST)):
                found.append((step, Path(entry.path)))
    return sorted(found)


def new_staging_dir(run: Path, step: int) -> Path:
    """Create an empty temporary sibling to write a checkpoint into."""
    run.mkdir(parents=True, exist_ok=True)
    staging = run / f"{_TMP_PREFIX}{checkpoint_name(step)}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def commit(staging: Path, step: int) -> Path:
    """Make a fully written staging directory durable, then atomically move it into place.

    Every file in it and the directory itself are fsynced together first (see
    :func:`_make_durable`), so the rename can only publish complete data. An
    existing checkpoint of the same step is replaced: it is set aside first and
    removed only after the new one is in place, so a crash in between leaves one
    of the two committed (see :func:`remove_leftovers`).
    """
    _make_durable(staging)
    final = staging.parent / checkpoint_name(step)
    replaced = _rename_aside(final, _REPLACED_PREFIX) if final.exists() else None
    os.rename(staging, final)
    fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)
    return final


def _make_durable(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself, concurrently.

    Concurrent fsyncs share one journal commit (ext4, xfs), where one after another
    each pays for its own: for a small checkpoint this is most of the save's time.
    """
    with os.scandir(directory) as entries:
        paths = [e.path for e in entries if e.is_file(follow_symlinks=False)]
    fds: list[int] = []
    try:
        fds += [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
        fds.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        run_parallel(os.fsync, fds, threads=_FSYNC_THREADS)
    finally:
        for fd in fds:
            os.close(fd)


def delete(path: Path) -> None:
    """Delete a committed checkpoint: first out of the listing, then from disk.

    A checkpoint that is already gone (removed by another program) counts as deleted.
    """
    try:
        aside = _rename_aside(path, _TRASH_PREFIX)
    except FileNotFoundError:
        log.info("%s was already gone when retention came to delete it", path)
        return
    shutil.rmtree(aside)


def _rename_aside(path: Path, prefix: str) -> Path:
    aside = path.parent / f"{prefix}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, aside)
    fsync_dir(path.parent)
    return aside


def remove_leftovers(run: Path, *, check_manifests: bool = True) -> list[Path]:
    """Remove what killed saves and deletions left behind. Returns what was removed.

    Staging and trash directories go, and so do ``step-*`` directories that have no
    manifest (never committed; finding those costs a stat per checkpoint, skipped
    with ``check_manifests=False``). If a crash hit between setting aside an older
    checkpoint of the same step and renaming its replacement in, the older one is
    put back instead of being deleted.
    """
    removed: list[Path] = []
    if not run.is_dir():
        return removed
    with os.scandir(run) as scan:  # names and types only: no stat per entry
        entries = sorted((e for e in scan if e.is_dir(follow_symlinks=False)),
                         key=lambda e: e.name)
    for entry in entries:
        name, path = entry.name, Path(entry.path)
        if name.startswith(_REPLACED_PREFIX):
            original = run / name[len(_REPLACED_PREFIX) :].rsplit("-", 1)[0]
            if not original.exists():
                os.rename(path, original)
                log.warning("restored %s after an interrupted replace", original)
                continue
        elif not name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and (
            not check_manifests or parse_step(name) is None or (path / MANIFEST).is_file()
        ):
            continue
        shutil.rmtree(path)
        removed.append(path)
    if removed:
        fsync_dir(run)
        log.info("removed %d leftover(s) of interrupted saves in %s", len(removed), run)
    return removed


# What other frameworks leave in a folder: torch.save, Lightning, Hugging Face Trainer.
_FOREIGN_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def foreign_checkpoints(directory: Path) -> list[str]:
    """Names in ``directory`` that look like another framework's checkpoints."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [n for n in names if n.endswith(_FOREIGN_SUFFIXES)
            or (n.startswith("checkpoint-") and (directory / n).is_dir())]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
