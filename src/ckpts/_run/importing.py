"""Importing checkpoints written by other tools into a ckpts run, without unpickling code.

Sources, recognised by their layout:

- a Hugging Face ``checkpoint-N`` folder (``model.safetensors``, its sharded form
  with ``model.safetensors.index.json``, or ``pytorch_model.bin``; ``optimizer.pt``,
  ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``, ``trainer_state.json``,
  ``config.json``), or a Trainer output folder holding many of them: one ckpts
  checkpoint per folder, at step ``global_step``, with the ``eval_*`` values that
  ``trainer_state.json`` logged at that step as metrics;
- a Lightning ``.ckpt`` file, stored as the Lightning integration stores it
  (objects ``model``, ``optimizer`` and ``lightning``, see
  :func:`split_lightning_checkpoint`);
- a plain ``torch.save`` file of a state dict, or of a dict holding ``model`` /
  ``optimizer`` / ``scheduler`` state dicts and other plain values.

Safety: a foreign pickle is read only with ``torch.load(weights_only=True)``
(numpy arrays allowed, as in Hugging Face's ``rng_state.pth``). If that refuses
a file, the import stops with an error naming the file and saying how to proceed;
nothing less safe is ever tried. ``training_args.bin`` (a pickled
``TrainingArguments``) is never read.

RNG: a Hugging Face ``rng_state.pth`` becomes the checkpoint's ``rng`` object
(python, numpy, torch CPU and CUDA states, in ckpts' layout). Sources without one
get the importing process's generators there, so ``manager.restore`` works; the
randomness after such a resume does not continue the original run's.

All or nothing: every source checkpoint is read, converted and committed one at
a time (each commit is atomic), and if any of them fails, the checkpoints this
import already committed are deleted again, so the run is left as it was.
Steps that the run already holds, or that are not above its newest step, are
refused before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpts.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    NotACheckpointError,
    UnserializableStateError,
)

if TYPE_CHECKING:
    from ckpts._format.catalog import Checkpoint

log = logging.getLogger("ckpts")

# How a Lightning checkpoint dict is split into ckpts objects.
LIGHTNING_MODEL = "model"  # checkpoint["state_dict"]
LIGHTNING_OPTIMIZER = "optimizer"  # checkpoint["optimizer_states"]
LIGHTNING_REST = "lightning"  # every other key (loops, callbacks, hyper_parameters, ...)

_HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_HF_STATE_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler"}
_HF_JSON_FILES = {"trainer_state.json": "trainer_state", "config.json": "config"}
_STEP_KEYS = ("global_step", "step", "iter_num", "iteration")


@dataclass(frozen=True)
class _Source:
    """One checkpoint to import: where it comes from, its step, and how to read it."""

    path: Path
    step: int
    epoch: int | None
    metrics: dict[str, float]
    read: Callable[[], dict[str, Any]]  # object name -> plain state ("rng" optional)


class PlainState:
    """A Stateful holding state that is already plain data (an imported object's, a
    part of Lightning's checkpoint dict), so a TrainState can save it as it is."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state_dict: Any, /) -> None:
        self.value = state_dict


def import_checkpoints(
    source: str | os.PathLike[str],
    run: str | os.PathLike[str],
    *,
    step: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Checkpoint]:
    """Import a Hugging Face, Lightning or ``torch.save`` checkpoint (or a folder of them)
    into a ckpts run, one committed checkpoint per source checkpoint.

    Args:
        source: a ``checkpoint-N`` folder, a Trainer output folder holding several,
            a Lightning ``.ckpt`` file or a ``torch.save`` file.
        run: the ckpts run directory to import into (created if needed).
        step: the step for a single-file source whose contents name none
            (default: its ``global_step``/``step`` entry, else 0).
        on_progress: called as ``on_progress(done, total)`` after each checkpoint
            is committed (the CLI draws its progress bar with it).

    Returns:
        The imported checkpoints, ascending by step.

    Raises:
        NotACheckpointError: ``source`` is none of the supported kinds.
        UnserializableStateError: a file holds objects ``torch.load(weights_only=True)``
            refuses, or values ckpts cannot store; the message names the file.
        CorruptCheckpointError: a file is damaged (truncated, bad JSON, ...).
        InvalidArgumentError: the run already holds one of the steps, or newer ones.

    Example:
        >>> ckpts.import_checkpoints("out/checkpoint-500", "runs/exp1")  # doctest: +SKIP
        [Checkpoint(step=500, ...)]
    """
    from ckpts._run.manager import CheckpointManager

    sources = find_sources(Path(source), step=step)
    manager = CheckpointManager(run)
    existing = [c.step for c in manager.checkpoints()]
    clashing = sorted(set(existing) & {s.step for s in sources})
    if clashing or (existing and sources[0].step <= max(existing)):
        raise InvalidArgumentError(
            f"{run} already holds steps up to {max(existing)} (clashing: {clashing or 'none'}) "
            f"and {source} brings steps {[s.step for s in sources]}; imported steps must be "
            "new and above the run's newest. Import into a new run directory"
        )
    imported: list[Checkpoint] = []
    try:
        for done, found in enumerate(sources, start=1):
            imported.append(_import_one(manager, found))
            if on_progress is not None:
                on_progress(done, len(sources))
    except BaseException:
        for checkpoint in imported:  # all or nothing: take back what this import committed
            manager.storage.delete(checkpoint.name)
        if imported:
            log.warning("import of %s failed; removed the %d checkpoint(s) it had committed",
                        source, len(imported))
        raise
    finally:
        manager.close()
    return imported


def _import_one(manager: Any, found: _Source) -> Checkpoint:
    from ckpts._state.train_state import RNG_NAME, TrainState

    objects = found.read()
    state = TrainState(**{name: PlainState(value) for name, value in objects.items()
                          if name != RNG_NAME})
    if RNG_NAME in objects:
        # the source's generators replace the importing process's, captured by default
        state.objects[RNG_NAME] = PlainState(objects[RNG_NAME])
    try:
        checkpoint: Checkpoint = manager.save(found.step, state, metrics=found.metrics,
                                              epoch=found.epoch)
    except UnserializableStateError as e:
        raise UnserializableStateError(f"cannot import {found.path}: {e}") from e
    log.info("imported %s as step %d", found.path, found.step)
    return checkpoint


def find_sources(source: Path, *, step: int | None = None) -> list[_Source]:
    """The checkpoints ``source`` holds, ascending by step (pickles are read lazily,
    except a single file's, whose step is inside it)."""
    if step is not None and (type(step) is not int or step < 0):
        raise InvalidArgumentError(f"step must be an int >= 0, got {step!r}")
    if source.is_file():
        return [_file_source(source, step)]
    if not source.is_dir():
        raise NotACheckpointError(f"{source} does not exist; pass a checkpoint file or folder")
    if _is_hf_checkpoint(source):
        return [_hf_source(source, step)]
    children = sorted((int(m.group(1)), p) for p in source.iterdir()
                      if (m := _HF_CHECKPOINT.match(p.name)) and _is_hf_checkpoint(p))
    if not children:
        raise NotACheckpointError(
            f"{source} is neither a Hugging Face checkpoint folder (with one of "
            f"{', '.join(_HF_WEIGHTS)}) nor a folder of checkpoint-N folders; pass one of "
            "those, a Lightning .ckpt file or a torch.save file"
        )
    found = sorted((_hf_source(path, None) for _, path in children), key=lambda s: s.step)
    steps = [s.step for s in found]
    if len(set(steps)) != len(steps):
        raise CorruptCheckpointError(f"{source}: two checkpoint folders claim the same step")
    return found


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file.

    Plain numpy arrays are allowed (Hugging Face's ``rng_state.pth`` holds some);
    any other Python object is refused by torch's restricted unpickler.

    Raises:
        UnserializableStateError: the file holds objects the restricted unpickler refuses.
        CorruptCheckpointError: the file is not a readable torch.save file.
    """
    import numpy as np
    import torch

    numpy_core = getattr(np, "_core", None) or np.core
    allowed = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None:  # not an object it refused: bytes that are no pickle at all
            raise CorruptCheckpointError(
                f"{path} is not a readable torch.save file (damaged or another format): "
                f"{_unpickler_reason(e)}") from e
        raise UnserializableStateError(
            f"{path} holds Python objects other than tensors, numpy arrays and plain "
            f"containers (the first is {refused.group(1)}), so torch.load(weights_only=True) "
            "refused it. ckpts never "
            "unpickles arbitrary objects. Re-save it with plain types only (state_dict()s, "
            "dicts, lists, numbers, strings), or, if you trust the file, load it yourself with "
            "torch.load(weights_only=False) and save its state with ckpts.CheckpointManager"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as e:
        raise CorruptCheckpointError(f"{path} is not a readable torch.save file: {e}") from e


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _unpickler_reason(error: Exception) -> str:
    """The specific line of torch's long weights_only message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if "WeightsUnpickler" not in line
                and not line.startswith(("Weights only", "Please file", "Check the doc"))]
    return specific[0] if specific else (lines[0] if lines else type(error).__name__)


def is_lightning_checkpoint(data: Any) -> bool:
    """Whether a loaded dict looks like a Lightning checkpoint."""
    return isinstance(data, dict) and "state_dict" in data and (
        "pytorch-lightning_version" in data or "global_step" in data)


def split_lightning_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A Lightning checkpoint dict as ckpts objects: ``model`` (its ``state_dict``, so
    :func:`ckpts.load_weights` reads it), ``optimizer`` (``optimizer_states``) and
    ``lightning`` (every other key)."""
    objects: dict[str, Any] = {}
    if "state_dict" in checkpoint:
        objects[LIGHTNING_MODEL] = checkpoint["state_dict"]
    if "optimizer_states" in checkpoint:
        objects[LIGHTNING_OPTIMIZER] = checkpoint["optimizer_states"]
    objects[LIGHTNING_REST] = {k: v for k, v in checkpoint.items()
                               if k not in ("state_dict", "optimizer_states")}
    return objects


def join_lightning_checkpoint(objects: Mapping[str, Any]) -> dict[str, Any]:
    """Invert :func:`split_lightning_checkpoint`."""
    checkpoint = dict(objects.get(LIGHTNING_REST, {}))
    if LIGHTNING_MODEL in objects:
        checkpoint["state_dict"] = objects[LIGHTNING_MODEL]
    if LIGHTNING_OPTIMIZER in objects:
        checkpoint["optimizer_states"] = objects[LIGHTNING_OPTIMIZER]
    return checkpoint


def _file_source(path: Path, step: int | None) -> _Source:
    data = read_torch_file(path)
    if is_lightning_checkpoint(data):
        objects = split_lightning_checkpoint(data)
    elif isinstance(data, dict):
        objects = _plain_objects(data)
    else:
        raise NotACheckpointError(
            f"{path} holds a {type(data).__qualname__}, not a dict; ckpts imports state "
            "dicts (or dicts of them) and Lightning checkpoints"
        )
    found_step = next((data[k] for k in _STEP_KEYS if type(data.get(k)) is int and data[k] >= 0),
                      0)
    epoch = data.get("epoch")
    return _Source(path=path, step=found_step if step is None else step,
                   epoch=epoch if type(epoch) is int and epoch >= 0 else None,
                   metrics={}, read=lambda: objects)


def _plain_objects(data: dict[Any, Any]) -> dict[str, Any]:
    """A torch.save dict as objects: a bare state dict becomes ``model``; a dict of state
    dicts keeps its ``model``/``optimizer``/``scheduler`` and puts the rest in ``extra``."""
    import torch

    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"model": data}
    names = {"model": "model", "model_state_dict": "model", "state_dict": "model",
             "optimizer": "optimizer", "optimizer_state_dict": "optimizer",
             "scheduler": "scheduler", "lr_scheduler": "scheduler"}
    objects: dict[str, Any] = {}
    extra = {}
    for key, value in data.items():
        if key in names and names[key] not in objects:
            objects[names[key]] = value
        else:
            extra[key] = value
    if extra:
        objects["extra"] = extra
    return objects


def _is_hf_checkpoint(path: Path) -> bool:
    return any((path / name).is_file() for name in _HF_WEIGHTS)


def _hf_source(folder: Path, step: int | None) -> _Source:
    trainer_state = _read_json(folder / "trainer_state.json") \
        if (folder / "trainer_state.json").is_file() else {}
    name_step = _HF_CHECKPOINT.match(folder.name)
    global_step = trainer_state.get("global_step")
    if step is None:
        if type(global_step) is int and global_step >= 0:
            step = global_step
        elif name_step:
            step = int(name_step.group(1))
        else:
            step = 0
    epoch = trainer_state.get("epoch")
    metrics = {}
    for entry in trainer_state.get("log_history", []):
        if isinstance(entry, dict) and entry.get("step") == step:
            metrics.update({k: float(v) for k, v in entry.items()
                            if k.startswith("eval_") and type(v) in (int, float)})
    return _Source(
        path=folder, step=step, metrics=metrics,
        epoch=math.floor(epoch) if isinstance(epoch, (int, float)) and math.isfinite(epoch)
        and epoch >= 0 else None,
        read=lambda: _read_hf_folder(folder),
    )


def _read_hf_folder(folder: Path) -> dict[str, Any]:
    objects: dict[str, Any] = {"model": _read_hf_weights(folder)}
    for file_name, name in _HF_STATE_FILES.items():
        if (folder / file_name).is_file():
            objects[name] = read_torch_file(folder / file_name)
    if (folder / "rng_state.pth").is_file():
        objects["rng"] = _rng_from_hf(read_torch_file(folder / "rng_state.pth"),
                                      folder / "rng_state.pth")
    for file_name, name in _HF_JSON_FILES.items():
        if (folder / file_name).is_file():
            objects[name] = _read_json(folder / file_name)
    if (folder / "training_args.bin").is_file():
        log.info("%s: not importing training_args.bin (a pickled TrainingArguments; ckpts "
                 "never unpickles objects)", folder)
    return objects


def _read_hf_weights(folder: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            files = [folder / single]
        elif (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and "/" not in f for f in weight_map.values()):
                raise CorruptCheckpointError(f"{folder / index} has no usable weight_map")
            files = [folder / f for f in sorted(set(weight_map.values()))]
        else:
            continue
        for file in files:
            if file.suffix == ".safetensors":
                try:
                    weights.update(load_file(file))
                except (SafetensorError, OSError) as e:
                    raise CorruptCheckpointError(f"{file} is not a readable safetensors file: "
                                                 f"{e}") from e
            else:
                loaded = read_torch_file(file)
                if not isinstance(loaded, dict):
                    raise CorruptCheckpointError(f"{file} does not hold a state dict")
                weights.update(loaded)
        return weights
    raise NotACheckpointError(f"{folder} has none of {', '.join(_HF_WEIGHTS)}")


def _rng_from_hf(data: Any, path: Path) -> dict[str, Any]:
    """Hugging Face's ``rng_state.pth`` in the layout of ckpts' own ``rng`` object."""
    import numpy as np
    import torch

    try:
        kind, keys, pos, has_gauss, cached_gaussian = data["numpy"]
        rng: dict[str, Any] = {
            "python": data["python"],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "torch": data["cpu"],
        }
        cuda = data.get("cuda")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} is not a Hugging Face RNG state ({e!r})") from e
    if isinstance(cuda, torch.Tensor):
        rng["cuda"] = [cuda]
    elif isinstance(cuda, (list, tuple)) and cuda:
        rng["cuda"] = list(cuda)
    return rng


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} does not hold a JSON object")
    return data

