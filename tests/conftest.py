"""Tiny real mlx-lm models (llama and qwen2, random weights, fixed seeds) and their tokenizer."""

import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2
from mlx_lm.tokenizer_utils import TokenizerWrapper

# Tests see neither the user's profiles and vocab files nor a system OpenBLAS (see blas.py): every
# process they start inherits these.
os.environ["MLX_VOCABTRIM_CACHE"] = tempfile.mkdtemp(prefix="mlx-vocabtrim-tests-")
os.environ["MLX_VOCABTRIM_OPENBLAS"] = "0"

VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())",
    "Speculative decoding lets a small drafter propose tokens for a big target.",
] * 20


def model_config(arch: str, vocab: int = VOCAB, tie: bool = False, hidden: int = 64, layers: int = 2) -> dict:
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
    }


def make_model(arch: str = "qwen2", seed: int = 0, **kwargs) -> nn.Module:
    """A small random model of mlx-lm's own class; larger embeddings give peaked logits."""
    module = {"qwen2": qwen2, "llama": llama}[arch]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(model_config(arch, **kwargs)))
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 4
    mx.eval(model.parameters())
    return model


def noisy_copy(model: nn.Module, arch: str, scale: float, seed: int, **kwargs) -> nn.Module:
    """A model like `model` with Gaussian noise on every weight: a drafter that agrees sometimes."""
    copy = make_model(arch, seed=seed, **kwargs)
    mx.random.seed(seed + 1000)
    weights = [(k, v + scale * mx.random.normal(v.shape)) for k, v in tree_flatten(model.parameters())]
    copy.load_weights(weights)
    mx.eval(copy.parameters())
    return copy


def build_tokenizer(out: Path, specials: list[str] = SPECIALS, text: list[str] = TEXT) -> None:
    """Train a byte-level BPE on fixed text and save it as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)


def save_model(model: nn.Module, config: dict, tokenizer_dir: Path, out: Path) -> Path:
    """Write an mlx-lm model directory (config, safetensors, tokenizer files)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return TokenizerWrapper(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Saved target (qwen2) and drafter (noisy copy) directories sharing one tokenizer."""
    root = tmp_path_factory.mktemp("models")
    target = make_model("qwen2", seed=1)
    drafter = noisy_copy(target, "qwen2", 0.02, seed=2)
    return {
        "target": save_model(target, model_config("qwen2"), tokenizer_dir, root / "target"),
        "drafter": save_model(drafter, model_config("qwen2"), tokenizer_dir, root / "drafter"),
    }
