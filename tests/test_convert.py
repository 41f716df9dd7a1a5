"""GGUF -> mlx-lm conversion on small GGUF files written in the test with gguf's writer."""

import json
import os
import subprocess
import sys

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_model
from mlx.utils import tree_flatten
from mlx_lm import load

from mlx_vocabtrim.cli import cli
from mlx_vocabtrim.convert import convert_gguf
from mlx_vocabtrim.errors import VocabTrimError
from mlx_vocabtrim.models import PACKAGED

Q = gguf.GGMLQuantizationType
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# a tensor type for each kind of weight, so one file covers F32, F16, Q8_0 and Q4_0
TYPES = {
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_0,
    "attn_v": Q.F16,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.Q8_0,
    "token_embd": Q.Q8_0,
}


def gguf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{NAMES[rest]}"


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_tables(tokenizer_dir):
    doc = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    specials = {t["content"] for t in doc["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return tokens, merges, types


def add_tokenizer(writer, tokenizer_dir) -> None:
    """The test tokenizer's tables, as llama.cpp writes a BPE tokenizer."""
    tokens, merges, token_types = tokenizer_tables(tokenizer_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))


def write_gguf(path, arch, model, tokenizer_dir, types=TYPES):
    """A GGUF of `model` as llama.cpp writes it; returns the dequantized weights it holds."""
    args = model.args
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(1024)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    add_tokenizer(writer, tokenizer_dir)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    held = {}
    for name, value in tree_flatten(model.parameters()):
        w = np.array(value, dtype=np.float32)
        target = gguf_name(name)
        stored = w
        if arch == "llama" and ".attn_q." in target:
            stored = llama_permute(w, args.num_attention_heads)
        elif arch == "llama" and ".attn_k." in target:
            stored = llama_permute(w, args.num_key_value_heads)
        qtype = next((t for key, t in types.items() if key in target), Q.F32) if w.ndim == 2 else Q.F32
        if qtype == Q.F32:
            writer.add_tensor(target, stored)
        elif qtype == Q.F16:
            writer.add_tensor(target, stored.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        roundtrip = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype) if qtype != Q.F32 else w
        held[name] = roundtrip.astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_converted_model_matches_the_dequantized_weights(arch, tokenizer_dir, tokenizer, tmp_path):
    source = make_model(arch, seed=41)
    held = write_gguf(tmp_path / "m.gguf", arch, source, tokenizer_dir)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "mlx", dtype="float32")
    model, converted_tok = load(str(out))
    direct = make_model(arch, seed=99)
    direct.load_weights([(k, mx.array(v)) for k, v in held.items()])
    ids = mx.array([[3, 50, 7, 199, 250, 11, 12]])
    assert mx.allclose(model(ids), direct(ids), atol=1e-4).item()
    # the quantized GGUF really was lossy: the original weights give other logits
    assert not mx.allclose(model(ids), source(ids), atol=1e-4).item()
    text = "def add(a, b):\n    return a + b  # The quick brown fox <|im_end|>"
    assert converted_tok.encode(text) == tokenizer.encode(text)
    assert converted_tok.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert "<|im_start|>" in converted_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "mlx"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(dtype, tokenizer_dir, tmp_path):
    source = make_model("qwen2", seed=42)
    held = write_gguf(tmp_path / "m.gguf", "qwen2", source, tokenizer_dir, types={})
    model, _ = load(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "mlx", dtype=dtype)))
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == getattr(mx, dtype)
    expected = mx.array(held["model.layers.0.mlp.up_proj.weight"]).astype(getattr(mx, dtype))
    assert mx.array_equal(weight, expected).item()


def test_quantize_option(tokenizer_dir, tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen2", make_model("qwen2", seed=43), tokenizer_dir)
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(tmp_path / "m.gguf"),
            "--out",
            str(tmp_path / "q"),
            "--quantize",
            "--q-bits",
            "8",
            "--q-group-size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 32
    model, _ = load(str(tmp_path / "q"))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 320)


def test_bad_files_get_clear_errors(tokenizer_dir, tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good, "qwen2", make_model("qwen2", seed=44), tokenizer_dir)
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    (tmp_path / "header.gguf").write_bytes(data[:100])
    mistral = tmp_path / "mistral.gguf"
    writer = gguf.GGUFWriter(str(mistral), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((320, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cases = {
        "cut.gguf": "is truncated",
        "magic.gguf": "is not a GGUF file (wrong magic)",
        "header.gguf": "truncated or corrupt",
        "mistral.gguf": "GGUF architecture 'gemma' is not supported: convert a llama, qwen2 or gemma3 model",
        "missing.gguf": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(VocabTrimError, match=message.replace("(", r"\(").replace(")", r"\)")):
            convert_gguf(tmp_path / name, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    done = subprocess.run(
        [sys.executable, "-m", "mlx_vocabtrim", "convert", str(tmp_path / "cut.gguf"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr and "is truncated" in done.stderr
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no partial output left behind"


def _demo_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(spec["module"].format(1)) for spec in PACKAGED.values())


@pytest.mark.skipif(not _demo_installed(), reason="the demo extra (packaged Qwen2.5-Coder GGUF parts) is not installed")
def test_real_packaged_drafter_converts_and_answers(tmp_path, monkeypatch):
    """The real Qwen2.5-Coder-0.5B from its packages: assembled, converted, cached, coherent."""
    from mlx_vocabtrim.models import load_model

    monkeypatch.setenv("MLX_VOCABTRIM_CACHE", os.environ.get("MLX_VOCABTRIM_TEST_CACHE", str(tmp_path)))
    model, tokenizer = load_model("qwen2.5-coder-0.5b")
    assert model.args.vocab_size == 151936 and not model.args.tie_word_embeddings
    assert tokenizer.encode("def fib(n):\n") == [750, 15801, 1445, 982]
    assert tokenizer.decode(tokenizer.encode("naïve café → ok")) == "naïve café → ok"
    from mlx_vocabtrim import generate

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function add(a, b) that returns a + b."}],
        add_generation_prompt=True,
    )
    text = generate(model, tokenizer, prompt, max_tokens=40)
    assert "def add(a, b)" in text


GEMMA3_NAMES = {
    **NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def test_a_gemma3_gguf_converts_to_the_same_model(tokenizer_dir, tokenizer, tmp_path):
    """Gemma 3 as llama.cpp writes it: norms stored as 1 + w, tied embedding, every sixth layer global,
    the window in the header. The converted model gives the source's logits (F32 tensors) past its window."""
    from mlx_lm.models import gemma3_text

    config = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "head_dim": 16,
        "num_key_value_heads": 2,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 6,
        "vocab_size": 320,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
    }
    mx.random.seed(44)
    source = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    source.tie_word_embeddings = True
    source.load_weights([(k, v + 0.1 * mx.random.normal(v.shape)) for k, v in tree_flatten(source.parameters())])
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    writer.add_block_count(6)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(16)
    writer.add_value_length(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(8)
    add_tokenizer(writer, tokenizer_dir)
    for name, value in tree_flatten(source.parameters()):
        if name == "lm_head.weight":
            continue  # tied
        rest = name if name in GEMMA3_NAMES else name.split(".", 3)[3]
        target = GEMMA3_NAMES[rest] if name in GEMMA3_NAMES else f"blk.{name.split('.')[2]}.{GEMMA3_NAMES[rest]}"
        w = np.array(value, dtype=np.float32)
        writer.add_tensor(target, w + 1 if target.endswith("norm.weight") else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model, _ = load(str(convert_gguf(tmp_path / "g.gguf", tmp_path / "mlx", dtype="float32")))
    written = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert written["model_type"] == "gemma3_text" and written["sliding_window_pattern"] == 6
    ids = mx.array([list(range(3, 23))])  # 20 tokens: past the window of 8
    assert mx.allclose(model(ids), source(ids), atol=1e-4).item()
