"""The per-request draft head (kept rows plus context rows) and prompt lookup's proposals."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import VOCAB, make_model
from mlx_lm.models.cache import make_prompt_cache

from mlx_vocabtrim.heads import DraftHead
from mlx_vocabtrim.lookup import PromptLookup
from mlx_vocabtrim.trim import trim_drafter, trimmed_copy


def test_lookup_copies_what_followed_the_latest_match():
    index = PromptLookup(2)
    index.extend([1, 2, 3, 4, 9, 1, 2, 5, 6, 7, 1, 2])
    assert index.propose(3) == [5, 6, 7], "the latest earlier occurrence of [1, 2] wins"
    index.extend([5])
    assert index.propose(2) == [6, 7]
    assert index.propose(0) == []
    index = PromptLookup(3)
    index.extend([1, 2, 3, 8, 2, 3])
    assert index.propose(4) == [], "only a suffix of 3 or more tokens counts"


def test_longer_matches_win_and_a_match_reaching_the_end_continues_periodically():
    index = PromptLookup(1)
    index.extend([7, 1, 2, 3, 9, 2, 3, 4, 1, 2, 3])
    assert index.propose(2) == [9, 2], "[1, 2, 3] matched before [2, 3]"
    index = PromptLookup(2)
    index.extend([5, 6, 5, 6, 5, 6])
    assert index.propose(5) == [5, 6, 5, 6, 5]


@pytest.mark.parametrize("tie", [False, True])
def test_context_rows_extend_the_kept_rows(tie):
    drafter = make_model("qwen2", seed=41, tie=tie)
    keep = list(range(0, VOCAB, 4))
    trimmed = trimmed_copy(drafter, keep)
    head = DraftHead(trimmed, context_head=True)
    assert head.remap.tolist() == keep and head.context_rows == 0
    head.add([4, 5, 6, 5, 8, 9999])
    assert head.context_rows == 2 and head.remap.tolist() == keep + [5, 6]
    tokens = mx.array([3, 5, 7], mx.uint32)
    logits = head(tokens, make_prompt_cache(trimmed))
    full = drafter(tokens[None])[0, -1]
    assert mx.allclose(logits, full[head.remap], atol=1e-4).item(), "each row scores its remapped id"
    assert DraftHead(trimmed, context_head=False).remap.tolist() == keep


def test_without_a_full_head_or_a_clean_split_there_are_no_context_rows():
    drafter = trim_drafter(make_model("qwen2", seed=42), list(range(50)))  # full head released
    head = DraftHead(drafter, context_head=True)
    head.add([100, 200])
    assert head.context_rows == 0 and head.remap.size == 50

    class Scaled(nn.Module):  # logits are not head(body(x)): the head cannot be split off
        def __init__(self, model):
            super().__init__()
            self.model, self.lm_head, self.args = model.model, model.lm_head, model.args

        def __call__(self, x, cache=None):
            return 2 * self.lm_head(self.model(x, cache=cache))

        @property
        def layers(self):
            return self.model.layers

    scaled = Scaled(make_model("qwen2", seed=43))
    head = DraftHead(scaled, context_head=True)
    assert head.split is None
    tokens = mx.array([3, 5], mx.uint32)
    assert mx.allclose(head(tokens, make_prompt_cache(scaled)), scaled(tokens[None])[0, -1]).item()
