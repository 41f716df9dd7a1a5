"""A trimmed drafter that mlx-lm's own generators accept as `draft_model=` unchanged."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .errors import VocabTrimError


class TrimmedDraft(nn.Module):
    """Wraps a trimmed drafter so it returns full-vocabulary logits, -inf outside the kept ids.

    The head stays trimmed (k rows); only a scatter of k logits into a row of `vocab_size`
    is added, which mlx-lm's speculative loop needs to compare drafts with the target.
    """

    def __init__(self, draft_model: nn.Module, vocab_size: int):
        super().__init__()
        remap = getattr(draft_model, "vocab_remap", None)
        if remap is None:
            raise VocabTrimError("TrimmedDraft needs a trimmed drafter: call trim_drafter or load_draft first")
        if int(remap.max()) >= vocab_size:
            raise VocabTrimError(f"the drafter keeps id {int(remap.max())}, outside the target's {vocab_size} ids")
        self.draft = draft_model
        self.vocab_size = vocab_size

    @property
    def layers(self) -> list:
        return self.draft.layers

    def make_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.draft)

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        trimmed = self.draft(inputs, cache=cache, **kwargs)
        full = mx.full((*trimmed.shape[:-1], self.vocab_size), -mx.inf, dtype=trimmed.dtype)
        index = mx.broadcast_to(self.draft.vocab_remap, trimmed.shape)
        return mx.put_along_axis(full, index, trimmed, axis=-1)
