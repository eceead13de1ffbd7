"""Integrity checks: does a checkpoint's every file match its manifest?"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckpts._format import read_header
from ckpts._manifest import MANIFEST, hash_file, manifest_tensor_entries, read_manifest
from ckpts._storage import committed_dirs
from ckpts.errors import CheckpointError, CorruptCheckpointError, NotACheckpointError


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Check a checkpoint (or every checkpoint of a run) against its manifest.

    Reads every file once and compares its size and xxh3-128 hash with the
    manifest, then checks each tensor's dtype, shape and byte range in its file.

    Args:
        path: a checkpoint directory (``run/step-00000500``) or a run directory.

    Returns:
        The problems found, one line each (prefixed with the checkpoint directory
        for a run); an empty list means intact.

    Raises:
        NotACheckpointError: ``path`` is neither a committed checkpoint nor a run
            holding any.

    Example:
        >>> problems = ckpts.verify("runs/exp1/step-00000500")  # doctest: +SKIP
        >>> assert not problems, "\\n".join(problems)           # doctest: +SKIP
    """
    directory = Path(path)
    if (directory / MANIFEST).is_file():
        return verify_checkpoint(directory)
    checkpoints = committed_dirs(directory) if directory.is_dir() else []
    if not checkpoints:
        raise NotACheckpointError(
            f"{directory} is not a checkpoint (no {MANIFEST}) nor a run holding any; "
            "pass a run directory or one of its step-* checkpoints"
        )
    return [f"{ckpt.name}: {problem}" for _, ckpt in checkpoints
            for problem in verify_checkpoint(ckpt)]


def verify_checkpoint(directory: Path) -> list[str]:
    """The problems of one checkpoint directory; empty when intact."""
    try:
        manifest = read_manifest(directory)
    except (CheckpointError, OSError) as e:
        return [str(e)]
    problems = []
    for name, record in manifest["files"].items():
        problem = check_file(directory / name, record["nbytes"], record["hash"])
        if problem:
            problems.append(problem)
    if problems:
        return problems
    for obj_name, obj in manifest["objects"].items():
        headers = {}
        for key, entry in manifest_tensor_entries(obj).items():
            try:
                if entry.file not in headers:
                    headers[entry.file] = read_header(directory / entry.file)[0]
            except (CheckpointError, OSError) as e:
                problems.append(str(e))
                break
            found = headers[entry.file].get(key)
            if found is None or (found.dtype, found.shape) != (entry.dtype, entry.shape):
                problems.append(
                    f"{directory / entry.file}: tensor {key!r} of {obj_name!r} is "
                    f"{'absent' if found is None else f'{found.dtype}{list(found.shape)}'}, "
                    f"manifest says {entry.dtype}{list(entry.shape)}"
                )
    return problems


def check_file(path: Path, nbytes: int, expected_hash: str) -> str | None:
    """The problem with one file (missing, resized, other hash), or None."""
    problem = _size_problem(path, nbytes)
    if problem:
        return problem
    actual = hash_file(path)
    if actual != expected_hash:
        return f"{path}: content hash {actual} differs from the manifest's {expected_hash}"
    return None


def check_file_sizes(directory: Path, manifest: dict[str, Any]) -> None:
    """Cheap check before reading: every file exists with its recorded size.

    Raises:
        CorruptCheckpointError: naming the first file that is missing or resized.
    """
    for name, record in manifest["files"].items():
        problem = _size_problem(directory / name, record["nbytes"])
        if problem:
            raise CorruptCheckpointError(problem)


def _size_problem(path: Path, nbytes: int) -> str | None:
    if path.is_symlink() or not path.is_file():
        return f"{path}: missing (or not a regular file)"
    size = path.stat().st_size
    if size != nbytes:
        return f"{path}: {size} bytes, manifest says {nbytes} (truncated or overwritten)"
    return None
