"""The Hugging Face config of an ``hf`` or ``gguf`` export: where it comes from, and
whether it describes the saved weights.

The config is ``--config PATH`` when given, else the one recorded at save time for
a ``transformers`` model. Before any weight is read, :func:`check_config_fits` builds
the model the config describes on the ``meta`` device (no memory, no weights) with
``transformers``, the way ``from_pretrained`` would, and compares its
``state_dict`` keys and shapes with the saved module's, as the manifest records
them. A config of another size or architecture, or weights saved under a wrapper's
prefix (``module.``, ``_orig_mod.``), would give a folder whose every weight
``from_pretrained`` reports as missing and initializes at random: the export is
refused instead, naming the first key that does not fit.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpts._format.manifest import manifest_tensor_entries
from ckpts.errors import IncompatibleStateError, InvalidArgumentError

log = logging.getLogger("ckpts")

# How a config that does not build can go wrong: a value of the wrong type or size. Other
# errors of a model's __init__ (on the meta device: .item() and the like) skip the check.
_BAD_CONFIG = (ValueError, TypeError, KeyError, AttributeError, AssertionError)


def load_config(record: Mapping[str, Any], path: str | os.PathLike[str] | None
                ) -> dict[str, Any] | None:
    """The model's Hugging Face config: ``path`` if given, else the one recorded at save."""
    if path is not None:
        file = Path(path)
        if file.is_dir():
            file = file / "config.json"
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(
                f"cannot read the config {file}: {e}; pass a config.json (or the folder "
                "holding one) of the model the checkpoint was trained as") from e
        if not isinstance(loaded, dict):
            raise InvalidArgumentError(f"{file} is not a JSON object, so not a model config")
        return loaded
    recorded = record.get("hf_config")
    return dict(recorded) if isinstance(recorded, dict) else None


def required_config(config: dict[str, Any] | None, fmt: str) -> dict[str, Any]:
    """``config``, or the error saying that ``--format fmt`` needs one."""
    if config is None:
        raise InvalidArgumentError(
            f"--format {fmt} needs the model's Hugging Face config, and this checkpoint has "
            "none recorded (it was not saved from a transformers model); pass "
            "config=PATH (CLI: --config PATH) with the model's config.json")
    return config


def check_config_fits(config: Mapping[str, Any], record: Mapping[str, Any], *, where: str,
                      source: str) -> None:
    """Refuse ``config`` unless the model it describes has the saved module's keys and shapes.

    Keys the checkpoint holds beyond the model's (buffers an older ``transformers``
    saved) are left out of an export's use by ``from_pretrained``, with a warning
    here. Without ``transformers``, or for a model type it does not know (remote
    code), nothing can be checked: a warning says so and the export goes on.

    Args:
        config: the config the export writes (``architectures`` set).
        record: the saved module's manifest entry (tensor entries and aliases read).
        where: the checkpoint and module, for messages (``run/step-00000100 'model'``).
        source: where the config comes from, for messages (``--config cfg.json``).

    Raises:
        IncompatibleStateError: a key of the model is missing from the checkpoint, or
            has another shape there; or the config cannot build a model.
    """
    expected = _model_shapes(config, where=where, source=source)
    if expected is None:
        return
    architecture, shapes = expected
    saved = {key: entry.shape for key, entry in manifest_tensor_entries(dict(record)).items()}
    for alias, target in record.get("aliases", {}).items():
        saved[alias] = saved[target]  # a tied weight: saved once, the same shape
    missing = [key for key in shapes if key not in saved]
    mismatched = [(key, str(list(saved[key])), str(list(shape)))
                  for key, shape in shapes.items() if key in saved and saved[key] != shape]
    unexpected = [key for key in saved if key not in shapes]
    fix = ("pass the config.json of the model the checkpoint was trained as "
           "(config=PATH, CLI: --config PATH)")
    if missing:
        key = missing[0]
        raise IncompatibleStateError(
            f"{source} does not describe the weights of {where}: {architecture} built from it "
            f"has {key!r} of shape {list(shapes[key])}, which the checkpoint lacks"
            f"{_hint(key, list(saved))} ({len(missing)} of its {len(shapes)} keys missing); "
            f"{fix}", missing=missing, unexpected=unexpected, mismatched=mismatched)
    if mismatched:
        key, have, want = mismatched[0]
        raise IncompatibleStateError(
            f"{source} does not describe the weights of {where}: {architecture} built from it "
            f"has {key!r} of shape {want}, the checkpoint {have} ({len(mismatched)} of its "
            f"{len(shapes)} keys differ in shape); {fix}",
            unexpected=unexpected, mismatched=mismatched)
    if unexpected:
        log.warning("%s: %d saved key(s) that %s built from %s does not have (e.g. %r) are "
                    "exported, and from_pretrained will ignore them", where, len(unexpected),
                    architecture, source, unexpected[0])


def _hint(key: str, saved: list[str]) -> str:
    """Where a missing key went: under a wrapper's prefix, or what the saved keys look like."""
    for name in saved:
        if name.endswith(f".{key}"):
            prefix = name[: -len(key)]
            return (f" (it holds {name!r}: the weights were saved under the prefix {prefix!r} "
                    "of a wrapper such as DDP or torch.compile; save the unwrapped model)")
    return f" (its keys are like {saved[0]!r})" if saved else " (it has no tensors)"


def _model_shapes(config: Mapping[str, Any], *, where: str, source: str
                  ) -> tuple[str, dict[str, tuple[int, ...]]] | None:
    """The class the config names and its model's ``state_dict`` shapes, built on the meta
    device; None (with a warning) when it cannot be known here."""
    try:
        import torch
        import transformers
    except ImportError:
        log.warning("%s: the config was not checked against the weights, since transformers "
                    "is not installed (pip install 'ckpts[hf]')", where)
        return None
    model_type = config.get("model_type")
    known = transformers.CONFIG_MAPPING  # lazy: `in` and [] work, .get does not
    config_class = known[model_type] if isinstance(model_type, str) and model_type in known \
        else None
    if config_class is None:
        log.warning("%s: the config was not checked against the weights: transformers %s "
                    "knows no model_type %r", where, transformers.__version__, model_type)
        return None
    architectures = config.get("architectures") or []
    named = getattr(transformers, str(architectures[0]), None) if architectures else None
    model_class: Any = named if isinstance(named, type) and issubclass(
        named, transformers.PreTrainedModel) else None
    try:
        hf_config = config_class.from_dict(dict(config))
        if model_class is None:  # what AutoModelForCausalLM.from_pretrained would build
            causal = transformers.MODEL_FOR_CAUSAL_LM_MAPPING
            if type(hf_config) not in causal:
                log.warning("%s: the config was not checked against the weights: it names "
                            "no transformers class (architectures: %s) and %s has no causal "
                            "LM", where, architectures, model_type)
                return None
            model_class = causal[type(hf_config)]
        with torch.device("meta"):
            model = model_class(hf_config)
    except _BAD_CONFIG as e:
        raise IncompatibleStateError(
            f"{source} cannot build a {model_type} model ({type(e).__name__}: {e}), so it is "
            f"not the config of {where}; pass the config.json of the model the checkpoint "
            "was trained as (config=PATH, CLI: --config PATH)") from e
    except Exception as e:  # a model whose __init__ does not run on the meta device
        log.warning("%s: the config was not checked against the weights: building its "
                    "model on the meta device failed (%s: %s)", where, type(e).__name__, e)
        return None
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    return type(model).__name__, shapes
