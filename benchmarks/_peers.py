"""The operations being compared: ckpts and its peers, each as an ``Op`` (dir -> result).

Saves write into the directory they are given and fsync what they write. Restores
and weights-only loads read a checkpoint written earlier (a file warm in the page
cache) into a live, identically shaped target workload.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import ckpts
from benchmarks._measure import Deferred, Op, run_rounds
from benchmarks._workloads import Workload

# DCP without a process group runs as a single process and says so on every call.
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")

NOTES = [
    "Saves include fsync of every file (ckpts also hashes, fsyncs directories and commits "
    "atomically; the peers do not).",
    "Restores and weights-only loads read files that are warm in the page cache (all formats "
    "alike; caches are not dropped). Exception: at 'large' the four formats' files (~24 GB) "
    "outgrow the page cache, so restores partly read from disk.",
    "Hashing: ckpts has no switch to turn it off, so xxh3-128 over the same bytes is timed "
    "separately; its ratio is its share of a ckpts save in the same round.",
    "Peak extra RSS: max of /proc/self/statm resident pages sampled every ~1 ms during one "
    "untimed run, minus the value just before it; % of the state's tensor bytes. 'anon' "
    "leaves out file pages mapped with mmap (reclaimable page cache).",
    "Async stall: one manager (ckpts) reused across saves, after one untimed warm-up save; "
    "the background write is waited for outside the clock. DCP async_save on CPU stages a "
    "fresh copy per call (its staging cache needs pinned memory).",
    "'1 run': timed once (in its memory run, sampler on) instead of in every round, being "
    "too slow for the time budget (DCP and torch.load at many_small, or > 20 s); its ratio "
    "is of the medians. An op still running after 90 s is interrupted and shown as such.",
    "Each round runs the contenders in a new seeded random order: on this VM an op's time "
    "depends on the op run just before it, so a fixed rotation would favour some.",
    "The machine is shared: other processes may run during the benchmark.",
]

TORCH_FILE = "state.pt"
SAFETENSORS_FILE = "state.safetensors"
WRITE_CHUNK = 256 * 2**20

LABELS = {"torch.save": "torch.save + fsync", "safetensors": "safetensors save_file + fsync",
          "DCP": "DCP save ({threads} threads)", "clone": "clone() of the state (floor)",
          "write": "one file write + fsync (disk floor)",
          "write4": "4 files on 4 threads + fsync (disk floor)",
          "restore/torch.load": "torch.load + load_state_dict",
          "restore/safetensors": "safetensors load_file + copy_",
          "restore/DCP": "DCP load (in place)",
          "weights/safetensors": "safetensors load_file + load_state_dict"}


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- saves


def ckpts_save(w: Workload) -> Op:
    state = ckpts.TrainState(model=w.model, optimizer=w.optimizer)

    def run(d: Path) -> Deferred:
        manager = ckpts.CheckpointManager(d)
        manager.save(1, state)
        return Deferred(manager.close)  # releases the run's lock file, untimed
    return run


def torch_save(w: Workload) -> Op:
    def run(d: Path) -> None:
        with open(d / TORCH_FILE, "wb") as f:
            torch.save(w.torch_state(), f)
            f.flush()
            os.fsync(f.fileno())
    return run


def safetensors_save(w: Workload) -> Op:
    def run(d: Path) -> None:
        safetensors.torch.save_file(w.flat(), d / SAFETENSORS_FILE)
        fsync_path(d / SAFETENSORS_FILE)
    return run


def dcp_save(w: Workload, threads: int) -> Op:
    def run(d: Path) -> None:
        dcp.save(w.torch_state(),
                 storage_writer=FileSystemWriter(d, sync_files=True, thread_count=threads))
    return run


def clone_floor(w: Workload) -> Op:
    """A bare clone() of every tensor: what any async save must at least stage."""
    def run(d: Path) -> list[torch.Tensor]:
        return [t.clone() for t in w.flat().values()]
    return run


def write_floor(w: Workload, files: int = 1) -> Op:
    """The state's byte count written to ``files`` files (one thread each) in 256 MiB
    writes of the state's first 256 MiB, then fsync: what the disk itself allows."""
    total = w.nbytes()
    pieces, have = [], 0
    for tensor in w.flat().values():
        if have >= WRITE_CHUNK:
            break
        piece = tensor.reshape(-1).view(torch.uint8)[: WRITE_CHUNK - have]
        pieces.append(piece)
        have += piece.numel()
    view = memoryview(torch.cat(pieces).numpy())  # type: ignore[arg-type]

    def write(path: Path, nbytes: int) -> None:
        with open(path, "wb", buffering=0) as f:
            while nbytes:
                nbytes -= f.write(view[: min(nbytes, len(view))])
            os.fsync(f.fileno())

    def run(d: Path) -> None:
        sizes = [total // files + (i < total % files) for i in range(files)]
        threads = [threading.Thread(target=write, args=(d / f"blob{i}", n))
                   for i, n in enumerate(sizes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return run


def hash_only(w: Workload) -> Op:
    """xxh3-128 over every tensor's bytes: what ckpts' hashing costs by itself."""
    views = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in w.flat().values()]

    def run(d: Path) -> str:
        digest = xxhash.xxh3_128()
        for view in views:
            digest.update(view)
        return digest.hexdigest()
    return run


def best_dcp_threads(w: Workload, scratch: Path) -> tuple[int, dict[int, float]]:
    """Pick DCP's best FileSystemWriter thread_count (1, 2 or 4) from one save each."""
    ops = {f"DCP threads={t}": dcp_save(w, t) for t in (1, 2, 4)}
    times = {int(n.split("=")[1]): s.values[0]
             for n, s in run_rounds(ops, 1, scratch, label="DCP warm-up").items()}
    return min(times, key=times.__getitem__), times


# ---------------------------------------------------------------- async saves


def ckpts_async_save(w: Workload, run_dir: Path) -> Op:
    """The stall of ``save()`` with ``async_save=True``.

    One manager for every call, as in training: its staging buffers are reused from
    save to save. It keeps the last checkpoint only; the previous one is deleted by
    the background writer, which ``wait()`` (untimed) lets finish.
    """
    manager = ckpts.CheckpointManager(run_dir, async_save=True, keep=[ckpts.KeepLast(1)])
    state = ckpts.TrainState(model=w.model, optimizer=w.optimizer)
    steps = itertools.count(1)

    def run(d: Path) -> Deferred:
        manager.save(next(steps), state)
        return Deferred(manager.wait)
    return run


def dcp_async_save(w: Workload, threads: int) -> Op:
    """DCP's async_save as it comes: on CPU it stages into a fresh copy each call (its
    staging cache needs pinned memory, hence CUDA)."""
    def run(d: Path) -> Deferred:
        future = dcp.async_save(
            w.torch_state(),
            storage_writer=FileSystemWriter(d, sync_files=True, thread_count=threads))
        return Deferred(future.result)
    return run


def copy_floor(w: Workload) -> Op:
    """copy_ of every tensor into buffers allocated (and touched) beforehand: the floor
    for an async save that reuses its staging memory."""
    pairs = [(t, torch.empty_like(t).fill_(0)) for t in w.flat().values()]

    def run(d: Path) -> None:
        with torch.no_grad():
            for source, buffer in pairs:
                buffer.copy_(source)
    return run


# ---------------------------------------------------------------- restores


def ckpts_restore(run_dir: Path, target: Workload) -> Op:
    state = ckpts.TrainState(model=target.model, optimizer=target.optimizer)

    def run(d: Path) -> None:
        if ckpts.CheckpointManager(run_dir).restore(state) is None:
            raise RuntimeError(f"{run_dir} holds no checkpoint")
    return run


def torch_restore(save_dir: Path, target: Workload) -> Op:
    def run(d: Path) -> None:
        loaded = torch.load(save_dir / TORCH_FILE, weights_only=True, mmap=False)
        target.model.load_state_dict(loaded["model"])
        target.optimizer.load_state_dict(loaded["optimizer"])
    return run


def safetensors_restore(save_dir: Path, target: Workload) -> Op:
    def run(d: Path) -> None:
        loaded = safetensors.torch.load_file(save_dir / SAFETENSORS_FILE)
        with torch.no_grad():
            for name, live in target.flat().items():
                live.copy_(loaded[name])
    return run


def dcp_restore(save_dir: Path, target: Workload) -> Op:
    def run(d: Path) -> None:
        state = target.torch_state()
        dcp.load(state, storage_reader=FileSystemReader(save_dir))
        target.model.load_state_dict(state["model"])
        target.optimizer.load_state_dict(state["optimizer"])
    return run


# ---------------------------------------------------------------- weights only


def ckpts_weights(checkpoint_dir: Path, target: Workload) -> Op:
    def run(d: Path) -> None:
        ckpts.load_weights(checkpoint_dir, target.model)
    return run


def safetensors_weights(checkpoint_dir: Path, target: Workload) -> Op:
    """load_file of the model's own safetensors file(s) in the ckpts checkpoint (the
    same bytes), then load_state_dict: no manifest, no hash check."""
    files = sorted(checkpoint_dir.glob("model*.safetensors"))
    if not files:
        raise RuntimeError(f"no model*.safetensors in {checkpoint_dir}")

    def run(d: Path) -> None:
        loaded: dict[str, torch.Tensor] = {}
        for path in files:
            loaded.update(safetensors.torch.load_file(path))
        target.model.load_state_dict(loaded)
    return run
