"""VocabTrim: speculative decoding in MLX with a drafter whose LM head keeps only the tokens that matter."""

__version__ = "0.1.0"

from . import generate as _generate_command  # noqa: F401  (bind the submodule first, like mlx_lm)
from .errors import VocabTrimError
from .mlx_lm_draft import TrimmedDraft
from .models import check_pair, load_model, load_pair
from .speculative import SpecStats, SpeculativeResponse, generate, speculative_generate_step, stream_generate
from .trim import head_rows, load_draft, save_trimmed, trim_drafter
from .vocab import load_vocab, read_ranked_ids, save_vocab, select_keep_ids, tokenizer_fingerprint

__all__ = [
    "SpecStats",
    "SpeculativeResponse",
    "TrimmedDraft",
    "VocabTrimError",
    "check_pair",
    "generate",
    "head_rows",
    "load_draft",
    "load_model",
    "load_pair",
    "load_vocab",
    "read_ranked_ids",
    "save_trimmed",
    "save_vocab",
    "select_keep_ids",
    "speculative_generate_step",
    "stream_generate",
    "tokenizer_fingerprint",
    "trim_drafter",
]
