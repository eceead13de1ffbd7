"""Importing checkpoints written by other tools into a ckpts run, without unpickling code.

Sources, recognised by their layout:

- a Hugging Face ``checkpoint-N`` folder (``model.safetensors``, its sharded form
  with ``model.safetensors.index.json``, or ``pytorch_model.bin``; ``optimizer.pt``,
  ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``, ``trainer_state.json``,
  ``config.json``), or a Trainer output folder holding many of them: one ckpts
  checkpoint per folder, at step ``global_step``, with the ``eval_*`` values that
  ``trainer_state.json`` logged at that step as metrics; the final model at the
  folder's top when it is a step of its own (:func:`plan_import`); tied weights that
  ``save_pretrained`` left out recorded as aliases (:func:`_tied_keys`);
- a Lightning ``.ckpt`` file, stored as the Lightning integration stores it (objects
  ``model``, ``optimizer`` and ``lightning``, see :func:`split_lightning_checkpoint`),
  with ModelCheckpoint's score as its metric (:func:`lightning_scores`);
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

import contextlib
import filecmp
import functools
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


@dataclass(frozen=True)
class ImportPlan:
    """What importing ``source`` brings: its checkpoints, ascending by step, and why it
    leaves out the others (a Trainer folder's final model, see :func:`plan_import`)."""

    source: Path
    checkpoints: list[_Source]
    skipped: list[str]


class PlainState:
    """A Stateful holding state that is already plain data (an imported object's, a
    part of Lightning's checkpoint dict), so a TrainState can save it as it is."""

    def __init__(self, value: Any, *, hf_config: dict[str, Any] | None = None) -> None:
        self.value = value
        self.hf_config = hf_config  # an imported model's config.json, recorded for export

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
        source: a ``checkpoint-N`` folder, a Trainer output folder holding several
            (and maybe the final ``trainer.save_model()`` at its top), a Lightning
            ``.ckpt`` file or a ``torch.save`` file.
        run: the ckpts run directory to import into (created if needed).
        step: the step of a source whose contents name none: a single file (default:
            its ``global_step``/``step`` entry, else 0), or the final model at the top
            of a Trainer output folder that has no ``trainer_state.json``.
        on_progress: called as ``on_progress(done, total)`` after each checkpoint
            is committed (the CLI draws its progress bar with it).

    Returns:
        The imported checkpoints, ascending by step (a final model left out is logged,
        with why, at INFO).

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
    return import_plan(plan_import(Path(source), step=step), run, on_progress=on_progress)


def import_plan(plan: ImportPlan, run: str | os.PathLike[str], *,
                on_progress: Callable[[int, int], None] | None = None) -> list[Checkpoint]:
    """Commit ``plan``'s checkpoints into ``run``, all or nothing (:func:`import_checkpoints`)."""
    from ckpts._run.manager import CheckpointManager

    for reason in plan.skipped:
        log.info("importing %s: skipping %s", plan.source, reason)
    sources = plan.checkpoints
    manager = CheckpointManager(run)
    existing = [c.step for c in manager.checkpoints()]
    clashing = sorted(set(existing) & {s.step for s in sources})
    if clashing or (existing and sources[0].step <= max(existing)):
        raise InvalidArgumentError(
            f"{run} already holds steps up to {max(existing)} (clashing: {clashing or 'none'}) "
            f"and {plan.source} brings steps {[s.step for s in sources]}; imported steps must "
            "be new and above the run's newest. Import into a new run directory"
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
                        plan.source, len(imported))
        raise
    finally:
        manager.close()
    return imported


def _import_one(manager: Any, found: _Source) -> Checkpoint:
    from ckpts._state.train_state import RNG_NAME, TrainState

    objects = found.read()
    config = objects.get("config")  # a Hugging Face folder's config.json: the model's
    state = TrainState(**{name: PlainState(value, hf_config=config if name == "model" and
                                           isinstance(config, dict) else None)
                          for name, value in objects.items() if name != RNG_NAME})
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


def plan_import(source: Path, *, step: int | None = None) -> ImportPlan:
    """The checkpoints ``source`` holds, ascending by step (pickles are read lazily,
    except a single file's, whose step is inside it).

    A Trainer output folder brings each ``checkpoint-N`` folder at its step, and the
    model ``trainer.save_model()`` left at its top if that is a step of its own: at
    ``step``, else at the ``global_step`` of the ``trainer_state.json`` beside it
    (``trainer.save_state()``), unless a ``checkpoint-N`` has that step or the same
    weight files (the newest, or the best after ``load_best_model_at_end``). With no
    step known it is skipped too; :attr:`ImportPlan.skipped` says why.

    Raises:
        InvalidArgumentError: ``step`` is negative, or names no single checkpoint (a
            folder of checkpoint-N folders and no model at its top).
    """
    if step is not None and (type(step) is not int or step < 0):
        raise InvalidArgumentError(f"step must be an int >= 0, got {step!r}")
    if source.is_file():
        return ImportPlan(source, [_file_source(source, step)], [])
    if not source.is_dir():
        raise NotACheckpointError(f"{source} does not exist; pass a checkpoint file or folder")
    children = [path for path in source.iterdir()
                if _HF_CHECKPOINT.match(path.name) and _is_hf_checkpoint(path)]
    if not children:
        if _is_hf_checkpoint(source):
            return ImportPlan(source, [_hf_source(source, step)], [])
        raise NotACheckpointError(
            f"{source} is neither a Hugging Face checkpoint folder (with one of "
            f"{', '.join(_HF_WEIGHTS)}) nor a folder of checkpoint-N folders; pass one of "
            "those, a Lightning .ckpt file or a torch.save file"
        )
    found = sorted((_hf_source(path, None) for path in children), key=lambda s: s.step)
    steps = [s.step for s in found]
    if len(set(steps)) != len(steps):
        raise CorruptCheckpointError(f"{source}: two checkpoint folders claim the same step")
    if not _is_hf_checkpoint(source):
        if step is not None:
            raise InvalidArgumentError(
                f"step={step} sets the step of a single checkpoint, but {source} holds "
                "checkpoint-N folders, each imported at its own step; leave step out")
        return ImportPlan(source, found, [])
    final, reason = _final_model(source, step, found)
    if final is None:
        return ImportPlan(source, found, [reason])
    return ImportPlan(source, sorted([*found, final], key=lambda s: s.step), [])


def _final_model(folder: Path, step: int | None, checkpoints: list[_Source]
                 ) -> tuple[_Source | None, str]:
    """The model ``trainer.save_model()`` left at the top of a Trainer output folder, as
    a source, or None and why it is skipped."""
    by_step = {s.step: s.path for s in checkpoints}
    state = _trainer_state(folder)
    known, said = (step, "as given") if step is not None else (
        state.get("global_step"), "global_step in the trainer_state.json beside it")
    known = known if type(known) is int and known >= 0 else None
    what = f"the model at the top of {folder} (trainer.save_model())"
    if known is not None and known in by_step:
        return None, (f"{what}: its step, {known} ({said}), is {by_step[known].name}'s, "
                      "imported from there")
    # the newest checkpoint's weights, or the best one's after load_best_model_at_end
    for candidate in reversed(checkpoints):
        if _same_weights(folder, candidate.path):
            return None, (f"{what}: it has the same weight files as {candidate.path.name}, "
                          "imported from there")
    if known is None:
        return None, (f"{what}: its step is unknown (no trainer_state.json beside it, which "
                      "trainer.save_state() writes); to import it too, pass its step "
                      "(--step N, or step=N)")
    return _hf_source(folder, known), ""


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
            "refused it. ckpts never unpickles arbitrary objects. Re-save it with plain types "
            "only (state_dict()s, dicts, lists, numbers, strings), or, if you trust the file, "
            "load it yourself with torch.load(weights_only=False) and save its state with "
            "ckpts.CheckpointManager"
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
    lightning = is_lightning_checkpoint(data)
    if lightning:
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
                   metrics=lightning_scores(data, path) if lightning else {},
                   read=lambda: objects)


def lightning_scores(checkpoint: Mapping[str, Any], path: Path) -> dict[str, float]:
    """``{monitor: score}`` of each ``ModelCheckpoint`` that ranked the ``.ckpt`` file at
    ``path`` among its top k.

    A ModelCheckpoint's state in ``checkpoint["callbacks"]`` holds ``monitor`` and
    ``best_k_models``: path -> score of its top-k files, this one included when it was
    written (``current_score`` is the newest top-k score, not always this file's).
    ``path`` is matched as it is, resolved (``save_last="link"``), or by its name alone
    if one entry has it (moved files). ``last.ckpt`` is in no top k: no score.
    """
    scores: dict[str, float] = {}
    callbacks = checkpoint.get("callbacks")
    here = {os.path.abspath(path), os.path.realpath(path)}
    for state in callbacks.values() if isinstance(callbacks, Mapping) else ():
        ranked = state.get("best_k_models") if isinstance(state, Mapping) else None
        if not isinstance(ranked, Mapping) or not isinstance(state.get("monitor"), str):
            continue
        paths = [p for p in ranked if isinstance(p, str)]
        named = ([p for p in paths if {os.path.abspath(p), os.path.realpath(p)} & here]
                 or [p for p in paths if Path(p).name == path.name])
        with contextlib.suppress(TypeError, ValueError, RuntimeError):  # not one number
            if len(named) == 1:
                scores[state["monitor"]] = float(ranked[named[0]])  # a one-element tensor
    return scores


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
    trainer_state = _trainer_state(folder)
    name_step = _HF_CHECKPOINT.match(folder.name)
    global_step = trainer_state.get("global_step")
    recorded = global_step if type(global_step) is int and global_step >= 0 else (
        int(name_step.group(1)) if name_step else 0)
    step = recorded if step is None else step
    epoch = trainer_state.get("epoch")
    metrics = {}  # logged at the step the folder records, whatever step it is imported at
    for entry in trainer_state.get("log_history", []):
        if isinstance(entry, dict) and entry.get("step") == recorded:
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
    if (rng := folder / "rng_state.pth").is_file():
        objects["rng"] = _rng_from_hf(read_torch_file(rng), rng)
    for file_name, name in _HF_JSON_FILES.items():
        if (folder / file_name).is_file():
            objects[name] = _read_json(folder / file_name)
    _tie_weights(objects["model"], objects.get("config"))
    if (folder / "training_args.bin").is_file():
        log.info("%s: not importing training_args.bin (a pickled TrainingArguments; ckpts "
                 "never unpickles objects)", folder)
    return objects


def _weight_files(folder: Path) -> list[Path]:
    """A Hugging Face folder's weight files: the single file, or the shards of its index."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and "/" not in f for f in weight_map.values()):
                raise CorruptCheckpointError(f"{folder / index} has no usable weight_map")
            return [folder / f for f in sorted(set(weight_map.values()))]
    raise NotACheckpointError(f"{folder} has none of {', '.join(_HF_WEIGHTS)}")


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two Hugging Face folders hold byte-identical weight files (read up to the
    first difference: different weights differ in their first tensor)."""
    files_a, files_b = _weight_files(a), _weight_files(b)
    return [f.name for f in files_a] == [f.name for f in files_b] and all(
        filecmp.cmp(x, y, shallow=False) for x, y in zip(files_a, files_b, strict=True))


def _read_hf_weights(folder: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for file in _weight_files(folder):
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


def _tie_weights(weights: dict[str, Any], config: Any) -> None:
    """Add the tied weights ``save_pretrained`` leaves out (GPT-2's ``lm_head.weight``) as
    the tensor they are tied to: saved as aliases, as the live model's would be."""
    if not isinstance(config, dict):
        return
    for keys in _tied_keys(json.dumps(config, sort_keys=True)):
        present = [key for key in keys if key in weights]
        for key in keys:
            if present and key not in weights:
                weights[key] = weights[present[0]]


@functools.lru_cache(maxsize=8)
def _tied_keys(config_json: str) -> tuple[tuple[str, ...], ...]:
    """The groups of state-dict keys that are one tensor in the model of ``config.json``.

    Only transformers knows which weights a model ties (``_tied_weights_keys``, whose
    form changed in 5.x, with ``tie_word_embeddings`` and the encoder-decoder
    settings), so it is asked: the class ``architectures`` names is built from the
    config on the ``meta`` device (no memory, no weights, never remote code), and
    the parameters that are one object there are tied. Without transformers or such
    a class, no tie is recorded (a warning if the config may tie embeddings).
    """
    config = json.loads(config_json)
    name = next(iter(config.get("architectures") or [None]))
    try:
        import torch
        import transformers

        model_class = getattr(transformers, name, None) if isinstance(name, str) else None
        if model_class is None or not hasattr(model_class, "config_class"):
            problem = f"transformers has no model class {name!r} (config.json's architectures)"
        else:
            with torch.device("meta"):
                model = model_class(model_class.config_class.from_dict(config))
            owners: dict[int, list[str]] = {}
            for key, tensor in [*model.named_parameters(remove_duplicate=False),
                                *model.named_buffers(remove_duplicate=False)]:
                owners.setdefault(id(tensor), []).append(key)
            return tuple(tuple(keys) for keys in owners.values() if len(keys) > 1)
    except ImportError as e:
        problem = f"transformers is not installed (pip install 'ckpts[hf]'): {e}"
    except Exception as e:  # transformers' code building the model: any failure costs the ties only
        problem = f"transformers could not build {name} on the meta device: {e!r}"
    if config.get("tie_word_embeddings", True):
        log.warning("cannot tell which weights %s ties, so no tie is recorded: %s. If it ties "
                    "its embeddings, load with load_weights(..., strict=False), then call "
                    "model.tie_weights()", name or "the model in config.json", problem)
    return ()


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


def _trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / "trainer_state.json"
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} does not hold a JSON object")
    return data

