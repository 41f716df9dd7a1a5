"""VocabTrim: speculative decoding in MLX with a drafter whose LM head keeps only the tokens that matter.

Importing the package is light: its names load from their modules on first use.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "Setup": "resolve",
    "SpecStats": "speculative",
    "SpeculativeResponse": "speculative",
    "TrimmedDraft": "mlx_lm_draft",
    "VocabTrimError": "errors",
    "batch_generate": "batch",
    "check_pair": "models",
    "generate": "speculative",
    "head_rows": "trim",
    "load": "resolve",
    "load_draft": "trim",
    "load_model": "models",
    "load_pair": "resolve",
    "load_vocab": "vocab",
    "read_ranked_ids": "vocab",
    "save_trimmed": "trim",
    "save_vocab": "vocab",
    "select_keep_ids": "vocab",
    "speculative_generate_step": "speculative",
    "stream_generate": "speculative",
    "tokenizer_fingerprint": "vocab",
    "trim_drafter": "trim",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
