"""Format v4 at thousands of ranks, simulated: shapes only, the library's own planning.

``python -m benchmarks.scale_sim --ranks N [--json]`` (``make bench-scale`` runs 8, 64,
512 and 2,816) simulates an FSDP2 job of N ranks (a 1-D mesh ``(N,)``, every parameter
``Shard(0)``) over a Llama-7B-shaped model (vocab 32,000, hidden 4,096, intermediate
11,008, 32 layers: 291 parameters, fp32 by default, ``--dtype BF16`` for bf16
parameters) with AdamW's state (``exp_avg``, ``exp_avg_sq`` laid out as their
parameter, and ``step``: a 0-d float32 tensor every rank holds whole, as FSDP2 keeps
it) and a per-rank RNG object. No tensor data exists: pieces are shapes, and the
bytes' hashes are hashes of a few placeholder bytes (real length, fake value).

What runs is the code a real save and restore run (ckpts._checkpoint.rank_plan, called
as ckpts._checkpoint.sharded calls it), on the same inputs a real job would give it:

1. one rank's local plan and index (rank 1): ``shared_layouts`` -> ``pieces_of`` ->
   its files laid out by the real safetensors code (``aligned_order``,
   ``encode_header``) into ``WrittenFile`` records -> ``piece_entries`` ->
   ``rank_index`` -> ``rank_status``; the same for every other rank (each rank's
   index is computed for real, on 2 processes, and only its size and hash kept);
2. rank 0's commit given every rank's status: ``commit_plan`` + ``new_manifest`` +
   the manifest's JSON encoding; it then writes ``manifest.json``, ``layout.json`` and
   the rank indexes the restore below reads into ``<dir>/run/step-00000001/`` (a real
   checkpoint directory, without its data files);
3. one rank's restore plan onto 2N ranks (rank N of 2N, FSDP2 again): it loads the
   manifest, reads ``layout.json`` through ``Contents`` and runs ``planned_reads`` for
   every tensor of the model and the optimizer, reading (and hash-checking) only the
   rank indexes those need.

Trees are real: the model's is ckpts' codec over a state_dict of its keys, the
optimizer's the codec over the state_dict of a real ``torch.optim.AdamW`` of as many
one-element parameters after one step, the RNG's a real ``RNGState`` snapshot of this
process. What is not simulated: data (no file is written or read but the metadata),
the network (the all-gather of statuses is counted in bytes, not timed), other hosts
and their filesystems (one process plays every rank, on this machine's page cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ckpts._checkpoint.rank_plan import (
    Layouts,
    TensorSpec,
    commit_plan,
    layout_entries,
    pieces_of,
    planned_reads,
    rank_status,
    shared_layouts,
    status_bytes,
)
from ckpts._checkpoint.sharded import rank_files, rank_index_of
from ckpts._checkpoint.write import describe, new_manifest, object_fields
from ckpts._format.codec import encode
from ckpts._format.index import LAYOUT, Contents, rank_index_name
from ckpts._format.layout import Box, Layout
from ckpts._format.manifest import (
    BLOCK,
    DTYPE_SIZES,
    Shard,
    digest,
    encode_json,
    load_manifest,
)
from ckpts._format.safetensors import DTYPE_NAMES, DTYPES, encode_header
from ckpts._state.rng import RNGState
from ckpts._state.train_state import PER_RANK_KINDS, ObjectSnapshot, snapshot_object
from ckpts._tensors.writing import WrittenFile
from ckpts.storage import LocalStorage
from ckpts.storage._port import MANIFEST

STEP = "step-00000001"
# issue 26's targets (decimal units, the stricter reading: 1 KB = 1,000 B)
TARGETS = {
    "plan_commit_s": 5.0,
    "gathered_bytes_per_rank": 2_000,
    "reshard_plan_s": 1.0,
    "restore_metadata_bytes_per_rank": 2_000_000,
    "manifest_bytes": 2_000_000,
}
_T = TypeVar("_T")


def manifest_bound(ranks: int) -> int:
    """Issue 26's bound on the manifest: 64 KB + 512 B a rank."""
    return 64_000 + 512 * ranks


def llama_params(layers: int = 32, vocab: int = 32000, hidden: int = 4096,
                 intermediate: int = 11008) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama model's parameters (Hugging Face ``LlamaForCausalLM`` keys and shapes,
    untied embeddings), in its ``state_dict()`` order: 9 a layer, plus 3."""
    params: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        at = f"model.layers.{i}"
        params += [(f"{at}.self_attn.{m}.weight", (hidden, hidden))
                   for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        params += [(f"{at}.mlp.gate_proj.weight", (intermediate, hidden)),
                   (f"{at}.mlp.up_proj.weight", (intermediate, hidden)),
                   (f"{at}.mlp.down_proj.weight", (hidden, intermediate)),
                   (f"{at}.input_layernorm.weight", (hidden,)),
                   (f"{at}.post_attention_layernorm.weight", (hidden,))]
    params += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return params


@dataclass(frozen=True)
class JobState:
    """What every rank of the simulated job saves: ``snapshots`` as
    ``TrainState.snapshot()`` gives them (the shared objects' trees, with no tensors:
    their ``specs`` stand for them; the per-rank objects whole), and each shared
    tensor's spec as ``ckpts._checkpoint.sharded.tensor_spec`` makes it."""

    snapshots: dict[str, ObjectSnapshot]
    specs: dict[str, dict[str, TensorSpec]]
    per_rank: list[str]  # the names of the per-rank objects, sorted (as write_on_ranks)

    @property
    def tensors(self) -> int:
        """How many shared tensors (every parameter and optimizer state tensor)."""
        return sum(len(tensors) for tensors in self.specs.values())


def job_state(params: Sequence[tuple[str, Sequence[int]]], size: int, *, dtype: str = "F32",
              model_class: str = "FSDPLlamaForCausalLM",
              adamw: Mapping[str, Any] | None = None, rng: bool = True) -> JobState:
    """The state of an FSDP2 job of ``size`` ranks (mesh ``(size,)``, every parameter
    ``Shard(0)``) over a model of ``params`` (key, global shape; ``dtype``), with an
    AdamW (``adamw``: its arguments) after one step, and (``rng``) an RNG per rank."""
    mesh, placements = (size,), ("S0",)
    placeholder = torch.zeros(())
    model_tensors: dict[str, torch.Tensor] = {}
    model_tree = encode({key: placeholder for key, _ in params}, model_tensors)
    model = {key: TensorSpec(dtype, tuple(shape), mesh, placements) for key, shape in params}
    # the optimizer's tree: a real AdamW's state_dict after a step, one placeholder
    # parameter per real one (its tree does not depend on the parameters' shapes)
    stand_ins = [torch.nn.Parameter(torch.zeros(1)) for _ in params]
    optimizer = torch.optim.AdamW(stand_ins, **dict(adamw or {}))
    for parameter in stand_ins:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_tree = encode(optimizer.state_dict(), optimizer_tensors)
    state_specs = {}
    for key, tensor in optimizer_tensors.items():  # state.<i>.<name>
        _, index, name = key.split(".", 2)
        if name == "step":  # a 0-d tensor every rank holds whole (FSDP2 does not shard it)
            state_specs[key] = TensorSpec(DTYPES[tensor.dtype], tuple(tensor.shape))
        else:  # exp_avg, exp_avg_sq: as their parameter
            state_specs[key] = TensorSpec(dtype, tuple(params[int(index)][1]), mesh, placements)
    snapshots = {
        "model": ObjectSnapshot(kind="module", class_name=model_class, tree=model_tree,
                                tensors={}),
        "optimizer": ObjectSnapshot(kind="optimizer", class_name=type(optimizer).__name__,
                                    tree=optimizer_tree, tensors={}),
    }
    if rng:
        snapshots["rng"] = snapshot_object("rng", RNGState())
    per_rank = sorted(name for name, snap in snapshots.items() if snap.kind in PER_RANK_KINDS)
    return JobState(snapshots, {"model": model, "optimizer": state_specs}, per_rank)


class PieceShape:
    """A piece of a tensor as the safetensors writer sees it (dtype, shape, numel,
    element size), without its bytes: what ``aligned_order`` and ``encode_header`` read
    of a tensor, so the real header (and so the real byte offsets) come out."""

    __slots__ = ("_numel", "_size", "dtype", "shape")

    def __init__(self, dtype: str, shape: Sequence[int]) -> None:
        self.dtype = DTYPE_NAMES[dtype]
        self.shape = tuple(shape)
        self._size = DTYPE_SIZES[dtype]
        self._numel = 1
        for dim in self.shape:
            self._numel *= dim

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self._size


def placeholder_hash(*parts: object) -> str:
    """The hash of a few placeholder bytes: a real xxh3-128 digest string, of the real
    length, standing for the hash of bytes that do not exist here."""
    return digest("/".join(map(str, parts)).encode())


def written_file(file: str, items: Sequence[tuple[str, Any]]) -> WrittenFile:
    """The record ``ckpts._tensors.writing.write_tensor_files`` returns for a file of
    ``items`` (in order): its real header (size and hash), each tensor's byte range
    after it, and placeholder hashes for the bytes (one per BLOCK above BLOCK bytes)."""
    header = encode_header(items)  # type: ignore[arg-type]  # PieceShape: see its doc
    position, tensors, blocks = len(header), {}, {}
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        tensors[key] = (position, position + nbytes, placeholder_hash(file, key))
        if nbytes > BLOCK:
            blocks[key] = [placeholder_hash(file, key, i) for i in range(-(-nbytes // BLOCK))]
        position += nbytes
    return WrittenFile(nbytes=position, header=len(header), header_hash=digest(header),
                       tensors=tensors, blocks=blocks)


@dataclass(frozen=True)
class RankSave:
    """One rank's part of a save: its index, its files' records, its status."""

    index: bytes
    files: dict[str, WrittenFile]
    status: dict[str, Any]


def save_rank(state: JobState, layouts: Layouts, entries: Mapping[str, Any],
              rank: int) -> RankSave:
    """Rank ``rank``'s part of a save, as ``ckpts._checkpoint.sharded._write_rank`` and
    ``write_on_ranks`` make it, with its files laid out but not written."""
    mine = pieces_of(layouts, rank)
    files = rank_files(rank, mine, state.snapshots, state.per_rank,
                       lambda name, key, box: PieceShape(state.specs[name][key].dtype, box[1]))
    by_file = {file: written_file(file, items) for file, items in files}
    index = rank_index_of(rank, mine, state.snapshots, state.per_rank, by_file)
    return RankSave(index, by_file, rank_status(index, entries))


def local_plan(state: JobState, size: int, rank: int) -> tuple[Layouts, Any, RankSave]:
    """Everything one rank computes for a save, from its specs to its status."""
    layouts = shared_layouts(state.specs, size)
    entries = layout_entries(state.specs, layouts)
    return layouts, entries, save_rank(state, layouts, entries, rank)


def commit(state: JobState, statuses: Sequence[Any], entries: Mapping[str, Any], size: int,
           where: str = "the simulated run") -> tuple[bytes, dict[str, Any], bytes]:
    """Rank 0's commit given every rank's status, as ``write_on_ranks`` and
    ``ckpts._checkpoint.job.ManyRanks.write`` make it: ``layout.json``, the manifest,
    and the manifest's bytes (``ckpts._run.writer`` encodes it so)."""
    shared = {name: snap for name, snap in state.snapshots.items() if name not in state.per_rank}
    layout, files, objects = commit_plan(
        statuses, entries, where, size=size,
        shared={name: describe(snap, {}) for name, snap in shared.items()},
        per_rank={name: object_fields(state.snapshots[name]) for name in state.per_rank})
    manifest = new_manifest(step=1, epoch=0, metrics={"loss": 2.0}, files=files,
                            objects=objects, world_size=size, per_rank=state.per_rank)
    return layout, manifest, encode_json(manifest)


def live_box(entry: Mapping[str, Any], rank: int, size: int) -> Box:
    """The box of a saved tensor that rank ``rank`` of an FSDP2 job of ``size`` ranks
    holds: its ``Shard(0)`` piece on a mesh ``(size,)`` (an empty box where it holds
    none), or the whole tensor for one every rank holds whole (``step``)."""
    shape = tuple(entry["shape"])
    if "mesh" not in entry:
        return (0,) * len(shape), shape
    box = Layout(shape, (size,), ("S0",)).piece_of(rank)
    return box if box is not None else ((0,) * len(shape), (0,) * len(shape))


def write_metadata(directory: Path, manifest: bytes, layout: bytes,
                   indexes: Mapping[int, bytes]) -> Path:
    """A checkpoint directory of the metadata a real save writes (its manifest,
    ``layout.json`` and the rank indexes given), without the data files."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LAYOUT).write_bytes(layout)
    for rank, index in indexes.items():
        (directory / rank_index_name(rank)).write_bytes(index)
    (directory / MANIFEST).write_bytes(manifest)  # last, as a commit
    return directory


class CountingStorage(LocalStorage):
    """A run directory whose reads are counted: file -> bytes read."""

    def __init__(self, run: Path) -> None:
        super().__init__(run)
        self.read_bytes: dict[str, int] = {}

    def read(self, name: str, file: str) -> bytes:
        data = super().read(name, file)
        self.read_bytes[file] = self.read_bytes.get(file, 0) + len(data)
        return data


Reads = dict[tuple[str, str], list[tuple[Shard, Box]]]


def restore_plan(storage: LocalStorage, name: str, rank: int, size: int,
                 objects: Iterable[str] = ("model", "optimizer")) -> Reads:
    """What rank ``rank`` of an FSDP2 job of ``size`` ranks reads of each tensor of the
    shared ``objects``, as a restore plans it (ckpts._run.restoring reads the manifest,
    ckpts._checkpoint.restore and sharded.read_on_ranks the rest)."""
    manifest = load_manifest(storage, name, tensor_entries=False)
    contents = Contents(storage, name, manifest)
    reads: Reads = {}
    for obj in objects:
        for key, entry in contents.object(obj, located=False)["tensors"].items():
            reads[(obj, key)] = planned_reads(contents, obj, key, entry,
                                              live_box(entry, rank, size))
    return reads


def needed_ranks(layouts: Layouts, rank: int, size: int) -> set[int]:
    """The saving ranks whose pieces rank ``rank`` of ``size`` ranks would read."""
    needed = set()
    for tensors in layouts.values():
        for layout in tensors.values():
            entry = {"shape": list(layout.shape), **layout.to_json()}
            needed.update(r for r, _ in layout.pieces_overlapping(live_box(entry, rank, size)))
    return needed


def median_time(action: Callable[[], _T], repeats: int) -> tuple[float, _T]:
    """The median wall time of ``repeats`` runs of ``action``, and its last result."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


# every rank's index, on worker processes: the state is inherited (fork), not sent
_WORK: dict[str, Any] = {}


def _statuses_of(ranks: range) -> list[tuple[dict[str, Any], bytes | None]]:
    state, layouts, entries, kept = (_WORK["state"], _WORK["layouts"], _WORK["entries"],
                                     _WORK["kept"])
    out = []
    for rank in ranks:
        saved = save_rank(state, layouts, entries, rank)
        out.append((saved.status, saved.index if rank in kept else None))
    return out


def all_statuses(state: JobState, layouts: Layouts, entries: Any, size: int, processes: int,
                 kept: set[int]) -> list[tuple[dict[str, Any], bytes | None]]:
    """Every rank's status, each computed by :func:`save_rank`, with the index of each
    rank in ``kept`` (None for the others)."""
    _WORK.update(state=state, layouts=layouts, entries=entries, kept=kept)
    if processes <= 1 or size < 64:
        return _statuses_of(range(size))
    step = max(1, -(-size // (processes * 8)))
    chunks = [range(begin, min(size, begin + step)) for begin in range(0, size, step)]
    gc.freeze()  # the forked workers share the state's pages, and skip it when collecting
    try:
        # the workers run plain Python (no torch op), so forking with torch loaded is
        # safe; Python 3.12+ would warn about forking a process with threads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")
                                     ) as pool:
                return [item for part in pool.map(_statuses_of, chunks) for item in part]
    finally:
        gc.unfreeze()


def simulate(params: Sequence[tuple[str, Sequence[int]]], ranks: int, where: Path, *,
             dtype: str = "F32", repeats: int = 5, processes: int = 2,
             model_class: str = "FSDPLlamaForCausalLM") -> dict[str, Any]:
    """Run the three measurements (module docstring) for a job of ``ranks`` ranks over
    a model of ``params``; the checkpoint's metadata goes to ``where/run/STEP``."""
    started, load = time.perf_counter(), os.getloadavg()[0]
    state = job_state(params, ranks, dtype=dtype, model_class=model_class)
    rank = min(1, ranks - 1)
    local_s, (layouts, entries, mine) = median_time(
        lambda: local_plan(state, ranks, rank), repeats)

    # the checkpoint directory holds rank 0's index and those the restore reads
    new_size, reader = 2 * ranks, ranks  # rank N of 2N: the middle
    needed = needed_ranks(layouts, reader, new_size) | {0}
    began = time.perf_counter()
    found = all_statuses(state, layouts, entries, ranks, processes, needed)
    statuses_s = time.perf_counter() - began
    statuses = [status for status, _ in found]
    index_sizes = [status["index"][0] for status in statuses]
    assert statuses[rank] == mine.status  # the same function, the same answer

    commit_s, (layout, _, payload) = median_time(
        lambda: commit(state, statuses, entries, ranks), max(1, repeats // 2 + 1))

    indexes = {saver: found[saver][1] for saver in sorted(needed)}
    for saver, index in indexes.items():
        assert index is not None and [len(index), digest(index)] == statuses[saver]["index"]
    directory = write_metadata(where / "run" / STEP, payload, layout, indexes)  # type: ignore[arg-type]

    counted: list[CountingStorage] = []

    def restoring() -> Reads:
        counted.append(CountingStorage(where / "run"))
        return restore_plan(counted[-1], STEP, reader, new_size)

    restore_s, reads = median_time(restoring, max(1, repeats // 2 + 1))
    read_files = counted[-1].read_bytes
    read_ranks = sorted(int(file[5:10]) for file in read_files if file.startswith("rank-"))
    result = {
        "ranks": ranks,
        "tensors": state.tensors,
        "parameters": len(params),
        "dtype": dtype,
        "local_plan_rank": rank,
        "local_plan_s": round(local_s, 6),
        "rank_index_bytes": len(mine.index),
        "rank_index_bytes_max": max(index_sizes),
        "rank_index_bytes_total": sum(index_sizes),
        "rank_pieces": sum(len(keys) for keys in pieces_of(layouts, rank).values()),
        "all_ranks_indexed_s": round(statuses_s, 3),
        "plan_commit_s": round(commit_s, 6),
        "manifest_bytes": len(payload),
        "manifest_bound": manifest_bound(ranks),
        "layout_bytes": len(layout),
        "gathered_bytes_per_rank": status_bytes(statuses[rank]),
        # all_gather: every rank receives every status, padded to the longest
        "gathered_bytes_received_per_rank": ranks * max(status_bytes(s) for s in statuses),
        "restore_ranks": new_size,
        "restore_rank": reader,
        "reshard_plan_s": round(restore_s, 6),
        "restore_metadata_bytes_per_rank": sum(read_files.values()),
        "ranks_read": len(read_ranks),
        "rank_indexes_read_bytes": sum(n for f, n in read_files.items() if f.startswith("rank-")),
        "pieces_read": sum(len(found) for found in reads.values()),
        "checkpoint": str(directory),
        "simulation_s": round(time.perf_counter() - started, 1),
        "load_average": round(load, 2),  # of this machine when the run began: others' work
    }
    result["targets"] = targets_met(result)
    return result


def targets_met(result: Mapping[str, Any]) -> dict[str, bool]:
    """Issue 26's targets, each met or not."""
    met = {name: result[name] <= limit for name, limit in TARGETS.items()}
    met["manifest_bound"] = result["manifest_bytes"] <= result["manifest_bound"]
    return met


def summary(result: Mapping[str, Any]) -> str:
    """The result, readable."""
    r, t = result, result["targets"]

    def mark(name: str) -> str:
        return "met" if t[name] else "MISSED"

    return "\n".join([
        f"format v4, simulated FSDP2 job of {r['ranks']:,} ranks: {r['parameters']} "
        f"parameters ({r['dtype']}) + AdamW = {r['tensors']:,} shared tensors, RNG per rank",
        f"  rank {r['local_plan_rank']}: local plan + index {r['local_plan_s'] * 1e3:.1f} ms, "
        f"{r['rank_pieces']:,} pieces, index {r['rank_index_bytes']:,} B "
        f"(largest {r['rank_index_bytes_max']:,} B; every rank's computed in "
        f"{r['all_ranks_indexed_s']:.1f} s)",
        f"  rank 0 commit: {r['plan_commit_s'] * 1e3:.1f} ms (target <= 5 s: "
        f"{mark('plan_commit_s')}); manifest {r['manifest_bytes']:,} B (<= 2 MB: "
        f"{mark('manifest_bytes')}; <= 64 KB + 512 B x ranks = {r['manifest_bound']:,} B: "
        f"{mark('manifest_bound')}); layout.json {r['layout_bytes']:,} B",
        f"  gathered per rank: {r['gathered_bytes_per_rank']:,} B sent (<= 2 KB: "
        f"{mark('gathered_bytes_per_rank')}), {r['gathered_bytes_received_per_rank']:,} B "
        "received (all_gather)",
        f"  restore on {r['restore_ranks']:,} ranks, rank {r['restore_rank']:,}: plan "
        f"{r['reshard_plan_s'] * 1e3:.1f} ms (<= 1 s: {mark('reshard_plan_s')}), "
        f"{r['pieces_read']:,} pieces from {r['ranks_read']:,} rank indexes; metadata read "
        f"{r['restore_metadata_bytes_per_rank']:,} B (<= 2 MB: "
        f"{mark('restore_metadata_bytes_per_rank')})",
        f"  (simulated in {r['simulation_s']:.0f} s; load average {r['load_average']:.1f} "
        f"on {os.cpu_count()} cores at the start)",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_sim",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, required=True, help="ranks of the saving job")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (7B: 32)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="F32", choices=["F32", "BF16"],
                        help="parameters' (and AdamW moments') dtype")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of rank 1's plan")
    parser.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes that compute every rank's index")
    parser.add_argument("--dir", type=Path, default=None,
                        help="keep the checkpoint's metadata here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error("--ranks must be at least 1")
    params = llama_params(args.layers, args.vocab, args.hidden, args.intermediate)
    with tempfile.TemporaryDirectory(prefix="scale-sim-") as temp:
        where = args.dir if args.dir is not None else Path(temp)
        result = simulate(params, args.ranks, where, dtype=args.dtype, repeats=args.repeats,
                          processes=args.processes)
    if args.dir is None:
        result.pop("checkpoint")
    print(summary(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
