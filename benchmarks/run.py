"""ckpts against torch.save, safetensors and torch.distributed.checkpoint, in one run.

For each workload size: save (fsync'd), async-save stall, restore into a live model
and optimizer, weights-only load, peak extra RSS and bytes on disk; each time is the
median of interleaved rounds (every contender once per round, order shuffled), and
each ratio is the median of the per-round ratios ckpts/peer. See BENCHMARKS.md.

Run: ``python -m benchmarks.run [--sizes tiny,small,standard,many_small] [--reps 5]
[--out benchmarks/results] [--dir /tmp]``  (``large``, ~6 GB of state, only on request)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import _measure as ms
from benchmarks import _peers as peers
from benchmarks import _workloads as wl
from benchmarks._measure import Rows, Series, log
from benchmarks._peers import NOTES
from benchmarks._workloads import SIZES, Workload, build

DEFAULT_SIZES = "tiny,small,standard,many_small"
# A tiny save takes milliseconds, where the disk's noise is as large: more rounds.
REPS_FACTOR = {"tiny": 5}
# Timed once (in the memory run) instead of in every round: with 40,000 tensors a DCP
# save or load takes 20-45 s here and torch.load 10-20 s, which would blow the default
# run's time budget (~8 minutes on 2 cores).
SLOW_PEERS = {"many_small": {"DCP", "torch.load"}}
# Any op whose single memory run takes longer than SLOW_S is timed once too; one that
# runs past LIMIT_S is interrupted and reported as such (a quadratic bug must not hang
# the whole run).
SLOW_S, LIMIT_S = 20.0, 90.0


def timed_once(seconds: dict[str, float | None], names: set[str]) -> dict[str, Series | str]:
    """The single memory-run time of each op in ``names`` (or why there is none)."""
    return {n: Series([t]) if t is not None else f"> {LIMIT_S:.0f} s (interrupted)"
            for n, t in seconds.items() if n in names}


def too_slow(seconds: dict[str, float | None]) -> set[str]:
    return {n for n, t in seconds.items() if t is None or t > SLOW_S}


def save_phase(w: Workload, threads: int, reps: int, kept: Path, scratch: Path, rows: Rows,
               slow: set[str]) -> tuple[dict[str, ms.PeakRSS], Series]:
    saves = {"ckpts": peers.ckpts_save(w), "torch.save": peers.torch_save(w),
             "safetensors": peers.safetensors_save(w), "DCP": peers.dcp_save(w, threads),
             "clone": peers.clone_floor(w), "write": peers.write_floor(w),
             "write4": peers.write_floor(w, files=4),
             "hash": peers.hash_only(w)}
    memory, once = {}, {}
    for name in ("ckpts", "torch.save", "safetensors", "DCP", "clone"):
        log(f"  {w.size}: memory run of {name} save (kept for the restores)")
        memory[name], once[name] = ms.measure_memory(saves[name], kept / name, LIMIT_S)
    slow = slow | too_slow(once)
    times: dict[str, Series | str] = {**ms.run_rounds(
        {n: op for n, op in saves.items() if n not in slow}, reps, scratch,
        label=f"{w.size} save"), **timed_once(once, slow)}
    for name in ("torch.save", "safetensors", "DCP", "clone", "write", "write4"):
        rows.add("save", times["ckpts"], _label(name, slow, threads), times[name])
    rows.add("hashing: xxh3-128 alone (share of save)", times["hash"], "ckpts save",
             times["ckpts"], unit="share")
    return memory, times["clone"]  # type: ignore[return-value]  # never timed once


def _label(name: str, slow: set[str], threads: int) -> str:
    label = peers.LABELS.get(name, name).format(threads=threads)
    return label + (" [1 run: too slow for rounds]" if name in slow else "")


def async_phase(w: Workload, threads: int, reps: int, scratch: Path, rows: Rows,
                clone: Series, info: dict[str, Any], slow: set[str]) -> None:
    run_dir = scratch / "ckpts-async-run"
    factories: dict[str, Callable[[], ms.Op]] = {
        "ckpts": lambda: peers.ckpts_async_save(w, run_dir),
        "DCP": lambda: peers.dcp_async_save(w, threads), "copy": lambda: peers.copy_floor(w)}
    for name in slow:
        factories.pop(name, None)
    # ckpts' staging buffers + a copy floor + DCP's fresh staging copy, with the state
    info["async_interleaved"] = 4 * rows.state_bytes < ms.mem_available()
    batches = [list(factories)] if info["async_interleaved"] else [[n] for n in factories]
    stalls: dict[str, Series] = {}
    for batch in batches:  # one batch, or one contender at a time when memory is short
        group = {n: factories[n]() for n in batch}
        stalls.update(ms.run_rounds(group, reps, scratch, label=f"{w.size} async stall",
                                    warmup=True))
        del group
        gc.collect()
    shutil.rmtree(run_dir, ignore_errors=True)
    theirs = {"copy_ into preallocated buffers (floor)": stalls["copy"],
              peers.LABELS["clone"]: clone}
    if "DCP" in stalls:
        theirs = {f"DCP async_save ({threads} threads)": stalls["DCP"], **theirs}
    for label, series in theirs.items():
        rows.add("async save stall (warm)", stalls.get("ckpts", "n/a"), label,
                 series)


def restore_phase(target: Workload, expected: dict[str, str], reps: int, kept: Path,
                  scratch: Path, rows: Rows, info: dict[str, Any], slow: set[str]
                  ) -> dict[str, ms.PeakRSS]:
    checkpoint = kept / "ckpts" / "step-00000001"
    restores = {"ckpts": peers.ckpts_restore(kept / "ckpts", target),
                "torch.load": peers.torch_restore(kept / "torch.save", target),
                "safetensors": peers.safetensors_restore(kept / "safetensors", target),
                "DCP": peers.dcp_restore(kept / "DCP", target)}
    weights = {"ckpts": peers.ckpts_weights(checkpoint, target),
               "safetensors": peers.safetensors_weights(checkpoint, target)}
    memory: dict[str, ms.PeakRSS] = {}
    once: dict[str, float | None] = {}
    info["restore_mismatches"] = {}
    for group, ops, model_only in (("restore", restores, False), ("weights", weights, True)):
        for name, op in ops.items():
            log(f"  {target.size}: memory run and check of {name} {group}")
            wl.scramble(target)
            peak, once[f"{group}/{name}"] = ms.measure_memory(op, scratch / "memory", LIMIT_S)
            if group == "restore":
                memory[name] = peak
            want = {k: v for k, v in expected.items() if k.startswith("model.") or not model_only}
            bad = wl.mismatches(want, wl.fingerprint(target, model_only=model_only))
            done = once[f"{group}/{name}"] is not None
            info["restore_mismatches"][f"{group}/{name}"] = bad[:20] if done else "interrupted"
            if bad and done:
                log(f"  WARNING: {group} by {name} differs in {len(bad)} tensors: {bad[:5]}")
    slow = {f"{g}/{n}" for g in ("restore", "weights") for n in slow} | too_slow(once)
    results: dict[str, Series | str] = timed_once(once, slow)
    for group, ops in (("restore", restores), ("weights", weights)):
        results.update({f"{group}/{n}": s for n, s in ms.run_rounds(
            {n: op for n, op in ops.items() if f"{group}/{n}" not in slow}, reps, scratch,
            label=f"{target.size} {group}").items()})
    for name in ("torch.load", "safetensors", "DCP"):
        rows.add("restore into live model + optimizer", results["restore/ckpts"],
                 _label(f"restore/{name}", slow, 0), results[f"restore/{name}"])
    rows.add("weights-only load", results["weights/ckpts"],
             _label("weights/safetensors", slow, 0), results["weights/safetensors"])
    return memory


def bench_size(size: str, reps: int, base: Path) -> dict[str, Any]:
    started = time.perf_counter()
    reps *= REPS_FACTOR.get(size, 1)
    log(f"== {size}: building the workload")
    w = build(size)
    info: dict[str, Any] = {"params": w.n_params, "tensors": len(w.flat()),
                            "state_bytes": w.nbytes(), "reps": reps}
    rows = Rows(info["state_bytes"])
    expected = wl.fingerprint(w)
    kept, scratch = base / f"{size}-kept", base / f"{size}-scratch"
    slow = SLOW_PEERS.get(size, set())
    if "DCP" in slow:  # its per-item overhead dominates: no thread count helps much
        threads, info["dcp_warmup_s"] = 1, "skipped"
    else:
        threads, info["dcp_warmup_s"] = peers.best_dcp_threads(w, scratch)
    info["dcp_threads"] = threads
    mem_save, clone = save_phase(w, threads, reps, kept, scratch, rows, slow)
    async_phase(w, threads, reps, scratch, rows, clone, info, slow)
    log(f"  {size}: building the restore target")
    target = wl.restore_target(w)
    del w
    gc.collect()
    mem_restore = restore_phase(target, expected, reps, kept, scratch, rows, info, slow)
    del target
    for op, memory, names in (("save", mem_save, ("torch.save", "safetensors", "DCP", "clone")),
                              ("restore", mem_restore, ("torch.load", "safetensors load_file",
                                                        "DCP load"))):
        ours = memory["ckpts"]
        for name in names:
            rows.add(f"peak extra RSS, {op}", Series([float(ours.extra)]),
                     peers.LABELS.get(name, name).format(threads=threads),
                     Series([float(memory[name.split()[0]].extra)]), unit="rss",
                     anon=(ours.extra_anon, memory[name.split()[0]].extra_anon))
    disk = {n: float(ms.tree_size(kept / n)) for n in ("ckpts", "torch.save", "safetensors", "DCP")}
    for name in ("torch.save", "safetensors", "DCP"):
        rows.add("bytes on disk", Series([disk["ckpts"]]), name, Series([disk[name]]),
                 unit="bytes")
    shutil.rmtree(kept, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    gc.collect()
    info["seconds"] = round(time.perf_counter() - started, 1)
    return {**info, "rows": list(rows)}


def _cell(value: Any, unit: str, state_bytes: int, anon: int | None = None) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    med, low, high = value["median"], value["min"], value["max"]
    if unit in ("s", "share"):
        scale, suffix = (1e3, " ms") if high < 1 else (1.0, " s")
        digits = 1 if scale == 1e3 else 2
        text = f"{med * scale:.{digits}f}{suffix}"
        return text + (f" [{low * scale:.{digits}f}-{high * scale:.{digits}f}]"
                       if len(value["values"]) > 1 else "")
    if unit == "rss":
        return (f"{med / 1e6:.0f} MB ({100 * med / state_bytes:.0f}%)"
                + (f", anon {anon / 1e6:.0f} MB" if anon is not None else ""))
    return f"{med / 1e6:.1f} MB"


def _ratio(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "n/a"
    return f"{100 * r['ratio']:.1f}%" if r["unit"] == "share" else f"{r['ratio']:.2f}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    b = result["state_bytes"]
    anon = [r["anon"] or (None, None) for r in result["rows"]]
    return [[r["operation"], _cell(r["ckpts"], r["unit"], b, a[0]), r["peer"],
             _cell(r["peer_value"], r["unit"], b, a[1]), _ratio(r)]
            for r, a in zip(result["rows"], anon, strict=True)]


HEADER = ["operation", "ckpts median [min-max]", "peer", "peer median [min-max]",
          "ckpts/peer (median)"]


def title(size: str, result: dict[str, Any]) -> str:
    return (f"{size}: {result['params'] / 1e6:.1f} M params, {result['tensors']} tensors, "
            f"{result['state_bytes'] / 1e9:.3f} GB of state, {result['reps']} reps, "
            f"DCP thread_count={result['dcp_threads']}")


def print_tables(results: dict[str, Any], info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size().columns, 150))
    for size, result in results.items():
        table = Table(title=title(size, result), title_justify="left")
        for i, name in enumerate(HEADER):
            table.add_column(name, justify="right" if i in (1, 3, 4) else "left")
        for cells in table_rows(result):
            table.add_row(*cells)
        console.print(table)
    console.print(f"Machine: {wl.machine_line(info)}")
    for note in NOTES:
        console.print(f"- {note}")


def markdown(results: dict[str, Any], info: dict[str, Any]) -> str:
    lines = ["# ckpts benchmarks", "", f"Machine: {wl.machine_line(info)}", ""]
    for size, result in results.items():
        lines += [f"## {title(size, result)}", "", "| " + " | ".join(HEADER) + " |",
                  "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
                  for cells in table_rows(result)]
        lines.append("")
    return "\n".join(lines + [f"- {note}" for note in NOTES]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated, from {', '.join(SIZES)} (default {DEFAULT_SIZES})")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="where results.json / results.md go (default benchmarks/results)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where temporary checkpoints are written (default: system temp)")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or args.reps < 1:
        parser.error(f"unknown sizes {unknown}; choose from {SIZES}" if unknown else "--reps >= 1")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ckpts-bench-", dir=args.dir) as tmp:
        info = wl.machine(Path(tmp))
        for size in sizes:
            results[size] = bench_size(size, args.reps, Path(tmp))
    total = time.perf_counter() - started
    info["loadavg_at_end"] = os.getloadavg()[0]
    print_tables(results, info)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = info["date"].replace(":", "").replace("+0000", "Z")
    payload = {"machine": info, "sizes": results, "notes": NOTES, "reps": args.reps,
               "total_seconds": round(total, 1)}
    for name in ("results", f"results-{stamp}"):
        (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (args.out / f"{name}.md").write_text(markdown(results, info))
    print(f"total {total:.0f} s; wrote {args.out}/results.json and results.md "
          f"(and timestamped copies)")


if __name__ == "__main__":
    main()
