"""benchmarks/scale_sim.py: it runs at small rank counts, and what it simulates is what a
real job saves (and plans to restore) through the same library code.

The second test runs a real 2-rank FSDP2 job (gloo on CPU, ``torch.multiprocessing.spawn``)
that saves a small model + AdamW + RNG, then simulates the same shapes on 2 ranks and
compares ``layout.json``, each rank's index, the manifest and the 2 -> 4 restore plan.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import scale_sim  # noqa: E402

from ckpts._checkpoint.rank_plan import planned_reads  # noqa: E402
from ckpts._format.index import Contents  # noqa: E402
from ckpts._format.manifest import load_manifest  # noqa: E402
from ckpts.storage import LocalStorage  # noqa: E402

SMALL = {"layers": 2, "vocab": 1000, "hidden": 256, "intermediate": 688}


@pytest.mark.parametrize("ranks", [8, 64])
def test_small_runs_report_sane_figures(tmp_path: Path, ranks: int) -> None:
    params = scale_sim.llama_params(**SMALL)
    assert len(params) == 2 * 9 + 3
    result = scale_sim.simulate(params, ranks, tmp_path, repeats=1, processes=1)
    assert result["ranks"] == ranks
    assert result["tensors"] == 4 * len(params)  # parameter, exp_avg, exp_avg_sq, step
    # rank N of 2N reads part of every tensor, from one saved piece or two
    assert result["tensors"] <= result["pieces_read"] <= 2 * result["tensors"]
    assert 1 <= result["ranks_read"] <= ranks
    assert 0 < result["local_plan_s"] < 5 and 0 < result["plan_commit_s"] < 5
    assert 0 < result["reshard_plan_s"] < 5
    assert 0 < result["manifest_bytes"] <= result["manifest_bound"] == 64_000 + 512 * ranks
    assert result["gathered_bytes_per_rank"] < 200  # two numbers and two hashes
    assert result["gathered_bytes_received_per_rank"] >= ranks * 100
    assert result["rank_index_bytes"] <= result["rank_index_bytes_max"]
    assert result["rank_index_bytes_total"] >= ranks * result["rank_index_bytes"] // 2
    assert result["restore_metadata_bytes_per_rank"] == (
        result["manifest_bytes"] + result["layout_bytes"] + result["rank_indexes_read_bytes"])
    assert result["targets"]["manifest_bound"] and result["targets"]["gathered_bytes_per_rank"]
    directory = Path(result["checkpoint"])
    manifest = json.loads((directory / "manifest.json").read_bytes())
    assert manifest["world_size"] == ranks and manifest["per_rank"] == ["rng"]
    assert len(manifest["files"]) == ranks + 1  # every rank's index, and layout.json
    assert sorted(manifest["objects"])[:2] == ["model", "optimizer"]


def test_command_line_ends_with_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert scale_sim.main(["--ranks", "3", "--layers", "1", "--vocab", "50", "--hidden", "16",
                           "--intermediate", "40", "--repeats", "1", "--json",
                           "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["ranks"] == 3 and result["tensors"] == 4 * 12
    assert "simulated FSDP2 job of 3 ranks" in lines[0]
    assert set(result["targets"]) == {*scale_sim.TARGETS, "manifest_bound"}


class Tiny(torch.nn.Module):
    """Shards that are uneven at 2 and 4 ranks, one rank with an empty piece (``head``,
    1 row), and a matrix whose halves are over 1 MiB (block hashes)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.proj = torch.nn.Linear(64, 9000, bias=False)
        self.down = torch.nn.Linear(9000, 3)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.proj(self.norm(self.embed(x)))))


def save_on_ranks(rank: int, world: int, port: int, run: str) -> None:
    """One rank of the real job: FSDP2 Tiny + AdamW after a step, saved at step 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckpts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = Tiny()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.children():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.arange(4) % 7).pow(2).mean().backward()
        optimizer.step()
        with ckpts.CheckpointManager(run) as manager:
            manager.save(1, ckpts.TrainState(model=model, optimizer=optimizer))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("real") / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(save_on_ranks, args=(2, port, str(run)), nprocs=2, join=True)
    return run / scale_sim.STEP


def without(piece: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in piece.items() if key not in keys}


def plan_rows(reads: scale_sim.Reads) -> dict[tuple[str, str], list[Any]]:
    """A restore plan without its hashes: which file, byte range, saved box, how many
    block hashes, and which part of the tensor each read gives."""
    return {key: [(piece.file, piece.begin, piece.end, piece.origin, piece.size,
                   len(piece.blocks), overlap) for piece, overlap in found]
            for key, found in reads.items()}


def test_simulated_plan_equals_a_real_two_rank_save(real_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    params = [(key, tuple(tensor.shape)) for key, tensor in Tiny().state_dict().items()]
    state = scale_sim.job_state(params, 2, model_class="FSDPTiny")
    layouts, entries, _ = scale_sim.local_plan(state, 2, 0)
    saves = [scale_sim.save_rank(state, layouts, entries, rank) for rank in range(2)]
    layout, _, payload = scale_sim.commit(state, [s.status for s in saves], entries, 2)
    simulated = scale_sim.write_metadata(tmp_path / "run" / scale_sim.STEP, payload, layout,
                                         {rank: s.index for rank, s in enumerate(saves)})

    # layout.json: trees (the optimizer's param_groups too), dtypes, shapes, layouts; the
    # same bytes, as nothing in it comes from the data
    real_layout = (real_checkpoint / "layout.json").read_bytes()
    assert json.loads(layout) == json.loads(real_layout)
    assert layout == real_layout
    tensors = json.loads(layout)["objects"]
    assert tensors["optimizer"]["tensors"]["state.0.step"] == {"dtype": "F32", "shape": [],
                                                               "rank": 0}
    assert tensors["model"]["tensors"]["head.weight"]["placements"] == ["S0"]

    # each rank's index: its files (sizes, header sizes, header hashes: the headers are
    # real) and pieces (files, byte ranges, block counts), its RNG's tensor entries
    for rank, saved in enumerate(saves):
        real = json.loads((real_checkpoint / f"rank-{rank:05d}.json").read_bytes())
        sim = json.loads(saved.index)
        assert sim["rank"] == real["rank"] == rank
        assert sim["files"] == real["files"]
        assert sim["pieces"].keys() == real["pieces"].keys() == {"model", "optimizer"}
        for name in sim["pieces"]:
            assert list(sim["pieces"][name]) == list(real["pieces"][name])
            for key, piece in sim["pieces"][name].items():
                found = real["pieces"][name][key]
                assert without(piece, "hash", "blocks") == without(found, "hash", "blocks")
                assert len(piece.get("blocks", [])) == len(found.get("blocks", []))
                assert len(piece["hash"]) == len(found["hash"])
        assert "head.weight" in sim["pieces"]["model"] if rank == 0 else \
            "head.weight" not in sim["pieces"]["model"]  # rank 1's piece is empty
        assert any(piece.get("blocks") for piece in sim["pieces"]["model"].values())
        rng = f"rng.rank{rank}"
        assert sim["objects"].keys() == real["objects"].keys() == {rng}
        for key, entry in sim["objects"][rng]["tensors"].items():
            assert without(entry, "hash") == without(real["objects"][rng]["tensors"][key], "hash")
        assert list(sim["objects"][rng]["tensors"]) == list(real["objects"][rng]["tensors"])
        assert sim["objects"][rng]["tree"].keys() == real["objects"][rng]["tree"].keys()

    # the manifest: the same objects and files; only the rank indexes' sizes and hashes
    # may differ (their RNG trees hold this process's random state, not the job's)
    sim_manifest = json.loads(payload)
    real_manifest = json.loads((real_checkpoint / "manifest.json").read_bytes())
    assert sim_manifest["objects"] == real_manifest["objects"]
    assert sim_manifest["files"].keys() == real_manifest["files"].keys()
    assert sim_manifest["files"]["layout.json"] == real_manifest["files"]["layout.json"]
    for key in ("format", "format_version", "world_size", "per_rank", "tags"):
        assert sim_manifest[key] == real_manifest[key]

    # the restore onto 4 ranks: every rank's boxes (as torch.chunk splits dim 0), and the
    # pieces planned_reads finds for them in the real checkpoint
    real_storage = LocalStorage(real_checkpoint.parent)
    contents = Contents(real_storage, scale_sim.STEP,
                        load_manifest(real_storage, scale_sim.STEP, tensor_entries=False))
    for rank in range(4):
        simulated_plan = scale_sim.restore_plan(LocalStorage(simulated.parent), scale_sim.STEP,
                                                rank, 4)
        real_plan: scale_sim.Reads = {}
        for obj in ("model", "optimizer"):
            for key, entry in contents.object(obj, located=False)["tensors"].items():
                box = scale_sim.live_box(entry, rank, 4)
                if "mesh" in entry:
                    rows = torch.arange(entry["shape"][0]).chunk(4)
                    if rank < len(rows) and len(rows[rank]):
                        assert box == ((int(rows[rank][0]),) + (0,) * (len(box[0]) - 1),
                                       (len(rows[rank]), *entry["shape"][1:]))
                    else:
                        assert not all(box[1])
                real_plan[(obj, key)] = planned_reads(contents, obj, key, entry, box)
        assert plan_rows(simulated_plan) == plan_rows(real_plan)
        assert sum(map(len, real_plan.values())) >= 8  # some of the model's tensors at least
