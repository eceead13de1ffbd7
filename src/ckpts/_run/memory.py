"""The memory tier: snapshots of the state in host shared memory, a few a step apart.

A snapshot is a copy of every tensor into a slot of this rank's memory area
(ckpts.storage._shm): safetensors files preallocated once and reused, so the copy is
the whole cost the training thread pays. Its protocol mirrors a checkpoint's commit:

1. the slot's markers are removed (a copy cut short leaves a slot without one);
2. the tensors are copied in, and ``pending.json`` written: the manifest without its
   hashes. From here the snapshot counts: a keeper or a restore can finish it;
3. a background thread hashes the files' headers and every tensor and writes
   ``manifest.json`` (a format v2 manifest): the slot is then a checkpoint like any
   other, read back and hash-checked by the same code.

Slots rotate so that a snapshot never overwrites the newest complete one, nor one the
background writer is making durable or is about to: two slots, a third while a durable
save runs, a fourth while another one waits for it.
A durable checkpoint is written from a slot, so the trainer does not wait for it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from ckpts._checkpoint.job import Job, OneProcess
from ckpts._checkpoint.restore import restore_into
from ckpts._checkpoint.write import describe, new_manifest
from ckpts._format.codec import is_dtensor
from ckpts._format.manifest import digest, encode_json, parse_manifest
from ckpts._format.safetensors import DTYPES, encode_header
from ckpts._state.train_state import ObjectSnapshot, TrainState
from ckpts.errors import CheckpointError, CorruptCheckpointError, InvalidArgumentError, LockedError
from ckpts.storage import MANIFEST
from ckpts.storage._shm import PENDING, MemoryArea

log = logging.getLogger("ckpts")

SLOTS = 4
"""Slots of an area at most: the newest snapshot, the next one, the one a durable save
reads and (one process, on a store slower than save= asks) the one whose durable save
waits for it."""
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class _Layout:
    """Where each tensor of a state goes in a slot: per file its header and size, per
    object the destination (file, byte offset) of each key in the snapshot's order."""

    signature: tuple[Any, ...]
    headers: dict[str, bytes]
    sizes: dict[str, int]
    places: dict[str, list[tuple[str, int]]]  # object -> [(file, offset)] in key order


@dataclass(frozen=True)
class Found:
    """A snapshot found in the area: its slot, step, and whether it is hashed yet."""

    slot: str
    step: int
    sealed: bool


class MemoryTier:
    """One rank's snapshots of one run, in host shared memory (see the module docstring).

    Args:
        location: the run (its storage's location): names the area.
        rank: this process's rank in the job.
    """

    def __init__(self, location: str, rank: int) -> None:
        self.area = MemoryArea(location, rank)
        self.busy: set[str] = set()
        """Slots a durable save is reading: not overwritten until it is done."""
        self._newest: Found | None = None  # the newest snapshot this process took
        self._held: dict[str, int] = {}  # slot -> step of its snapshot, as this process knows
        self._layout: _Layout | None = None  # of the last snapshot
        self._layouts: dict[str, _Layout] = {}  # of each slot's views
        self._targets: dict[str, dict[str, list[torch.Tensor]]] = {}  # slot -> object -> views
        self._sealer = ThreadPoolExecutor(1, thread_name_prefix="ckpts-seal")
        self._seals: dict[str, Future[None]] = {}
        self.opened = False

    def __repr__(self) -> str:
        return f"MemoryTier({self.area.location!r})"

    def own(self, *, wait: float) -> None:
        """Make the area and become its owner, waiting up to ``wait`` seconds for a keeper
        that is still persisting the snapshots of a trainer that died.

        Raises:
            LockedError: another live process owns the area (the run's second trainer).
        """
        if self.opened:
            return
        self.area.create()
        deadline = time.monotonic() + wait
        while True:
            try:
                self.area.lock()
                break
            except LockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.opened = True
        self._held = {found.slot: found.step for found in self.found()}

    def close(self, *, free: bool) -> None:
        """Finish the hashing in flight, give the area up, and remove it with ``free``."""
        for seal in list(self._seals.values()):
            seal.result()
        self._sealer.shutdown()
        if self.opened:
            self.area.unlock()
            self.opened = False
        self._targets.clear()
        if free:
            self.area.free()

    # ---- taking snapshots ---------------------------------------------------------------

    def check_room(self, snapshots: Mapping[str, ObjectSnapshot], *, slots: int) -> None:
        """Allocate ``slots`` slots for these snapshots now, before training starts (a
        slot allocated later costs the training thread a page-in of the whole state), and
        refuse a state that the memory area cannot hold.

        Raises:
            InsufficientSpaceError: says how big the tmpfs must be and how to get it.
        """
        layout = _layout_of(snapshots, _signature(snapshots))
        for index in range(slots):
            self.area.map_slot(f"slot-{index}", layout.sizes)

    def take(self, step: int, epoch: int | None, metrics: Mapping[str, float],
             snapshots: Mapping[str, ObjectSnapshot]) -> tuple[str, dict[str, ObjectSnapshot]]:
        """Copy ``snapshots`` into a slot and mark it complete; its hashing goes on in the
        background. Returns the slot and the snapshots with their tensors in it, for a
        durable save (which must mark the slot busy while it reads it).

        Raises:
            InvalidArgumentError: the state holds DTensors (not taken by the memory tier).
            InsufficientSpaceError: the memory area cannot hold the state.
        """
        if any(is_dtensor(t) for snap in snapshots.values() for t in snap.tensors.values()):
            raise InvalidArgumentError(
                "memory= does not take DTensor (FSDP2) state yet; save it with "
                "async_save=True instead, or gather it first")
        slot = self._free_slot()
        seal = self._seals.pop(slot, None)
        if seal is not None:
            seal.result()  # hashing this slot's previous snapshot is over before it changes
        self.area.clear(slot)
        signature = _signature(snapshots)
        layout = self._layout if self._layout is not None \
            and self._layout.signature == signature else _layout_of(snapshots, signature)
        self._layout = layout
        targets = self._targets_for(slot, layout, snapshots)
        sources = [t for snap in snapshots.values() for t in snap.tensors.values()]
        destinations = [t for name in snapshots for t in targets[name]]
        with torch.no_grad():
            torch._foreach_copy_(destinations, sources)
        pending = new_manifest(step=step, epoch=epoch, metrics=metrics, files={
            file: {"nbytes": size, "header": len(layout.headers[file])}
            for file, size in layout.sizes.items()}, objects={
            name: describe(snap, {key: {"file": file, "dtype": DTYPES[tensor.dtype],
                                        "shape": list(tensor.shape),
                                        "offsets": [offset, offset + _nbytes(tensor)]}
                                  for (key, tensor), (file, offset)
                                  in zip(snap.tensors.items(), layout.places[name], strict=True)})
            for name, snap in snapshots.items()})
        self.area.write_marker(slot, PENDING, encode_json(pending))
        self._newest = Found(slot, step, sealed=False)
        self._seals[slot] = self._sealer.submit(self._seal, slot)
        # a snapshot of the same step or a later one (a step saved again, or a branch's)
        # is older than this one: it must not be restored instead
        self._forget({other for other, held in self._held.items()
                      if held >= step and other != slot})
        self._held[slot] = step
        staged = {name: replace(snap, tensors=dict(zip(snap.tensors, targets[name], strict=True)),
                                notes=None) for name, snap in snapshots.items()}
        return slot, staged

    def _free_slot(self) -> str:
        """The first slot that holds neither the newest snapshot nor one being read."""
        taken = self.busy | ({self._newest.slot} if self._newest else set())
        return next(f"slot-{i}" for i in range(SLOTS) if f"slot-{i}" not in taken)

    def _targets_for(self, slot: str, layout: _Layout, snapshots: Mapping[str, ObjectSnapshot]
                     ) -> dict[str, list[torch.Tensor]]:
        """Each tensor's destination in ``slot``, in the snapshots' key order: the same
        views as last time when the layout is unchanged, else mapped anew."""
        held = self._layouts.get(slot)
        if held is not None and held.signature == layout.signature:
            return self._targets[slot]
        self._layouts.pop(slot, None)
        self._targets.pop(slot, None)
        views = self.area.map_slot(slot, layout.sizes)
        buffers = {file: torch.frombuffer(view, dtype=torch.uint8) if len(view) else None
                   for file, view in views.items()}
        targets: dict[str, list[torch.Tensor]] = {}
        for name, snap in snapshots.items():
            targets[name] = [_view(buffers[file], offset, tensor)
                             for tensor, (file, offset)
                             in zip(snap.tensors.values(), layout.places[name], strict=True)]
        for file, header in layout.headers.items():
            views[file][:len(header)] = header
        self._layouts[slot], self._targets[slot] = layout, targets
        return targets

    def _seal(self, slot: str) -> None:
        """Hash a complete slot and write its manifest (on the sealing thread)."""
        try:
            seal(self.area, slot)
        except Exception as e:  # a failed seal leaves the pending snapshot, still usable
            log.warning("could not hash the memory snapshot in %s: %s",
                        self.area.where(slot), e)
        else:
            newest = self._newest
            if newest is not None and newest.slot == slot:
                self._newest = replace(newest, sealed=True)

    # ---- finding and using snapshots ----------------------------------------------------

    def found(self) -> list[Found]:
        """The snapshots in the area, newest first (a slot without a marker is none)."""
        found = []
        for slot in self.area.slots():
            marked = self.area.marked_step(slot)
            if marked is not None:
                found.append(Found(slot, *marked))
        return sorted(found, key=lambda f: f.step, reverse=True)

    def manifest(self, snapshot: Found) -> dict[str, Any]:
        """A snapshot's manifest, hashing it first if it was not yet.

        Raises:
            CorruptCheckpointError: its marker is damaged.
        """
        if not snapshot.sealed:
            seal(self.area, snapshot.slot)
        data = self.area.read_marker(snapshot.slot, MANIFEST)
        if data is None:
            raise CorruptCheckpointError(f"{self.area.where(snapshot.slot)} has no manifest")
        return parse_manifest(data, self.area.where(snapshot.slot))

    def restore(self, snapshot: Found, state: TrainState) -> None:
        """Load a snapshot into ``state`` (this rank's own): every tensor is checked
        against its hash before anything is loaded, so a damaged snapshot changes nothing.

        Raises:
            CorruptCheckpointError: the snapshot fails its hashes.
            IncompatibleStateError: it does not fit ``state``.
        """
        manifest, _ = self.read(snapshot)
        restore_into(self.area, snapshot.slot, manifest, state, OneProcess())
        self._newest = snapshot

    def read(self, snapshot: Found) -> tuple[dict[str, Any], dict[str, ObjectSnapshot]]:
        """A snapshot as a save takes it: its manifest, and its objects with their tensors
        mapped from the slot, each checked against its hash first.

        Raises:
            CorruptCheckpointError: a header or a tensor does not match its hash.
        """
        manifest = self.manifest(snapshot)
        where = self.area.where(snapshot.slot)
        maps = {file: self.area.map_file(snapshot.slot, file) for file in manifest["files"]}
        for file, record in manifest["files"].items():
            if digest(maps[file][:record["header"]]) != record["hash"]:
                raise CorruptCheckpointError(f"{where}/{file}: its header fails its hash")
        snapshots = {}
        for name, obj in manifest["objects"].items():
            tensors = {}
            for key, info in obj["tensors"].items():
                begin, end = info["offsets"]
                raw = maps[info["file"]][begin:end]
                if digest(raw) != info["hash"]:
                    raise CorruptCheckpointError(
                        f"{where}/{info['file']}: tensor {key!r} fails its hash")
                dtype = next(d for d, n in DTYPES.items() if n == info["dtype"])
                tensors[key] = torch.frombuffer(raw, dtype=dtype).view(info["shape"]) \
                    if end > begin else torch.empty(info["shape"], dtype=dtype)
            snapshots[name] = ObjectSnapshot(
                kind=obj["kind"], class_name=obj["class"], tree=obj["tree"], tensors=tensors,
                aliases=obj.get("aliases", {}), hf_config=obj.get("hf_config"))
        return manifest, snapshots

    def drop(self, *, newer_than: int = -1) -> None:
        """Take away every snapshot newer than ``newer_than`` (default: all): states the
        run must not go back to (a restore from the run, or of an older common step)."""
        self._forget({found.slot for found in self.found() if found.step > newer_than})
        if self._newest is not None and self._newest.step > newer_than:
            self._newest = None

    def _forget(self, slots: set[str]) -> None:
        """Take the snapshots of these slots away (their files stay, for reuse)."""
        for slot in slots:
            seal = self._seals.pop(slot, None)
            if seal is not None:
                seal.result()
            self.area.clear(slot)
            self._held.pop(slot, None)

    @property
    def newest(self) -> Found | None:
        """The newest snapshot this process took or restored."""
        return self._newest


def seal(area: MemoryArea, slot: str) -> None:
    """Hash a pending snapshot's headers and tensors and write its manifest."""
    data = area.read_marker(slot, PENDING)
    if data is None:
        if area.read_marker(slot, MANIFEST) is not None:
            return  # sealed already
        raise CorruptCheckpointError(f"{area.where(slot)} holds no snapshot")
    pending = json.loads(data)
    maps = {file: area.map_file(slot, file) for file in pending["files"]}
    for file, record in pending["files"].items():
        if len(maps[file]) != record["nbytes"]:
            raise CorruptCheckpointError(f"{area.where(slot)}/{file} is not {record['nbytes']} "
                                         "bytes long")
        record["hash"] = digest(maps[file][:record["header"]])
    for obj in pending["objects"].values():
        for info in obj["tensors"].values():
            begin, end = info["offsets"]
            info["hash"] = digest(maps[info["file"]][begin:end])
    area.write_marker(slot, MANIFEST, encode_json(pending))
    area.clear_pending(slot)


def _signature(snapshots: Mapping[str, ObjectSnapshot]) -> tuple[Any, ...]:
    """What a layout depends on: each object's keys, shapes and dtypes, in order."""
    return tuple((name, tuple(snap.tensors), tuple(t.shape for t in snap.tensors.values()),
                  tuple(t.dtype for t in snap.tensors.values()))
                 for name, snap in snapshots.items())


def _layout_of(snapshots: Mapping[str, ObjectSnapshot], signature: tuple[Any, ...]) -> _Layout:
    """Each object's tensors in a file of its own, widest dtypes first (aligned)."""
    headers: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    places: dict[str, list[tuple[str, int]]] = {}
    for name, snap in snapshots.items():
        if not snap.tensors:
            places[name] = []
            continue
        file = f"{name}{_SUFFIX}"
        # a copy runs at full speed only between cache-line aligned addresses: the data
        # starts on a page, and within each dtype the tensors of whole cache lines go first
        ordered = sorted(snap.tensors.items(),
                         key=lambda item: (-item[1].element_size(), _nbytes(item[1]) % 64 != 0))
        header = encode_header(ordered, align=4096)
        offsets, position = {}, len(header)
        for key, tensor in ordered:
            offsets[key] = position
            position += _nbytes(tensor)
        headers[file], sizes[file] = header, position
        places[name] = [(file, offsets[key]) for key in snap.tensors]
    return _Layout(signature, headers, sizes, places)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _view(buffer: torch.Tensor | None, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``like``'s dtype and shape over ``buffer``'s bytes from ``offset``."""
    if buffer is None or like.numel() == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    return buffer[offset:offset + _nbytes(like)].view(like.dtype).view(like.shape)


def usable(tier: MemoryTier, job: Job, run_newest: int | None) -> list[Found]:
    """The snapshots every rank may restore from, newest first: the steps that every rank
    holds in memory and that are not older than the run's newest checkpoint. Every rank
    calls this (it gathers each rank's steps) and gets the same steps."""
    mine = tier.found()
    steps = job.gather_json(sorted({f.step for f in mine}))
    common = set(steps[0]).intersection(*steps[1:]) if steps else set()
    return [f for f in mine if f.step in common and (run_newest is None or f.step >= run_newest)]


def restore_newest(tier: MemoryTier, state: TrainState, job: Job, run_newest: int | None
                   ) -> int | None:
    """Restore the newest snapshot that every rank can read, if it is at least as new as
    the run's newest checkpoint; one that fails its hashes on any rank is skipped (with a
    warning) for the next. Returns the step, or None when the run must serve (and then
    the snapshots are dropped: a restore from the run starts the memory tier afresh).

    Raises:
        CheckpointError: on every rank, when one rank's snapshot does not fit the state
            (IncompatibleStateError there), or fails otherwise than by damage.
    """
    for snapshot in usable(tier, job, run_newest):
        error: BaseException | None = None
        try:
            tier.restore(snapshot, state)
        except Exception as e:  # every rank learns of it before any raises
            error = e
        problems, damaged = job.problems(error)
        if problems and not damaged:
            raise error if error is not None else CheckpointError(
                f"restoring from host memory failed on another rank: {'; '.join(problems)}")
        if not problems:
            tier.drop(newer_than=snapshot.step)
            log.info("restored step %d from host memory (%s)", snapshot.step,
                     tier.area.where(snapshot.slot))
            return snapshot.step
        log.warning("skipping the memory snapshot of step %d, not intact on every rank: %s",
                    snapshot.step, "; ".join(problems))
    tier.drop()
    return None
