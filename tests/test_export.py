"""Export for deployment: Hugging Face folders, safetensors and GGUF, from real checkpoints.

Models are tiny ``transformers`` models built from configs (no downloads), saved
through ``CheckpointManager`` with an AdamW optimizer, so the optimizer's bytes are
there to be (not) read. The llama.cpp logits comparison needs llama-cpp-python,
which builds from source in minutes: it runs with ``CKPTS_LLAMA_CPP=1`` only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ckpts
from ckpts.cli import app
from ckpts.export import export

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

VOCAB = 320
PROMPT = [[1, 17, 200, 45, 3, 99, 310, 7]]


def tiny_llama(*, tied: bool = False) -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def save(run: Path, model: torch.nn.Module) -> ckpts.Checkpoint:
    """One AdamW step (so the optimizer has state on disk), then a save."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.tensor(PROMPT)) if hasattr(model, "config") else model(torch.ones(1, 4))
    (out.logits if hasattr(out, "logits") else out).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with ckpts.CheckpointManager(run) as manager:
        checkpoint = manager.save(100, ckpts.TrainState(model=model, optimizer=optimizer))
    assert checkpoint is not None
    return checkpoint


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits.float()


def test_hf_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path: Path) -> None:
    model = tiny_llama()
    checkpoint = save(tmp_path / "run", model)
    assert "hf_config" in json.loads((checkpoint.path / "manifest.json").read_text()
                                     )["objects"]["model"], "saves must record the HF config"
    out = export(checkpoint, tmp_path / "hf", format="hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded), logits(model))


def test_hf_bf16_export_is_within_bf16_tolerance(tmp_path: Path) -> None:
    model = tiny_llama()
    out = export(save(tmp_path / "run", model), tmp_path / "hf", format="hf", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    expected = logits(model)
    torch.testing.assert_close(logits(loaded), expected, atol=2e-2, rtol=2e-2)
    assert not torch.equal(logits(loaded), expected)  # it really is bf16


def test_hf_export_of_tied_gpt2_drops_the_alias_and_from_pretrained_reties_it(
        tmp_path: Path) -> None:
    model = tiny_gpt2()
    out = export(save(tmp_path / "run", model), tmp_path / "hf", format="hf")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(logits(loaded), logits(model))


def test_sharded_hf_export_loads_through_its_index(tmp_path: Path) -> None:
    model = tiny_llama()
    out = export(save(tmp_path / "run", model), tmp_path / "hf", format="hf",
                 max_shard_size="60kB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not (out / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_hf_export_copies_the_tokenizer_files(tmp_path: Path) -> None:
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer(50)))
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    (tokenizer_dir / "notes.txt").write_text("not a tokenizer file")
    out = export(save(tmp_path / "run", tiny_llama()), tmp_path / "hf", format="hf",
                 tokenizer=tokenizer_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_export_reads_no_optimizer_bytes(tmp_path: Path) -> None:
    checkpoint = save(tmp_path / "run", tiny_llama())
    optimizer_files = list(checkpoint.path.glob("optimizer*.safetensors"))
    assert optimizer_files
    for file in optimizer_files:  # garbage in every optimizer byte: export never notices
        file.write_bytes(b"\xff" * file.stat().st_size)
    out = export(checkpoint, tmp_path / "w.safetensors", format="safetensors")
    assert out.is_file()
    model_file = checkpoint.path / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.safetensors"):
        export(checkpoint, tmp_path / "again.safetensors", format="safetensors")


def test_safetensors_export_has_every_state_dict_key_or_shards_with_an_index(
        tmp_path: Path) -> None:
    model = tiny_gpt2()
    checkpoint = save(tmp_path / "run", model)
    single = export(checkpoint, tmp_path / "one" / "model.safetensors", format="safetensors")
    state = model.state_dict()
    fresh = tiny_gpt2()
    torch.nn.init.zeros_(fresh.transformer.wte.weight)
    fresh.load_state_dict(load_file(single))  # every key present, tied ones included
    assert torch.equal(logits(fresh), logits(model))

    sharded = export(checkpoint, tmp_path / "many", format="safetensors",
                     max_shard_size=40_000, dtype="fp16")
    assert sharded == tmp_path / "many" / "model.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    merged: dict[str, torch.Tensor] = {}
    for name in files:
        merged.update(load_file(tmp_path / "many" / name))
    assert merged.keys() == state.keys() == index["weight_map"].keys()
    for key, tensor in state.items():
        assert merged[key].dtype == (torch.float16 if tensor.is_floating_point()
                                     else tensor.dtype)
        assert torch.equal(merged[key], tensor.to(merged[key].dtype)), key


def test_hf_export_without_a_recorded_config_needs_one(tmp_path: Path) -> None:
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    checkpoint = save(tmp_path / "run", plain)
    with pytest.raises(ckpts.InvalidArgumentError, match="--config PATH"):
        export(checkpoint, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "custom", "hidden": 4}))
    out = export(checkpoint, tmp_path / "hf", format="hf", config=config)
    assert json.loads((out / "config.json").read_text())["model_type"] == "custom"
    assert load_file(out / "model.safetensors").keys() == {"0.weight", "0.bias"}


def test_hf_export_refuses_a_config_that_does_not_describe_the_weights(tmp_path: Path) -> None:
    checkpoint = save(tmp_path / "run", tiny_gpt2())  # n_embd 32
    wider = tmp_path / "wider.json"
    wider.write_text(transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64,
                                             n_layer=2, n_head=2).to_json_string())
    with pytest.raises(ckpts.IncompatibleStateError) as raised:
        export(checkpoint, tmp_path / "hf", format="hf", config=wider)
    assert str(raised.value).startswith(
        f"the config {wider} does not describe the weights of {checkpoint.path} ('model'): "
        "GPT2LMHeadModel built from it has 'transformer.wte.weight' of shape [320, 64], "
        "the checkpoint [320, 32]")
    assert raised.value.mismatched[0] == ("transformer.wte.weight", "[320, 32]", "[320, 64]")
    done = CliRunner().invoke(app, ["export", str(checkpoint.path), str(tmp_path / "hf"),
                                    "--format", "hf", "--config", str(wider)])
    assert done.exit_code == 2 and done.output.startswith(f"error: the config {wider} does")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "wider.json"]  # nothing written


def test_hf_export_refuses_weights_saved_under_a_wrappers_prefix(tmp_path: Path) -> None:
    model = tiny_gpt2()

    class Wrapped(torch.nn.Module):  # as DistributedDataParallel holds it: keys "module.*"
        def __init__(self) -> None:
            super().__init__()
            self.module = model

    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        checkpoint = manager.save(1, ckpts.TrainState(model=Wrapped()))
    assert checkpoint is not None
    config = tmp_path / "config.json"
    config.write_text(model.config.to_json_string())
    with pytest.raises(ckpts.IncompatibleStateError,
                       match=r"'transformer\.wte\.weight' of shape \[320, 32\], which the "
                             r"checkpoint lacks \(it holds 'module\.transformer\.wte\.weight': "
                             r"the weights were saved under the prefix 'module\.'"):
        export(checkpoint, tmp_path / "hf", format="hf", config=config)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_an_existing_output(tmp_path: Path) -> None:
    checkpoint = save(tmp_path / "run", tiny_llama())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ckpts.InvalidArgumentError, match="already exists"):
        export(checkpoint, tmp_path / "taken", format="hf")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


# --- GGUF ---------------------------------------------------------------------------


def gguf_tensors(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {t.name: t for t in reader.tensors}


def gguf_field(path: Path, key: str) -> Any:
    field = gguf.GGUFReader(path).fields[key]
    return field.contents()


def llama_cpp_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows in llama.cpp's order, written out index by index: within each head,
    row j of llama.cpp is row j//2 (even j) or head_dim/2 + j//2 (odd j) of HF's."""
    head_dim = weight.shape[0] // heads
    order = [h * head_dim + j // 2 + (j % 2) * (head_dim // 2)
             for h in range(heads) for j in range(head_dim)]
    return weight[order]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gguf_export_has_llama_cpp_names_shapes_permuted_qk_and_metadata(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="ckpts"):
        out = export(save(tmp_path / "run", model), tmp_path / "m.gguf", format="gguf")
    assert "placeholder vocabulary of 320 tokens" in caplog.text
    tensors = gguf_tensors(out)
    layers = [f"blk.{i}.{n}.weight" for i in range(2) for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
        "ffn_up", "ffn_down")]
    assert sorted(tensors) == sorted(["token_embd.weight", "output_norm.weight",
                                      "output.weight", *layers])
    state = model.state_dict()

    def value(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(t.data.copy()).reshape([int(d) for d in reversed(t.shape)])

    assert torch.equal(value("token_embd.weight"), state["model.embed_tokens.weight"])
    assert torch.equal(value("output.weight"), state["lm_head.weight"])
    assert torch.equal(value("blk.1.ffn_down.weight"), state["model.layers.1.mlp.down_proj.weight"])
    q = state["model.layers.0.self_attn.q_proj.weight"]
    k = state["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(value("blk.0.attn_q.weight"), llama_cpp_rows(q, heads=4))
    assert torch.equal(value("blk.0.attn_k.weight"), llama_cpp_rows(k, heads=2))
    assert not torch.equal(value("blk.0.attn_q.weight"), q)
    assert gguf_field(out, "general.architecture") == "llama"
    assert gguf_field(out, "llama.block_count") == 2
    assert gguf_field(out, "llama.attention.head_count") == 4
    assert gguf_field(out, "llama.attention.head_count_kv") == 2
    assert gguf_field(out, "llama.embedding_length") == 64
    assert gguf_field(out, "llama.feed_forward_length") == 96
    assert gguf_field(out, "llama.rope.dimension_count") == 16
    tokens = gguf_field(out, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[3 + 0x41] == "<0x41>"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gguf_export_in_bf16_keeps_norms_in_f32(tmp_path: Path) -> None:
    model = tiny_llama()
    out = export(save(tmp_path / "run", model), tmp_path / "m.gguf", format="gguf",
                 dtype="bf16")
    tensors = gguf_tensors(out)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    raw = torch.from_numpy(tensors["token_embd.weight"].data.copy()).view(torch.bfloat16)
    assert torch.equal(raw.reshape(VOCAB, 64),
                       model.state_dict()["model.embed_tokens.weight"].bfloat16())


def byte_level_tokenizer(size: int) -> dict[str, Any]:
    """A GPT-2-style byte-level BPE tokenizer.json with ``size`` tokens (one special)."""
    alphabet = [chr(c) for c in range(ord("a"), ord("a") + size - 2)]
    vocab = {token: i for i, token in enumerate(alphabet)}
    vocab["ab"] = len(vocab)
    return {
        "version": "1.0",
        "added_tokens": [{"id": size - 1, "content": "<|endoftext|>", "special": True,
                          "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None, "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": ["a b"]},
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gguf_export_embeds_a_real_tokenizer_or_refuses_one_that_does_not_fit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = save(tmp_path / "run", tiny_llama())
    fits = tmp_path / "tokenizer.json"
    fits.write_text(json.dumps(byte_level_tokenizer(100)))
    with caplog.at_level(logging.WARNING, logger="ckpts"):
        out = export(checkpoint, tmp_path / "m.gguf", format="gguf", tokenizer=fits)
    assert "placeholder" not in caplog.text
    assert gguf_field(out, "tokenizer.ggml.model") == "gpt2"
    tokens = gguf_field(out, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB  # padded to the embedding rows
    assert tokens[:3] == ["a", "b", "c"] and tokens[99] == "<|endoftext|>"
    assert tokens[98] == "ab" and tokens[100] == "[PAD100]"
    assert gguf_field(out, "tokenizer.ggml.merges") == ["a b"]

    too_big = tmp_path / "big.json"
    too_big.write_text(json.dumps(byte_level_tokenizer(500)))
    with pytest.raises(ckpts.InvalidArgumentError, match=r"has 500 tokens .* 320 rows"):
        export(checkpoint, tmp_path / "big.gguf", format="gguf", tokenizer=too_big)
    assert not (tmp_path / "big.gguf").exists()


def test_gguf_export_refuses_a_model_that_is_not_llama(tmp_path: Path) -> None:
    checkpoint = save(tmp_path / "run", tiny_gpt2())
    with pytest.raises(ckpts.InvalidArgumentError, match="model_type 'gpt2'"):
        export(checkpoint, tmp_path / "m.gguf", format="gguf")


@pytest.mark.skipif(os.environ.get("CKPTS_LLAMA_CPP") != "1",
                    reason="opt-in: CKPTS_LLAMA_CPP=1 with llama-cpp-python installed "
                           "(it builds from source, ~5 min on 2 cores)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")
@pytest.mark.parametrize("vocabulary", ["placeholder", "tokenizer.json"])
def test_gguf_export_gives_pytorchs_logits_in_llama_cpp(tmp_path: Path, vocabulary: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_llama()
    tokenizer = None
    if vocabulary == "tokenizer.json":
        tokenizer = tmp_path / "tokenizer.json"
        tokenizer.write_text(json.dumps(byte_level_tokenizer(100)))
    out = export(save(tmp_path / "run", model), tmp_path / "m.gguf", format="gguf",
                 tokenizer=tokenizer)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=2)
    try:
        llm.eval(PROMPT[0])
        ours = torch.tensor(llm.scores[: len(PROMPT[0])], dtype=torch.float32)
    finally:
        llm.close()
    difference = (ours - logits(model)[0]).abs().max().item()
    print(f"llama.cpp vs PyTorch ({vocabulary}): max |logit diff| = {difference:.3g}")
    assert difference < 1e-3


def test_export_command_writes_the_file_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    checkpoint = save(tmp_path / "run", tiny_llama())
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(checkpoint.path), str(tmp_path / "w.safetensors"),
                               "--format", "safetensors", "--dtype", "fp16"])
    assert done.exit_code == 0, done.output
    assert load_file(tmp_path / "w.safetensors")["lm_head.weight"].dtype == torch.float16
    plain = save(tmp_path / "plain", torch.nn.Linear(4, 2))
    failed = runner.invoke(app, ["export", str(plain.path), str(tmp_path / "hf"),
                                 "--format", "hf"])
    assert failed.exit_code == 2
    assert failed.output.startswith("error: --format hf needs the model's Hugging Face config")
    assert "Traceback" not in failed.output
