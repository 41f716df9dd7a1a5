"""GGUF (llama.cpp) -> mlx-lm directory: config, safetensors, tokenizer and chat template.

Tensors are dequantized with llama.cpp's `gguf` package (MLX's own reader cannot read
K-quants or Q5_0) and streamed into safetensors shards a block of rows at a time, so
peak memory stays near one block, not one model. Output goes to a temporary directory
that is renamed into place only when complete.
"""

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import VocabTrimError
from .files import partial_dir

ARCHITECTURES = ("llama", "qwen2", "gemma3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
DTYPES = {"float32": (mx.float32, "F32"), "float16": (mx.float16, "F16"), "bfloat16": (mx.bfloat16, "BF16")}
SHARD_BYTES = 2 << 30
BLOCK_ROWS = 4096
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUPS = (32, 64, 128)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3 norms one more per layer and name the pre-feed-forward norm `ffn_norm`
_GEMMA3_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_dtype() -> str:
    """float32 on a CPU (its fast path), float16 on a GPU."""
    return "float16" if mx.default_device() == mx.gpu else "float32"


def hf_name(name: str, arch: str = "llama") -> str | None:
    """The mlx-lm/Hugging Face name of a llama.cpp tensor of `arch`; None for ones to skip."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    names = _GEMMA3_NAMES if arch == "gemma3" else _LAYER_NAMES
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}"
    return None


def open_gguf(path: str | Path) -> Any:
    """A GGUFReader, with one-line errors for missing, truncated or corrupt files."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise VocabTrimError(f"GGUF file {path} does not exist: check the path")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise VocabTrimError(f"{path} is not a GGUF file (wrong magic): give a llama.cpp .gguf file")
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise VocabTrimError(f"GGUF file {path} is truncated or corrupt ({e}): download it again") from e
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise VocabTrimError(f"GGUF file {path} is truncated ({size} of {end} bytes): download it again")
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: Any) -> dict:
    """mlx-lm config.json for the GGUF's architecture (llama, qwen2 or gemma3)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise VocabTrimError(
            f"GGUF architecture {arch!r} is not supported: convert a {', '.join(ARCHITECTURES[:-1])} or "
            f"{ARCHITECTURES[-1]} model"
        )
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise VocabTrimError("GGUF file has no token_embd.weight tensor: it is not a complete model")
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    config = {
        "model_type": arch,
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 1e6 if arch == "qwen2" else 1e4),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 4096),
        "vocab_size": int(names["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in names,
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if head_dim and head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if "rope_freqs.weight" in names:
        config["rope_scaling"] = _llama3_rope_scaling(names["rope_freqs.weight"], config)
    if arch == "gemma3":
        config.update(_gemma3_config(reader, config, head_dim or hidden // heads))
    return config


def _gemma3_config(reader: Any, config: dict, head_dim: int) -> dict:
    """What mlx-lm's gemma3_text needs beyond llama's fields, as llama.cpp reads a Gemma 3 GGUF: every
    sixth layer global, local rope base 10,000, queries scaled by the head size (27B: hidden / heads)."""
    factor = _field(reader, "gemma3.rope.scaling.factor")
    scale = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 else head_dim
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "head_dim": head_dim,
        "sliding_window": _field(reader, "gemma3.attention.sliding_window", 512),
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scale,
        "rope_scaling": {"rope_type": "linear", "factor": float(factor)} if factor and factor != 1 else None,
    }


def _llama3_rope_scaling(tensor: Any, config: dict) -> dict:
    """Llama 3 rope scaling recovered from llama.cpp's rope_freqs factors (checked exactly)."""
    factors = np.asarray(tensor.data, dtype=np.float32)
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = config["rope_theta"] ** (np.arange(0, dims, 2) / dims)
    wavelen = 2 * np.pi * freqs
    low, high = 8192 / 1.0, 8192 / 4.0
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(
        wavelen > low, scaling["factor"], np.where(wavelen < high, 1.0, 1 / ((1 - smooth) / scaling["factor"] + smooth))
    )
    if not np.allclose(expected, factors, rtol=1e-3):
        raise VocabTrimError("GGUF rope_freqs are not Llama 3 scaling: this rope scaling is not supported")
    return scaling


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows for llama (rotary halves)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensor_blocks(tensor: Any, transform: Callable[[np.ndarray], np.ndarray] | None) -> Iterator[np.ndarray]:
    """Float32 rows of a GGUF tensor, BLOCK_ROWS at a time (the whole tensor if q/k needs unpermuting)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise VocabTrimError(
            f"tensor {tensor.name} has GGUF type {qtype.name}: supported types are {', '.join(SUPPORTED_TYPES)}"
        )
    data = tensor.data
    if transform is not None:
        yield transform(dequantize(np.asarray(data), qtype).astype(np.float32, copy=False))
        return
    rows = data.shape[0] if data.ndim > 1 else 1
    data = data if data.ndim > 1 else data.reshape(1, -1)
    for start in range(0, rows, BLOCK_ROWS):
        yield dequantize(np.asarray(data[start : start + BLOCK_ROWS]), qtype).astype(np.float32, copy=False)


def _to_bytes(block: np.ndarray, dtype: mx.Dtype) -> bytes:
    if dtype == mx.float32:
        return block.tobytes()
    if dtype == mx.float16:
        return block.astype(np.float16).tobytes()
    return np.array(mx.array(block).astype(mx.bfloat16).view(mx.uint16)).tobytes()


def _plan(reader: Any, config: dict) -> list[tuple[str, Any, list[int], Callable | None]]:
    """(output name, GGUF tensor, shape, row transform) for every tensor mlx-lm needs."""
    plan, arch = [], _field(reader, "general.architecture")
    for tensor in reader.tensors:
        name = hf_name(tensor.name, arch)
        if name is None:
            if tensor.name != "rope_freqs.weight":
                raise VocabTrimError(f"GGUF tensor {tensor.name} is not a {config['model_type']} weight")
            continue
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        transform = None
        if arch == "llama" and ".self_attn.q_proj." in name:
            transform = lambda a: _unpermute(a, config["num_attention_heads"])  # noqa: E731
        elif arch == "llama" and ".self_attn.k_proj." in name:
            transform = lambda a: _unpermute(a, config["num_key_value_heads"])  # noqa: E731
        elif arch == "gemma3" and name.endswith("norm.weight"):
            transform = lambda a: a - 1.0  # noqa: E731  llama.cpp stores Gemma's 1 + w
        plan.append((name, tensor, shape, transform))
    return plan


def _write_shards(plan: list, out: Path, dtype_name: str, progress: Callable[[int], None]) -> None:
    """Stream tensors into safetensors shards of at most SHARD_BYTES, plus the index file."""
    dtype, st_dtype = DTYPES[dtype_name]
    itemsize = dtype.size
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = int(np.prod(entry[2])) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for name, _, shape, _ in shard:
            nbytes = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = filename
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / filename, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _, tensor, _, transform in shard:
                for block in _tensor_blocks(tensor, transform):
                    f.write(_to_bytes(block, dtype))
                progress(tensor.n_bytes)
    index = {
        "metadata": {"total_size": sum(int(np.prod(s)) * itemsize for _, _, s, _ in plan)},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(reader: Any, arch: str, out: Path) -> None:
    """Hugging Face tokenizer files rebuilt from the GGUF tables, checked id by id."""
    from tokenizers import normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    keys = {
        "model": "tokenizer_type",
        "pre": "pre_tokenizer_type",
        "tokens": "tokens",
        "scores": "scores",
        "token_type": "token_type",
        "merges": "merges",
        "add_space_prefix": "add_prefix_space",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "padding_token_id": "pad_token_id",
        "unknown_token_id": "unk_token_id",
    }
    table = {name: _field(reader, f"tokenizer.ggml.{key}") for key, name in keys.items()}
    table = {k: v for k, v in table.items() if v is not None}
    if "tokens" not in table:
        raise VocabTrimError("GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer to convert")
    try:
        backend, _ = convert_gguf_tokenizer(arch, table)
    except ValueError as e:
        raise VocabTrimError(f"cannot rebuild the GGUF tokenizer ({e})") from e
    if arch == "qwen2" and backend.normalizer is None:
        backend.normalizer = normalizers.NFC()  # as Qwen2's reference tokenizer.json
    tokens = table["tokens"]
    # SentencePiece vocabularies spell spaces "▁"; llama.cpp writes Gemma's whitespace-run tokens with spaces
    spelled = (lambda t: t.replace(" ", "\u2581")) if table.get("tokenizer_type") == "llama" else (lambda t: t)
    mismatch = next((i for i, t in enumerate(tokens) if backend.id_to_token(i) != spelled(t)), None)
    if mismatch is not None or backend.get_vocab_size() != len(tokens):
        raise VocabTrimError(f"converted tokenizer differs from the GGUF table at id {mismatch}: file is not supported")
    tokens_of = {k: tokens[table[f"{k}_id"]] for k in ("eos_token", "pad_token", "unk_token") if f"{k}_id" in table}
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and "bos_token_id" in table:
        bos = tokens_of["bos_token"] = tokens[table["bos_token_id"]]
        if backend.encode("a").ids[:1] != [table["bos_token_id"]]:  # encoding adds it, as llama.cpp does
            pair = f"{bos} $A {bos} $B"
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=pair, special_tokens=[(bos, table["bos_token_id"])]
            )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens_of)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)


def convert_gguf(
    gguf_path: str | Path,
    out: str | Path,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> Path:
    """Convert a GGUF file into an mlx-lm directory at `out`; returns `out`.

    progress(done_bytes, total_bytes) is called once the file is checked, then after every
    tensor. An existing `out` is refused unless `force`, and then replaced only once the new
    directory is complete.
    """
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise VocabTrimError(f"--dtype {dtype} is not supported: use one of {', '.join(DTYPES)}")
    if quantize and (q_bits not in QUANT_BITS or q_group_size not in QUANT_GROUPS):
        raise VocabTrimError(
            f"--q-bits {q_bits} --q-group-size {q_group_size} is not supported: bits are one of "
            f"{QUANT_BITS}, group sizes one of {QUANT_GROUPS}"
        )
    out = Path(out)
    if out.exists() and not force:
        raise VocabTrimError(f"{out} already exists: pass --force to replace it, or pick another --out")
    reader = open_gguf(gguf_path)
    config = read_config(reader)
    plan = _plan(reader, config)
    total, done = sum(t.n_bytes for _, t, _, _ in plan), 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress:
            progress(done, total)

    advance(0)  # the file is checked: writing starts
    with partial_dir(out, force=force) as tmp:
        float_dir = tmp / "float" if quantize else tmp
        float_dir.mkdir(exist_ok=True)
        config["torch_dtype"] = dtype
        (float_dir / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(reader, _field(reader, "general.architecture"), float_dir)
        _write_shards(plan, float_dir, dtype, advance)
        if quantize:
            from mlx_lm import convert as mlx_lm_convert

            quantized = tmp / "quantized"
            mlx_lm_convert(
                str(float_dir), mlx_path=str(quantized), quantize=True, q_bits=q_bits, q_group_size=q_group_size
            )
            shutil.rmtree(float_dir)
            for item in quantized.iterdir():
                os.replace(item, tmp / item.name)
            quantized.rmdir()
    return out
