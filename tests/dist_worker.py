"""One rank of a torch.distributed (gloo, CPU) job that saves and restores with ckpts,
for tests/test_distributed.py.

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
       python dist_worker.py SCENARIO CONFIG_JSON

The test starts one such process per rank (not mp.spawn, whose parent kills every rank
as soon as one dies: the rank-death test needs the survivor to run on). Each scenario
writes what the test checks under ``config["out"]``: full tensors (every DTensor
gathered) as safetensors, and small JSON reports, never pickle. The model is a tiny
FSDP2 (``fully_shard``) network whose shards are uneven at 4 ranks (10 rows: 3,3,3,1;
3 rows: 1,1,1,0) and whose first layer is over 8 MiB, so that it is stored with block
hashes and a reshard reads part of it.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpts
from ckpts.storage._port import Staged  # the storage port's own type, as faulty_storage.py uses

WIDE = 2100  # rows of the first layer: 2100 x 1024 float32 is 8.6 MB, over one 8 MiB block


class Progress:
    """Plain (non-tensor) training progress, saved as JSON."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.losses = state["step"], state["epoch"], list(state["losses"])


def plain_model() -> torch.nn.Sequential:
    """The network, unsharded (the one-process restores build this too)."""
    return torch.nn.Sequential(torch.nn.Linear(1024, WIDE, bias=False), torch.nn.Linear(WIDE, 10),
                               torch.nn.ReLU(), torch.nn.Linear(10, 3))


def build(world: int, seed: int) -> tuple[ckpts.TrainState, torch.nn.Module,
                                          torch.optim.Optimizer, Progress]:
    """The FSDP2 model sharded over ``world`` ranks, its AdamW and progress."""
    torch.manual_seed(seed)
    model = plain_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    progress = Progress()
    state = ckpts.TrainState(model=model, optimizer=optimizer, progress=progress)
    return state, model, optimizer, progress


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
               rank: int) -> float:
    """One step on a batch that depends on the step and the rank (as a sampler's would)."""
    progress.step += 1
    progress.epoch = progress.step // 2
    batch = torch.randn(3, 1024, generator=torch.Generator().manual_seed(progress.step * 10 + rank))
    loss = model(batch).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    progress.losses.append(round(loss.item(), 6))
    return float(loss)


def full_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                 ) -> dict[str, torch.Tensor]:
    """Model parameters and optimizer state as full tensors (a collective: every rank calls)."""
    def whole(value: torch.Tensor) -> torch.Tensor:
        full = value.full_tensor() if isinstance(value, DTensor) else value
        return full.detach().clone().contiguous()

    found = {f"model/{key}": whole(value) for key, value in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            found[f"optimizer/{index}/{key}"] = whole(torch.as_tensor(value))
    return found


def record(out: Path, label: str, rank: int, tensors: dict[str, torch.Tensor] | None,
           report: dict[str, Any]) -> None:
    """Write ``label``'s tensors and JSON report of this rank."""
    if tensors is not None:
        safetensors.torch.save_file(tensors, str(out / f"{label}.rank{rank}.safetensors"))
    (out / f"{label}.rank{rank}.json").write_text(json.dumps(report))


def restore_and_record(where: str, label: str, rank: int, world: int, out: Path,
                       **manager_options: Any) -> None:
    """Restore ``where`` into fresh objects, then record what was restored."""
    state, model, optimizer, progress = build(world, seed=1000 + rank)  # differs from any save
    with ckpts.CheckpointManager(where, **manager_options) as manager:
        step = manager.restore(state)
        listed = {c.step: {"epoch": c.epoch, "metrics": c.metrics} for c in manager.checkpoints()}
    tensors = full_tensors(model, optimizer)
    record(out, label, rank, tensors, {"restored": step, "progress": progress.state_dict(),
                                       "listed": listed.get(step) if step is not None else None,
                                       "lr": optimizer.param_groups[0]["lr"]})


def save_steps(where: str, label: str, steps: int, rank: int, world: int, out: Path,
               **manager_options: Any) -> None:
    """Train and save ``steps`` steps; rank 0 records each step's full state."""
    state, model, optimizer, progress = build(world, seed=7)
    with ckpts.CheckpointManager(where, **manager_options) as manager:
        for _ in range(steps):
            loss = train_step(model, optimizer, progress, rank)
            manager.save(progress.step, state, epoch=progress.epoch, metrics={"loss": loss})
            tensors = full_tensors(model, optimizer)
            if rank == 0:
                record(out, f"{label}-{progress.step}", 0, tensors, progress.state_dict())


def reshard(rank: int, world: int, config: dict[str, Any]) -> None:
    """Restore each of ``config["restore"]`` (label, run) saved at other world sizes,
    then save ``config["save"]`` (a run, and how many steps) and restore it again."""
    out = Path(config["out"])
    for label, run in config.get("restore", []):
        restore_and_record(run, label, rank, world, out)
    if config.get("save"):
        run, steps = config["save"]
        save_steps(run, f"expected-w{world}", steps, rank, world, out)
        restore_and_record(run, f"w{world}-w{world}", rank, world, out)


class BrokenStorage(ckpts.storage.LocalStorage):
    """A LocalStorage with faults injected at the storage port: ``write`` raises OSError
    (``fail``), ends the process at once (``die``) or stalls ``stall`` seconds first, and
    ``commit`` raises OSError (``fail_commit``)."""

    fail = die = fail_commit = False
    stall = 0.0

    def write(self, staged: Staged, files: Sequence[tuple[str, Sequence[memoryview]]]) -> None:
        if self.die:
            os._exit(17)
        if self.fail:
            raise OSError(5, "Input/output error (injected on this rank)")
        time.sleep(self.stall)
        super().write(staged, files)

    def commit(self, staged: Staged, manifest: bytes) -> None:
        if self.fail_commit:
            raise OSError(28, "No space left on device (injected on this rank)")
        super().commit(staged, manifest)


def failures(rank: int, world: int, config: dict[str, Any]) -> None:
    """Saves in which one rank fails, each reported by every rank with how it ended and
    how long it took. ``config["hang"]``: save 1, then save 2 with rank 1 stalled in
    write for 3 collective timeouts. Otherwise: save 1; save 2 with rank 1 raising in
    write; save 3 with rank 0's commit raising; save 4; save 5 with rank 1 dying in
    write. Ends the process (the other rank may be gone: no close() nor destroy)."""
    out = Path(config["out"])
    storage = BrokenStorage(Path(config["run"]))
    state, model, optimizer, progress = build(world, seed=7)
    manager = ckpts.CheckpointManager(storage, collective_timeout=config["timeout"])
    report: dict[str, Any] = {}
    label = "hang" if config.get("hang") else "failures"

    def attempt(step: int, *, on: int | None = None, **faults: Any) -> None:
        for fault, value in faults.items():
            setattr(storage, fault, value if rank == on else type(value)())
        train_step(model, optimizer, progress, rank)
        began = time.monotonic()
        try:
            manager.save(step, state)
            report[str(step)] = {"outcome": "saved"}
        except Exception as e:
            report[str(step)] = {"outcome": type(e).__name__, "message": str(e),
                                 "checkpoint_error": isinstance(e, ckpts.CheckpointError)}
        report[str(step)]["seconds"] = time.monotonic() - began
        for fault, value in faults.items():
            setattr(storage, fault, type(value)())
        record(out, label, rank, None, report)

    attempt(1)
    if config.get("hang"):
        attempt(2, on=1, stall=3 * config["timeout"])
    else:
        attempt(2, on=1, fail=True)
        attempt(3, on=0, fail_commit=True)
        attempt(4)
        attempt(5, on=1, die=True)
    os._exit(0)


def async_saves(rank: int, world: int, config: dict[str, Any]) -> None:
    """Async saves, each followed at once by a change of every tensor that must not reach
    the checkpoint; then each step restored into fresh objects."""
    out = Path(config["out"])
    state, model, optimizer, progress = build(world, seed=7)
    with ckpts.CheckpointManager(config["run"], async_save=True) as manager:
        for _ in range(3):
            train_step(model, optimizer, progress, rank)
            tensors = full_tensors(model, optimizer)
            if rank == 0:
                record(out, f"async-expected-{progress.step}", 0, tensors, progress.state_dict())
            manager.save(progress.step, state)
            with torch.no_grad():  # right after save() returned: the writer is still busy
                for parameter in model.parameters():
                    assert isinstance(parameter, DTensor)
                    parameter.to_local().add_(100.0)
                for entry in optimizer.state.values():
                    entry["exp_avg"].to_local().add_(100.0)
            progress.losses.append(-1.0)
    for step in (1, 2, 3):
        fresh, fresh_model, fresh_optimizer, fresh_progress = build(world, seed=1000 + rank)
        with ckpts.CheckpointManager(config["run"]) as manager:
            restored = manager.restore(fresh, step=step)
        record(out, f"async-{step}", rank, full_tensors(fresh_model, fresh_optimizer),
               {"restored": restored, "progress": fresh_progress.state_dict()})


def triggers(rank: int, world: int, config: dict[str, Any]) -> None:
    """Saves decided by triggers: ``Every(steps=2)``, and ``OnImprovement`` fed each rank's
    own loss (which improves on different steps on each rank)."""
    out = Path(config["out"])
    state, model, optimizer, progress = build(world, seed=7)
    report: dict[str, list[int]] = {}
    local_losses = [5.0, 4.0, 6.0, 3.0, 3.5, 2.0] if rank == 0 else [5.0, 6.0, 4.0, 4.5, 3.0, 1.0]
    for label, trigger in (("every", ckpts.Every(steps=2)),
                           ("improvement", ckpts.OnImprovement("loss"))):
        saved = []
        run = Path(config["run"]) / label
        with ckpts.CheckpointManager(run, save=trigger) as manager:
            for step in range(1, 7):
                train_step(model, optimizer, progress, rank)
                if manager.save(step, state, metrics={"loss": local_losses[step - 1]}) is not None:
                    saved.append(step)
        report[label] = saved
    record(out, "triggers", rank, None, report)


def s3(rank: int, world: int, config: dict[str, Any]) -> None:
    """Save to the test's S3 server from every rank, then restore on the same ranks."""
    out = Path(config["out"])
    options = config["storage_options"]
    save_steps(config["url"], "s3-expected", 2, rank, world, out, storage_options=options)
    restore_and_record(config["url"], "s3-restored", rank, world, out, storage_options=options)


SCENARIOS: dict[str, Callable[[int, int, dict[str, Any]], None]] = {
    "reshard": reshard, "failures": failures, "async": async_saves, "triggers": triggers,
    "s3": s3}


def main() -> None:
    scenario, config = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    for name in scenario.split(","):
        SCENARIOS[name](rank, world, config[name])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
