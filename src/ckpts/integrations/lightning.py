"""The Lightning CheckpointIO plugin: Lightning's checkpoints written as atomic ckpts runs.

Usage: one plugin, for the Trainer of either Lightning package (``import lightning as
L``, or ``import pytorch_lightning as pl``), and the training DataLoader wrapped in
:class:`ckpts.ResumableLoader` so that a checkpoint taken mid-epoch resumes exactly::

    def train_dataloader(self):  # in the LightningModule or LightningDataModule
        return ckpts.ResumableLoader(DataLoader(self.train, batch_size=32, shuffle=True))

    trainer = L.Trainer(
        plugins=[CkptsCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath="runs/exp", monitor="val_loss",
                                   save_top_k=2, save_last=True)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path="last")

Mapping. Every ``.ckpt`` path Lightning asks for becomes a ckpts *run directory* of
that name holding one committed checkpoint::

    runs/exp/epoch=1-step=20.ckpt/step-00000020/{manifest.json, model.safetensors, ...}
    runs/exp/last.ckpt/step-00000020/...

A save commits the new step atomically (manifest last, renamed into place) and only
then deletes the older step inside, so a ``.ckpt`` path always holds one whole
checkpoint, whatever instant the process dies. Everything ModelCheckpoint does by
path keeps working: its top-k and ``last`` bookkeeping, ``remove_checkpoint``
(``Storage.destroy``: the checkpoint is renamed aside before its files are deleted, so
it never appears half-removed; a removal killed midway leaves the ``.ckpt`` whole, and
removing it again finishes),
``file_exists`` and ``ckpt_path="last"`` (both look the path up on disk; a
directory answers like a file), and ``save_last="link"`` (a symlink to the
directory). ``ckpts ls runs/exp/last.ckpt`` lists its checkpoint, ``ckpts ls runs/exp``
every ``.ckpt`` of the folder, and ``ckpts best runs/exp --metric val_loss`` prints the
best one's ``step-*`` folder, which ``ckpt_path=`` and ``ckpts.load_weights`` take (as
they take ``CheckpointManager(".../epoch=1-step=20.ckpt").latest()``).

Contents. Lightning's checkpoint dict is stored as three objects:
``model`` (its ``state_dict``; ``ckpts.load_weights(step_folder, lightning_module)``
reads it), ``optimizer`` (``optimizer_states``) and ``lightning`` (loops,
callbacks, hyper-parameters, schedulers, epoch, versions...). Tensors go to
safetensors files and the rest to the manifest's JSON; a value with no
pickle-free encoding is refused with an error that names its key. Each
checkpoint also holds every RNG (python, numpy, torch, CUDA), which Lightning
does not save. The value ModelCheckpoint ranked a top-k checkpoint by is
recorded as its metric (read from ModelCheckpoint's ``best_k_models`` in the checkpoint
dict); ``last.ckpt`` carries none, since Lightning does not say which score it has.

Exact resume. ``load_checkpoint`` puts the RNGs back as they were when the
checkpoint was saved. Lightning loads the checkpoint before the sanity check,
which it runs under ``isolate_rng``, and nothing else draws random numbers
before the fit loop resumes, so a fit killed after a checkpoint and resumed with
``ckpt_path="last"`` continues bit-exactly (with ``seed_everything`` and
``deterministic=True``, as Lightning needs for any reproducibility). Loading a
checkpoint for ``validate``/``test`` restores the RNGs too.

Mid-epoch. A checkpoint taken inside an epoch (``every_n_train_steps``,
``val_check_interval``, a save on exception) resumes exactly only if the training
loader says where it was: Lightning saves and loads the state of training loaders
that have ``state_dict``/``load_state_dict``, such as :class:`ckpts.ResumableLoader`
(which replays the epoch's order and skips the batches already seen). A plain
DataLoader starts the epoch's batches over, so the plugin logs a warning, once per
plugin, when it saves such a checkpoint: the checkpoint dict's fit loop says the epoch
is under way (its ``batch_progress`` has batches done, not the last) and holds no
loader state (``fit_loop.state_dict.combined_loader``). Lightning adds its
DistributedSampler to a DataLoader only, not to a ResumableLoader: under DDP, give the
DataLoader a ``DistributedSampler`` before wrapping it.

One process. Lightning saves from rank 0 only, so under DDP the checkpoint holds
rank 0's RNGs, and every rank gets them back on load: training resumes, but not
bit-exactly. Exact resume is for single-process fits.

Adoption. ``load_checkpoint`` also reads a plain ``.ckpt`` file written by
Lightning's own ``TorchCheckpointIO``, with ``torch.load(weights_only=True)``
only, so a run that switches to this plugin resumes from its old ``last.ckpt``.

Packages. ``pytorch_lightning``'s Trainer accepts plugins derived from the standalone
``lightning_fabric``'s CheckpointIO, the unified ``lightning``'s Trainer only those
derived from its own ``lightning.fabric``'s. CkptsCheckpointIO derives from the
CheckpointIO of each of the two packages that is installed, so either Trainer takes it
and uses it as its own: the strategy's saves, loads, removals and ``teardown``.
Lightning's ``AsyncCheckpointIO`` can wrap it: it saves on its own thread while
ModelCheckpoint removes on the training thread, so a removal waits for the save it would
cut short (a lock), but one that overtakes a save still queued leaves that ``.ckpt``
behind, as it does Lightning's own files; ``async_save=True`` has neither problem. The
XLA strategies take only ``XLACheckpointIO``; DeepSpeed and FSDP write their own
checkpoints and use no CheckpointIO.

Versions: ``pytorch-lightning`` or ``lightning`` 2.6.x (the ``lightning`` extra installs
the former; 2.6.0 and 2.6.6 of both tested). Earlier releases re-run validation when
resuming from an end-of-epoch checkpoint, which draws random numbers again, so their
resume cannot be exact.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpts._checkpoint.weights import load_state
from ckpts._format.catalog import Checkpoint
from ckpts._run.importing import (
    PlainState,
    is_lightning_checkpoint,
    join_lightning_checkpoint,
    lightning_scores,
    read_torch_file,
    split_lightning_checkpoint,
)
from ckpts._run.manager import CheckpointManager
from ckpts._run.policy import KeepLast
from ckpts._state.rng import RNGState
from ckpts._state.train_state import RNG_NAME, TrainState
from ckpts.errors import (
    InvalidArgumentError,
    NotACheckpointError,
    UnserializableStateError,
)
from ckpts.storage import MANIFEST, open_storage

log = logging.getLogger("ckpts")

# Where each Lightning package defines the CheckpointIO its Trainer checks plugins against:
# pytorch_lightning uses the standalone lightning_fabric's; the unified lightning its own.
_CHECKPOINT_IO_MODULES = {
    "pytorch-lightning": "lightning_fabric.plugins.io.checkpoint_io",
    "lightning": "lightning.fabric.plugins.io.checkpoint_io",
}


def _installed_checkpoint_ios() -> tuple[type, ...]:
    """The CheckpointIO class of every installed Lightning package (one or two)."""
    found = []
    for module in _CHECKPOINT_IO_MODULES.values():
        try:
            found.append(importlib.import_module(module).CheckpointIO)
        except ImportError:
            continue
    if not found:
        raise ImportError("ckpts.integrations.lightning needs PyTorch Lightning (the "
                          "pytorch_lightning or the lightning package): "
                          "pip install 'ckpts[lightning]'")
    return tuple(found)


if TYPE_CHECKING:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _UnifiedCheckpointIO
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO as _FabricCheckpointIO

    class _CheckpointIO(_FabricCheckpointIO, _UnifiedCheckpointIO):
        """What CkptsCheckpointIO derives from where both packages are installed."""
else:
    # One class for either Trainer: it derives from each installed package's CheckpointIO, so
    # both accept it (their plugin check is an isinstance on their own class).
    _CheckpointIO = type("_CheckpointIO", _installed_checkpoint_ios(), {"__module__": __name__})

# Before ckpts used Storage.destroy, a removal renamed the run aside under this prefix
# first; a removal killed then left such a folder, which a later save still finishes.
_REMOVING = ".ckpts-removing-"


class CkptsCheckpointIO(_CheckpointIO):
    """Lightning CheckpointIO that writes atomic, hash-checked, pickle-free ckpts checkpoints,
    with every RNG, for bit-exact resume.

    Args:
        async_save: return from a save once the state is copied to host memory and
            write it on a background thread while training goes on. One save is
            in flight at a time; the next save, a load, a removal or the end of
            ``fit`` waits for it, and raises its error if it failed.
        max_shard_size: split tensor files above this size (see
            :class:`ckpts.CheckpointManager`).

    Example:
        >>> from ckpts.integrations.lightning import CkptsCheckpointIO  # doctest: +SKIP
        >>> trainer = L.Trainer(plugins=[CkptsCheckpointIO()])         # doctest: +SKIP
    """

    def __init__(self, *, async_save: bool = False, max_shard_size: int | str = "512MB") -> None:
        super().__init__()
        for package in _CHECKPOINT_IO_MODULES:
            try:
                installed = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                continue
            if _release(installed) < (2, 6):
                log.warning("%s %s re-runs validation when it resumes from an end-of-epoch "
                            "checkpoint, so resume will not be exact; install 2.6 (pip install "
                            "'%s>=2.6,<2.7')", package, installed, package)
        self.async_save = async_save
        self.max_shard_size = max_shard_size
        self._in_flight: CheckpointManager | None = None
        self._warned_mid_epoch = False
        # Lightning's AsyncCheckpointIO calls save on its thread and remove on the training
        # thread: a removal must not delete a .ckpt while its save is writing it
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"CkptsCheckpointIO(async_save={self.async_save})"

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer, plugins included; a lock does not pickle
        return {name: value for name, value in vars(self).items() if name != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state, _lock=threading.RLock())

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Commit Lightning's ``checkpoint`` dict as the one checkpoint of the run ``path``.

        Raises:
            InvalidArgumentError: ``storage_options`` was given (not supported).
            UnserializableStateError: a value has no pickle-free encoding; the
                message names its key (``lightning``'s ``hyper_parameters.x``...).
        """
        if storage_options is not None:
            raise InvalidArgumentError(
                f"{type(self).__name__} takes no storage_options (got {storage_options!r}); "
                "call trainer.save_checkpoint(path) without them"
            )
        with self._lock:
            self._save(checkpoint, Path(path))

    def _save(self, checkpoint: dict[str, Any], run: Path) -> None:
        self.wait()
        if not self._warned_mid_epoch and _mid_epoch_without_loader_state(checkpoint):
            self._warned_mid_epoch = True
            log.warning(
                "Lightning is saving %s in the middle of an epoch (step %s), but the training "
                "DataLoader has no state to save: a fit resumed from it starts the epoch's "
                "batches over, so it will not continue exactly. Wrap the loader that "
                "train_dataloader() returns: return ckpts.ResumableLoader(DataLoader(...)). "
                "(Logged once.)", run, checkpoint.get("global_step"))
        _sweep_removed(run.parent)
        step = checkpoint.get("global_step", 0)
        epoch = checkpoint.get("epoch")
        if run.is_symlink() or run.is_file():
            # Lightning overwrites: a "last" link (not its target), or a .ckpt file of its own
            open_storage(run).destroy()
        else:
            newest = CheckpointManager(run).latest() if run.is_dir() else None
            if newest is not None and newest.step > step:
                # a fresh fit writing over an older run's file: Lightning overwrites it
                open_storage(run).destroy()
        state = TrainState(**{name: PlainState(value) for name, value in
                              split_lightning_checkpoint(checkpoint).items()})
        manager = CheckpointManager(run, keep=[KeepLast(1)], async_save=self.async_save,
                                    max_shard_size=self.max_shard_size)
        try:
            manager.save(step, state, metrics=lightning_scores(checkpoint, run),
                         epoch=epoch if type(epoch) is int and epoch >= 0 else None)
        except UnserializableStateError as e:
            manager.close()
            raise UnserializableStateError(
                f"cannot save Lightning's checkpoint to {run}: {e}") from e
        except BaseException:
            manager.close()
            raise
        if self.async_save:
            self._in_flight = manager
        else:
            manager.close()

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read the checkpoint at ``path`` back into Lightning's dict, and put every RNG back
        where it was when it was saved.

        ``path`` is a ``.ckpt`` run written by this plugin, one of its ``step-*``
        checkpoints, or a ``.ckpt`` file written by Lightning itself (read with
        ``torch.load(weights_only=True)``). Tensors are returned on the CPU;
        Lightning copies them onto the module's and optimizer's devices
        (``map_location`` is not needed and ignored).

        Raises:
            NotACheckpointError: nothing committed at ``path``.
            CorruptCheckpointError: a file fails its hash check.
        """
        self.wait()
        target = Path(path)
        if target.is_file():
            data = read_torch_file(target)
            if not is_lightning_checkpoint(data):
                raise NotACheckpointError(f"{target} is not a Lightning checkpoint")
            return data  # type: ignore[no-any-return]
        checkpoint = _committed(target)
        names = _object_names(checkpoint)
        loaded = join_lightning_checkpoint(
            {name: load_state(checkpoint, name) for name in names if name != RNG_NAME})
        if RNG_NAME in names:
            RNGState().load_state_dict(load_state(checkpoint, RNG_NAME))
        log.info("loaded Lightning checkpoint step %d from %s", checkpoint.step, checkpoint.path)
        return loaded

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the ``.ckpt`` at ``path`` (``Storage.destroy``): its checkpoint is renamed
        aside, then its files are deleted. A symlink is removed, not its target."""
        with self._lock:
            self.wait()
            target = Path(path)
            if not (target.is_symlink() or target.exists()):
                log.debug("remove_checkpoint: %s does not exist", target)
                return
            open_storage(target).destroy()

    def wait(self) -> None:
        """Block until the save in flight (with ``async_save``) is committed; raise its error."""
        with self._lock:
            manager, self._in_flight = self._in_flight, None
            if manager is not None:
                manager.close()

    def teardown(self) -> None:
        """Called by Lightning at the end of ``fit``: wait for the save in flight."""
        self.wait()


def _release(version: str) -> tuple[int, ...]:
    """``"2.6.0.post1"`` -> ``(2, 6, 0)``: the leading numeric parts."""
    parts = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _committed(target: Path) -> Checkpoint:
    """The checkpoint at ``target``: a step directory itself, or a run's newest."""
    if (target / MANIFEST).is_file():
        return Checkpoint.from_directory(target)
    newest = CheckpointManager(target).latest() if target.is_dir() else None
    if newest is None:
        raise NotACheckpointError(
            f"{target} holds no committed checkpoint; pass a .ckpt path written by "
            "CkptsCheckpointIO (a run directory), or a Lightning .ckpt file"
        )
    return newest


def _object_names(checkpoint: Checkpoint) -> list[str]:
    from ckpts._format.catalog import open_checkpoint
    from ckpts._format.index import read_manifest

    return list(read_manifest(*open_checkpoint(checkpoint), tensor_entries=False)["objects"])


def _mid_epoch_without_loader_state(checkpoint: dict[str, Any]) -> bool:
    """Whether Lightning's ``checkpoint`` was taken inside a training epoch while no training
    loader had a state to save.

    Inside an epoch: the fit loop's ``epoch_loop.batch_progress`` counts batches of the
    current epoch but not its last one (at the last batch ``is_last_batch`` is already
    set, and a resume goes on with the next epoch). Loader states: the fit loop saves those
    of its loaders that have ``state_dict`` under ``state_dict.combined_loader``.
    """
    loops = checkpoint.get("loops")
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    if not isinstance(fit_loop, dict):
        return False
    progress = fit_loop.get("epoch_loop.batch_progress")
    current = progress.get("current") if isinstance(progress, dict) else None
    if not isinstance(progress, dict) or not isinstance(current, dict):
        return False
    in_epoch = progress.get("is_last_batch") is False and current.get("ready", 0) > 0
    loop_state = fit_loop.get("state_dict")
    loader_states = loop_state.get("combined_loader") if isinstance(loop_state, dict) else None
    return in_epoch and not loader_states


def _sweep_removed(directory: Path) -> None:
    """Finish removals that a killed process of an earlier ckpts left half done."""
    for name in open_storage(directory).folders():
        if name.startswith(_REMOVING):
            try:
                open_storage(directory / name).destroy()
            except OSError as e:  # a leftover must not fail the save
                log.warning("could not remove %s, left by a killed removal: %s",
                            directory / name, e)
