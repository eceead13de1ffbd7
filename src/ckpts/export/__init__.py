"""Export a checkpoint's weights for deployment: a Hugging Face folder, safetensors, or GGUF.

Export reads one saved module's files (hash-checked, through the same read path as
:func:`ckpts.load_weights`) and never the optimizer's. Formats:

- ``hf``: a folder ``from_pretrained`` loads: ``model.safetensors`` (or shards and
  ``model.safetensors.index.json``), ``config.json`` and any tokenizer files given.
  The config is the one recorded at save time for a ``transformers`` model
  (``manifest["objects"][name]["hf_config"]``), or ``config=PATH``.
- ``safetensors``: every ``state_dict`` key in one file (tied weights written as
  copies, so ``model.load_state_dict(load_file(path))`` just works), or shards
  with an index above ``max_shard_size``.
- ``gguf``: a Llama-family model for llama.cpp (see :mod:`ckpts.export.gguf`).

``dtype`` (``fp32``, ``bf16``, ``fp16``) casts floating-point tensors; integer
tensors are written as they are.

Everything that can be checked is checked before a weight is read, and before torch is
imported: the format, dtype and shard size, that ``out`` is free, the module, and
the config an ``hf`` or ``gguf`` export needs, which must describe the saved weights
(:func:`ckpts.export._config.check_config_fits`).

Example:
    >>> from ckpts.export import export
    >>> export("runs/exp1/step-00001500", "out/model", format="hf", dtype="bf16")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ckpts._checkpoint.weights import module_record, read_module_tensors
from ckpts._format.catalog import Checkpoint
from ckpts._run.space import parse_size
from ckpts.errors import InvalidArgumentError
from ckpts.export._config import check_config_fits, load_config, required_config
from ckpts.export._output import ProgressCallback, byte_counter

if TYPE_CHECKING:
    import torch

ExportFormat = Literal["hf", "safetensors", "gguf"]
ExportDtype = Literal["fp32", "bf16", "fp16"]
FORMATS: tuple[str, ...] = ("hf", "safetensors", "gguf")
# each dtype option, as torch (and a config.json's "dtype") names it
DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def export(
    checkpoint: Checkpoint | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: ExportFormat,
    dtype: ExportDtype | None = None,
    name: str | None = None,
    config: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = "5GB",
    progress: ProgressCallback | None = None,
) -> Path:
    """Export one module of a checkpoint for deployment.

    Args:
        checkpoint: a :class:`~ckpts.Checkpoint` or a checkpoint directory.
        out: where to write: a new folder for ``hf``; a ``.safetensors`` file (or a
            folder, which gets ``model.safetensors``) for ``safetensors``; a
            ``.gguf`` file for ``gguf``. It must not exist yet (or be an empty folder).
        format: ``hf``, ``safetensors`` or ``gguf``.
        dtype: cast floating-point weights to ``fp32``, ``bf16`` or ``fp16``
            (default: as saved).
        name: the saved module to export (default: ``model``, or the only module).
        config: a ``config.json`` (or a folder holding one) for a checkpoint saved
            without a recorded Hugging Face config; needed then by ``hf`` and ``gguf``.
        tokenizer: a ``tokenizer.json`` or a Hugging Face tokenizer folder: copied
            into an ``hf`` folder, embedded as the vocabulary of a ``gguf`` file.
        max_shard_size: split safetensors output into files of at most this size.
        progress: called as weights are written, with (bytes done, bytes in all).

    Returns:
        The path written (``out``).

    Raises:
        InvalidArgumentError: a bad format or dtype, ``out`` exists, or a needed
            config is missing.
        NotACheckpointError: ``checkpoint`` is not a checkpoint, or has no such module.
        CorruptCheckpointError: the module's files fail their hash check.
        CheckpointError: an optional package (``gguf``) is missing.
    """
    if format not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    size = parse_size(max_shard_size)
    target = Path(out)
    if format == "safetensors" and target.suffix != ".safetensors":
        target = target / "model.safetensors"
    _check_free(target, directory=format == "hf")
    obj_name, record = module_record(checkpoint, name=name)
    hf_config = load_config(record, config)
    if format in ("hf", "gguf"):  # checked before any weight is read
        hf_config = required_config(hf_config, format)
        if not hf_config.get("architectures") and record.get("class"):
            hf_config["architectures"] = [record["class"]]
        where = checkpoint.path if isinstance(checkpoint, Checkpoint) else checkpoint
        check_config_fits(hf_config, record, where=f"{where} ({obj_name!r})",
                          source=f"the config {config}" if config is not None
                          else "the Hugging Face config recorded at save")
    aliases: dict[str, str] = dict(record.get("aliases", {}))
    tensors = _cast(read_module_tensors(checkpoint, name=obj_name), dtype)
    if format == "gguf":
        from ckpts.export.gguf import write_gguf

        weights = {k: t for k, t in tensors.items() if k not in aliases}
        write_gguf(weights, required_config(hf_config, format), target, dtype=dtype,
                   tokenizer=Path(tokenizer) if tokenizer is not None else None,
                   progress=byte_counter(weights, progress))
        return target
    if format == "safetensors":
        # every key, tied ones as copies: safetensors refuses shared memory
        weights = {k: t.clone() if k in aliases else t for k, t in tensors.items()}
        target.parent.mkdir(parents=True, exist_ok=True)
        from ckpts.export.shards import write_weights

        write_weights(weights, target.parent, stem=target.name.removesuffix(".safetensors"),
                      max_shard_size=size, progress=byte_counter(weights, progress))
        return target
    from ckpts.export.hf import write_hf_folder

    return write_hf_folder(tensors, aliases, required_config(hf_config, format), target,
                           dtype=DTYPES[dtype] if dtype is not None else None,
                           tokenizer=Path(tokenizer) if tokenizer is not None else None,
                           max_shard_size=size, progress=progress)


def _cast(tensors: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to ``dtype``; tied keys stay one tensor."""
    if dtype is None:
        return tensors
    import torch

    wanted = getattr(torch, DTYPES[dtype])
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.dtype == wanted:
            out[key] = tensor
            continue
        if id(tensor) not in cast:
            cast[id(tensor)] = tensor.to(wanted)
        out[key] = cast[id(tensor)]
    return out


def _check_free(target: Path, *, directory: bool) -> None:
    if directory and target.is_dir() and not any(target.iterdir()):
        return
    if target.exists():
        raise InvalidArgumentError(
            f"{target} already exists; export to a new path (or remove it first)")


__all__ = ["ExportDtype", "ExportFormat", "export"]
