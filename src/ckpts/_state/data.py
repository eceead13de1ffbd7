"""Resumable DataLoader iteration: exact mid-epoch resume that skips seen batches without loading.

:class:`ResumableLoader` wraps a ``torch.utils.data.DataLoader``. Its state is the epoch, the
number of batches handed out in it and the random generator states the epoch's sampler started
from. On resume the sampler replays the epoch's order from those states and skips the batches
already seen at the index level, so the dataset never loads them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ckpts.errors import IncompatibleStateError, InvalidArgumentError

log = logging.getLogger("ckpts")

_Generators = tuple[torch.Generator | None, torch.Generator | None]
# Global CPU, DataLoader and sampler generator states from when a sampler pass began.
_EpochRNG = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
_RNG_KEYS = ("torch_rng", "generator_rng", "sampler_generator_rng")


def _capture(generators: _Generators) -> _EpochRNG:
    loader_gen, sampler_gen = (None if g is None else g.get_state() for g in generators)
    return torch.get_rng_state(), loader_gen, sampler_gen


def _install(rng: _EpochRNG, generators: _Generators) -> None:
    torch.set_rng_state(rng[0])
    for generator, state in zip(generators, rng[1:], strict=True):
        if generator is not None and state is not None:
            generator.set_state(state)


class _ReplaySampler(Sampler[Any]):
    """Wraps the index sampler; records the RNG a pass starts from, or replays a pass skipping N.

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

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        replay, self.replay = self.replay, None
        if replay is None:
            self.started = _capture(self.generators)
            yield from self.inner
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
        total = len(self) if hasattr(self._sampler.inner, "__len__") else None
        if total is not None and self._batches_yielded >= total > 0:
            return self._epoch + 1, 0, None
        return self._epoch, self._batches_yielded, self._sampler.started

    def __len__(self) -> int:
        return len(self._dataloader)

    def __iter__(self) -> Iterator[Any]:
        replay = self._sampler.replay
        self._batches_yielded = 0 if replay is None else replay[1]
        set_epoch = getattr(self._data_sampler, "set_epoch", None)
        if callable(set_epoch):  # DistributedSampler: each epoch its own order, replayed alike
            set_epoch(self._epoch)
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

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, batches yielded in it, RNG states the epoch started from.

        Values are ints, None and uint8 tensors. Call it any time, also inside the loop.

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
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration yields the rest of that epoch.

        Args:
            state: what :meth:`state_dict` returned, possibly after a save/load round trip.

        Raises:
            InvalidArgumentError: a key is missing or has a wrong type; nothing is changed.
            IncompatibleStateError: the state does not fit this DataLoader (other generators,
                more batches than it has); nothing is changed.

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
        self._epoch, self._batches_yielded = epoch, batches


def _count(state: Mapping[str, Any], key: str) -> int:
    value = state[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgumentError(
            f"ResumableLoader state[{key!r}] must be a non-negative int, got {value!r}; "
            "pass an unmodified ResumableLoader.state_dict()"
        )
    return value


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
