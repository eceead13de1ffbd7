"""ckpts on CUDA state against torch.save, torch.load and DCP and the copy and disk floors.

Issue 14's table in one short run (at most ~5 minutes on one H200 at the default size).
The state: a stack of fp32 ``width x width`` layers (weight and bias) on the GPU, ~268 M
parameters by default (width 4096, 16 layers), and AdamW after one real training step:
~3.2 GB, every tensor on CUDA (AdamW's ``step`` counters stay on the CPU, where torch
keeps them). Contenders, in interleaved rounds after one untimed warm-up round:

- async save, the training thread blocked: ckpts ``save()`` with ``async_save=True`` (one
  manager reused, as in training) against DCP ``async_save`` and against the floor, a
  ``copy_`` of every tensor into pinned host buffers allocated (and touched) beforehand;
- sync save (fsync'd): ckpts against ``torch.save``, DCP ``save`` and the disk floor, the
  same bytes written from those pinned buffers to 4 files on 4 threads;
- restore into the live CUDA model + optimizer: ckpts against ``torch.load`` +
  ``load_state_dict`` and DCP ``load`` + ``load_state_dict``.

Then 40 training steps saving every 10 (ckpts async, DCP async, ckpts sync), each against
the same loop without saves, as overhead per save; and the first async save of a fresh
manager (pinned allocation) against a later one.

Run: ``python -m benchmarks.gpu [--size 268M] [--rounds 3] [--out DIR] [--dir DIR]``, or
``make bench-gpu``. Without a CUDA device it says so and exits 0. ``--cpu-dry-run`` runs
the same code on the CPU with a tiny model in seconds, to test the script (its numbers
say nothing about ckpts). Writes ``gpu-<timestamp>.json`` and ``.md`` under ``--out``
(default ``benchmarks/results``; with ``--cpu-dry-run``, nothing unless given). Exits 1
when an operation failed (its row says so; the rest of the table is still measured).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save

import ckpts
from benchmarks import _measure as ms
from benchmarks import _peers as peers
from benchmarks import _workloads as wl
from benchmarks._measure import Deferred, Op, Series, log, paired_ratio, write_results

TITLE = "ckpts on CUDA state against torch.save, torch.load and DCP (issue 14)"
DEFAULT_SIZE = "268M"
STEPS, EVERY = 40, 10
LIMIT_S = 120.0  # a memory run still going after this is interrupted
NOTES = [
    "A time is the median of the rounds [min-max]; every contender runs once per round in "
    "a new seeded shuffled order, after one untimed warm-up round. A ratio is the median "
    "of the per-round ratios ckpts/peer (the ratio of the values for a row measured once).",
    "Every timed operation starts and ends with torch.cuda.synchronize(). Async saves: "
    "the background write is waited for after the clock stops.",
    "Saves fsync every file (DCP: sync_files=True; ckpts also hashes every byte, fsyncs "
    "directories and commits atomically). DCP runs with thread_count = min(8, cores).",
    "Pinned copy floor: copy_(non_blocking=True) of every tensor into pinned host buffers "
    "allocated and touched beforehand, then a synchronize. Disk floor: the bytes of those "
    "buffers written to 4 files by 4 threads, then fsync.",
    "Restores read files written minutes before (warm in the page cache, for all alike) "
    "into the live CUDA model and AdamW; each contender's warm-up restore is checked "
    "bit-exact against a copy of the state on the device, after scrambling it.",
    "Training loop: one forward/backward/AdamW step of the same model on a fixed batch, "
    "40 steps, a save every 10; overhead per save = (loop time - the faster of two loops "
    "without saves, one before and one after) / 4, the final background write excluded "
    "(recorded in the JSON). ckpts async reuses the warm manager of the rounds; DCP "
    "async_save waits for its previous save before the next, as ckpts does.",
    "First async save: a fresh manager's first save(), whose staging memory is allocated "
    "then, against the median of that manager's later saves in the rounds.",
]


@dataclass
class Plan:
    """What one run measures: the model's shape, the batch and the rounds."""

    device: str
    width: int
    layers: int
    batch: int
    rounds: int
    dcp_threads: int

    def params(self) -> int:
        return self.layers * (self.width * self.width + self.width)


def parse_size(text: str) -> int:
    """A parameter count such as ``268M``, ``1.2G``, ``50K`` or ``1000000``."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        count = int(float(number) * scale)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--size {text!r} is not a parameter count; write e.g. 268M, 1.2G or 50000") from e
    if count < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r} must be at least one parameter")
    return count


def plan_for(params: int, device: str, rounds: int) -> Plan:
    """Layers of width 4096 (narrower for small sizes), as many as ``params`` needs."""
    width = 4096
    while width > 16 and params < 4 * width * width:
        width //= 2
    layers = max(1, round(params / (width * width + width)))
    batch = 8192 if device == "cuda" else 32
    return Plan(device, width, layers, batch, rounds, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------- the state


class LayerStack(wl.StateModule):
    """``layers`` linear layers (``lNN_w``, ``lNN_b``) applied in turn: a model with a
    real forward and backward, whose state is only its parameters."""

    def __init__(self, params: dict[str, torch.Tensor], layers: int) -> None:
        super().__init__(params)
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.layers):
            x = torch.nn.functional.linear(x, self.params[f"l{i:02d}_w"],
                                           self.params[f"l{i:02d}_b"])
        return x


def build(plan: Plan) -> tuple[wl.Workload, torch.Tensor]:
    """The model on ``plan.device`` (std 0.02), AdamW after one real step, and the batch
    the training loop uses."""
    torch.manual_seed(0)
    device = torch.device(plan.device)
    params: dict[str, torch.Tensor] = {}
    for i in range(plan.layers):
        params[f"l{i:02d}_w"] = torch.empty(plan.width, plan.width, device=device).normal_(0, 0.02)
        params[f"l{i:02d}_b"] = torch.zeros(plan.width, device=device)
    model = LayerStack(params, plan.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    batch = torch.randn(plan.batch, plan.width, device=device)
    train_step(model, optimizer, batch)
    synchronize(plan.device)
    return wl.Workload("gpu", model, optimizer), batch


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batch: torch.Tensor) -> None:
    model(batch).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def scramble_and_check(w: wl.Workload, expected: list[torch.Tensor], restore: Op,
                       target: Path) -> float:
    """Scramble the live state, restore it with ``restore``, and require every tensor to
    equal ``expected`` bit for bit. Returns the seconds ``restore`` took."""
    wl.scramble(w)
    started = time.perf_counter()
    restore(target)
    elapsed = time.perf_counter() - started
    wrong = [name for (name, t), e in zip(w.flat().items(), expected, strict=True)
             if not torch.equal(t, e)]
    if wrong:
        raise RuntimeError(f"restore left {len(wrong)} of {len(expected)} tensors wrong: "
                           f"{wrong[:5]}")
    return elapsed


# ---------------------------------------------------------------- the operations


def pinned_buffers(w: wl.Workload, pin: bool) -> list[torch.Tensor]:
    """A host buffer per tensor of the state (pinned on CUDA), zero-filled so its pages
    are touched before any timing."""
    return [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).zero_()
            for t in w.flat().values()]


def pinned_copy_floor(w: wl.Workload, buffers: list[torch.Tensor]) -> Op:
    """copy_ of every tensor into the reused pinned buffers: the floor of an async stall."""
    def run(d: Path) -> None:
        with torch.no_grad():
            for buffer, tensor in zip(buffers, w.flat().values(), strict=True):
                buffer.copy_(tensor, non_blocking=True)
    return run


def disk_floor(buffers: list[torch.Tensor], files: int = 4) -> Op:
    """The buffers' bytes written to ``files`` files, one thread each, then fsync."""
    views = [memoryview(b.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
             for b in buffers]
    groups = [views[i::files] for i in range(files)]

    def write(path: Path, group: list[memoryview]) -> None:
        with open(path, "wb", buffering=0) as f:
            for view in group:
                done = 0
                while done < len(view):
                    done += f.write(view[done:])
            os.fsync(f.fileno())

    def run(d: Path) -> None:
        threads = [threading.Thread(target=write, args=(d / f"blob{i}", group))
                   for i, group in enumerate(groups)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return run


def synced(op: Op, device: str) -> Op:
    """``op`` between two synchronizes: its time includes the device work it queued."""
    def run(d: Path) -> Any:
        synchronize(device)
        result = op(d)
        synchronize(device)
        return result
    return run


# ---------------------------------------------------------------- the phases


RESTORES = {"ckpts restore": "ckpts save", "torch.load restore": "torch.save",
            "DCP load": "DCP save"}


def first_async_save(w: wl.Workload, run_dir: Path, device: str) -> tuple[Op, float]:
    """A fresh async manager's op (see ``peers.ckpts_async_save``; not synchronized, as
    a training loop calls it) and the time of its first save, the one that allocates its
    staging memory."""
    op = peers.ckpts_async_save(w, run_dir)
    started = time.perf_counter()
    result = synced(op, device)(run_dir)
    elapsed = time.perf_counter() - started
    if isinstance(result, Deferred):
        result.finish()
    return op, elapsed


def warm_up(ops: Mapping[str, Op], w: wl.Workload, kept: Path
            ) -> tuple[dict[str, float], dict[str, str]]:
    """Run every op once, outside the rounds: first all but the restores (the saves the
    restores read from are kept in ``kept/<name>``), then each restore after a scramble,
    checked bit-exact. Returns each op's time and, for an op that raised, its error."""
    expected = [t.detach().clone() for t in w.flat().values()]
    first, failed = {}, {}
    order = [n for n in ops if n not in RESTORES] + [n for n in ops if n in RESTORES]
    for name in order:
        target = kept / ms._slug(name)
        target.mkdir(parents=True)
        try:
            if name in RESTORES:
                first[name] = scramble_and_check(w, expected, ops[name], target)
            else:
                started = time.perf_counter()
                result = ops[name](target)
                first[name] = time.perf_counter() - started
                if isinstance(result, Deferred):
                    result.finish()
        except Exception as e:  # a broken contender must not hide the others' numbers
            traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {e}"
            first.pop(name, None)
        log(f"  warm-up {name}: " + (failed[name] if name in failed
                                     else f"{first[name]:.3f}s"))
        if name not in RESTORES.values():  # only the restores' sources are kept
            shutil.rmtree(target)
    restore_with(w, expected)
    return first, failed


def restore_with(w: wl.Workload, expected: list[torch.Tensor]) -> None:
    """Put ``expected`` back into the live state (after a failed restore left it
    scrambled)."""
    with torch.no_grad():
        for tensor, value in zip(w.flat().values(), expected, strict=True):
            tensor.copy_(value)


def training_loop(w: wl.Workload, batch: torch.Tensor, device: str,
                  save: Callable[[int], Any] | None) -> float:
    """Seconds for ``STEPS`` training steps, calling ``save(step)`` every ``EVERY``."""
    synchronize(device)
    started = time.perf_counter()
    for step in range(1, STEPS + 1):
        train_step(w.model, w.optimizer, batch)
        if save is not None and step % EVERY == 0:
            save(step)
    synchronize(device)
    return time.perf_counter() - started


def loop_phase(w: wl.Workload, batch: torch.Tensor, plan: Plan, async_op: Op,
               workdir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The training loop without saves (before and after), then with each kind of save."""
    state = ckpts.TrainState(model=w.model, optimizer=w.optimizer)
    sync_manager = ckpts.CheckpointManager(workdir / "loop-sync", keep=[ckpts.KeepLast(1)])
    dcp_futures: list[Any] = []
    pending: list[Deferred] = []

    def ckpts_async(step: int) -> None:
        result = async_op(workdir)
        if isinstance(result, Deferred):
            pending[:] = [result]

    def dcp_async(step: int) -> None:
        while dcp_futures:
            dcp_futures.pop().result()
        writer = FileSystemWriter(workdir / f"loop-dcp-{step}", sync_files=True,
                                  thread_count=plan.dcp_threads)
        dcp_futures.append(dcp_async_save(w.torch_state(), storage_writer=writer))

    def finish_all() -> None:
        while pending:
            pending.pop().finish()
        while dcp_futures:
            dcp_futures.pop().result()

    savers: dict[str, Callable[[int], Any] | None] = {
        "no saves (before)": None, "ckpts async": ckpts_async, "DCP async_save": dcp_async,
        "ckpts sync": lambda step: sync_manager.save(step, state), "no saves (after)": None}
    seconds: dict[str, float] = {}
    final_wait: dict[str, float] = {}
    failed: dict[str, str] = {}
    for _ in range(3):  # untimed: the first loop must not pay for warming anything up
        train_step(w.model, w.optimizer, batch)
    for name, saver in savers.items():
        try:
            seconds[name] = training_loop(w, batch, plan.device, saver)
            started = time.perf_counter()
            finish_all()
            final_wait[name] = time.perf_counter() - started
        except Exception as e:  # record, go on: the other loops still measure
            traceback.print_exc()
            failed[f"loop: {name}"] = f"{type(e).__name__}: {e}"
            pending.clear()  # a failed save's background work is abandoned, not awaited
            dcp_futures.clear()
        log(f"  training loop, {name}: " + (f"{seconds[name]:.3f}s" if name in seconds
                                             else "failed"))
    sync_manager.close()
    for leftover in [workdir / "loop-sync", *workdir.glob("loop-dcp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    base = min(seconds.get("no saves (before)", float("inf")),
               seconds.get("no saves (after)", float("inf")))
    saves = STEPS // EVERY
    overhead = {name: (seconds[name] - base) / saves for name in
                ("ckpts async", "DCP async_save", "ckpts sync") if name in seconds}
    return {"steps": STEPS, "save_every": EVERY, "seconds": seconds,
            "final_wait_s": final_wait, "no_save_s": base,
            "overhead_per_save_s": overhead}, failed


# ---------------------------------------------------------------- the table


# (operation, ckpts contender, peer, target ratio or None)
ROWS: list[tuple[str, str, str, float | None]] = [
    ("async save, training thread blocked", "ckpts async save", "DCP async_save", None),
    ("async save, training thread blocked", "ckpts async save", "pinned copy floor", None),
    ("sync save", "ckpts save", "torch.save", None),
    ("sync save", "ckpts save", "DCP save", 0.6),
    ("sync save", "ckpts save", "disk floor (4 files, 4 threads)", 1.15),
    ("restore into live model + optimizer", "ckpts restore", "torch.load restore", None),
    ("restore into live model + optimizer", "ckpts restore", "DCP load", 0.3),
    (f"{STEPS} training steps, save every {EVERY}: overhead per save", "loop: ckpts async",
     "loop: DCP async_save", None),
    (f"{STEPS} training steps, save every {EVERY}: overhead per save", "loop: ckpts async",
     "loop: ckpts sync", None),
    (f"{STEPS} training steps, save every {EVERY}: overhead per save", "loop: ckpts async",
     "pinned copy floor", 2.0),
    ("first async save (pinned allocation) against later ones", "first async save",
     "ckpts async save", 2.0),
]


def summarize(times: Mapping[str, Series], failed: Mapping[str, str]) -> list[dict[str, Any]]:
    """The table's rows: both sides' values, the ratio, the target and whether it is met."""
    rows = []
    for operation, ours, peer, target in ROWS:
        a, b = times.get(ours), times.get(peer)
        ratio = paired_ratio(a, b) if a is not None and b is not None and b.median else None
        rows.append({"operation": operation, "ckpts_name": ours, "peer": peer,
                     "ckpts": a.summary() if a else failed.get(ours, "not measured"),
                     "peer_value": b.summary() if b else failed.get(peer, "not measured"),
                     "ratio": ratio, "target": target,
                     "met": None if target is None or ratio is None else ratio <= target})
    return rows


def _seconds(value: float) -> str:
    if abs(value) >= 1:
        return f"{value:.2f} s"
    return f"{value * 1e3:.0f} ms" if abs(value) >= 0.01 else f"{value * 1e3:.2f} ms"


def _cell(value: dict[str, Any] | str) -> str:
    if isinstance(value, str):
        return f"failed: {value}"[:120].replace("|", "/")
    if value["min"] == value["max"]:
        return _seconds(value["median"])
    return f"{_seconds(value['median'])} [{_seconds(value['min'])}-{_seconds(value['max'])}]"


def markdown(result: dict[str, Any]) -> str:
    plan = result["plan"]
    lines = [f"# {TITLE}", "",
             f"Device: **{result['device_name']}**. Machine: "
             f"{wl.machine_line(result['machine'])}", "",
             f"State: {plan['params']:,} fp32 params ({plan['layers']} layers of width "
             f"{plan['width']}) + AdamW = {result['state_bytes'] / 1e6:,.1f} MB on "
             f"{plan['device']}; batch {plan['batch']}; rounds: {plan['rounds']}; "
             f"{result['total_seconds']:.0f} s in all.", ""]
    if plan["device"] != "cuda":
        lines += ["**CPU dry run**: these numbers test the script, not ckpts; the targets "
                  "are for CUDA state.", ""]
    lines += ["| operation | ckpts | peer or floor | peer | ckpts / peer | target | met |",
              "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        target = "" if row["target"] is None else f"<= {row['target']}x"
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['operation']} | {row['ckpts_name']}: {_cell(row['ckpts'])} | "
                     f"{row['peer']} | {_cell(row['peer_value'])} | {ratio} | {target} | "
                     f"{met} |")
    lines.append("")
    for name, peak in result.get("host_memory", {}).items():
        lines.append(f"- Peak extra host memory, {name}: {peak['extra_mb']:,.0f} MB "
                     f"({peak['of_state']:.1%} of the state; anonymous {peak['anon_mb']:,.0f} MB).")
    return "\n".join(lines + [f"- {note}" for note in NOTES]) + "\n"


def peak_host_memory(ops: Mapping[str, Op], failed: Mapping[str, str], kept: Path,
                     state_bytes: int) -> dict[str, dict[str, float]]:
    """Peak extra host memory (RSS above the start, sampled every ~1 ms) of one more
    sync save and one more restore: the chunked path holds a few chunks, not the state."""
    peaks = {}
    for name in ("ckpts save", "ckpts restore"):
        if name in failed:
            continue
        peak, _ = ms.measure_memory(ops[name], kept / "memory-run", LIMIT_S)
        peaks[name] = {"extra_mb": peak.extra / 1e6, "anon_mb": peak.extra_anon / 1e6,
                       "of_state": peak.extra / state_bytes}
        log(f"  peak extra host memory, {name}: {peak.extra / 1e6:.0f} MB")
    return peaks


# ---------------------------------------------------------------- the run


def measure(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Build the state, run the warm-up and the rounds, then the training loops."""
    phases = {"started": time.perf_counter()}
    w, batch = build(plan)
    phases["built"] = time.perf_counter()
    state_bytes = w.nbytes()
    log(f"== {plan.params() / 1e6:.1f} M params, {state_bytes / 1e9:.2f} GB of state on "
        f"{plan.device}, {plan.rounds} rounds, in {workdir}")
    async_op, first_async = first_async_save(w, workdir / "async-run", plan.device)
    log(f"  first async save: {first_async:.3f}s")
    buffers = pinned_buffers(w, pin=plan.device == "cuda")
    kept = workdir / "kept"
    ops: dict[str, Op] = {
        "ckpts async save": async_op,
        "DCP async_save": peers.dcp_async_save(w, plan.dcp_threads),
        "pinned copy floor": pinned_copy_floor(w, buffers),
        "ckpts save": peers.ckpts_save(w), "torch.save": peers.torch_save(w),
        "DCP save": peers.dcp_save(w, plan.dcp_threads),
        "disk floor (4 files, 4 threads)": disk_floor(buffers),
        "ckpts restore": peers.ckpts_restore(kept / ms._slug("ckpts save"), w),
        "torch.load restore": peers.torch_restore(kept / ms._slug("torch.save"), w),
        "DCP load": peers.dcp_restore(kept / ms._slug("DCP save"), w)}
    ops = {name: synced(op, plan.device) for name, op in ops.items()}
    first, failed = warm_up(ops, w, kept)
    phases["warmed up"] = time.perf_counter()
    failed.update({r: f"its source ({s}) failed" for r, s in RESTORES.items() if s in failed})
    host_memory = peak_host_memory(ops, failed, kept, state_bytes)
    live = {name: op for name, op in ops.items() if name not in failed}
    times = dict(ms.run_rounds(live, plan.rounds, workdir / "rounds", label="gpu"))
    times["first async save"] = Series([first_async])
    phases["rounds done"] = time.perf_counter()
    loop, loop_failed = loop_phase(w, batch, plan, async_op, workdir)
    phases["loops done"] = time.perf_counter()
    failed.update(loop_failed)
    for name, overhead in loop["overhead_per_save_s"].items():
        times[f"loop: {name}"] = Series([overhead])
    return {"state_bytes": state_bytes, "host_memory": host_memory,
            "times": {n: s.summary() for n, s in times.items()},
            "rows": summarize(times, failed), "first_call_s": first,
            "train_loop": loop, "failed": failed,
            "phase_seconds": {name: round(phases[name] - phases["started"], 1)
                              for name in phases if name != "started"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size(DEFAULT_SIZE),
                        help=f"fp32 parameters of the model (default {DEFAULT_SIZE}: "
                        "~3.2 GB of state with AdamW)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run on the CPU with a tiny model (seconds): tests the script")
    parser.add_argument("--out", type=Path, default=None,
                        help="where gpu-<timestamp>.json/.md go (default benchmarks/results; "
                        "with --cpu-dry-run, nothing is written unless given)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where checkpoints are written (default: system temp)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.cpu_dry_run:
        device, device_name, args.size, args.rounds = "cpu", "CPU (dry run)", 20_000, 1
    elif torch.cuda.is_available():
        device, device_name = "cuda", torch.cuda.get_device_name(0)
    else:
        print(f"no CUDA device: torch {torch.__version__} sees none "
              "(torch.cuda.is_available() is False); run on a GPU machine "
              "(`make bench-gpu` there), or pass --cpu-dry-run to check the script here. "
              "Skipped.")
        return 0
    out = args.out if args.out is not None or args.cpu_dry_run else Path("benchmarks/results")
    plan = plan_for(args.size, device, args.rounds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckpts-gpu-bench-", dir=args.dir) as tmp:
        machine = wl.machine(Path(tmp))
        measured = measure(plan, Path(tmp))
    machine["loadavg_at_end"] = os.getloadavg()[0]
    result = {"title": TITLE, "machine": machine, "device_name": device_name,
              "plan": {**asdict(plan), "params": plan.params()}, **measured, "notes": NOTES,
              "total_seconds": round(time.perf_counter() - started, 1)}
    text = markdown(result)
    print(text)
    write_results(out, "gpu", result, text)
    if result["failed"]:
        log("failed: " + "; ".join(f"{n}: {e}" for n, e in result["failed"].items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
