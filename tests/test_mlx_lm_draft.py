"""The trimmed drafter inside mlx-lm's own stream_generate, unchanged."""

import mlx.core as mx
import pytest
from conftest import VOCAB, make_model, noisy_copy
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from mlx_vocabtrim import VocabTrimError, speculative_generate_step, trim_drafter
from mlx_vocabtrim.mlx_lm_draft import TrimmedDraft


@pytest.mark.parametrize("k", [VOCAB, 60, 1])
def test_mlx_lm_greedy_with_trimmed_drafter_equals_target(tokenizer, k):
    target = make_model("qwen2", seed=61)
    drafter = noisy_copy(target, "qwen2", 0.01, seed=62)
    prompt = [5, 17, 33, 90, 200, 11]
    reference = [t for t, _ in generate_step(mx.array(prompt), target, max_tokens=30)]
    keep = list(dict.fromkeys(reference))[: min(k, 30)] + [i for i in range(VOCAB) if i not in reference]
    trim_drafter(drafter, keep[:k])
    wrapped = TrimmedDraft(drafter, VOCAB)
    assert wrapped(mx.array([prompt])).shape == (1, len(prompt), VOCAB)
    ours = [t for t, _, _ in speculative_generate_step(prompt, target, drafter, max_tokens=30)]
    responses = list(
        mlx_lm_stream_generate(
            target, tokenizer, mx.array(prompt), max_tokens=31, draft_model=wrapped, num_draft_tokens=3
        )
    )
    theirs = [r.token for r in responses][:30]
    assert theirs == reference == ours
    if k == VOCAB:
        assert any(r.from_draft for r in responses)


def test_logits_processors_work_through_the_wrapper(tokenizer):
    """A repetition penalty gives the same text with the trimmed drafter as with the full one.

    (mlx-lm's speculative loop keeps its own penalty context, without the prompt, so its
    output under a penalty differs from its plain decoding whatever the drafter; we match
    mlx-lm's speculative output exactly.)
    """
    target = make_model("qwen2", seed=63)
    full = noisy_copy(target, "qwen2", 0.01, seed=64)
    drafter = trim_drafter(noisy_copy(target, "qwen2", 0.01, seed=64), list(range(0, VOCAB, 2)))
    prompt = mx.array([9, 8, 7])

    def tokens(draft_model):
        processors = make_logits_processors(repetition_penalty=1.3)
        responses = mlx_lm_stream_generate(
            target, tokenizer, prompt, max_tokens=21, draft_model=draft_model, logits_processors=processors
        )
        return [r.token for r in responses]

    with_full = tokens(full)
    assert tokens(TrimmedDraft(drafter, VOCAB)) == with_full
    assert with_full == tokens(target), "under mlx-lm's scheme any drafter gives the target's output"


def test_untrimmed_drafter_is_refused():
    with pytest.raises(VocabTrimError, match="needs a trimmed drafter"):
        TrimmedDraft(make_model("qwen2", seed=65), VOCAB)
