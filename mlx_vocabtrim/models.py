"""Load models through mlx-lm and check that a target and a drafter can work together."""

from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm import load as mlx_lm_load

from .errors import VocabTrimError
from .trim import head_rows


def load_model(name: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local mlx-lm directory or a Hugging Face repo id."""
    path = Path(name).expanduser()
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise VocabTrimError(f"model {name} not found: give a local mlx-lm directory or a Hugging Face repo id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise VocabTrimError(f"{path} has no config.json: it is not an mlx-lm model directory")
    try:
        return mlx_lm_load(str(path) if path.exists() else name)
    except Exception as e:  # mlx-lm raises many types for missing, offline or corrupt models
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VocabTrimError(f"cannot load model {name} ({reason}): check the name, files and network") from e


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    return {i: token for token, i in tokenizer.get_vocab().items()}


def check_pair(
    target: nn.Module,
    target_tok: Any,
    drafter: nn.Module,
    draft_tok: Any,
    target_name: str = "target",
    draft_name: str = "drafter",
) -> None:
    """Raise a one-line error unless both tokenizers agree and the drafter covers the target's ids."""
    t_tokens, d_tokens = _id_to_token(target_tok), _id_to_token(draft_tok)
    for i in sorted(t_tokens.keys() & d_tokens.keys()):
        if t_tokens[i] != d_tokens[i]:
            raise VocabTrimError(
                f"{target_name} and {draft_name} use different tokenizers: id {i} is "
                f"{t_tokens[i]!r} in the target but {d_tokens[i]!r} in the drafter; "
                "pick a drafter from the target's model family"
            )
    t_eos, d_eos = sorted(target_tok.eos_token_ids), sorted(draft_tok.eos_token_ids)
    if t_eos != d_eos:
        raise VocabTrimError(
            f"{target_name} and {draft_name} stop on different EOS ids ({t_eos} vs {d_eos}): "
            "pick a drafter from the target's model family"
        )
    t_rows = head_rows(target)
    d_rows = head_rows(drafter)
    if d_rows < t_rows:
        raise VocabTrimError(
            f"{draft_name} covers ids below {d_rows} but {target_name} can emit ids up to {t_rows - 1} "
            f"(first uncovered id {d_rows}): pick a drafter with the target's full vocabulary"
        )


def load_pair(target: str, drafter: str) -> tuple[nn.Module, Any, nn.Module]:
    """(target model, tokenizer, drafter model), checked to share one tokenizer."""
    model, tokenizer = load_model(target)
    draft_model, draft_tokenizer = load_model(drafter)
    check_pair(model, tokenizer, draft_model, draft_tokenizer, target, drafter)
    return model, tokenizer, draft_model
