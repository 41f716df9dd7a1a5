"""The drafter's scoring rows for one request.

A trimmed drafter scores its k kept rows. With the context head, the rows of every id in the
request (prompt and output so far) that the top-k lacks are gathered from the full head kept
in memory and scored by a second small matmul: tens to hundreds of rows that cover the
request's own rare words and identifiers.
"""

from collections.abc import Iterable
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn

from .trim import _output_head, full_head, slice_rows


def model_body(model: nn.Module) -> nn.Module | None:
    """The transformer without its LM head (mlx-lm's `model.model`), when the model has one."""
    body = getattr(model, "model", None)
    return body if isinstance(body, nn.Module) and "layers" in body and "embed_tokens" in body else None


def _split(drafter: nn.Module) -> SimpleNamespace | None:
    """The drafter's body and head when its logits are exactly head(body(x)), checked once per
    drafter (trim_drafter resets it): scoring only the last position, or adding context rows,
    needs the hidden state."""
    cached = getattr(drafter, "head_split", None)
    if cached is not None:
        return cached or None
    body = model_body(drafter)
    split = False
    if body is not None:
        head, tied = _output_head(drafter)
        head = head.as_linear if tied else head
        probe = mx.array([[0]], mx.uint32)
        if mx.allclose(drafter(probe), head(body(probe)), rtol=1e-5, atol=1e-5).item():
            split = SimpleNamespace(body=body, head=head)
    drafter.head_split = split
    return split or None


class DraftHead:
    """Scores the drafter's next token over its rows: index i stands for target id remap[i]
    (remap None: untrimmed, the index is the id). An untrimmed head with more rows than the
    target scores (a padded vocabulary) is cut to `vocab` rows: the target could neither
    embed nor emit the others."""

    def __init__(self, drafter: nn.Module, context_head: bool = True, vocab: int | None = None):
        self.drafter = drafter
        self.vocab = vocab
        self.split = _split(drafter)
        self.static = getattr(drafter, "vocab_remap", None)
        self.remap = self.static
        self.full = full_head(drafter) if context_head and self.static is not None and self.split else None
        self.kept = set(self.static.tolist()) if self.full is not None else set()
        self.extra_ids: list[int] = []
        self.extra: nn.Module | None = None

    @property
    def context_rows(self) -> int:
        """Rows added for the request's own ids so far."""
        return len(self.extra_ids)

    def add(self, ids: Iterable[int]) -> None:
        """Add the rows of `ids` the head lacks (a no-op without the context head)."""
        if self.full is None:
            return
        rows = self.full.weight.shape[0]
        new = [i for i in dict.fromkeys(ids) if i not in self.kept and 0 <= i < rows]
        if not new:
            return
        self.kept.update(new)
        self.extra_ids += new
        extra = mx.array(self.extra_ids, mx.int32)
        self.extra = slice_rows(self.full, extra)
        self.remap = mx.concatenate([self.static, extra])

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        """Logits over the head's rows after `tokens` (fed to the drafter's cache); only the
        last position is scored."""
        if not self.split:
            logits = self.drafter(tokens[None], cache=cache)[0, -1]
        else:
            hidden = self.split.body(tokens[None], cache=cache)[:, -1:]
            logits = self.split.head(hidden)[0, -1]
            if self.extra is not None:
                return mx.concatenate([logits, self.extra(hidden)[0, -1]])
        return logits[: self.vocab] if self.remap is None and self.vocab is not None else logits
