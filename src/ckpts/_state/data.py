"""Resumable DataLoader iteration: exact mid-epoch resume that skips seen batches without loading.

:class:`ResumableLoader` wraps a ``torch.utils.data.DataLoader``. Its state is the epoch, the
number of batches handed out in it and the random generator states the epoch's sampler started
from. On resume the sampler replays the epoch's order from those states and skips the batches
already seen at the index level, so the dataset never loads them.

With a ``DistributedSampler`` the state also holds the job's position in the epoch's order
(:class:`EpochOrder`), so that a job resumed on another number of ranks hands out the rest of
the epoch, shared by its ranks (:func:`remainder_positions`), instead of starting it over.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from ckpts.errors import IncompatibleStateError, InvalidArgumentError

log = logging.getLogger("ckpts")

_Generators = tuple[torch.Generator | None, torch.Generator | None]
# Global CPU, DataLoader and sampler generator states from when a sampler pass began.
_EpochRNG = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
_RNG_KEYS = ("torch_rng", "generator_rng", "sampler_generator_rng")
_DISTRIBUTED = "distributed"  # the state's key for a DistributedSampler's position
_ORDER_KEYS = ("dataset_length", "seed", "shuffle", "drop_last")  # must match the live sampler
_POSITION_KEYS = ("num_replicas", "order_replicas", "start", "consumed")


@dataclass(frozen=True)
class EpochOrder:
    """How ``DistributedSampler`` orders an epoch over all ranks: a permutation of the
    dataset (``seed + epoch``; ``range`` unshuffled), repeated from its start, of which the
    first :attr:`size` positions are handed out, position ``p`` by rank ``p % replicas``.

    Example:
        >>> order = EpochOrder(length=10, replicas=4, shuffle=False, seed=0, drop_last=False)
        >>> order.size, order.indices(0, range(order.size))
        (12, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    """

    length: int
    replicas: int
    shuffle: bool
    seed: int
    drop_last: bool

    @property
    def size(self) -> int:
        """The positions handed out: the dataset length rounded up to a multiple of
        ``replicas`` (padded with repeats), or down with ``drop_last`` (the tail dropped)."""
        rounded = self.length // self.replicas if self.drop_last else -(-self.length //
                                                                         self.replicas)
        return rounded * self.replicas

    def indices(self, epoch: int, positions: Iterable[int]) -> list[int]:
        """The dataset indices at ``positions`` of ``epoch``'s order (past the dataset's
        length, the order repeats from its start, as ``DistributedSampler`` pads)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            permutation = torch.randperm(self.length, generator=generator).tolist()
        else:
            permutation = list(range(self.length))
        return [permutation[position % self.length] for position in positions]


def remainder_positions(size: int, consumed: int, replicas: int, rank: int, *,
                        drop_last: bool) -> range:
    """The positions of an order of ``size`` positions that ``rank`` of ``replicas`` ranks
    takes when the job goes on from position ``consumed``: the rest is shared round-robin
    (``consumed + rank``, then every ``replicas``-th), every rank taking as many as the
    others, as ``DistributedSampler`` shares an epoch: when the rest does not divide by
    ``replicas``, it is padded with up to ``replicas - 1`` positions past ``size`` (repeats),
    or with ``drop_last`` its last ``rest % replicas`` positions are left out.

    Example:
        >>> [list(remainder_positions(10, 3, 2, rank, drop_last=False)) for rank in (0, 1)]
        [[3, 5, 7, 9], [4, 6, 8, 10]]
        >>> [list(remainder_positions(10, 3, 2, rank, drop_last=True)) for rank in (0, 1)]
        [[3, 5, 7], [4, 6, 8]]
    """
    rest = size - consumed
    each = rest // replicas if drop_last else -(-rest // replicas)
    return range(consumed + rank, consumed + each * replicas, replicas)


@dataclass(frozen=True)
class _Pass:
    """A pass over an epoch's ``order`` from position ``start`` by rank ``rank`` of
    ``replicas``: the sampler's own pass from 0, or the rest of the epoch after a resume
    on another number of ranks."""

    order: EpochOrder
    start: int
    replicas: int
    rank: int

    def positions(self) -> range:
        """The positions of the order this rank hands out."""
        return remainder_positions(self.order.size, self.start, self.replicas, self.rank,
                                   drop_last=self.order.drop_last)


def _sampler_pass(sampler: DistributedSampler[Any], start: int,
                  order: EpochOrder | None = None) -> _Pass:
    """``sampler``'s pass over ``order`` (by default its own) from position ``start``."""
    own = EpochOrder(length=len(sampler.dataset),  # type: ignore[arg-type]
                     replicas=sampler.num_replicas, shuffle=sampler.shuffle, seed=sampler.seed,
                     drop_last=sampler.drop_last)
    return _Pass(order or own, start, sampler.num_replicas, sampler.rank)


def _capture(generators: _Generators) -> _EpochRNG:
    loader_gen, sampler_gen = (None if g is None else g.get_state() for g in generators)
    return torch.get_rng_state(), loader_gen, sampler_gen


def _install(rng: _EpochRNG, generators: _Generators) -> None:
    torch.set_rng_state(rng[0])
    for generator, state in zip(generators, rng[1:], strict=True):
        if generator is not None and state is not None:
            generator.set_state(state)


class _ReplaySampler(Sampler[Any]):
    """Wraps the index sampler; records the RNG a pass starts from, or replays a pass skipping N,
    or hands out other indices (``instead``: the rest of an epoch after a resharded resume).

    The RNG is recorded (or installed) when the first index is requested, where RandomSampler
    draws its seed, not at ``iter(dataloader)``: a fresh iterator draws a worker base seed first,
    a persistent-workers iterator does not, so only this point is the same in both. A replay puts
    the caller's global RNG back before the first sample is loaded (it may augment with it).
    """

    def __init__(self, inner: Any, generators: _Generators) -> None:
        super().__init__()
        self.inner = inner
        self.generators = generators
        self.started: _EpochRNG | None = None  # the pass in progress
        self.replay: tuple[_EpochRNG, int] | None = None  # used by the next pass only
        self.instead: Iterable[Any] | None = None  # used by the next pass only

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        replay, self.replay = self.replay, None
        instead, self.instead = self.instead, None
        if replay is None:
            self.started = _capture(self.generators)
            yield from self.inner if instead is None else instead
            return
        rng, skip = replay
        self.started = rng
        outside = torch.get_rng_state()
        _install(rng, self.generators)
        indices = iter(self.inner)
        try:  # the first next() draws the sampler's seed, so keep it under the epoch's RNG
            first = next(itertools.islice(indices, skip, None))
        except StopIteration:
            return
        finally:
            torch.set_rng_state(outside)
        yield first
        yield from indices


def _generator_of(obj: object) -> torch.Generator | None:
    generator = getattr(obj, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _twin(loader: DataLoader[Any], sampler: _ReplaySampler) -> DataLoader[Any]:
    """A DataLoader with ``loader``'s settings that draws its indices from ``sampler``."""
    settings: dict[str, Any] = {
        name: getattr(loader, name)
        for name in (
            "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
            "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers",
            "pin_memory_device", "in_order",
        )
        if hasattr(loader, name)  # pin_memory_device and in_order depend on the torch version
    }
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=sampler, **settings)
    return DataLoader(loader.dataset, batch_size=None, sampler=sampler, **settings)


class ResumableLoader:
    """A DataLoader wrapper whose position inside an epoch can be saved and restored exactly.

    Iterate it like the DataLoader. :meth:`state_dict` records the epoch, the batches handed out
    in it and the generator states the epoch's sampler started from; after :meth:`load_state_dict`
    the next iteration yields exactly the remaining batches of that epoch, in the original order,
    without loading the skipped samples, and later epochs match the uninterrupted run. The global
    torch RNG at the moment of saving is not part of this state: checkpoint it separately and
    restore it before iterating again. A new ``iter()`` without a loaded state starts the current
    epoch over, like a plain DataLoader. Do not modify the DataLoader after wrapping it.

    A sampler with ``set_epoch`` (``DistributedSampler``) gets the loader's epoch at the
    start of each pass, so every epoch has its own order and a resumed epoch replays its
    own; there is no need to call ``set_epoch`` yourself.

    A job resumed on another number of ranks goes on where the saved job was in the epoch,
    when the sampler is ``DistributedSampler`` itself (not a subclass) under the DataLoader's
    own ``BatchSampler`` or with ``batch_size=None``. The ranks of a synchronous job have all
    handed out as many batches, so together they have handed out the first ``consumed``
    positions of the epoch's order (:class:`EpochOrder`); the state records that count, and
    any one rank's state serves every new rank. The new ranks share the positions after it
    round-robin, in order (:func:`remainder_positions`); later epochs are the sampler's own
    order for the new number of ranks. So every position of the interrupted epoch's order is
    handed out exactly once over the job, but for what ``DistributedSampler`` does at the end
    of any epoch so that every rank takes as many batches (DDP would hang otherwise): when
    the rest does not divide by the new number of ranks ``W``, up to ``W - 1`` positions are
    added (repeats: the order goes on from its start, as the sampler pads it), or, with the
    sampler's ``drop_last=True``, up to ``W - 1`` of its last positions are left out of that
    epoch. The DataLoader's own ``drop_last`` drops each rank's last partial batch, as it
    always does. A state saved in a resumed epoch resumes the same way, on any number of
    ranks. The dataset's length and the sampler's seed, ``shuffle`` and ``drop_last`` must be
    the saved ones; the batch size may change. ``len()`` stays the sampler's own epoch's.

    With ``num_workers > 0`` the index order is exact, but randomness inside worker processes
    (augmentations) may differ after a resume: workers receive the batches in a different
    round-robin order and their generators start from fresh seeds.

    Args:
        dataloader: a DataLoader over a map-style dataset, with ``in_order=True`` (the default).

    Raises:
        InvalidArgumentError: ``dataloader`` is not a DataLoader, wraps an IterableDataset, or
            has ``in_order=False``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> dataset = TensorDataset(torch.arange(64.0))
        >>> loader = ResumableLoader(DataLoader(dataset, batch_size=8, shuffle=True))
        >>> for step, batch in enumerate(loader):
        ...     if step == 2:
        ...         state = loader.state_dict()  # saved with the model and the RNGs
        ...         break
        >>> resumed = ResumableLoader(DataLoader(dataset, batch_size=8, shuffle=True))
        >>> resumed.load_state_dict(state)  # in a new process: continues after that batch
        >>> len(list(resumed))
        5
    """

    def __init__(self, dataloader: DataLoader[Any]) -> None:
        if not isinstance(dataloader, DataLoader):
            raise InvalidArgumentError(
                f"ResumableLoader wraps a torch.utils.data.DataLoader, got "
                f"{type(dataloader).__name__}; pass a DataLoader"
            )
        if isinstance(dataloader.dataset, IterableDataset):
            raise InvalidArgumentError(
                "ResumableLoader needs a map-style dataset, but this DataLoader reads an "
                "IterableDataset, whose samples cannot be skipped without loading them; make the "
                "dataset stateful (state_dict()/load_state_dict()) and checkpoint it instead"
            )
        if not getattr(dataloader, "in_order", True):
            raise InvalidArgumentError(
                "the DataLoader has in_order=False, so the batches already seen cannot be told "
                "apart from the rest on resume; build it with in_order=True"
            )
        if type(dataloader) is not DataLoader:
            log.warning(
                "ResumableLoader iterates a plain DataLoader with the settings of your %s; "
                "behaviour its methods override is not used", type(dataloader).__name__
            )
        self._dataloader = dataloader
        auto_collation = dataloader.batch_sampler is not None
        index_sampler = dataloader.batch_sampler if auto_collation else dataloader.sampler
        data_sampler = getattr(index_sampler, "sampler", None) if auto_collation else index_sampler
        self._data_sampler = data_sampler
        self._generators: _Generators = (_generator_of(dataloader), _generator_of(data_sampler))
        self._sampler = _ReplaySampler(index_sampler, self._generators)
        self._twin = _twin(dataloader, self._sampler)
        self._epoch = 0
        self._batches_yielded = 0
        # a DistributedSampler whose epoch can go on over another number of ranks
        self._distributed: DistributedSampler[Any] | None = None
        if type(data_sampler) is DistributedSampler and \
                type(index_sampler) in (BatchSampler, DistributedSampler):
            self._distributed = data_sampler
        self._batching = ((index_sampler.batch_size, index_sampler.drop_last)
                          if isinstance(index_sampler, BatchSampler) else (1, False))
        self._remainder: _Pass | None = None  # the pass in progress, or the next pass
        self._remainder_next = False  # whether the next pass hands out self._remainder

    @property
    def dataloader(self) -> DataLoader[Any]:
        """The wrapped DataLoader (iterate the ResumableLoader, not this, to stay resumable)."""
        return self._dataloader

    @property
    def epoch(self) -> int:
        """How many epochs have been iterated to the end (the last batch handed out)."""
        return self._position()[0]

    @property
    def batches_yielded(self) -> int:
        """How many batches of the current epoch have been handed out."""
        return self._position()[1]

    def _position(self) -> tuple[int, int, _EpochRNG | None]:
        """Epoch, batches and start RNG; an epoch whose last batch is out counts as done.

        The loop only learns that an epoch ended on the next ``next()``, but a checkpoint
        taken right after the last batch should already say "epoch done".
        """
        if self._remainder is not None:
            total: int | None = self._batches_of(self._remainder)
        else:
            total = len(self) if hasattr(self._sampler.inner, "__len__") else None
        if total is not None and self._batches_yielded >= total > 0:
            return self._epoch + 1, 0, None
        return self._epoch, self._batches_yielded, self._sampler.started

    def __len__(self) -> int:
        return len(self._dataloader)

    def __iter__(self) -> Iterator[Any]:
        replay = self._sampler.replay
        self._batches_yielded = 0 if replay is None else replay[1]
        if not self._remainder_next:
            self._remainder = None  # a pass after another began: the sampler's own order
        self._remainder_next = False
        set_epoch = getattr(self._data_sampler, "set_epoch", None)
        if callable(set_epoch):  # DistributedSampler: each epoch its own order, replayed alike
            set_epoch(self._epoch)
        if self._remainder is not None:
            self._sampler.instead = self._remainder_indices(self._remainder)
        if replay is None:
            batches = iter(self._twin)
        else:  # creating the iterator may draw a worker seed: keep the caller's RNG untouched
            outside = torch.get_rng_state()
            batches = iter(self._twin)
            torch.set_rng_state(outside)
        for batch in batches:
            self._batches_yielded += 1
            yield batch
        self._epoch += 1
        self._batches_yielded = 0
        self._sampler.started = None
        self._remainder = None

    def _batches_of(self, remainder: _Pass) -> int:
        samples, (batch_size, drop_last) = len(remainder.positions()), self._batching
        return samples // batch_size if drop_last else -(-samples // batch_size)

    def _remainder_indices(self, remainder: _Pass) -> Iterable[Any]:
        """What the index sampler hands out in a pass over ``remainder``."""
        indices = remainder.order.indices(self._epoch, remainder.positions())
        batch_size, drop_last = self._batching
        if self._dataloader.batch_sampler is None:
            return indices
        return BatchSampler(indices, batch_size, drop_last)

    def _distributed_state(self, sampler: DistributedSampler[Any], epoch_done: bool
                           ) -> dict[str, Any]:
        """The job's position in the epoch's order: how many positions all ranks together
        have handed out (``consumed``), of the order for ``order_replicas`` ranks, in a pass
        that began at position ``start`` on ``num_replicas`` ranks."""
        current = self._remainder
        if current is None or epoch_done:
            current = _sampler_pass(sampler, 0)
        consumed = 0
        if not epoch_done:  # every rank has handed out as many batches as this one
            each = min(self._batches_yielded * self._batching[0], len(current.positions()))
            consumed = min(current.start + each * current.replicas, current.order.size)
        order = current.order
        return {"num_replicas": current.replicas, "order_replicas": order.replicas,
                "start": current.start, "consumed": consumed, "dataset_length": order.length,
                "seed": order.seed, "shuffle": order.shuffle, "drop_last": order.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, batches yielded in it, RNG states the epoch started from.

        Values are ints, None and uint8 tensors. Call it any time, also inside the loop.
        With a ``DistributedSampler`` (see the class), ``state["distributed"]`` also holds
        the job's position in the epoch's order, as ints and bools: ``consumed`` positions
        handed out by all ranks together, of the order for ``order_replicas`` ranks, in a
        pass that began at position ``start`` on ``num_replicas`` ranks (``start`` is 0
        unless the epoch was resumed on another number of ranks), and the sampler's
        ``dataset_length``, ``seed``, ``shuffle`` and ``drop_last``.

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> loader = ResumableLoader(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2))
            >>> batches = iter(loader)
            >>> _ = next(batches), next(batches)
            >>> state = loader.state_dict()
            >>> state["epoch"], state["batches_yielded"]
            (0, 2)
        """
        epoch, batches, started = self._position()
        # between epochs, the generators' current states are where the next epoch starts
        rng = started or (None, *_capture(self._generators)[1:])
        state: dict[str, Any] = {"epoch": epoch, "batches_yielded": batches}
        for key, value in zip(_RNG_KEYS, rng, strict=True):
            state[key] = None if value is None else value.clone()
        if self._distributed is not None:
            state[_DISTRIBUTED] = self._distributed_state(self._distributed,
                                                          epoch_done=epoch != self._epoch)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration yields the rest of that epoch.

        Args:
            state: what :meth:`state_dict` returned, possibly after a save/load round trip.

        A state whose ``distributed`` position was saved on as many ranks as this loader's
        ``DistributedSampler`` has, in an epoch not resumed on another number of ranks,
        replays the epoch exactly; any other goes on from its position in the epoch's order,
        shared by this loader's ranks (see the class). A state without the key (saved by an
        older ckpts, or without a DistributedSampler) always replays.

        Raises:
            InvalidArgumentError: a key is missing or has a wrong type or value (a position
                outside the epoch); nothing is changed.
            IncompatibleStateError: the state does not fit this DataLoader (other generators,
                more batches than it has, another dataset length or sampler seed, shuffle or
                drop_last); nothing is changed.

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> data = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2)
            >>> first = ResumableLoader(data)
            >>> batches = iter(first)
            >>> _ = next(batches), next(batches), next(batches)
            >>> loader = ResumableLoader(data)
            >>> loader.load_state_dict(first.state_dict())  # 3 batches were seen
            >>> [batch[0].tolist() for batch in loader]  # the batches after them
            [[6.0, 7.0]]
        """
        if not isinstance(state, Mapping):
            raise InvalidArgumentError(
                f"ResumableLoader state must be a dict, got {type(state).__name__}; "
                "pass what ResumableLoader.state_dict() returned"
            )
        missing = [k for k in ("epoch", "batches_yielded", *_RNG_KEYS) if k not in state]
        if missing:
            raise InvalidArgumentError(
                f"ResumableLoader state is missing key(s) {missing}; "
                "pass what ResumableLoader.state_dict() returned"
            )
        epoch, batches = _count(state, "epoch"), _count(state, "batches_yielded")
        devices = (None, *self._generators)
        cpu, *generator_states = (
            _rng_tensor(state, key, live) for key, live in zip(_RNG_KEYS, devices, strict=True)
        )
        if cpu is None and batches:
            raise InvalidArgumentError(
                "ResumableLoader state has batches_yielded but no 'torch_rng'; "
                "pass an unmodified ResumableLoader.state_dict()"
            )
        recorded = cpu is not None or any(s is not None for s in generator_states)
        for key, saved, live in zip(_RNG_KEYS[1:], generator_states, self._generators, strict=True):
            if recorded and (saved is None) != (live is None):
                raise IncompatibleStateError(
                    f"ResumableLoader state {'has' if live is None else 'lacks'} {key!r} but this "
                    f"DataLoader {'has no' if live is None else 'has a'} torch.Generator there; "
                    "build the DataLoader and its sampler as in the run that saved the state"
                )
        remainder = self._saved_remainder(state)
        if remainder is not None:  # saved on another number of ranks, or resumed there
            self._sampler.replay, self._sampler.started = None, None
            self._remainder = remainder if remainder.start else None  # 0: a fresh epoch
            self._remainder_next = self._remainder is not None
            self._epoch, self._batches_yielded = epoch, 0
            return
        total = len(self) if hasattr(self._sampler.inner, "__len__") else batches
        if batches > total:
            raise IncompatibleStateError(
                f"ResumableLoader state has batches_yielded={batches}, but this DataLoader has "
                f"only {total} batches per epoch; use the same dataset and batch size as the "
                "run that saved the state"
            )
        rng = None if cpu is None else (cpu, generator_states[0], generator_states[1])
        if rng is None:  # saved between epochs: the next epoch starts from these generators
            for generator, saved in zip(self._generators, generator_states, strict=True):
                if generator is not None and saved is not None:
                    generator.set_state(saved)
        self._sampler.started = rng
        self._sampler.replay = None if rng is None else (rng, batches)
        self._remainder, self._remainder_next = None, False
        self._epoch, self._batches_yielded = epoch, batches

    def _saved_remainder(self, state: Mapping[str, Any]) -> _Pass | None:
        """Where a state's ``distributed`` position goes on from, checked; None where the
        epoch replays exactly instead (no position, no DistributedSampler here, or a
        position saved by a pass of the sampler's own order on as many ranks)."""
        sampler, saved = self._distributed, state.get(_DISTRIBUTED)
        if sampler is None or saved is None:
            return None
        if not isinstance(saved, Mapping):
            raise InvalidArgumentError(
                f"ResumableLoader state[{_DISTRIBUTED!r}] must be a dict, got "
                f"{type(saved).__name__}; pass an unmodified ResumableLoader.state_dict()")
        missing = [key for key in (*_POSITION_KEYS, *_ORDER_KEYS) if key not in saved]
        if missing:
            raise InvalidArgumentError(
                f"ResumableLoader state[{_DISTRIBUTED!r}] is missing key(s) {missing}; "
                "pass an unmodified ResumableLoader.state_dict()")
        within = f"[{_DISTRIBUTED!r}]"
        replicas, order_replicas, start, consumed = (
            _count(saved, key, within) for key in _POSITION_KEYS)
        if not replicas or not order_replicas:
            raise InvalidArgumentError(
                f"ResumableLoader state[{_DISTRIBUTED!r}] has no ranks (num_replicas "
                f"{replicas}, order_replicas {order_replicas}); pass an unmodified "
                "ResumableLoader.state_dict()")
        for key in ("seed", "shuffle", "drop_last"):
            kind = int if key == "seed" else bool
            if type(saved[key]) is not kind:
                raise InvalidArgumentError(
                    f"ResumableLoader state[{_DISTRIBUTED!r}][{key!r}] must be a "
                    f"{kind.__name__}, got {saved[key]!r}; pass an unmodified "
                    "ResumableLoader.state_dict()")
        order = EpochOrder(length=_count(saved, "dataset_length", within),
                           replicas=order_replicas, shuffle=saved["shuffle"], seed=saved["seed"],
                           drop_last=saved["drop_last"])
        live = _sampler_pass(sampler, 0).order
        for key, was, now in zip(_ORDER_KEYS, (order.length, order.seed, order.shuffle,
                                              order.drop_last),
                                 (live.length, live.seed, live.shuffle, live.drop_last),
                                 strict=True):
            if was != now:
                raise IncompatibleStateError(
                    f"ResumableLoader state[{_DISTRIBUTED!r}][{key!r}] is {was!r}, but this "
                    f"DataLoader's DistributedSampler has {now!r}; build the dataset and the "
                    "sampler as in the run that saved the state")
        if not start <= consumed <= order.size:
            raise InvalidArgumentError(
                f"ResumableLoader state[{_DISTRIBUTED!r}] has consumed={consumed} and "
                f"start={start}, outside the {order.size} positions of the epoch's order (0 <= "
                "start <= consumed <= positions); pass an unmodified ResumableLoader.state_dict()")
        if start == 0 and order_replicas == replicas == sampler.num_replicas:
            return None
        return _sampler_pass(sampler, consumed, order)


def _count(state: Mapping[str, Any], key: str, within: str = "") -> int:
    """``state[key]``, a non-negative int (``within``: where ``state`` is in the whole)."""
    value = state[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgumentError(
            f"ResumableLoader state{within}[{key!r}] must be a non-negative int, got {value!r}; "
            "pass an unmodified ResumableLoader.state_dict()"
        )
    return value


def reshards(loader: ResumableLoader, state: Any) -> bool:
    """Whether ``loader`` takes ``state``, saved by a rank of a job on another number of
    ranks (any rank: their positions agree), by going on from the job's position in the
    epoch's order: its sampler is a DistributedSampler (see :class:`ResumableLoader`) and
    the state holds that position. Anything else would take that rank's own position."""
    return (loader._distributed is not None and isinstance(state, Mapping)
            and isinstance(state.get(_DISTRIBUTED), Mapping))


def _rng_tensor(
    state: Mapping[str, Any], key: str, live: torch.Generator | None
) -> torch.Tensor | None:
    """``state[key]`` as a generator state (checked against a scratch generator), or None."""
    value = state[key]
    if value is None:
        return None
    try:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            raise TypeError("not a uint8 tensor")
        torch.Generator(device=live.device if live is not None else "cpu").set_state(value)
    except (TypeError, RuntimeError) as e:
        raise InvalidArgumentError(
            f"ResumableLoader state[{key!r}] is not a generator state ({e}); "
            "pass an unmodified ResumableLoader.state_dict()"
        ) from e
    return value.clone()
