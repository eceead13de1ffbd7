"""Helpers for format v4 tests: edit a checkpoint's index files; and one rank of the
torch.distributed (gloo, CPU) jobs of tests/test_format_v4.py.

Usage (a rank): python v4_worker.py SCENARIO CONFIG_JSON, with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. Each scenario records what the test checks under
``config["out"]``: full tensors (every DTensor gathered) as safetensors, and JSON
reports, never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpts._format.manifest import digest, encode_json


def rehash_index(checkpoint: Path, file: str) -> None:
    """Record index ``file``'s present size and hash in the manifest, as a consistent
    (hostile or buggy) writer would: the index's content checks then face what it says."""
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_bytes())
    payload = (checkpoint / file).read_bytes()
    manifest["files"][file] = {"nbytes": len(payload), "hash": digest(payload)}
    path.write_bytes(encode_json(manifest))


def change_index(checkpoint: Path, file: str, change: Callable[[dict[str, Any]], None], *,
                 rehash: bool = True) -> None:
    """Edit index ``file`` of ``checkpoint`` as JSON; ``rehash`` records its new size
    and hash in the manifest (:func:`rehash_index`), else the manifest's record of it
    is left as it was (a damaged index)."""
    path = checkpoint / file
    content = json.loads(path.read_bytes())
    change(content)
    path.write_bytes(encode_json(content))
    if rehash:
        rehash_index(checkpoint, file)


def flip_byte(path: Path, offset: int) -> None:
    """Flip a bit of one byte of a file (a negative offset counts from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# ---- one rank of a job (tests/test_format_v4.py starts one process per rank) ----

class Progress:
    """Plain training progress, saved as JSON (inline in the manifest: no tensors)."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.losses = state["step"], list(state["losses"])


def plain_model() -> Any:
    """The network unsharded (a one-process restore builds this). Rows 6 and 5: uneven
    shards at 4 ranks (2, 2, 2, 0 and 2, 2, 1, 0), and at 2 (3, 3 and 3, 2)."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))


def build(world: int, seed: int) -> tuple[Any, Any, Any, Progress]:
    """The model under FSDP2 (``fully_shard``) over ``world`` ranks, its AdamW, progress."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckpts

    torch.manual_seed(seed)
    model = plain_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    progress = Progress()
    return (ckpts.TrainState(model=model, optimizer=optimizer, progress=progress), model,
            optimizer, progress)


def train_step(model: Any, optimizer: Any, progress: Progress, rank: int) -> None:
    """One step on a batch that depends on the step and the rank."""
    import torch

    progress.step += 1
    batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(progress.step * 10 + rank))
    loss = model(batch).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    progress.losses.append(round(float(loss), 6))


def full_tensors(model: Any, optimizer: Any) -> dict[str, Any]:
    """Model and optimizer state as full tensors (a collective: every rank calls it),
    keyed ``model/<key>`` and ``optimizer/<index>/<name>``."""
    import torch
    from torch.distributed.tensor import DTensor

    def whole(value: Any) -> Any:
        full = value.full_tensor() if isinstance(value, DTensor) else value
        return full.detach().clone().contiguous()

    found = {f"model/{key}": whole(value) for key, value in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            found[f"optimizer/{index}/{key}"] = whole(torch.as_tensor(value))
    return found


def record(out: Path, label: str, rank: int, tensors: dict[str, Any] | None,
           report: dict[str, Any]) -> None:
    """Write this rank's report of ``label`` (and, given, its tensors: safetensors)."""
    if tensors is not None:
        import safetensors.torch

        safetensors.torch.save_file(tensors, str(out / f"{label}.rank{rank}.safetensors"))
    (out / f"{label}.rank{rank}.json").write_text(json.dumps(report))


def restore_and_record(run: str, label: str, rank: int, world: int, out: Path) -> None:
    """Restore ``run`` into fresh objects; record the step, the warnings logged, the
    full tensors (rank 0) and the JSON state restored."""
    import logging

    import ckpts

    state, model, optimizer, progress = build(world, seed=1000 + rank)  # unlike any save
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, entry: logging.LogRecord) -> None:
            warnings.append(entry.getMessage())

    keep = Keep(logging.WARNING)
    logging.getLogger("ckpts").addHandler(keep)
    try:
        with ckpts.CheckpointManager(run, collective_timeout=60.0) as manager:
            step = manager.restore(state)
    finally:
        logging.getLogger("ckpts").removeHandler(keep)
    tensors = full_tensors(model, optimizer)
    record(out, label, rank, tensors if rank == 0 else None, {
        "restored": step, "warnings": warnings, "progress": progress.state_dict(),
        "param_groups": optimizer.state_dict()["param_groups"]})


def save_two(rank: int, world: int, config: dict[str, Any]) -> None:
    """Train and save steps 1 and 2 to ``config["run"]`` (rank 0 records each step's
    full state as ``savedN``); then restore a copy of the run whose step 2 has one byte
    of ``rank-00001.json`` flipped (``config["damaged"]``), as ``fallback``."""
    import shutil

    import torch.distributed as dist

    import ckpts

    out = Path(config["out"])
    state, model, optimizer, progress = build(world, seed=7)
    with ckpts.CheckpointManager(config["run"], collective_timeout=60.0) as manager:
        for step in (1, 2):
            train_step(model, optimizer, progress, rank)
            manager.save(step, state, metrics={"loss": progress.losses[-1]})
            tensors = full_tensors(model, optimizer)
            if rank == 0:
                record(out, f"saved{step}", 0, tensors, {
                    "progress": progress.state_dict(),
                    "param_groups": optimizer.state_dict()["param_groups"]})
    if rank == 0:
        damaged = Path(config["damaged"])
        shutil.copytree(config["run"], damaged)
        flip_byte(damaged / "step-00000002" / "rank-00001.json", 40)
    dist.barrier()
    restore_and_record(config["damaged"], "fallback", rank, world, out)


def reshard(rank: int, world: int, config: dict[str, Any]) -> None:
    """Restore ``config["from"]`` (saved at another world size) as ``restored``, then
    save that state again as step 2 of ``config["run"]``."""
    import ckpts

    out = Path(config["out"])
    state, model, optimizer, progress = build(world, seed=2000 + rank)
    with ckpts.CheckpointManager(config["from"], collective_timeout=60.0) as manager:
        step = manager.restore(state)
    tensors = full_tensors(model, optimizer)
    record(out, "restored", rank, tensors if rank == 0 else None, {
        "restored": step, "progress": progress.state_dict(),
        "param_groups": optimizer.state_dict()["param_groups"]})
    with ckpts.CheckpointManager(config["run"], collective_timeout=60.0) as manager:
        manager.save(step, state)


SCENARIOS: dict[str, Callable[[int, int, dict[str, Any]], None]] = {
    "save_two": save_two, "reshard": reshard}


def main() -> None:
    import datetime
    import os
    import sys

    import torch
    import torch.distributed as dist

    scenario, config = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,  # a lost rank fails fast
                            timeout=datetime.timedelta(seconds=120))
    try:
        SCENARIOS[scenario](rank, world, config)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
