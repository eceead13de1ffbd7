"""The ``hf`` export: a folder ``AutoModel*.from_pretrained`` loads, written without transformers.

The folder holds ``config.json``, the weights as ``save_pretrained`` lays them out
(``model.safetensors``, or shards plus ``model.safetensors.index.json``) and the
tokenizer files, if given. Tied weights (GPT-2's ``lm_head.weight``) are left out
when the config ties word embeddings, as ``save_pretrained`` does, and written as
a copy otherwise. The folder is built under a temporary name and renamed into
place when complete, so a failed export leaves nothing that looks usable.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ckpts.errors import InvalidArgumentError
from ckpts.export._output import byte_counter, discard, publish, staged_directory
from ckpts.export.shards import write_weights

# the files of a Hugging Face tokenizer folder, copied into an hf export as they are
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "vocab.txt", "added_tokens.json", "chat_template.jinja",
)

def write_hf_folder(
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    config: dict[str, Any],
    out: Path,
    *,
    dtype: str | None,
    tokenizer: Path | None,
    max_shard_size: int,
    progress: Callable[[int, int], None] | None,
) -> Path:
    """Write the folder ``out`` (see the module docstring). Returns ``out``.

    ``dtype``: what the weights were cast to, as torch names it (``bfloat16``), which
    the config records; None: as saved.
    """
    tied = bool(config.get("tie_word_embeddings", True))
    weights = {k: (t.clone() if k in aliases else t) for k, t in tensors.items()
               if not (tied and k in aliases)}
    if dtype is not None:
        config = {**config, "dtype": dtype}
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    tokenizer_files = _tokenizer_files(tokenizer) if tokenizer is not None else []
    staging = staged_directory(out)
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
        for file in tokenizer_files:
            shutil.copyfile(file, staging / file.name)
        write_weights(weights, staging, stem="model", max_shard_size=max_shard_size,
                      progress=byte_counter(weights, progress))
        publish(staging, out)
    except BaseException:
        discard(staging)
        raise
    return out


def _tokenizer_files(path: Path) -> list[Path]:
    """The tokenizer files to copy: ``path`` itself, or the known ones in a folder."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if found:
            return found
        raise InvalidArgumentError(
            f"{path} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); pass "
            "a tokenizer.json or the folder tokenizer.save_pretrained() wrote")
    raise InvalidArgumentError(f"tokenizer {path} does not exist")
