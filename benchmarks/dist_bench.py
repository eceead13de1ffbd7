"""ckpts against torch.distributed.checkpoint (DCP) on many ranks: FSDP2 saves and
resharding restores, in one run.

Issue 10's benchmark. The same transformer-like FSDP2 model (fp32, an embedding and
blocks of four bias-free matrices, AdamW after one real training step) runs on 2 and
on 4 CPU ranks (gloo, ``init_device_mesh("cpu", (n,))``, ``fully_shard`` per block,
then on the root). Three spawns of worker processes:

1. 2 ranks: save rounds; keep one ckpts and one DCP checkpoint of the state;
2. 4 ranks: save rounds; keep one of each; restore rounds of the 2-rank ones (2 -> 4);
3. 2 ranks: restore rounds of the 4-rank ones (4 -> 2).

Contenders, in interleaved rounds (every contender once per round, order shuffled,
the same order on every rank):

- save: ckpts ``CheckpointManager(dir).save(step, TrainState(model=, optimizer=))``
  on every rank, against DCP ``dcp.save({"model", "optim"} from get_state_dict,
  storage_writer=FileSystemWriter(dir, thread_count=T, sync_files=True))`` for T in
  1, 2 and 4; the ratio is against the T with the lowest median in the same run.
- restore (resharding): ckpts ``CheckpointManager(run).restore(state)`` (a new manager,
  as a resumed job has) against ``dcp.load`` with ``FileSystemReader`` into
  ``get_state_dict`` + ``set_state_dict``; both into the live FSDP2 model and AdamW.

A time is the wall time of the slowest rank between two barriers. Peak extra RSS is
sampled per rank during one untimed run of each contender (before the rounds) and
compared with the rank's shard (its local model and optimizer bytes) plus one ckpts
restore buffer (``ckpts._checkpoint.sharded.CHUNK``). Each restore is checked: the live
state is scrambled before, and after the untimed run the full tensors (model, exp_avg,
exp_avg_sq, step) must hash as the saved ones did.

Run: ``python -m benchmarks.dist_bench [--rounds 5] [--width 1024] [--blocks 4]
[--dir /tmp]``, or ``make bench-dist``; ``--quick`` is a smoke run (seconds, tiny
model, 1 round). Writes ``benchmarks/results/dist-<timestamp>.json`` and ``.md``
(with ``--quick``, only where ``--out`` says).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save_state
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.multiprocessing.spawn import spawn as spawn_ranks

import ckpts
from benchmarks import _workloads as wl
from benchmarks._measure import PeakRSS, Series, _settle, log, paired_ratio, write_results
from ckpts._checkpoint.sharded import CHUNK

TITLE = "ckpts vs torch.distributed.checkpoint on many ranks (FSDP2, CPU, gloo)"
DCP_THREADS = (1, 2, 4)
NOISE = "- (DCP under max(1 MiB, 2 % of shard))"  # too small a base for a ratio
NOTES = [
    "A time is the wall time of the slowest rank, between a barrier before and one after "
    "the operation; the median of the rounds, each contender once per round in a new "
    "seeded shuffled order (the same on every rank). A ratio is the median of the "
    "per-round ratios ckpts/DCP.",
    "Saves fsync every file (DCP: sync_files=True; ckpts also hashes every tensor, every "
    "1 MiB block of tensors over 1 MiB, fsyncs directories and commits atomically). DCP "
    "is timed at thread_count 1, 2 and 4 in every round; the ratio is against the "
    "thread count with the lowest median.",
    "Each ckpts save gets a fresh run directory and a manager that has already found "
    "the job, as a training loop's manager has by its save: it restored from its empty "
    "run first (untimed), which creates its own gloo group. A restore's time includes "
    "that group (a resumed job pays it once), measured alone as 'new gloo group'.",
    "Restores reshard (saved at 2 ranks, restored at 4, and the reverse) into a live "
    "FSDP2 model and an AdamW with state; the files were written minutes before and are "
    "warm in the page cache for both (caches are not dropped). ckpts checks every byte "
    "it reads against the manifest's hashes; DCP checks no content hashes.",
    "Peak extra RSS: per rank, the max of /proc/self/statm resident pages sampled every "
    "~1 ms during one untimed run, minus the value just before; the worst rank is shown, "
    "and the worst ratio of a rank's peak to its own shard (local model + optimizer "
    "bytes) plus one 32 MiB ckpts I/O chunk (<= 1.00x meets the target). DCP's memory "
    "run saves with 2 threads.",
    "Workers use torch.set_num_threads(cores // ranks) (at least 1). 4 ranks on 2 cores "
    "oversubscribe the CPU: both contenders alike.",
    "The machine is shared: other processes may run during the benchmark.",
]


# ---------------------------------------------------------------- the model


class Block(torch.nn.Module):
    """Four bias-free matrices of a transformer block (attention is left out: only the
    parameter shapes and a real backward matter here)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.proj = torch.nn.Linear(width, width, bias=False)
        self.fc1 = torch.nn.Linear(width, 4 * width, bias=False)
        self.fc2 = torch.nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(self.qkv(x)[..., : x.shape[-1]])
        out: torch.Tensor = x + self.fc2(torch.relu(self.fc1(x)))
        return out


class Model(torch.nn.Module):
    """An embedding and ``blocks`` blocks: ~12 width^2 parameters a block."""

    def __init__(self, width: int, blocks: int, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(blocks))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return x


@dataclass(frozen=True)
class Plan:
    """The model's sizes and the number of interleaved rounds."""

    width: int
    blocks: int
    vocab: int
    rounds: int

    def params(self) -> int:
        return self.vocab * self.width + self.blocks * 12 * self.width ** 2

    def state_bytes(self) -> int:
        """fp32 parameters, exp_avg and exp_avg_sq (AdamW's step counters are tiny)."""
        return 3 * 4 * self.params()


def build(plan: Plan, world: int) -> tuple[Model, torch.optim.Optimizer]:
    """The FSDP2 model on ``world`` CPU ranks and AdamW after one real step (the same
    initial weights and batch on every rank and world size)."""
    torch.manual_seed(0)
    model = Model(plan.width, plan.blocks, plan.vocab)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, plan.vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def live_tensors(model: Model, optimizer: torch.optim.Optimizer
                 ) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the training state by name, in the same order on every rank."""
    found: list[tuple[str, torch.Tensor]] = []
    for name, parameter in model.named_parameters():
        found.append((name, parameter))
        for key, value in sorted(optimizer.state[parameter].items()):
            if isinstance(value, torch.Tensor):
                found.append((f"{name}.{key}", value))
    return found


def local(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, DTensor):
        found: torch.Tensor = tensor.to_local()
        return found
    return tensor


def shard_bytes(model: Model, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of the state: its local shards (and any whole small tensor)."""
    return sum(local(t).nbytes for _, t in live_tensors(model, optimizer))


def fingerprint(model: Model, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """xxh3-128 of every full tensor (a collective: every rank calls it)."""
    prints = {}
    for name, tensor in live_tensors(model, optimizer):
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        data = full.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        prints[name] = xxhash.xxh3_128(data.tobytes()).hexdigest()
    return prints


def scramble(model: Model, optimizer: torch.optim.Optimizer) -> None:
    """Overwrite the live state, so that a restore that reads nothing is caught."""
    with torch.no_grad():
        for _, tensor in live_tensors(model, optimizer):
            local(tensor).fill_(-1.0)


# ---------------------------------------------------------------- the contenders

@dataclass
class Op:
    """One contender: ``run`` is timed; ``prepare`` (before) and ``finish`` (after) are not."""

    run: Callable[[Path], None]
    prepare: Callable[[Path], None] = lambda d: None
    finish: Callable[[], None] = lambda: None


def ckpts_save(state: ckpts.TrainState) -> Op:
    """A manager that has found the job (its gloo group made, by restoring from its
    still empty run, untimed), as a training loop's manager has; then one save."""
    managers: list[ckpts.CheckpointManager] = []

    def prepare(d: Path) -> None:
        managers.append(ckpts.CheckpointManager(d))
        if managers[-1].restore(state) is not None:
            raise RuntimeError(f"{d} is not empty")

    def run(d: Path) -> None:
        managers[-1].save(1, state)

    def finish() -> None:
        managers.pop().close()
    return Op(run=run, prepare=prepare, finish=finish)


def dcp_save(model: Model, optimizer: torch.optim.Optimizer, threads: int) -> Op:
    def run(d: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp_save_state({"model": model_state, "optim": optim_state},
                 storage_writer=FileSystemWriter(d, thread_count=threads, sync_files=True))
    return Op(run=run)


def ckpts_restore(model: Model, optimizer: torch.optim.Optimizer, run_dir: Path) -> Op:
    """A new manager (as a resumed job has) restores the run's checkpoint."""
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    managers: list[ckpts.CheckpointManager] = []

    def run(d: Path) -> None:
        managers.append(ckpts.CheckpointManager(run_dir))
        if managers[-1].restore(state) is None:
            raise RuntimeError(f"{run_dir} holds no checkpoint")

    def finish() -> None:
        managers.pop().close()
    return Op(run=run, prepare=lambda d: scramble(model, optimizer),
              finish=finish)


def dcp_restore(model: Model, optimizer: torch.optim.Optimizer, saved: Path) -> Op:
    def run(d: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp_load({"model": model_state, "optim": optim_state},
                 storage_reader=FileSystemReader(saved))
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state)
    return Op(run=run, prepare=lambda d: scramble(model, optimizer))


# ---------------------------------------------------------------- inside a rank


class Rank:
    """One worker's view: its rank, the job's size and collectives on plain tensors
    (no pickle)."""

    def __init__(self, rank: int, world: int, workdir: Path) -> None:
        self.rank, self.world, self.workdir = rank, world, workdir

    def slowest(self, value: float) -> float:
        found = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return float(found.item())

    def every(self, value: float) -> list[float]:
        found = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world)]
        dist.all_gather(found, torch.tensor([value], dtype=torch.float64))
        return [float(t.item()) for t in found]

    def fresh(self, path: Path) -> Path:
        """An empty directory at ``path`` (made by rank 0), seen by every rank."""
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        dist.barrier()
        return path

    def remove(self, path: Path) -> None:
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    def timed(self, op: Op, target: Path) -> float:
        """The slowest rank's wall time of ``op.run`` (barriers before and after)."""
        op.prepare(target)
        _settle()
        dist.barrier()
        started = time.perf_counter()
        op.run(target)
        dist.barrier()
        seconds = time.perf_counter() - started
        op.finish()
        return self.slowest(seconds)

    def memory(self, op: Op, target: Path) -> dict[str, Any]:
        """Peak extra RSS (total and anonymous) of every rank during one ``op.run``."""
        op.prepare(target)
        dist.barrier()
        with PeakRSS() as peak:
            op.run(target)
        dist.barrier()
        op.finish()
        return {"extra": self.every(peak.extra), "extra_anon": self.every(peak.extra_anon)}

    def rounds(self, ops: dict[str, Op], reps: int, label: str) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in ops}
        for rep in range(reps):
            order = list(ops)
            random.Random(rep).shuffle(order)
            for name in order:
                target = self.fresh(self.workdir / "scratch" / f"{name}-{rep}")
                times[name].append(self.timed(ops[name], target))
                self.remove(target)
            if self.rank == 0:
                log(f"  {label} round {rep + 1}/{reps}: "
                    + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in ops))
        return times


def worker(rank: int, world: int, port: int, config: str) -> None:
    """One rank of a spawn: ``config`` (JSON) says the plan, the work directory, whether
    to save (keeping one checkpoint of each kind) and which world's checkpoints to
    restore. Rank 0 writes the results to ``<workdir>/result-<world>.json``."""
    settings = json.loads(config)
    plan, workdir = Plan(**settings["plan"]), Path(settings["workdir"])
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # Restoring at another world size logs, as it should, that the per-rank RNG state keeps
    # its value; the restores are checked tensor by tensor instead.
    logging.getLogger("ckpts").setLevel(logging.ERROR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        me = Rank(rank, world, workdir)
        model, optimizer = build(plan, world)
        result: dict[str, Any] = {"world": world, "shard_bytes": me.every(shard_bytes(model,
                                                                                     optimizer))}
        started = time.perf_counter()
        dist.new_group(backend="gloo")
        result["new_group_s"] = me.slowest(time.perf_counter() - started)
        if settings["save"]:
            result["save"] = save_phase(me, plan, model, optimizer)
        if settings["restore_from"]:
            result["restore"] = restore_phase(me, plan, model, optimizer,
                                              int(settings["restore_from"]))
        if rank == 0:
            (workdir / f"result-{world}.json").write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def save_phase(me: Rank, plan: Plan, model: Model, optimizer: torch.optim.Optimizer
               ) -> dict[str, Any]:
    """Keep one checkpoint of each kind (their memory runs), then the timed rounds."""
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    ops = {"ckpts": ckpts_save(state)}
    ops.update({f"DCP-{t}": dcp_save(model, optimizer, t) for t in DCP_THREADS})
    prints = fingerprint(model, optimizer)
    if me.rank == 0:
        (me.workdir / f"expected-{me.world}.json").write_text(json.dumps(prints))
    kept = me.workdir / "kept"
    memory = {"ckpts": me.memory(ops["ckpts"], me.fresh(kept / f"ckpts-{me.world}")),
              "DCP": me.memory(ops["DCP-2"], me.fresh(kept / f"dcp-{me.world}"))}
    times = me.rounds(ops, plan.rounds, f"save at {me.world} ranks")
    return {"times": times, "memory": memory}


def restore_phase(me: Rank, plan: Plan, model: Model, optimizer: torch.optim.Optimizer,
                  saved_world: int) -> dict[str, Any]:
    """One checked, memory-sampled restore of each kind, then the timed rounds."""
    kept = me.workdir / "kept"
    expected = json.loads((me.workdir / f"expected-{saved_world}.json").read_text())
    ops = {"ckpts": ckpts_restore(model, optimizer, kept / f"ckpts-{saved_world}"),
           "DCP": dcp_restore(model, optimizer, kept / f"dcp-{saved_world}")}
    memory = {}
    for name, op in ops.items():
        memory[name] = me.memory(op, me.workdir)
        got = fingerprint(model, optimizer)
        wrong = sorted(k for k in expected if got.get(k) != expected[k])
        if wrong:
            raise RuntimeError(f"{name} restored {len(wrong)} of {len(expected)} tensors "
                               f"wrongly at {me.world} ranks (saved at {saved_world}): "
                               f"{wrong[:5]}")
    times = me.rounds(ops, plan.rounds, f"restore {saved_world} -> {me.world} ranks")
    return {"from": saved_world, "times": times, "memory": memory}


# ---------------------------------------------------------------- the parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(plan: Plan, workdir: Path, world: int, *, save: bool, restore_from: int | None
          ) -> dict[str, Any]:
    log(f"== {world} ranks: " + ", ".join(
        (["save"] if save else []) + ([f"restore from {restore_from}"] if restore_from else [])))
    config = json.dumps({"plan": asdict(plan), "workdir": str(workdir), "save": save,
                         "restore_from": restore_from})
    spawn_ranks(worker, args=(world, free_port(), config),  # type: ignore[no-untyped-call]
                nprocs=world)
    result: dict[str, Any] = json.loads((workdir / f"result-{world}.json").read_text())
    return result


def manifest_stats(checkpoint_run: Path) -> dict[str, Any]:
    """Sizes of a kept ckpts checkpoint's manifest: bytes, files, shard entries, block
    hashes (docs/scale.md extrapolates from these)."""
    manifests = sorted(checkpoint_run.glob("*/manifest.json"))
    if not manifests:
        return {}
    text = manifests[-1].read_text()
    manifest = json.loads(text)
    shards = blocks = tensors = 0

    def walk(node: Any) -> None:
        nonlocal shards, blocks, tensors
        if isinstance(node, dict):
            if "dtype" in node and "shape" in node:
                tensors += 1
                for shard in node.get("shards", [node]):
                    shards += 1
                    blocks += len(shard.get("blocks", ()))
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(manifest.get("objects", {}))
    return {"bytes": len(text.encode()), "files": len(manifest.get("files", {})),
            "tensors": tensors, "shard_entries": shards, "block_hashes": blocks,
            "world_size": manifest.get("world_size")}


def row(operation: str, ours: list[float], peer: str, theirs: list[float]) -> dict[str, Any]:
    a, b = Series(ours), Series(theirs)
    return {"operation": operation, "ckpts": a.summary(), "peer": peer,
            "peer_value": b.summary(), "ratio": paired_ratio(a, b)}


def summarize(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    rows, memory = [], []
    for world, result in sorted(results.items()):
        save = result["save"]["times"]
        best = min(DCP_THREADS, key=lambda t: statistics.median(save[f"DCP-{t}"]))
        rows.append(row(f"save at {world} ranks", save["ckpts"],
                        f"DCP save (best of 1/2/4 threads: {best})", save[f"DCP-{best}"]))
    for world, result in sorted(results.items()):
        restore = result["restore"]
        rows.append(row(f"restore {restore['from']} -> {world} ranks", restore["times"]["ckpts"],
                        "DCP load + set_state_dict", restore["times"]["DCP"]))
    for world, result in sorted(results.items()):
        for phase in ("save", "restore"):
            found = result[phase]["memory"]
            label = (f"save at {world} ranks" if phase == "save"
                     else f"restore {result['restore']['from']} -> {world} ranks")
            ours, theirs = found["ckpts"]["extra"], found["DCP"]["extra"]
            shards = result["shard_bytes"]
            # a peer's peak below 2 % of a shard is noise, not a base for a ratio
            floor = max(2**20, 0.02 * max(shards))
            memory.append({"operation": label, "ckpts_max": max(ours), "dcp_max": max(theirs),
                           "ckpts_anon_max": max(found["ckpts"]["extra_anon"]),
                           "dcp_anon_max": max(found["DCP"]["extra_anon"]),
                           "shard_max": max(shards),
                           "of_limit": max(o / (s + CHUNK) for o, s in
                                           zip(ours, shards, strict=True)),
                           "ratio": max(ours) / max(theirs) if max(theirs) > floor else None,
                           "per_rank_ckpts": ours, "per_rank_dcp": theirs})
    return {"rows": rows, "memory": memory}


def _time(summary: dict[str, Any]) -> str:
    return f"{summary['median']:.3f} s [{summary['min']:.3f}-{summary['max']:.3f}]"


def markdown(result: dict[str, Any]) -> str:
    plan, summary = result["plan"], result["summary"]
    lines = [f"# {TITLE}", "", f"Machine: {wl.machine_line(result['machine'])}", "",
             f"Model: {plan['params'] / 1e6:.1f} M fp32 params (width {plan['width']}, "
             f"{plan['blocks']} blocks, vocab {plan['vocab']}) + AdamW: "
             f"{plan['state_bytes'] / 1e6:.0f} MB of state across the ranks. "
             f"{plan['rounds']} rounds. Every restore was checked bit-exact (model and "
             "optimizer, full tensors). A new gloo group took "
             + ", ".join(f"{w}: {r['new_group_s'] * 1e3:.0f} ms" for w, r in
                         sorted(result["ranks"].items())) + ".", "",
             "| operation | ckpts, median [min-max] | peer | peer, median [min-max] | "
             "ckpts/peer |", "|---|---|---|---|---|"]
    lines += [f"| {r['operation']} | {_time(r['ckpts'])} | {r['peer']} | "
              f"{_time(r['peer_value'])} | {r['ratio']:.2f}x |" for r in summary["rows"]]
    lines += ["", "| peak extra RSS, worst rank | ckpts (anon) | DCP (anon) | shard per rank | "
              "ckpts / (shard + 32 MiB chunk), worst rank | ckpts/DCP |",
              "|---|---|---|---|---|---|"]
    mb = 1e6
    lines += [f"| {m['operation']} | {m['ckpts_max'] / mb:.0f} MB ({m['ckpts_anon_max'] / mb:.0f})"
              f" | {m['dcp_max'] / mb:.0f} MB ({m['dcp_anon_max'] / mb:.0f}) | "
              f"{m['shard_max'] / mb:.0f} MB | {m['of_limit']:.2f}x | "
              + (f"{m['ratio']:.2f}x" if m["ratio"] is not None else NOISE) + " |"
              for m in summary["memory"]]
    stats = result["manifests"]
    lines += ["", "Manifests of the kept ckpts checkpoints: " + "; ".join(
        f"{w} ranks: {s['bytes']} bytes, {s['files']} files, {s['tensors']} tensors in "
        f"{s['shard_entries']} shard entries, {s['block_hashes']} block hashes"
        for w, s in sorted(stats.items()) if s) + ".", ""]
    return "\n".join(lines + [f"- {note}" for note in NOTES]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--width", type=int, default=1024, help="model width (default 1024)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks (default 4)")
    parser.add_argument("--vocab", type=int, default=8192, help="embedding rows (default 8192)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (seconds): width 64, 2 blocks, 1 round")
    parser.add_argument("--out", type=Path, default=None,
                        help="where dist-<timestamp>.json/.md go (default benchmarks/results; "
                        "with --quick, nothing is written unless given)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where checkpoints are written (default: system temp)")
    args = parser.parse_args()
    if args.quick:
        args.width, args.blocks, args.vocab, args.rounds = 64, 2, 256, 1
    if min(args.rounds, args.width, args.blocks, args.vocab) < 1:
        parser.error("sizes and --rounds must be positive")
    out = args.out if args.out is not None or args.quick else Path("benchmarks/results")
    plan = Plan(args.width, args.blocks, args.vocab, args.rounds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckpts-dist-bench-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        machine = wl.machine(workdir)
        log(f"== {plan.params() / 1e6:.1f} M params, {plan.state_bytes() / 1e6:.0f} MB of "
            f"state, {plan.rounds} rounds, in {tmp}")
        first = spawn(plan, workdir, 2, save=True, restore_from=None)
        second = spawn(plan, workdir, 4, save=True, restore_from=2)
        third = spawn(plan, workdir, 2, save=False, restore_from=4)
        manifests = {w: manifest_stats(workdir / "kept" / f"ckpts-{w}") for w in (2, 4)}
    first["restore"] = third["restore"]
    ranks = {2: first, 4: second}
    machine["loadavg_at_end"] = os.getloadavg()[0]
    result = {"title": TITLE, "machine": machine,
              "plan": {**asdict(plan), "params": plan.params(),
                       "state_bytes": plan.state_bytes(), "quick": args.quick},
              "summary": summarize(ranks), "ranks": ranks, "manifests": manifests,
              "notes": NOTES, "total_seconds": round(time.perf_counter() - started, 1)}
    text = markdown(result)
    print(text)
    write_results(out, "dist", result, text)
    log(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
