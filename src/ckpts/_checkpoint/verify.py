"""Integrity checks: does a checkpoint's every file match its manifest? (no torch)

A check reads the manifest and its indexes, streams every file through its xxh3-128
hashes (:func:`check_files`) and compares each safetensors header with the manifest's
entries. None of that needs tensors, so ``ckpts verify`` answers without importing
torch.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import xxhash

from ckpts._format.catalog import is_committed, open_checkpoint
from ckpts._format.headers import read_header
from ckpts._format.index import read_manifest
from ckpts._format.manifest import HASH_PREFIX, manifest_tensor_entries
from ckpts.errors import CheckpointError, CorruptCheckpointError, NotACheckpointError
from ckpts.storage import open_storage
from ckpts.storage._port import MANIFEST, Range, Storage

log = logging.getLogger("ckpts")

# a file is read this many bytes at a time, several windows in flight
VERIFY_WINDOW = 16 * 1024 * 1024
_WINDOWS_IN_FLIGHT = 4


def verify(path: str | os.PathLike[str], *,
           storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Check a checkpoint (or every checkpoint of a run) against its manifest.

    Reads every file once and compares its size and xxh3-128 hashes with the
    manifest (format v2: the header and each tensor have their own), then checks
    each tensor's dtype, shape and byte range in its file's header.

    Args:
        path: a checkpoint (``run/step-00000500``) or a run: a directory or a URL
            (``s3://bucket/run``).
        storage_options: for a URL, the options of its fsspec filesystem
            (credentials, endpoint); default: the AWS variables.

    Returns:
        The problems found, one line each (prefixed with the checkpoint's name for
        a run); an empty list means intact. A checkpoint of the run deleted while it
        was being checked (by retention or a prune) is not a problem: it is skipped.

    Raises:
        NotACheckpointError: ``path`` is neither a committed checkpoint nor a run
            holding any, or it is a checkpoint that was deleted while being checked.

    Example:
        >>> problems = ckpts.verify("runs/exp1/step-00000500")  # doctest: +SKIP
        >>> assert not problems, "\\n".join(problems)           # doctest: +SKIP
    """
    storage, name = open_checkpoint(path, storage_options)
    if MANIFEST in storage.sizes(name):
        problems = verify_listed(storage, name)
        if problems is None:
            raise NotACheckpointError(deleted_while_verifying(storage.where(name)))
        return problems
    run = open_storage(path, storage_options)
    checkpoints = sorted(run.committed(), key=lambda entry: entry.step)
    if not checkpoints:
        raise NotACheckpointError(
            f"{path} is not a checkpoint (no {MANIFEST}) nor a run holding any; "
            "pass a run or one of its step-* checkpoints"
        )
    found = []
    for entry in checkpoints:
        problems = verify_listed(run, entry.name, entry.sizes)
        if problems is None:
            log.info("%s was deleted while verifying the run (retention or prune?)",
                     run.where(entry.name))
        found += [f"{entry.name}: {problem}" for problem in problems or []]
    return found


def verify_listed(storage: Storage, name: str,
                  sizes: Mapping[str, int] | None = None) -> list[str] | None:
    """The problems of a checkpoint that a listing found committed (see
    :func:`verify_checkpoint`), or None when it was deleted since (by retention, a
    prune): its manifest is gone, so what went missing was deleted, not damaged. A file
    missing beside a manifest that is still there is damage."""
    problems = verify_checkpoint(storage, name, sizes)
    if not problems:
        return problems
    try:
        return problems if is_committed(storage, name) else None
    except OSError:  # cannot tell: report what the check found
        return problems


def deleted_while_verifying(where: str) -> str:
    """The error for a checkpoint named on its own that was deleted while it was checked."""
    return (f"{where} was deleted while it was being verified (by retention or a prune?); "
            "verify the run to check the checkpoints it holds now")


def verify_checkpoint(storage: Storage, name: str,
                      sizes: Mapping[str, int] | None = None) -> list[str]:
    """The problems of one checkpoint; empty when intact. ``sizes``: its files' sizes,
    when a listing of the run already has them (else the checkpoint is listed)."""
    where = storage.where(name)
    try:
        listed = storage.sizes(name) if sizes is None else sizes
        manifest = read_manifest(storage, name, sizes=listed)
        check_file_sizes(where, manifest, listed)
        problems = check_files(storage, name, manifest)
    except (CheckpointError, OSError) as e:
        return [str(e)]
    if problems:
        return problems
    headers: dict[str, Any] = {}
    for obj_name, obj in manifest["objects"].items():
        for key, entry in manifest_tensor_entries(obj).items():
            # format v3: each rank's shard is a tensor of the shard's size in its own file
            pieces = [(s.file, s.size, s.begin, s.end) for s in entry.shards] or [
                (entry.file, entry.shape, entry.begin, entry.end)]
            for file, shape, begin, end in pieces:
                try:
                    if file not in headers:
                        nbytes = manifest["files"][file]["nbytes"]
                        headers[file] = read_header(storage, name, file, nbytes)
                except (CheckpointError, OSError) as e:
                    problems.append(str(e))
                    return problems
                found = headers[file].get(key)
                ranged = entry.hash is not None or bool(entry.shards)
                expected = (entry.dtype, shape) + ((begin, end) if ranged else ())
                actual = found and (found.dtype, found.shape) + (
                    (found.begin, found.end) if ranged else ())
                if actual != expected:
                    problems.append(
                        f"{where}/{file}: tensor {key!r} of {obj_name!r} is "
                        f"{'absent' if found is None else f'{found.dtype}{list(found.shape)}'} "
                        f"in the file's header, the manifest says {entry.dtype}{list(shape)}"
                        + (f" at bytes {begin}..{end}" if ranged else ""))
    return problems


def check_file_sizes(where: str, manifest: dict[str, Any], sizes: Mapping[str, int]) -> None:
    """Cheap check before reading: every file exists with its recorded size.

    Raises:
        CorruptCheckpointError: naming the first file that is missing or resized.
    """
    for file, record in manifest["files"].items():
        if file not in sizes:
            raise CorruptCheckpointError(f"{where}/{file}: missing (or not a regular file)")
        if sizes[file] != record["nbytes"]:
            raise CorruptCheckpointError(
                f"{where}/{file}: {sizes[file]} bytes, manifest says {record['nbytes']} "
                "(truncated or overwritten)")


def check_files(storage: Storage, name: str, manifest: Mapping[str, Any]) -> list[str]:
    """Stream every file of a checkpoint through its hashes; the problems found.

    Each file is read in windows of :data:`VERIFY_WINDOW` bytes (a few in flight),
    so memory stays small whatever the checkpoint's size. v2 tensor files: the
    header and each tensor against their own hashes; other files: the whole file.
    """
    spans: dict[str, list[tuple[int, int, str, str]]] = defaultdict(list)
    for file, record in manifest["files"].items():
        if "header" in record:
            spans[file].append((0, record["header"], record["hash"], "its header"))
        else:
            spans[file].append((0, record["nbytes"], record["hash"], "its content"))
    for obj in manifest["objects"].values():
        for key, info in obj["tensors"].items():
            for piece in info.get("shards", [info]):  # format v3: each rank's piece
                if "offsets" in piece:
                    begin, end = piece["offsets"]
                    spans[piece["file"]].append((begin, end, piece["hash"], f"tensor {key!r}"))
    problems = []
    for file, file_spans in spans.items():
        problem = _stream_hashes(storage, name, file, sorted(file_spans))
        if problem:
            problems.append(f"{storage.where(name)}/{file}: {problem}")
    return problems


def _stream_hashes(storage: Storage, name: str, file: str,
                   spans: list[tuple[int, int, str, str]]) -> str | None:
    """Read ``file`` once, in order, feeding each span's bytes to its own hasher."""
    end = max((span[1] for span in spans), default=0)
    hashers = [xxhash.xxh3_128() for _ in spans]
    window_span = VERIFY_WINDOW * _WINDOWS_IN_FLIGHT
    for start in range(0, end, window_span):
        views = [memoryview(bytearray(min(VERIFY_WINDOW, end - offset)))
                 for offset in range(start, min(end, start + window_span), VERIFY_WINDOW)]
        storage.read_ranges(name, [Range(file, start + i * VERIFY_WINDOW, view)
                                   for i, view in enumerate(views)])
        data = b"".join(views) if len(views) > 1 else views[0]
        for (begin, stop, _, _), hasher in zip(spans, hashers, strict=True):
            low, high = max(begin, start), min(stop, start + len(data))
            if low < high:
                hasher.update(memoryview(data)[low - start: high - start])
    for (_, _, expected, what), hasher in zip(spans, hashers, strict=True):
        actual = HASH_PREFIX + hasher.hexdigest()
        if actual != expected:
            return f"content hash of {what} is {actual}, the manifest says {expected}"
    return None
