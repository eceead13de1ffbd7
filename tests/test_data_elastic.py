"""A DistributedSampler's epoch goes on where it was when a job resumes on another number of
ranks: every sample of the interrupted epoch once over the job, then the sampler's own order.

In-process tests simulate the ranks of a job (one ResumableLoader per rank, in lockstep, as
DDP keeps them) to check the arithmetic: uneven remainders, both ``drop_last`` flags, a
partial last batch, hand-edited states. Real jobs (tests/elastic_worker.py: gloo, DDP,
AdamW, a CheckpointManager) are SIGKILLed on 2 ranks mid-epoch and resumed on 4 and on 1,
and the 4-rank job's own mid-epoch checkpoint is resumed on 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import ckpts
from ckpts._checkpoint.restore import match_objects
from ckpts._state.data import EpochOrder, ResumableLoader, remainder_positions
from ckpts.errors import IncompatibleStateError, InvalidArgumentError
from elastic_worker import BATCH_SIZE, SAMPLES, SEED, build_model

WORKER = Path(__file__).with_name("elastic_worker.py")
JOB_TIMEOUT = 120.0  # seconds: a job that runs longer hangs (DDP with uneven batches would)
ORDER_SEED = 3


# --- in-process: the ranks of a job simulated in lockstep -----------------------------

def distributed_loader(length: int, replicas: int, rank: int, *, batch_size: int | None = 4,
                       drop_last: bool = False, drop_last_batch: bool = False,
                       seed: int = ORDER_SEED) -> ResumableLoader:
    data = torch.arange(length)
    sampler = DistributedSampler(data, num_replicas=replicas, rank=rank, seed=seed,
                                 drop_last=drop_last)
    return ResumableLoader(DataLoader(data, batch_size=batch_size, sampler=sampler,
                                      drop_last=drop_last_batch))


def epoch_order(length: int, replicas: int, epoch: int, *, drop_last: bool = False) -> list[int]:
    """The epoch's order over all ranks, from DistributedSampler itself (not ckpts')."""
    ranks = []
    for rank in range(replicas):
        sampler = DistributedSampler(range(length), num_replicas=replicas, rank=rank,
                                     seed=ORDER_SEED, drop_last=drop_last)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    return [ranks[p % replicas][p // replicas] for p in range(replicas * len(ranks[0]))]


def samples(batch: Any) -> list[int]:
    """A batch's sample indices (a TensorDataset's batch is a list of one tensor)."""
    batch = batch[0] if isinstance(batch, list) else batch
    return [int(batch)] if batch.dim() == 0 else batch.tolist()


class Job:
    """The ranks of a job, one ResumableLoader each, taking batches in lockstep as DDP
    keeps them."""

    def __init__(self, ranks: list[ResumableLoader]) -> None:
        self.ranks = ranks
        self.passes: list[Iterator[Any]] | None = None

    def take(self, batches: int | None = None) -> list[list[int]]:
        """Each rank's samples in ``batches`` more batches of the pass in progress (or a new
        one), None: to the pass's end; checks that the ranks end the pass together."""
        if self.passes is None:
            self.passes = [iter(loader) for loader in self.ranks]
        seen: list[list[int]] = [[] for _ in self.ranks]
        taken = 0
        while batches is None or taken < batches:
            got = [next(batches_of_rank, None) for batches_of_rank in self.passes]
            assert len({batch is None for batch in got}) == 1, "ranks took different batch counts"
            if got[0] is None:
                self.passes = None
                break
            for rank, batch in enumerate(got):
                seen[rank] += samples(batch)
            taken += 1
        return seen


def new_job(length: int, replicas: int, state: dict[str, Any] | None = None,
            **options: Any) -> Job:
    """A job over ``arange(length)`` on ``replicas`` ranks, each loading ``state`` if given."""
    ranks = [distributed_loader(length, replicas, rank, **options) for rank in range(replicas)]
    for loader in ranks:
        if state is not None:
            loader.load_state_dict(state)
    return Job(ranks)


def flat(seen: list[list[int]]) -> list[int]:
    return [sample for rank in seen for sample in rank]


def test_epoch_order_is_distributed_samplers_order_over_all_ranks() -> None:
    for length in (1, 5, 22, 96):
        for replicas in (1, 2, 3, 4, 7):
            for drop_last in (False, True):
                for shuffle in (False, True):
                    order = EpochOrder(length=length, replicas=replicas, shuffle=shuffle,
                                       seed=ORDER_SEED, drop_last=drop_last)
                    for rank in range(replicas):
                        sampler = DistributedSampler(range(length), num_replicas=replicas,
                                                     rank=rank, shuffle=shuffle, seed=ORDER_SEED,
                                                     drop_last=drop_last)
                        sampler.set_epoch(2)
                        positions = range(rank, order.size, replicas)
                        assert order.indices(2, positions) == list(sampler)


@pytest.mark.parametrize(("size", "consumed", "replicas", "drop_last", "expected"), [
    (12, 4, 4, False, [[4, 8], [5, 9], [6, 10], [7, 11]]),  # divides: nothing added
    (12, 5, 3, False, [[5, 8, 11], [6, 9, 12], [7, 10, 13]]),  # 7 left: 2 repeats
    (12, 5, 3, True, [[5, 8], [6, 9], [7, 10]]),  # 7 left: the last one not handed out
    (12, 11, 3, False, [[11], [12], [13]]),  # fewer left than ranks
    (12, 11, 3, True, [[], [], []]),
    (12, 12, 2, False, [[], []]),  # nothing left
])
def test_remainder_is_shared_round_robin_padding_or_dropping_an_uneven_tail(
        size: int, consumed: int, replicas: int, drop_last: bool, expected: list[list[int]]
) -> None:
    assert [list(remainder_positions(size, consumed, replicas, rank, drop_last=drop_last))
            for rank in range(replicas)] == expected


CASES = {  # length, ranks before, batches before, ranks after, batch size, drop_last flags
    "2to4_even": (96, 2, 5, 4, 4, False, False),  # 56 left: 14 each, the 4th batch partial
    "2to3_padded": (96, 2, 5, 3, 4, False, False),  # 56 left: 19 each, 1 repeat
    "2to3_dropped": (96, 2, 5, 3, 4, True, False),  # 56 left: 18 each, 2 left out
    "3to2_padded_order": (22, 3, 1, 2, 3, False, False),  # an order of 24: 15 left, 8 each
    "2to5_partial_last_batch": (50, 2, 3, 5, 4, False, False),  # 26 left: 6 each, 4 + 2
    "2to3_partial_batch_dropped": (50, 2, 3, 3, 4, False, True),  # 26 left: 9 each, 2 x 4
    "4to1_dropped_order": (22, 4, 1, 1, 2, True, False),  # an order of 20: 12 left
    "no_batching": (22, 2, 3, 3, None, False, False),  # 16 left: 6 each, 2 repeats
}


def epoch_samples(length: int, replicas: int, rank: int, epoch: int, *, drop_last: bool = False,
                  batch_size: int | None = None) -> list[int]:
    """What rank ``rank`` of an uninterrupted job hands out in ``epoch``; with a
    ``batch_size``, without its last partial batch."""
    sampler = DistributedSampler(range(length), num_replicas=replicas, rank=rank, seed=ORDER_SEED,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return indices if batch_size is None else indices[:len(indices) // batch_size * batch_size]


def padded(order: list[int], length: int, positions: int) -> list[int]:
    """The first ``positions`` of an epoch's order, which goes on past its end as
    DistributedSampler pads it: the dataset's permutation (``order[:length]``) again."""
    return [order[p % length] for p in range(positions)]


@pytest.mark.parametrize("case", list(CASES))
def test_resharded_epoch_hands_out_the_rest_of_the_order_once_then_the_samplers_order(
        case: str) -> None:
    length, before_ranks, batches, after_ranks, batch_size, drop_last, drop_last_batch = \
        CASES[case]
    options = {"batch_size": batch_size, "drop_last": drop_last,
               "drop_last_batch": drop_last_batch}
    job = new_job(length, before_ranks, **options)
    before = flat(job.take(batches))
    state = job.ranks[-1].state_dict()  # any rank's state serves
    order = epoch_order(length, before_ranks, 0, drop_last=drop_last)
    assert Counter(before) == Counter(order[:len(before)])
    assert state["distributed"]["consumed"] == len(before)

    resumed = new_job(length, after_ranks, state, **options)
    after = resumed.take()

    rest = len(order) - len(before)
    share = rest // after_ranks if drop_last else -(-rest // after_ranks)
    # padded: the order's rest and repeats to fill the last round; dropped: the rest's tail
    expected = Counter(padded(order, length, len(before) + share * after_ranks)[len(before):])
    if drop_last_batch and batch_size is not None:  # each rank's partial batch goes
        each = share // batch_size * batch_size
        assert [len(seen) for seen in after] == [each] * after_ranks
        assert Counter(flat(after)) <= expected
    else:
        assert [len(seen) for seen in after] == [share] * after_ranks
        assert Counter(flat(after)) == expected
    assert abs(share * after_ranks - rest) < after_ranks
    assert [loader.epoch for loader in resumed.ranks] == [1] * after_ranks
    assert resumed.take() == [
        epoch_samples(length, after_ranks, rank, 1, drop_last=drop_last,
                      batch_size=batch_size if drop_last_batch else None)
        for rank in range(after_ranks)]


def test_an_epoch_resharded_twice_hands_out_each_sample_once_and_pads_only_the_last_round(
) -> None:
    """2 ranks take 5 batches of 4 (40 samples), 3 ranks 2 each (24), 5 ranks the rest
    (32, padded to 35); each resumed job loads another rank's state."""
    two = new_job(96, 2)
    seen = flat(two.take(5))
    three = new_job(96, 3, two.ranks[1].state_dict())
    seen += flat(three.take(2))
    state = three.ranks[2].state_dict()
    assert {k: state["distributed"][k] for k in ("order_replicas", "start", "consumed")} == \
        {"order_replicas": 2, "start": 40, "consumed": 64}
    five = new_job(96, 5, state)
    seen += flat(five.take())

    order = epoch_order(96, 2, 0)
    assert Counter(seen) == Counter(order) + Counter(order[:3])  # 3 repeats: 35 for 32
    assert five.take() == [epoch_samples(96, 5, rank, 1) for rank in range(5)]


def test_a_resharded_epoch_resumed_on_as_many_ranks_goes_on_as_if_uninterrupted() -> None:
    two = new_job(96, 2)
    two.take(5)
    three = new_job(96, 3, two.ranks[0].state_dict())
    three.take(1)
    state = three.ranks[0].state_dict()
    rest_of_epoch = three.take()

    again = new_job(96, 3, state)
    assert again.take() == rest_of_epoch
    assert again.take() == [epoch_samples(96, 3, rank, 1) for rank in range(3)]


def test_on_as_many_ranks_the_epoch_still_replays_exactly() -> None:
    """The saved rank's own position is replayed (not recomputed from the job's), with or
    without the position that newer states hold."""
    job = new_job(96, 2)
    job.take(5)
    state = job.ranks[1].state_dict()
    rest = job.take()
    for saved in (state, {k: v for k, v in state.items() if k != "distributed"}):
        again = distributed_loader(96, 2, 1)
        again.load_state_dict(saved)
        assert again.batches_yielded == 5  # replayed: the batches before count
        assert flat([samples(batch) for batch in again]) == rest[1]


def test_a_state_saved_between_epochs_starts_the_next_epoch_in_the_new_ranks_order() -> None:
    job = new_job(22, 2, drop_last=True)
    job.take()
    state = job.ranks[0].state_dict()
    assert (state["epoch"], state["distributed"]["consumed"]) == (1, 0)

    assert new_job(22, 3, state, drop_last=True).take() == [
        epoch_samples(22, 3, rank, 1, drop_last=True) for rank in range(3)]


def test_state_right_after_a_resharded_load_saves_the_same_position() -> None:
    job = new_job(96, 2)
    job.take(5)
    loader = new_job(96, 4, job.ranks[0].state_dict()).ranks[3]
    position = loader.state_dict()["distributed"]
    assert (position["start"], position["consumed"], position["num_replicas"]) == (40, 40, 4)
    assert (loader.epoch, loader.batches_yielded) == (0, 0)


DISTRIBUTED_EDITS: dict[str, tuple[Callable[[dict[str, Any]], object], type[Exception], str]] = {
    "negative_consumed": (lambda d: d.update(consumed=-1), InvalidArgumentError,
                          r"state\['distributed'\]\['consumed'\] must be a non-negative int"),
    "consumed_past_the_order": (lambda d: d.update(consumed=97), InvalidArgumentError,
                                r"consumed=97.*96 positions"),
    "start_past_consumed": (lambda d: d.update(start=41), InvalidArgumentError, "start=41"),
    "missing_consumed": (lambda d: d.pop("consumed"), InvalidArgumentError,
                         r"missing key\(s\) \['consumed'\]"),
    "no_ranks": (lambda d: d.update(order_replicas=0), InvalidArgumentError, "no ranks"),
    "shuffle_not_a_bool": (lambda d: d.update(shuffle="yes"), InvalidArgumentError, "'shuffle'"),
    "seed_a_float": (lambda d: d.update(seed=7.0), InvalidArgumentError, "'seed'"),
    "another_seed": (lambda d: d.update(seed=8), IncompatibleStateError, r"'seed'\] is 8"),
    "another_dataset": (lambda d: d.update(dataset_length=95), IncompatibleStateError,
                        "'dataset_length'"),
    "another_drop_last": (lambda d: d.update(drop_last=True), IncompatibleStateError,
                          "'drop_last'"),
}


@pytest.mark.parametrize("edit", list(DISTRIBUTED_EDITS))
def test_a_hand_edited_position_raises_naming_the_key_and_changes_nothing(edit: str) -> None:
    change, error, message = DISTRIBUTED_EDITS[edit]
    job = new_job(96, 2)
    job.take(5)
    state = job.ranks[0].state_dict()
    change(state["distributed"])
    target = new_job(96, 4)
    target.take(2)
    before = target.ranks[1].state_dict()

    with pytest.raises(error, match=message):
        target.ranks[1].load_state_dict(state)

    after = target.ranks[1].state_dict()
    assert after["distributed"] == before["distributed"]
    assert (after["epoch"], after["batches_yielded"]) == (before["epoch"], 2)


def test_a_position_that_is_not_a_dict_is_refused() -> None:
    state = distributed_loader(96, 2, 0).state_dict()
    state["distributed"] = 40
    with pytest.raises(InvalidArgumentError, match=r"state\['distributed'\] must be a dict"):
        distributed_loader(96, 4, 0).load_state_dict(state)


def test_only_rank_0s_copy_of_a_distributed_loader_is_read_at_another_world_size(
        caplog: pytest.LogCaptureFixture) -> None:
    """match_objects asks for the state of rank 0's copies only (never every rank's): a
    loader over a DistributedSampler restores it; one over another sampler, one whose saved
    state has no position (an older ckpts), and the RNGs keep their live state, with a
    warning."""
    data = torch.arange(96)
    shuffled = ResumableLoader(DataLoader(data, batch_size=4, sampler=RandomSampler(data)))
    state = ckpts.TrainState(loader=distributed_loader(96, 3, 2), shuffled=shuffled,
                             older=distributed_loader(96, 3, 2))
    older = distributed_loader(96, 2, 0).state_dict()
    del older["distributed"]
    saved_states = {"loader.rank0": distributed_loader(96, 2, 0).state_dict(),
                    "shuffled.rank0": shuffled.state_dict(), "older.rank0": older}
    names = ("loader", "older", "rng", "shuffled")
    manifest = {"world_size": 2, "per_rank": list(names),
                "objects": {f"{name}.rank{rank}": {} for name in names for rank in range(2)}}
    asked: list[str] = []

    def saved_state(name: str) -> Any:
        asked.append(name)
        return saved_states[name]

    with caplog.at_level(logging.WARNING, logger="ckpts"):
        chosen = match_objects("run/step-1", manifest, state, rank=0, size=3,
                               saved_state=saved_state)

    assert chosen == {"loader": "loader.rank0"}
    assert "loader.rank0" in asked
    assert set(asked) <= {"loader.rank0", "older.rank0", "shuffled.rank0"}
    assert "older, rng, shuffled keep their current state" in caplog.text


# --- real jobs: DDP on gloo, SIGKILLed on 2 ranks, resumed on 4 and 1 -----------------

def launch(ranks: int, run: Path, records: Path, save_at: int) -> subprocess.Popen[str]:
    """The job on ``ranks`` ranks (forked by one process, in a session of its own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(f"{records}.log", "w") as output:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(ranks), str(run), str(records), str(save_at)],
            env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(job: subprocess.Popen[str], records: Path) -> None:
    try:
        job.wait(timeout=JOB_TIMEOUT)
    finally:
        kill(job)
    assert job.returncode == 0, Path(f"{records}.log").read_text()[-4000:]


def kill(job: subprocess.Popen[str]) -> None:
    """SIGKILL the job's every process (what is left of them)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def kill_once_saved(job: subprocess.Popen[str], records: Path, ranks: int) -> None:
    """SIGKILL every rank as soon as each has logged its save."""
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while not all(any("saved" in line for line in lines(records, rank))
                      for rank in range(ranks)):
            assert time.monotonic() < deadline, "the job did not save in time"
            assert job.poll() is None, Path(f"{records}.log").read_text()[-4000:]
            time.sleep(0.1)
    finally:
        kill(job)


def lines(records: Path, rank: int) -> list[dict[str, Any]]:
    path = Path(f"{records}-rank{rank}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def batches(records: Path, rank: int, *, epoch: int, until: int | None = None) -> list[int]:
    """The samples rank ``rank`` logged in ``epoch`` (up to step ``until``)."""
    return [sample for line in lines(records, rank)
            if line.get("epoch") == epoch and (until is None or line["step"] <= until)
            for sample in line["samples"]]


def first_step(records: Path) -> int:
    return int(next(line["step"] for line in lines(records, 0) if "step" in line))


@pytest.fixture(scope="module")
def elastic_jobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a``: 2 ranks, killed after saving at step 5 (mid-epoch 0: 40 of 96 samples).
    ``b``: 4 ranks resume a copy (run-b), save at step 7 and finish epoch 1; at the same
    time ``c``: 1 rank resumes another copy (run-c). ``e``: 1 rank resumes run-b's step 7."""
    base = tmp_path_factory.mktemp("elastic")
    kill_once_saved(launch(2, base / "run-a", base / "a", -5), base / "a", 2)
    for copy in ("run-b", "run-c", "run-d"):
        shutil.copytree(base / "run-a", base / copy)
    b, c = launch(4, base / "run-b", base / "b", 7), launch(1, base / "run-c", base / "c", 0)
    try:
        finish(b, base / "b")
        finish(c, base / "c")
    finally:
        kill(c)
    finish(launch(1, base / "run-b", base / "e", 0), base / "e")
    return base


def killed_job(base: Path) -> list[int]:
    """What the 2-rank job handed out of epoch 0 before it saved (its last batch too)."""
    return batches(base / "a", 0, epoch=0, until=5) + batches(base / "a", 1, epoch=0, until=5)


def test_resumed_on_4_ranks_every_sample_of_the_epoch_once_then_the_samplers_order(
        elastic_jobs: Path) -> None:
    before = killed_job(elastic_jobs)
    after = [batches(elastic_jobs / "b", rank, epoch=0) for rank in range(4)]

    assert len(before) == 40
    assert first_step(elastic_jobs / "b") == 6
    assert sorted(before + flat(after)) == list(range(SAMPLES))
    assert [batches(elastic_jobs / "b", rank, epoch=1) for rank in range(4)] == [
        ordered(4, rank, epoch=1) for rank in range(4)]


def test_resumed_on_1_rank_every_sample_of_the_epoch_once_then_the_samplers_order(
        elastic_jobs: Path) -> None:
    after = batches(elastic_jobs / "c", 0, epoch=0)

    assert first_step(elastic_jobs / "c") == 6
    assert sorted(killed_job(elastic_jobs) + after) == list(range(SAMPLES))
    assert batches(elastic_jobs / "c", 0, epoch=1) == ordered(1, 0, epoch=1)


def test_a_checkpoint_mid_epoch_on_4_ranks_resumes_on_1_rank_with_each_sample_once(
        elastic_jobs: Path) -> None:
    """2 ranks -> 4 (saved after 2 more batches each) -> 1."""
    on_four = [batches(elastic_jobs / "b", rank, epoch=0, until=7) for rank in range(4)]
    after = batches(elastic_jobs / "e", 0, epoch=0)

    assert first_step(elastic_jobs / "e") == 8
    assert [len(seen) for seen in on_four] == [8] * 4
    assert sorted(killed_job(elastic_jobs) + flat(on_four) + after) == list(range(SAMPLES))
    assert batches(elastic_jobs / "e", 0, epoch=1) == ordered(1, 0, epoch=1)


def test_one_process_restores_a_2_rank_loader_into_any_distributed_sampler_but_no_other(
        elastic_jobs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The test process (no torch.distributed) restores the 2-rank checkpoint into each
    rank of a 3-rank sampler (56 left: 19 each, one repeat), and into a RandomSampler
    loader, which keeps its live position."""
    dataset = TensorDataset(torch.arange(SAMPLES))

    def restore(sampler: Any) -> ResumableLoader:
        model = torch.nn.ModuleDict({"module": build_model()})  # DDP's keys: module.*
        loader = ResumableLoader(DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler))
        state = ckpts.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                 loader=loader)
        with ckpts.CheckpointManager(elastic_jobs / "run-d") as manager:
            assert manager.restore(state) == 5
        return loader

    ranks = [restore(DistributedSampler(dataset, num_replicas=3, rank=rank, seed=SEED))
             for rank in range(3)]
    rest = flat(Job(ranks).take())
    assert sorted(set(killed_job(elastic_jobs) + rest)) == list(range(SAMPLES))
    assert len(rest) == 57

    with caplog.at_level(logging.WARNING, logger="ckpts"):
        shuffled = restore(RandomSampler(dataset))
    assert (shuffled.epoch, shuffled.batches_yielded) == (0, 0)
    assert "loader, rng keep their current state" in caplog.text


def ordered(replicas: int, rank: int, *, epoch: int) -> list[int]:
    """What DistributedSampler(num_replicas=replicas, seed=SEED) gives ``rank`` in ``epoch``."""
    sampler = DistributedSampler(range(SAMPLES), num_replicas=replicas, rank=rank, seed=SEED)
    sampler.set_epoch(epoch)
    return list(sampler)
