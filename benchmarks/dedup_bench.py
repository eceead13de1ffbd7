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

The reuse check (issue 24): before reusing a file, a save reads the previous
checkpoint's copy back and hashes it against its manifest, so that a file damaged at
rest is written anew rather than linked. Its cost is measured in the same run, three
ways. The LoRA lockstep holds two more dedup runs: *dedup-unchecked*, the same save
with the check skipped (``ckpts._tensors.writing._intact_sources`` replaced for that
run's saves only: there is no option to turn it off), and *dedup-cold*, whose source
files are dropped from the page cache (``posix_fadvise(DONTNEED)`` after ``os.sync()``,
untimed) before each save, so its check reads them from the disk; and every dedup save
records the check's own wall time and the bytes it hashed (the reused files).

Run: ``python -m benchmarks.dedup_bench [--rounds 3] [--rank 8] [--dir /tmp]``, or
``make bench-dedup``; ``--quick`` is a tiny smoke run (seconds). Writes
``benchmarks/results/dedup-<timestamp>.json`` and ``.md`` (with ``--quick``, only where
``--out`` says).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ckpts
from benchmarks import _workloads as wl
from benchmarks._measure import log, write_results
from ckpts._run.usage import physical_bytes
from ckpts._tensors import writing

TITLE = "ckpts dedup: reuse of unchanged tensor files (issue 11) and its check (issue 24)"
KINDS = ("lora", "full")
# the runs of each kind, saving in lockstep (see the module docstring)
VARIANTS = {"lora": ("dedup", "dedup-unchecked", "dedup-cold", "no-dedup"),
            "full": ("dedup", "no-dedup")}
NOTES = [
    "Each round runs a LoRA set and a full fine-tune pair of runs (in a shuffled order): "
    "the pair a dedup and a no-dedup run, the LoRA set those two plus dedup-unchecked and "
    "dedup-cold, in fresh directories (deleted after), saving in lockstep: after each "
    "optimizer step each run saves the same state, in a shuffled order. "
    "A time ratio pairs each save with the peer's save of the same step; it is the median "
    "over rounds of the per-round median over the saves after the first.",
    "The page cache cannot be dropped whole here (no privilege assumed). A dedup save "
    "decides reuse by hashing the live tensors, then its check reads the files to reuse "
    "back: in the dedup run from the page cache (the previous save just wrote or linked "
    "them), which favours it; the dedup-cold run evicts them first and shows the save "
    "without that help. Every save calls fsync on what it writes.",
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
    "The reuse check reads back only the files about to be reused (here the frozen base "
    "and the RNG file). In the dedup and dedup-unchecked runs they were written or linked "
    "by the previous save, so the check hashes them from the page cache (a memory map, no "
    "copy): the warm case, which is the usual one for a source saved minutes earlier. The "
    "dedup-cold run evicts them first (clean pages, posix_fadvise DONTNEED), so its check "
    "pays the disk read: the case of a source whose pages the kernel has reclaimed.",
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


@contextlib.contextmanager
def reuse_check(run: Run) -> Iterator[None]:
    """During one save of ``run``: the reuse check timed (its seconds and the bytes it
    hashed added to the run's last entries), or, for dedup-unchecked, skipped."""
    real = writing._intact_sources

    def timed(storage: Any, reusable: Any, outs: Any, same: Sequence[bool]) -> list[bool]:
        started = time.perf_counter()
        checked = real(storage, reusable, outs, same)
        run.check_times[-1] += time.perf_counter() - started
        run.check_bytes[-1] += sum(out.nbytes for out, reused in zip(outs, same, strict=True)
                                   if reused)
        return checked

    def skipped(storage: Any, reusable: Any, outs: Any, same: Sequence[bool]) -> list[bool]:
        return list(same)

    writing._intact_sources = skipped if run.variant == "dedup-unchecked" else timed
    try:
        yield
    finally:
        writing._intact_sources = real


def evict(checkpoint: Path) -> None:
    """Drop a checkpoint's (clean) files from the page cache: the next read is the disk's."""
    for path in checkpoint.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Run:
    """One run directory, its manager and what each of its saves took and wrote.
    ``variant``: dedup, dedup-unchecked (no reuse check), dedup-cold (its sources
    evicted from the page cache before each save) or no-dedup."""

    def __init__(self, directory: Path, *, variant: str, keep_last: int | None) -> None:
        self.directory, self.variant = directory, variant
        keep = [ckpts.KeepLast(keep_last)] if keep_last else None
        self.manager = ckpts.CheckpointManager(directory, keep=keep,
                                               dedup=variant != "no-dedup")
        self.times: list[float] = []
        self.wchar: list[int] = []
        self.growth: list[int] = []
        self.check_times: list[float] = []  # the reuse check's own time in each save
        self.check_bytes: list[int] = []  # and the bytes it hashed (the files reused)
        self.went_first: list[bool] = []  # of its lockstep's saves of the same state
        self.physical = 0

    def save(self, step: int, state: ckpts.TrainState, *, first: bool) -> None:
        """One timed sync save; its bytes counted by wchar and by physical growth."""
        self.went_first.append(first)
        self.check_times.append(0.0)
        self.check_bytes.append(0)
        gc.collect()
        os.sync()  # nothing dirty from before: the save's fsyncs flush its own bytes only
        listing = self.manager.storage.committed()
        if self.variant == "dedup-cold" and listing:
            evict(self.directory / max(listing, key=lambda e: e.step).name)
        before = process_io()["wchar"]
        started = time.perf_counter()
        with reuse_check(self):
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
                "check_times": self.check_times, "check_bytes": self.check_bytes,
                "went_first": self.went_first,
                "checkpoints": len(listing), "physical": physical_bytes(listing),
                "logical": sum(sum(e.sizes.values()) for e in listing),
                "checkpoint_logical": sum(max(listing, key=lambda e: e.step).sizes.values()),
                "allocated": allocated_bytes(self.directory)}


def save_pair(training: Training, workdir: Path, *, variants: Sequence[str], saves: int,
              seed: int, keep_last: int | None, check_restore: bool = False
              ) -> dict[str, dict[str, Any]]:
    """Runs of the same training, one per variant (dedup, no-dedup, ...), in lockstep:
    after each optimizer step each saves the same state, in a shuffled order (so the
    saves of one step meet the same disk weather). Returns each run's record, by
    variant."""
    training.reset()
    gen = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    runs = {variant: Run(workdir / variant, variant=variant, keep_last=keep_last)
            for variant in variants}
    for step in range(1, saves + 1):
        training.step(gen)
        state = training.state()
        for position, variant in enumerate(order.sample(list(variants), len(variants))):
            runs[variant].save(step, state, first=position == 0)
    records = {variant: run.finish() for variant, run in runs.items()}
    if check_restore:
        restores_exactly(training, runs["dedup"].directory, saves)
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
    results: dict[str, list[dict[str, Any]]] = {f"{k}/{v}": [] for k in KINDS
                                                 for v in VARIANTS[k]}
    for index in range(plan.rounds):
        for kind in random.Random(index).sample(KINDS, len(KINDS)):
            training, saves, keep_last = ((lora, plan.lora_saves, None) if kind == "lora"
                                          else (full, plan.full_saves, 1))
            started = time.perf_counter()
            where = workdir if kind == "lora" else full_workdir
            records = save_pair(training, where / f"{kind}-{index}", variants=VARIANTS[kind],
                                saves=saves, seed=index, keep_last=keep_last,
                                check_restore=kind == "lora" and index == plan.rounds - 1)
            for variant, record in records.items():
                results[f"{kind}/{variant}"].append(record)
            log(f"  round {index + 1}/{plan.rounds}, {kind}: " + ", ".join(
                f"{v} {statistics.median(later(results[f'{kind}/{v}'][-1]['times'])):.3f} s/save"
                for v in VARIANTS[kind]) + f" ({time.perf_counter() - started:.0f} s)")
    info["restore_checked"] = True
    return results, info


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


def check_lines(results: dict[str, list[dict[str, Any]]]) -> Iterator[str]:
    """The reuse check's cost (issue 24): its own time and the bytes it hashed in each
    dedup run, then save times paired with the same save without the check."""
    yield ("| reuse check, saves 2..N | check time per save, median [min-max] | MB hashed "
           "per save (median) | rate (median) | share of the save's time (median) |")
    yield "|---|---|---|---|---|"
    for run_name in ("lora/dedup", "lora/dedup-cold", "full/dedup"):
        spent = [t for r in results[run_name] for t in later(r["check_times"])]
        hashed = [b for r in results[run_name] for b in later(r["check_bytes"])]
        shares = [c / t for r in results[run_name]
                  for c, t in zip(later(r["check_times"]), later(r["times"]), strict=True)]
        rates = [b / t for b, t in zip(hashed, spent, strict=True) if t > 0 and b]
        yield (f"| {run_name} | {1e3 * statistics.median(spent):.1f} ms "
               f"[{1e3 * min(spent):.1f}-{1e3 * max(spent):.1f}] | "
               f"{statistics.median(hashed) / 1e6:.1f} | "
               + (f"{statistics.median(rates) / 1e9:.2f} GB/s" if rates else "-")
               + f" | {100 * statistics.median(shares):.1f}% |")
    yield ""
    yield ("| save time, paired ratio (same step), saves 2..N | median over rounds | "
           "per round | single pairs |")
    yield "|---|---|---|---|"
    for ours, peer, what in (("dedup", "dedup-unchecked", "check on (warm) / off"),
                             ("dedup-cold", "dedup-unchecked", "check on (cold) / off"),
                             ("dedup-unchecked", "no-dedup", "reuse without the check / no dedup"),
                             ("dedup-cold", "no-dedup", "reuse, cold check / no dedup")):
        ratios = paired(results[f"lora/{peer}"], results[f"lora/{ours}"])
        rounds = round_medians(ratios)
        pairs = [v for per_round in ratios for v in per_round]
        yield (f"| LoRA: {what} ({ours} / {peer}) | {statistics.median(rounds):.3f}x | "
               + ", ".join(f"{v:.3f}" for v in rounds)
               + f" | {min(pairs):.2f}-{max(pairs):.2f} |")


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
    lines += ["", *timing_lines(result["runs"]), "", *check_lines(result["runs"]), ""]
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
