"""Deterministic training states to checkpoint: a module of fp32 parameters plus AdamW state.

``tiny``/``small``/``standard``/``large`` are transformer-like (an embedding, then
blocks of a fused qkv, an output projection, two MLP matrices and a small fused
norm/bias tensor); ``tiny`` (1.4 MB of state) shows the fixed cost of a save,
``many_small`` (10,000 tensors of 1-4 KB) the per-tensor overhead.
The optimizer has taken one step, so every parameter has ``exp_avg``,
``exp_avg_sq`` and ``step``: the state is about 3x the parameter bytes. Also: a
description of the machine the workloads run on.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

SIZES = ("tiny", "small", "medium", "standard", "large", "many_small")


def _transformer(width: int, vocab: int, positions: int, blocks: int, norm_rows: int
                 ) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embed", (vocab, width)), ("pos", (positions, width))]
    for b in range(blocks):
        shapes += [
            (f"h{b}_qkv", (3 * width, width)),
            (f"h{b}_proj", (width, width)),
            (f"h{b}_fc1", (4 * width, width)),
            (f"h{b}_fc2", (width, 4 * width)),
            (f"h{b}_norms", (norm_rows, width)),
        ]
    return shapes


def shapes_for(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a workload size."""
    if size == "tiny":  # ~117 K params, 12 tensors, 2 KB .. 64 KB: 1.4 MB with AdamW
        return _transformer(width=64, vocab=256, positions=64, blocks=2, norm_rows=8)
    if size == "small":  # ~10.4 M params, 17 tensors, 80 KB .. 4 MB
        return _transformer(width=512, vocab=2048, positions=256, blocks=3, norm_rows=40)
    if size == "medium":  # ~55 M params, 22 tensors, 320 KB .. 16 MB: 0.66 GB with AdamW
        # the standard shapes with 4 blocks instead of 8 (benchmarks/memory_bench.py)
        return _transformer(width=1024, vocab=4096, positions=256, blocks=4, norm_rows=80)
    if size == "standard":  # ~101 M params, 42 tensors, 320 KB .. 16 MB
        return _transformer(width=1024, vocab=4096, positions=256, blocks=8, norm_rows=80)
    if size == "large":  # ~491 M params, 47 tensors, 1.3 MB .. 134 MB
        return _transformer(width=2048, vocab=16384, positions=1024, blocks=9, norm_rows=160)
    if size == "many_small":  # 10,000 tensors of 256..1024 fp32 values (1-4 KB)
        gen = torch.Generator().manual_seed(1234)
        numels = torch.randint(256, 1025, (10_000,), generator=gen).tolist()
        return [(f"t{i:05d}", (n,)) for i, n in enumerate(numels)]
    raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")


class StateModule(torch.nn.Module):
    """A module that only holds parameters (no forward: nothing is trained)."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(t) for name, t in params.items()})


@dataclass
class Workload:
    """A model and its AdamW optimizer, with helpers to list their tensors."""

    size: str
    model: StateModule
    optimizer: torch.optim.AdamW

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def flat(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by a flat name: ``model.<key>`` and
        ``optimizer.<param index>.<exp_avg|exp_avg_sq|step>`` (live tensors, no copy)."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for index, per_param in self.optimizer.state_dict()["state"].items():
            for name, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    out[f"optimizer.{index}.{name}"] = value
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat().values())

    def torch_state(self) -> dict[str, Any]:
        """What torch.save and DCP are given: both state_dicts (live tensors)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def build(size: str, *, seed: int = 0) -> Workload:
    """Random parameters (std 0.02) and random gradients, then one real AdamW step, so
    ``exp_avg``/``exp_avg_sq``/``step`` exist and hold non-constant values."""
    gen = torch.Generator().manual_seed(seed)
    model = StateModule({name: torch.empty(shape).normal_(0.0, 0.02, generator=gen)
                         for name, shape in shapes_for(size)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(generator=gen)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    return Workload(size, model, optimizer)


def restore_target(source: Workload) -> Workload:
    """A second, identically shaped model + optimizer (a deep copy), scrambled so that
    every value differs from the source until something restores it."""
    model, optimizer = copy.deepcopy((source.model, source.optimizer))
    target = Workload(source.size, model, optimizer)
    scramble(target)
    return target


def fingerprint(workload: Workload, *, model_only: bool = False) -> dict[str, str]:
    """xxh3-64 of every tensor's bytes, by flat name: to check a restore was exact."""
    out = {}
    for name, tensor in workload.flat().items():
        if model_only and not name.startswith("model."):
            continue
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = xxhash.xxh3_64_hexdigest(memoryview(data))
    return out


def scramble(workload: Workload) -> None:
    """Overwrite every tensor of the live state, so a later check proves a restore."""
    with torch.no_grad():
        for tensor in workload.flat().values():
            tensor.fill_(-1.0)


def mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names whose fingerprints differ (or are missing on either side)."""
    return sorted(k for k in expected.keys() | actual.keys()
                  if expected.get(k) != actual.get(k))


def machine(workdir: Path) -> dict[str, Any]:
    """What the numbers were measured on."""
    import safetensors
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(mem_total / 2**30, 1),
        "filesystem": _filesystem(workdir),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _filesystem(path: Path) -> str:
    """The mount (device and type) holding ``path``, from /proc/mounts."""
    best = ("", "?", "?")
    resolved = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, kind = line.split()[:3]
                inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[0]):
                    best = (mount, device, kind)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}) at {best[0] or '?'}"


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, {m['filesystem']}; "
            f"Python {m['python']}, torch {m['torch']}, safetensors {m['safetensors']}; "
            f"{m['date']}; load average {m['loadavg_at_start']:.1f} at start, "
            f"{m.get('loadavg_at_end', float('nan')):.1f} at end")
