"""Greedy speculative output equals plain mlx-lm target decoding, token for token."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import VOCAB, make_model, noisy_copy
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_vocabtrim import SpecStats, VocabTrimError, speculative_generate_step, stream_generate, trim_drafter
from mlx_vocabtrim.vocab import select_keep_ids

PROMPTS = [[5, 17, 33, 90, 200, 11], [7], [300, 2, 2, 2, 9, 150, 151, 152, 40, 41, 42, 43], list(range(60, 90))]


def reference(model, prompt, max_tokens):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


def speculate(model, drafter, prompt, max_tokens, gamma, stats=None):
    steps = speculative_generate_step(
        prompt, model, drafter, num_draft_tokens=gamma, max_tokens=max_tokens, stats=stats
    )
    return [t for t, _, _ in steps]


def ranked_by_target(model, prompts, max_tokens=40):
    """Ids ranked by how often the target emits them on `prompts` (a tiny calibration)."""
    counts = [0] * VOCAB
    for p in prompts:
        for t in reference(model, p, max_tokens):
            counts[t] += 1
    return sorted(range(VOCAB), key=lambda i: (-counts[i], i))


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request):
    arch = request.param
    target = make_model(arch, seed=11)
    return arch, target, {p: reference(target, p, 48) for p in map(tuple, PROMPTS)}


DRAFTERS = {
    "noisy": lambda arch, t: noisy_copy(t, arch, 0.01, seed=3),
    "unrelated": lambda arch, t: make_model("llama" if arch == "qwen2" else "qwen2", seed=4),
    "tied": lambda arch, t: make_model(arch, seed=5, tie=True, hidden=32),
}


@pytest.mark.parametrize("drafter_kind", list(DRAFTERS))
@pytest.mark.parametrize("k", [VOCAB, 64, 1])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_lossless(pair, drafter_kind, k, gamma):
    arch, target, refs = pair
    drafter = DRAFTERS[drafter_kind](arch, target)
    if k < VOCAB:
        trim_drafter(drafter, select_keep_ids(ranked_by_target(target, PROMPTS[:2]), k, VOCAB))
    stats = SpecStats()
    for prompt, ref in refs.items():
        assert speculate(target, drafter, list(prompt), 48, gamma, stats) == ref
    assert stats.generated_tokens == 48 * len(refs)
    assert stats.draft_tokens > 0
    if drafter_kind == "noisy" and k == VOCAB:
        assert stats.accepted_tokens > stats.draft_tokens // 4


def test_drafter_equal_to_target_accepts_everything(pair):
    arch, target, refs = pair
    stats = SpecStats()
    for prompt, ref in refs.items():
        assert speculate(target, target, list(prompt), 48, 4, stats) == ref
    assert stats.accepted_tokens == stats.draft_tokens > 0
    # every round emits gamma + 1 tokens except where max_tokens cuts the last one short
    assert stats.target_calls == len(refs) * 10


def test_drafter_that_never_agrees(pair):
    arch, target, refs = pair
    emitted = {t for ref in refs.values() for t in ref}
    never = next(i for i in range(VOCAB) if i not in emitted)
    drafter = trim_drafter(make_model(arch, seed=6), [never])
    stats = SpecStats()
    for prompt, ref in refs.items():
        assert speculate(target, drafter, list(prompt), 48, 3, stats) == ref
    assert stats.accepted_tokens == 0 and stats.draft_tokens > 0
    assert stats.target_calls == stats.generated_tokens


def test_no_drafter_is_plain_decoding(pair):
    _, target, refs = pair
    stats = SpecStats()
    for prompt, ref in refs.items():
        assert speculate(target, None, list(prompt), 48, 3, stats) == ref
    assert stats.draft_tokens == 0 and stats.target_calls == stats.generated_tokens


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 9])
def test_max_tokens_boundary(pair, max_tokens):
    _, target, refs = pair
    prompt, ref = next(iter(refs.items()))
    for drafter in (target, noisy_copy(target, pair[0], 0.01, seed=3)):
        out = speculate(target, drafter, list(prompt), max_tokens, 3)
        assert out == ref[:max_tokens]


def test_eos_inside_a_draft_block_stops_there(pair, tokenizer):
    _, target, refs = pair
    prompt, ref = next(iter(refs.items()))
    eos = ref[6]
    stop_at = ref.index(eos)
    wrapped = TokenizerWrapper(tokenizer._tokenizer, eos_token_ids=[eos])
    responses = list(stream_generate(target, wrapped, list(prompt), target, max_tokens=40, num_draft_tokens=4))
    assert [r.token for r in responses] == ref[: stop_at + 1]
    assert responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])
    # drafter == target: the EOS came from inside an accepted draft block
    assert responses[-1].from_draft


def test_caches_hold_exactly_what_was_emitted(pair):
    arch, target, refs = pair
    drafter = noisy_copy(target, arch, 0.01, seed=3)
    prompt, ref = next(iter(refs.items()))
    cache = make_prompt_cache(target) + make_prompt_cache(drafter)
    steps = speculative_generate_step(list(prompt), target, drafter, num_draft_tokens=3, prompt_cache=cache)
    out = [next(steps)[0] for _ in range(7)]
    steps.close()
    assert out == ref[:7]
    n_layers = len(target.layers)
    # the target holds the prompt and all emitted tokens but the last (not yet fed)
    assert cache[0].offset == len(prompt) + 6
    assert cache[n_layers].offset <= len(prompt) + 6
    # a follow-up turn reusing the cache continues exactly like the target would
    full = list(prompt) + out
    follow = [t for t, _, _ in speculative_generate_step(out[-1:], target, drafter, prompt_cache=cache, max_tokens=12)]
    assert follow == reference(target, full, 12)


def test_responses_carry_mlx_lm_fields_and_stats(pair, tokenizer):
    _, target, refs = pair
    prompt, ref = next(iter(refs.items()))
    responses = list(stream_generate(target, tokenizer, list(prompt), target, max_tokens=20))
    last = responses[-1]
    assert [r.token for r in responses] == ref[:20]
    assert last.finish_reason == "length" and last.generation_tokens == 20
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory >= 0
    assert last.draft_tokens > 0 and last.accepted_tokens == last.draft_tokens
    assert last.target_calls < 20


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_prefill_skips_the_lm_head(arch):
    """The prompt only fills the KV caches: the head scores one row per model, not the prompt."""
    target, drafter = make_model(arch, seed=71), make_model(arch, seed=72)
    rows = []

    def counting(head):
        def call(x):
            rows.append(x.shape[1])
            return head(x)

        return call

    for m in (target, drafter):
        m.lm_head = counting(m.lm_head)
    prompt = list(range(3, 43))
    out = [t for t, _, _ in speculative_generate_step(prompt, target, drafter, num_draft_tokens=1, max_tokens=1)]
    assert out == reference(make_model(arch, seed=71), prompt, 1)
    assert rows and max(rows) == 1, f"the head scored {rows} positions at once"


@pytest.mark.parametrize("drafter_kind", ["noisy", "unrelated"])
@pytest.mark.parametrize("k", [VOCAB, 64])
def test_adaptive_drafting_is_lossless_and_stops_where_unsure(pair, drafter_kind, k):
    """draft_threshold: rounds end at the first draft whose running confidence is below it."""
    arch, target, refs = pair
    drafter = DRAFTERS[drafter_kind](arch, target)
    if k < VOCAB:
        trim_drafter(drafter, select_keep_ids(ranked_by_target(target, PROMPTS[:2]), k, VOCAB))
    fixed = SpecStats(confidences=[])
    for prompt, ref in refs.items():
        assert speculate(target, drafter, list(prompt), 48, 6, fixed) == ref
    assert sum(len(c) for c in fixed.confidences) == fixed.draft_tokens
    assert all(a >= b for c in fixed.confidences for a, b in zip(c, c[1:], strict=False)), "running products"
    # a threshold in the middle of the confidences seen: some rounds stop early, some run on
    threshold = float(np.median([c for round_ in fixed.confidences for c in round_]))
    stats = SpecStats(confidences=[])
    for prompt, ref in refs.items():
        steps = speculative_generate_step(
            list(prompt), target, drafter, num_draft_tokens=6, max_tokens=48, stats=stats, draft_threshold=threshold
        )
        assert [t for t, _, _ in steps] == ref
    lengths = [len(c) for c in stats.confidences]
    assert sum(lengths) == stats.draft_tokens and len(lengths) == stats.target_calls
    assert min(lengths) < 6 and max(lengths) > 1 and stats.draft_tokens < fixed.draft_tokens
    assert all(x >= threshold for c in stats.confidences for x in c[:-1]), "drafting went on below the threshold"
    assert any(c[-1] < threshold for c in stats.confidences)


def test_draft_threshold_out_of_range(pair):
    _, target, _ = pair
    with pytest.raises(VocabTrimError, match="--draft-threshold 1.0 is out of range"):
        next(speculative_generate_step([1, 2], target, target, draft_threshold=1.0))
