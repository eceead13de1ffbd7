"""Reuse of unchanged tensor files (dedup) on a LoRA-style run and on a full fine-tune.

Issue 11's benchmark. A transformer-like stack of fp32 matrices (~100 M parameters,
built from code) is trained two ways, each saved with ``CheckpointManager(dedup=True)``
and, as the peer in the same run, ``CheckpointManager(dedup=False)``:

- *LoRA*: the base (every matrix and the embedding) is frozen; rank-``r`` A/B adapters on
  each matrix and the norms are trainable, AdamW over those. Each save is preceded by
  one real AdamW step on random gradients (the frozen base never changes).
- *full fine-tune*: the same stack without adapters, everything trainable, AdamW over all.

Every round runs a LoRA pair and a full fine-tune pair, in a new shuffled order. A pair
is a dedup run and a no-dedup run, each in a fresh directory deleted afterwards, saving
in lockstep: after each optimizer step both save the same state, in a shuffled order,
so the two save identical bytes under the same disk weather. Per save it records the
wall time of ``manager.save()`` (sync; ckpts fsyncs every file and commits atomically)
and the bytes written, measured two independent ways: the growth of the run's physical
size (``ckpts._run.usage.physical_bytes`` of the listing: each shared file once) and the
``wchar`` delta of ``/proc/self/io`` (bytes this process passed to write calls). After
the last save it records the run's physical size, cross-checked by the allocated blocks
(``st_blocks * 512``) of its unique inodes.

Targets (issue 11), checked in the same run:

- LoRA, every save after the first writes <= 10 % of a full checkpoint's bytes (the
  no-dedup peer's save) and takes <= 25 % of its time;
- the run's 10 LoRA checkpoints hold <= 1.5x one full checkpoint on disk;
- a full fine-tune (nothing to reuse) pays <= 5 % save time over ``dedup=False``.

Run: ``python -m benchmarks.dedup_bench [--rounds 3] [--rank 8] [--dir /tmp]``, or
``make bench-dedup``; ``--quick`` is a tiny smoke run (seconds). Writes
``benchmarks/results/dedup-<timestamp>.json`` and ``.md`` (with ``--quick``, only where
``--out`` says).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ckpts
from benchmarks import _workloads as wl
from benchmarks._measure import log, write_results
from ckpts._run.usage import physical_bytes

TITLE = "ckpts dedup: reuse of unchanged tensor files (issue 11)"
KINDS = ("lora", "full")
NOTES = [
    "Each round runs a LoRA pair and a full fine-tune pair of runs (in a shuffled order), "
    "each pair a dedup and a no-dedup run in fresh directories (deleted after), saving in "
    "lockstep: after each optimizer step both save the same state, in a shuffled order. "
    "A time ratio pairs each save with the peer's save of the same step; it is the median "
    "over rounds of the per-round median over the saves after the first.",
    "The page cache cannot be dropped here (no privilege assumed): the reused files were "
    "just written and a dedup save hashes them from the live tensors, never from disk, "
    "so the cache does not favour it; every save calls fsync on what it writes.",
    "Bytes written are counted two independent ways: the growth of the run's physical "
    "size (each hard-linked file once) and this process's wchar from /proc/self/io "
    "(every byte passed to write calls: tensor files, manifest, the run's history).",
    "A LoRA save cannot write less than its changed tensors: the trainable parameters "
    "and their AdamW exp_avg/exp_avg_sq/step (the 'floor' in the first row). So the bytes and disk "
    "targets hold only when the trainable share is small: with AdamW a save after the "
    "first writes about 3t/(1+2t) of a full checkpoint for a trainable share t, so "
    "<= 10 % needs t <= ~3.6 % and 10 checkpoints <= 1.5x needs t <= ~1.9 %.",
    "The full fine-tune's runs keep their newest checkpoint only (KeepLast(1)) to bound "
    "the disk; retention runs inside save() for both peers alike.",
    "A full fine-tune changes every tensor, so dedup only adds its check: the header and "
    "the smallest tensor of each file are hashed before writing (hashes kept, not taken "
    "again). On this VM the same fsync'd 1.2 GB save took 0.4-3.9 s (page-cache reclaim "
    "and the disk), so single pairs differ up to 3x either way and a 5 % verdict needs "
    "many pairs or a quiet disk; --full-dir /dev/shm (tmpfs) takes the disk out.",
]


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Shape:
    """A transformer-like stack: an embedding, then blocks of four matrices and norms."""

    width: int
    blocks: int
    vocab: int
    rank: int  # LoRA rank; 0: no adapters (full fine-tune)

    def matrices(self) -> dict[str, tuple[int, int]]:
        """Each block's matrices as (out, in)."""
        w = self.width
        return {"qkv": (3 * w, w), "proj": (w, w), "fc1": (4 * w, w), "fc2": (w, 4 * w)}


class Adapted(torch.nn.Module):
    """A frozen (out, in) matrix plus, when ``rank`` > 0, trainable A (rank, in) and
    B (out, rank): the LoRA layout (the update is B @ A)."""

    def __init__(self, out_features: int, in_features: int, rank: int,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features).normal_(0.0, 0.02, generator=gen),
            requires_grad=rank == 0)
        if rank:
            self.lora_a = torch.nn.Parameter(
                torch.empty(rank, in_features).normal_(0.0, 0.02, generator=gen))
            self.lora_b = torch.nn.Parameter(torch.zeros(out_features, rank))


class Block(torch.nn.Module):
    def __init__(self, shape: Shape, gen: torch.Generator) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleDict(
            {name: Adapted(out, inp, shape.rank, gen)
             for name, (out, inp) in shape.matrices().items()})
        self.norm1 = torch.nn.LayerNorm(shape.width)
        self.norm2 = torch.nn.LayerNorm(shape.width)


class Stack(torch.nn.Module):
    """The model: ``shape``'s parameters (no forward: gradients are random)."""

    def __init__(self, shape: Shape, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(
            torch.empty(shape.vocab, shape.width).normal_(0.0, 0.02, generator=gen),
            requires_grad=shape.rank == 0)
        self.blocks = torch.nn.ModuleList(Block(shape, gen) for _ in range(shape.blocks))
        self.norm = torch.nn.LayerNorm(shape.width)


@dataclass
class Training:
    """A model, its trainable parameters' initial values, and a run's AdamW over them."""

    model: Stack
    initial: list[torch.Tensor]
    optimizer: torch.optim.AdamW = field(init=False)

    @classmethod
    def of(cls, shape: Shape) -> Training:
        model = Stack(shape)
        training = cls(model, [p.detach().clone() for p in trainable(model)])
        training.reset()
        return training

    def reset(self) -> None:
        """Back to the initial values with a fresh optimizer: every run saves the same."""
        with torch.no_grad():
            for p, start in zip(trainable(self.model), self.initial, strict=True):
                p.copy_(start)
        self.optimizer = torch.optim.AdamW(trainable(self.model), lr=1e-3, weight_decay=0.01)

    def step(self, gen: torch.Generator) -> None:
        """One AdamW step on random gradients of the trainable parameters."""
        for p in trainable(self.model):
            p.grad = torch.empty_like(p).normal_(generator=gen)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> ckpts.TrainState:
        return ckpts.TrainState(model=self.model, optimizer=self.optimizer)

    def changed_bytes(self) -> int:
        """What any save after the first must write: the trainable parameters and their
        AdamW state (exp_avg, exp_avg_sq, step), after a step."""
        params = sum(p.numel() * p.element_size() for p in trainable(self.model))
        return 3 * params + 4 * len(self.initial)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count(model: torch.nn.Module, only_trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not only_trainable)


# ---------------------------------------------------------------- one run


def process_io() -> dict[str, int]:
    """This process's I/O counters (all threads) from /proc/self/io."""
    with open("/proc/self/io") as f:
        return {key: int(value) for key, value in (line.split(":") for line in f)}


def allocated_bytes(run: Path) -> int:
    """Blocks allocated to the run's files, each inode once (hard links share one)."""
    seen: dict[tuple[int, int], int] = {}
    for root, _, files in os.walk(run):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


class Run:
    """One run directory, its manager and what each of its saves took and wrote."""

    def __init__(self, directory: Path, *, dedup: bool, keep_last: int | None) -> None:
        self.directory = directory
        keep = [ckpts.KeepLast(keep_last)] if keep_last else None
        self.manager = ckpts.CheckpointManager(directory, keep=keep, dedup=dedup)
        self.times: list[float] = []
        self.wchar: list[int] = []
        self.growth: list[int] = []
        self.went_first: list[bool] = []  # of its pair of saves of the same state
        self.physical = 0

    def save(self, step: int, state: ckpts.TrainState, *, first: bool) -> None:
        """One timed sync save; its bytes counted by wchar and by physical growth."""
        self.went_first.append(first)
        gc.collect()
        os.sync()  # nothing dirty from before: the save's fsyncs flush its own bytes only
        before = process_io()["wchar"]
        started = time.perf_counter()
        self.manager.save(step, state)
        self.times.append(time.perf_counter() - started)
        self.wchar.append(process_io()["wchar"] - before)
        now = physical_bytes(self.manager.storage.committed())
        self.growth.append(now - self.physical)
        self.physical = now

    def finish(self) -> dict[str, Any]:
        """Close the manager; the run's sizes at the end (its directory stays)."""
        listing = self.manager.storage.committed()
        self.manager.close()
        return {"times": self.times, "wchar": self.wchar, "growth": self.growth,
                "went_first": self.went_first,
                "checkpoints": len(listing), "physical": physical_bytes(listing),
                "logical": sum(sum(e.sizes.values()) for e in listing),
                "checkpoint_logical": sum(max(listing, key=lambda e: e.step).sizes.values()),
                "allocated": allocated_bytes(self.directory)}


def save_pair(training: Training, workdir: Path, *, saves: int, seed: int,
              keep_last: int | None, check_restore: bool = False) -> dict[bool, dict[str, Any]]:
    """A dedup run and a no-dedup run of the same training, in lockstep: after each
    optimizer step both save the same state, in a shuffled order (so each pair of saves
    meets the same disk weather). Returns each run's record, by ``dedup``."""
    training.reset()
    gen = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    runs = {dedup: Run(workdir / ("dedup" if dedup else "no-dedup"), dedup=dedup,
                       keep_last=keep_last) for dedup in (True, False)}
    for step in range(1, saves + 1):
        training.step(gen)
        state = training.state()
        for position, dedup in enumerate(order.sample([True, False], 2)):
            runs[dedup].save(step, state, first=position == 0)
    records = {dedup: run.finish() for dedup, run in runs.items()}
    if check_restore:
        restores_exactly(training, runs[True].directory, saves)
    shutil.rmtree(workdir)
    return records


def restores_exactly(training: Training, run: Path, step: int) -> None:
    """Untimed: the run's checkpoint of ``step`` (the live state) restores bit-exact
    into a scrambled model and a fresh optimizer; raises otherwise."""
    expected = {k: v.clone() for k, v in training.model.state_dict().items()}
    expected_opt = [{k: v.clone() for k, v in s.items()}
                    for s in training.optimizer.state.values()]
    with torch.no_grad():
        for p in training.model.parameters():
            p.fill_(-1.0)
    training.reset()
    training.step(torch.Generator().manual_seed(12345))  # optimizer state to overwrite
    reader = ckpts.CheckpointManager(run)
    reader.restore(training.state(), step=step)
    reader.close()
    got = training.model.state_dict()
    bad = [k for k, v in expected.items() if not torch.equal(v, got[k])]
    got_opt = list(training.optimizer.state.values())
    bad += [f"optimizer state {i}" for i, (a, b) in enumerate(zip(expected_opt, got_opt,
                                                                   strict=True))
            if any(not torch.equal(a[k], b[k]) for k in a)]
    if bad:
        raise RuntimeError(f"{run}: step {step} restored wrong values in {bad[:5]}")


# ---------------------------------------------------------------- the rounds


@dataclass(frozen=True)
class Plan:
    shape: Shape
    rounds: int
    lora_saves: int
    full_saves: int


def run_rounds(plan: Plan, workdir: Path, full_workdir: Path
               ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The LoRA pair (in ``workdir``) and the full fine-tune pair (in ``full_workdir``)
    once per round, in a new order each round, each in fresh run directories."""
    lora = Training.of(plan.shape)
    full = Training.of(Shape(plan.shape.width, plan.shape.blocks, plan.shape.vocab, 0))
    info: dict[str, Any] = {"lora_params": count(lora.model),
                            "lora_trainable": count(lora.model, True),
                            "full_params": count(full.model),
                            "lora_changed_bytes": lora.changed_bytes()}
    results: dict[str, list[dict[str, Any]]] = {name(k, d): [] for k in KINDS
                                                 for d in (True, False)}
    for index in range(plan.rounds):
        for kind in random.Random(index).sample(KINDS, len(KINDS)):
            training, saves, keep_last = ((lora, plan.lora_saves, None) if kind == "lora"
                                          else (full, plan.full_saves, 1))
            started = time.perf_counter()
            where = workdir if kind == "lora" else full_workdir
            records = save_pair(training, where / f"{kind}-{index}", saves=saves, seed=index,
                                keep_last=keep_last,
                                check_restore=kind == "lora" and index == plan.rounds - 1)
            for dedup, record in records.items():
                results[name(kind, dedup)].append(record)
            log(f"  round {index + 1}/{plan.rounds}, {kind}: " + ", ".join(
                f"{'dedup' if d else 'no-dedup'} "
                f"{statistics.median(later(results[name(kind, d)][-1]['times'])):.3f} s/save"
                for d in (True, False)) + f" ({time.perf_counter() - started:.0f} s)")
    info["restore_checked"] = True
    return results, info


def name(kind: str, dedup: bool) -> str:
    return f"{kind}/{'dedup' if dedup else 'no-dedup'}"


# ---------------------------------------------------------------- the verdict


def later(values: list[Any]) -> list[Any]:
    """The saves after the first (the first has nothing to reuse)."""
    return values[1:]


def paired(peers: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[list[float]]:
    """Per round, per save after the first: ours/peer's time, each save paired with the
    peer's save of the same step (made right before or after it)."""
    return [[a / b for a, b in zip(later(mine["times"]), later(theirs["times"]), strict=True)]
            for mine, theirs in zip(ours, peers, strict=True)]


def pooled(rounds: list[dict[str, Any]]) -> float:
    """The median time of every save after the first, all rounds together."""
    value: float = statistics.median(t for r in rounds for t in later(r["times"]))
    return value


def round_medians(ratios: list[list[float]]) -> list[float]:
    return [statistics.median(per_round) for per_round in ratios]


def summarize(results: dict[str, list[dict[str, Any]]], info: dict[str, Any]
              ) -> list[dict[str, Any]]:
    """The target rows: measured value, limit, pass/fail and how it was computed."""
    ld, ln = results["lora/dedup"], results["lora/no-dedup"]
    fd, fn = results["full/dedup"], results["full/no-dedup"]
    full_bytes = statistics.median(w for r in ln for w in r["wchar"])  # a full checkpoint
    checkpoint_size = statistics.median(r["checkpoint_logical"] for r in ln)
    wchar_share = max(w for r in ld for w in later(r["wchar"])) / full_bytes
    growth_share = max(g for r in ld for g in later(r["growth"])) / checkpoint_size
    first_share = max(w for r in ld for w in later(r["wchar"])) / min(r["wchar"][0] for r in ld)
    time_share = round_medians(paired(ln, ld))
    time_vs_first = [statistics.median(later(r["times"])) / r["times"][0] for r in ld]
    disk = [r["physical"] / checkpoint_size for r in ld]
    disk_blocks = [r["allocated"] / (p["allocated"] / p["checkpoints"]) for r, p in
                   zip(ld, ln, strict=True)]
    overhead_pairs = paired(fn, fd)
    overhead = round_medians(overhead_pairs)
    spread = [v for per_round in overhead_pairs for v in per_round]
    saves = len(ld[0]["times"])

    def row(target: str, value: float, limit: float, unit: str, how: str) -> dict[str, Any]:
        return {"target": target, "value": value, "limit": limit, "unit": unit,
                "pass": value <= limit, "how": how}

    return [
        row("LoRA: bytes written per save after the first (wchar)", wchar_share, 0.10, "%",
            f"max over saves 2..{saves} of all rounds / median no-dedup save "
            f"({full_bytes / 1e6:.1f} MB); vs the run's own first save "
            f"{100 * first_share:.2f}%; floor (changed tensors) "
            f"{100 * info['lora_changed_bytes'] / full_bytes:.2f}%"),
        row("LoRA: bytes written per save after the first (physical growth)", growth_share,
            0.10, "%", f"max over saves 2..{saves} of all rounds / one no-dedup checkpoint "
            f"({checkpoint_size / 1e6:.1f} MB)"),
        row("LoRA: save time after the first", statistics.median(time_share), 0.25, "%",
            f"median over rounds of the median over saves 2..{saves} of the paired ratio "
            "(same step, no-dedup); rounds "
            + ", ".join(f"{100 * v:.1f}%" for v in time_share) + "; vs the run's own first "
            f"save {100 * statistics.median(time_vs_first):.1f}%"),
        row(f"LoRA: disk of {saves} checkpoints (physical)", max(disk), 1.5, "x",
            "physical_bytes(listing) / one no-dedup checkpoint; rounds "
            + ", ".join(f"{v:.3f}" for v in disk)),
        row(f"LoRA: disk of {saves} checkpoints (st_blocks of unique inodes)",
            max(disk_blocks), 1.5, "x", "allocated blocks of the run / (no-dedup run's / "
            f"{saves}); rounds " + ", ".join(f"{v:.3f}" for v in disk_blocks)),
        row(f"full fine-tune: save time, dedup / no dedup, on {info['full_filesystem']}",
            statistics.median(overhead), 1.05, "x", "median over rounds of the median over "
            f"saves 2..{len(fd[0]['times'])} of the paired ratio (same step); rounds "
            + ", ".join(f"{v:.3f}" for v in overhead)
            + f"; single pairs {min(spread):.2f}-{max(spread):.2f}; all saves 2..N pooled, "
            f"median / median: {pooled(fd) / pooled(fn):.3f}"),
    ]


def fmt(value: float, unit: str) -> str:
    return f"{100 * value:.2f}%" if unit == "%" else f"{value:.3f}x"


def timing_lines(results: dict[str, list[dict[str, Any]]]) -> Iterator[str]:
    yield ("| run | first save | later saves, median [min-max] | MB written, first / later "
           "(median, wchar) | run on disk after the last save |")
    yield "|---|---|---|---|---|"
    for run_name, rounds in results.items():
        first = [r["times"][0] for r in rounds]
        rest = [t for r in rounds for t in later(r["times"])]
        wrote = [w for r in rounds for w in later(r["wchar"])]
        yield (f"| {run_name} | {statistics.median(first):.3f} s | "
               f"{statistics.median(rest):.3f} s [{min(rest):.3f}-{max(rest):.3f}] | "
               f"{statistics.median(r['wchar'][0] for r in rounds) / 1e6:.1f} / "
               f"{statistics.median(wrote) / 1e6:.1f} | "
               f"{statistics.median(r['physical'] for r in rounds) / 1e6:.1f} MB in "
               f"{rounds[0]['checkpoints']} checkpoint(s) |")


def markdown(result: dict[str, Any]) -> str:
    info, plan = result["info"], result["plan"]
    lines = [f"# {TITLE}", "", f"Machine: {wl.machine_line(result['machine'])}", "",
             f"Model: {info['lora_params'] / 1e6:.1f} M fp32 params, width {plan['width']}, "
             f"{plan['blocks']} blocks, vocab {plan['vocab']}. LoRA rank {plan['rank']}: "
             f"{info['lora_trainable'] / 1e6:.2f} M trainable "
             f"({100 * info['lora_trainable'] / info['lora_params']:.2f}%, adapters + norms), "
             f"{plan['lora_saves']} saves per run; full fine-tune "
             f"{info['full_params'] / 1e6:.1f} M trainable, {plan['full_saves']} saves per run. "
             f"{plan['rounds']} rounds."
             + (" The dedup LoRA run's last checkpoint restored bit-exact."
                if info.get("restore_checked") else ""), "",
             "| target | measured | limit | pass | how |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {fmt(r['value'], r['unit'])} | {fmt(r['limit'], r['unit'])} "
              f"| {'PASS' if r['pass'] else 'FAIL'} | {r['how']} |" for r in result["targets"]]
    lines += ["", *timing_lines(result["runs"]), ""]
    return "\n".join(lines + [f"- {note}" for note in NOTES]) + "\n"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--width", type=int, default=768, help="model width (default 768)")
    parser.add_argument("--blocks", type=int, default=12, help="blocks (default 12)")
    parser.add_argument("--vocab", type=int, default=16384, help="embedding rows (default 16384)")
    parser.add_argument("--lora-saves", type=int, default=10, help="saves per LoRA run (10)")
    parser.add_argument("--full-saves", type=int, default=6,
                        help="saves per full fine-tune run (default 6)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny smoke run (seconds): width 64, 2 blocks, 1 round")
    parser.add_argument("--out", type=Path, default=None,
                        help="where dedup-<timestamp>.json/.md go (default benchmarks/results; "
                        "with --quick, nothing is written unless given)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the runs are written (default: system temp)")
    parser.add_argument("--full-dir", type=Path, default=None,
                        help="where the full fine-tune's runs are written (default: as "
                        "--dir); /dev/shm takes the disk's noise out of its comparison")
    args = parser.parse_args()
    if args.quick:
        args.width, args.blocks, args.vocab, args.rank = 64, 2, 256, 4
        args.rounds, args.lora_saves, args.full_saves = 1, 3, 3
    if min(args.rounds, args.rank, args.width, args.blocks, args.vocab) < 1 \
            or min(args.lora_saves, args.full_saves) < 2:
        parser.error("sizes and --rounds must be positive, and each run needs >= 2 saves")
    out = args.out if args.out is not None or args.quick else Path("benchmarks/results")
    plan = Plan(Shape(args.width, args.blocks, args.vocab, args.rank), args.rounds,
                args.lora_saves, args.full_saves)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckpts-dedup-bench-", dir=args.dir) as tmp, \
            tempfile.TemporaryDirectory(prefix="ckpts-dedup-bench-full-",
                                        dir=args.full_dir or args.dir) as full_tmp:
        machine = wl.machine(Path(tmp))
        full_filesystem = wl.machine(Path(full_tmp))["filesystem"]
        log(f"== LoRA rank {args.rank} in {tmp}, full fine-tune in {full_tmp}, "
            f"{args.rounds} rounds")
        runs, info = run_rounds(plan, Path(tmp), Path(full_tmp))
        info["full_filesystem"] = full_filesystem
    machine["loadavg_at_end"] = os.getloadavg()[0]
    result = {"title": TITLE, "machine": machine, "info": info,
              "plan": {"width": args.width, "blocks": args.blocks, "vocab": args.vocab,
                       "rank": args.rank, "rounds": args.rounds,
                       "lora_saves": args.lora_saves, "full_saves": args.full_saves,
                       "quick": args.quick},
              "targets": summarize(runs, info), "runs": runs, "notes": NOTES,
              "total_seconds": round(time.perf_counter() - started, 1)}
    text = markdown(result)
    print(text)
    write_results(out, "dedup", result, text)
    log(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
