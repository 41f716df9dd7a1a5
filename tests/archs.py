"""Tiny random models of mlx-lm's sliding-window and hybrid architecture classes.

Each config keeps the architecture's cache layout (rotating windows beside full attention,
recurrent layers beside attention) at a size that runs in milliseconds; windows are a few
tokens, so a generation of 40 tokens crosses them many times.
"""

import importlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

VOCAB = 320
WINDOW = 8

_MAMBA = {"mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_n_groups": 1}
CONFIGS: dict[str, dict] = {
    "llama": {  # plain KVCache, for comparison
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
    },
    "gemma3_text": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "head_dim": 16,
        "num_key_value_heads": 2,
        "query_pre_attn_scalar": 16,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
    },
    "gemma4_text": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "head_dim": 16,
        "global_head_dim": 16,
        "num_key_value_heads": 2,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": VOCAB,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
        "use_double_wide_mlp": False,
    },
    "gpt_oss": {
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "hidden_size": 64,
        "intermediate_size": 64,
        "head_dim": 16,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "cohere2": {
        "hidden_size": 64,
        "head_dim": 16,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
    },
    "qwen3_5": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "head_dim": 16,
        "full_attention_interval": 2,
        "rope_parameters": {"type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.5},
    },
    "qwen3_next": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 64,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "rms_norm_eps": 1e-6,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 1024,
        "head_dim": 16,
        "full_attention_interval": 2,
    },
    "lfm2": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "intermediate_size": 128,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    },
    "nemotron_h": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 1024,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "mamba_proj_bias": False,
        "ssm_state_size": 8,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        "head_dim": 16,
        "hybrid_override_pattern": ["M", "*", "-", "M"],
    },
    "granitemoehybrid": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "max_position_embeddings": 1024,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "embedding_multiplier": 1.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "rms_norm_eps": 1e-5,
        "layer_types": ["mamba", "attention", "mamba"],
        "shared_intermediate_size": 128,
        "mamba_proj_bias": False,
        "mamba_conv_bias": True,
        **_MAMBA,
    },
    "falcon_h1": {
        "hidden_size": 64,
        "head_dim": 16,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "mamba_d_ssm": 32,
        "mamba_chunk_size": 16,
        **_MAMBA,
    },
    "mamba2": {
        "num_heads": 4,
        "head_dim": 16,
        "hidden_size": 32,
        "intermediate_size": 64,
        "state_size": 8,
        "num_hidden_layers": 2,
        "layer_norm_epsilon": 1e-5,
        "conv_kernel": 4,
        "n_groups": 1,
        "use_bias": False,
        "use_conv_bias": True,
        "tie_word_embeddings": True,
        "time_step_limit": [0.0, float("inf")],
        "time_step_rank": "auto",
    },
}
# (embedding, matrix) weight factors that make each class's random model write varied text, and the
# drafter noise at which about a third to two thirds of its drafts are accepted
SCALES = {
    "gemma4_text": (0.5, 1),
    "cohere2": (0.25, 1),
    "lfm2": (0.25, 1),
    "granitemoehybrid": (1, 1),
    "mamba2": (1, 1),
    "falcon_h1": (1, 2),
}
NOISE = {"gpt_oss": 0.01}
SLIDING = ("gemma3_text", "gemma4_text", "gpt_oss", "cohere2")
HYBRID = ("qwen3_5", "qwen3_next", "lfm2", "nemotron_h", "granitemoehybrid", "falcon_h1", "mamba2")


def arch_config(
    arch: str, tie: bool | None = None, window: int | None = None, vocab: int = VOCAB, layers: int | None = None
) -> dict:
    config = {"model_type": arch, **CONFIGS[arch], "vocab_size": vocab}
    if layers is not None:
        config["num_hidden_layers"] = layers
    if arch == "gemma4_text":
        config["vocab_size_per_layer_input"] = vocab
    if tie is not None:
        config["tie_word_embeddings"] = tie
    if window is not None:
        config["sliding_window"] = window
    return config


def make_arch(arch: str, seed: int = 0, embed: float | None = None, **kwargs) -> nn.Module:
    """A random model of mlx-lm's class for `arch` (`arch_config`'s options), its weights scaled by
    `SCALES` or `embed` (larger embeddings give peaked logits)."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(arch_config(arch, **kwargs)))
    factor, matrix = SCALES.get(arch, (4, 1))
    embed = factor if embed is None else embed
    weights = [
        (k, v * embed if "embed" in k else v * matrix if v.ndim == 2 else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.load_weights(weights)
    if kwargs.get("tie") and "tie_word_embeddings" in model.__dict__:
        model.tie_word_embeddings = True  # Gemma 3: what mlx-lm's sanitize sets for weights without lm_head
    mx.eval(model.parameters())
    return model


def noisy(model: nn.Module, arch: str, scale: float, seed: int, **kwargs) -> nn.Module:
    """A copy of `model` with Gaussian noise on every floating weight: a drafter of the same family
    (`kwargs` as `make_arch`'s; a tied copy of an untied model drops the head)."""
    copy = make_arch(arch, seed=seed, **kwargs)
    mx.random.seed(seed + 1000)
    weights = [
        (k, v + scale * mx.random.normal(v.shape).astype(v.dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in tree_flatten(model.parameters())
    ]
    names = dict(tree_flatten(copy.parameters()))
    copy.load_weights([(k, v) for k, v in weights if k in names], strict=False)
    mx.eval(copy.parameters())
    return copy
