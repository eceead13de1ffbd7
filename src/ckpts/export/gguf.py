"""The ``gguf`` export: a Llama-family checkpoint as a GGUF file llama.cpp loads.

What llama.cpp needs, and how it is met:

- tensor names: the Hugging Face names mapped with ``gguf.get_tensor_name_map``
  (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``);
- the q/k layout: Hugging Face orders each head's rotary dimensions as two halves,
  llama.cpp as interleaved pairs, so q and k rows are permuted per head (k with
  the key/value head count, for grouped-query attention);
- metadata from the config: sizes, head counts, RMS epsilon, rope base and linear
  rope scaling;
- a vocabulary. ``tokenizer=`` (a ``tokenizer.json`` or a folder holding one)
  embeds the real one: byte-level BPE as ``gpt2`` with its merges, byte-fallback
  BPE and Unigram as ``llama`` (SentencePiece-style scores). A tokenizer with
  more tokens than the model's embedding rows is refused; a smaller one is padded
  with unused tokens, as models pad their embeddings. Without a tokenizer, a
  byte-level placeholder vocabulary sized to the model is written, with a warning:
  the file loads and computes the same logits, but its text is not the model's.

1-D tensors (norms) stay float32, as llama.cpp's own converter keeps them. Tensors
are streamed to the file one at a time. The file is written under a temporary
name and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckpts.errors import CheckpointError, InvalidArgumentError

log = logging.getLogger("ckpts")

LLAMA_FAMILY = ("llama",)
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by llama.cpp

# gguf token types (gguf.TokenType), spelled out so this module types without gguf
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocabulary:
    """The tokenizer metadata written into the GGUF file."""

    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None


def write_gguf(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    out: Path,
    *,
    dtype: str | None,
    tokenizer: Path | None,
    progress: Callable[[int], None] | None,
) -> Path:
    """Write a Llama-family model as ``out`` (see the module docstring). Returns ``out``.

    Raises:
        InvalidArgumentError: the model is not Llama-family, a tensor has no GGUF
            name, or the tokenizer does not fit the model.
        CheckpointError: the ``gguf`` package is not installed.
    """
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError(
            "exporting GGUF needs the gguf package: pip install 'ckpts[gguf]'") from e
    hp = _hyperparameters(config)
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise InvalidArgumentError(
            "a Llama checkpoint's weights have model.embed_tokens.weight; this module has "
            f"{sorted(tensors)[:5]}... Export the LlamaForCausalLM module (name=...)")
    rows = int(embed.shape[0])
    vocab = _vocabulary(tokenizer, rows, config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    prepared: list[tuple[str, np.ndarray[Any, Any], Any]] = []
    for key, tensor in tensors.items():
        if key.endswith(SKIPPED_SUFFIXES):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InvalidArgumentError(
                f"tensor {key!r} has no llama.cpp name; only Llama-family weights (model.*, "
                "lm_head) can be exported to GGUF")
        prepared.append((gguf_name, *_array(key, tensor, hp, gguf)))
    file_type = {None: _file_type_of(tensors, gguf), "fp32": gguf.LlamaFileType.ALL_F32,
                 "fp16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(temporary, "llama")
    try:
        _write_metadata(writer, hp, config, vocab, rows, file_type, gguf)
        for gguf_name, array, raw_dtype in prepared:
            writer.add_tensor_info(gguf_name, array.shape, array.dtype, array.nbytes,
                                   raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, array, _ in prepared:
            writer.write_tensor_data(array)
            if progress is not None:
                progress(array.nbytes)
        writer.close()
        os.replace(temporary, out)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    return out


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Hugging Face's half-split rotary layout to
    llama.cpp's interleaved one, per head."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise InvalidArgumentError(
            f"GGUF export supports Llama-family models (model_type in {list(LLAMA_FAMILY)}); "
            f"this config has model_type {model_type!r}. Export it with --format hf instead")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        hp: dict[str, Any] = {
            "layers": int(config["num_hidden_layers"]),
            "hidden": hidden,
            "ffn": int(config["intermediate_size"]),
            "heads": heads,
            "kv_heads": int(config.get("num_key_value_heads") or heads),
            "head_dim": int(config.get("head_dim") or hidden // heads),
            "eps": float(config.get("rms_norm_eps", 1e-6)),
            "context": int(config.get("max_position_embeddings", 2048)),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"the model config lacks or mangles {e}; pass the model's config.json "
            "(--config PATH)") from e
    rope = dict(config.get("rope_parameters") or {})  # transformers 5
    rope.update(config.get("rope_scaling") or {})      # transformers 4
    hp["rope_theta"] = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear"):
        raise InvalidArgumentError(
            f"rope scaling {kind!r} is not supported by the GGUF export (only none and "
            "linear); export with --format hf and convert with llama.cpp's own script")
    hp["rope_linear_factor"] = float(rope["factor"]) if kind == "linear" else None
    return hp


def _array(key: str, tensor: torch.Tensor, hp: Mapping[str, Any], gguf: Any
           ) -> tuple[np.ndarray[Any, Any], Any]:
    """The tensor as the numpy array to write, and its GGML type when numpy has none."""
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        tensor = permute_rotary(tensor, hp["heads"])
    elif key.endswith(("k_proj.weight", "k_proj.bias")):
        tensor = permute_rotary(tensor, hp["kv_heads"])
    tensor = tensor.detach().contiguous()
    if tensor.dim() <= 1 or tensor.dtype == torch.float64:
        tensor = tensor.float()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    if tensor.dtype not in (torch.float32, torch.float16):
        raise InvalidArgumentError(
            f"tensor {key!r} has dtype {tensor.dtype}; GGUF export writes float32, float16 or "
            "bfloat16 weights (pass --dtype)")
    return tensor.numpy(), None


def _file_type_of(tensors: Mapping[str, torch.Tensor], gguf: Any) -> Any:
    dtypes = {t.dtype for t in tensors.values() if t.dim() > 1}
    if dtypes == {torch.bfloat16}:
        return gguf.LlamaFileType.MOSTLY_BF16
    if dtypes == {torch.float16}:
        return gguf.LlamaFileType.MOSTLY_F16
    return gguf.LlamaFileType.ALL_F32


def _write_metadata(writer: Any, hp: Mapping[str, Any], config: Mapping[str, Any],
                    vocab: Vocabulary, rows: int, file_type: Any, gguf: Any) -> None:
    writer.add_name(str(config.get("_name_or_path") or "ckpts export"))
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_rope_freq_base(hp["rope_theta"])
    if hp["rope_linear_factor"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp["rope_linear_factor"])
    writer.add_vocab_size(rows)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for setter, key in ((writer.add_bos_token_id, "bos_token_id"),
                        (writer.add_eos_token_id, "eos_token_id"),
                        (writer.add_pad_token_id, "pad_token_id")):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < rows:
            setter(value)


def _vocabulary(tokenizer: Path | None, rows: int, config: Mapping[str, Any]) -> Vocabulary:
    if tokenizer is None:
        log.warning(
            "no tokenizer given: writing a byte-level placeholder vocabulary of %d tokens "
            "(the model's embedding rows) so the GGUF file loads for checks; its tokens are "
            "not the model's. Pass --tokenizer PATH to embed the real vocabulary", rows)
        return _placeholder(rows)
    file = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        model = spec["model"]
        kind = model["type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgumentError(
            f"cannot read a Hugging Face tokenizer from {file} ({e}); pass a tokenizer.json "
            "or the folder tokenizer.save_pretrained() wrote") from e
    byte_fallback = bool(model.get("byte_fallback"))
    if kind == "Unigram":
        vocab = {token: i for i, (token, _) in enumerate(model["vocab"])}
        unigram_scores = {i: float(score) for i, (_, score) in enumerate(model["vocab"])}
    elif kind == "BPE":
        vocab = dict(model["vocab"])
        unigram_scores = {}
    else:
        raise InvalidArgumentError(
            f"{file}: tokenizer model {kind!r} is not supported for GGUF (BPE and Unigram are)")
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *added, -1]) + 1
    if size > rows:
        raise InvalidArgumentError(
            f"the tokenizer {file} has {size} tokens but the model's embedding has {rows} rows; "
            "pass the tokenizer this model was trained with")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [UNUSED] * rows
    for token, i in vocab.items():
        tokens[i] = token
        is_byte = byte_fallback and len(token) == 6 and token.startswith("<0x")
        types[i] = BYTE if is_byte else NORMAL
    for i, entry in added.items():
        tokens[i] = entry["content"]
        types[i] = CONTROL if entry.get("special") else USER_DEFINED
    if kind == "BPE" and not byte_fallback:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return Vocabulary("gpt2", tokens, types, merges=merges)
    scores = [unigram_scores.get(i, -float(i)) for i in range(rows)]
    return Vocabulary("llama", tokens, types, scores=scores)


def _placeholder(rows: int) -> Vocabulary:
    """``<unk> <s> </s>``, the 256 byte tokens, then unused ones, cut or padded to ``rows``."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [UNKNOWN, CONTROL, CONTROL, *([BYTE] * 256)]
    tokens += [f"<unused{i}>" for i in range(len(tokens), rows)]
    types += [UNUSED] * (rows - len(types))
    return Vocabulary("llama", tokens[:rows], types[:rows], scores=[0.0] * rows)
