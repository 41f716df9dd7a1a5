"""Lossless speculation on sliding-window and hybrid models: greedy output equals the target's own.

Tiny random models of mlx-lm's own classes (tests/archs.py): windows of 8 tokens crossed many
times by 40-token generations, recurrent layers beside attention, drafters of the same family
rejected at every position, prompt lookup, the context head, trimmed heads (tied and untied),
prefill in several passes, and a cache reused by a follow-up call.
"""

import mlx.core as mx
import pytest
from archs import HYBRID, NOISE, SLIDING, WINDOW, make_arch, noisy
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from mlx_vocabtrim import SpecStats, VocabTrimError, speculative_generate_step
from mlx_vocabtrim.trim import trimmed_copy

ARCHS = SLIDING + HYBRID
PROMPTS = [[5, 17, 33, 90, 200, 11, 5, 17, 33], list(range(60, 80))]  # a repeat for lookup; a prompt past the window
TOKENS = 40


def reference(model, prompt, max_tokens=TOKENS):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


def speculate(target, drafter, prompt, stats=None, **kwargs):
    steps = speculative_generate_step(prompt, target, drafter, max_tokens=TOKENS, stats=stats, **kwargs)
    return [t for t, _, _ in steps]


@pytest.fixture(scope="module", params=ARCHS)
def family(request):
    """(arch, target, a noisy drafter of the same family, the target's own greedy outputs)."""
    arch = request.param
    target = make_arch(arch, seed=1)
    drafter = noisy(target, arch, NOISE.get(arch, 0.005), seed=2)
    return arch, target, drafter, {tuple(p): reference(target, p) for p in PROMPTS}


def check(target, drafter, refs, **kwargs) -> SpecStats:
    total = SpecStats()
    for prompt, ref in refs.items():
        stats = SpecStats()
        assert speculate(target, drafter, list(prompt), stats=stats, **kwargs) == ref, kwargs
        total.draft_tokens += stats.draft_tokens
        total.accepted_tokens += stats.accepted_tokens
        total.target_calls += stats.target_calls
    return total


@pytest.mark.parametrize("gamma", [1, 4, 7])
def test_greedy_lossless_with_a_drafter_of_the_family(family, gamma):
    arch, target, drafter, refs = family
    stats = check(target, drafter, refs, num_draft_tokens=gamma, prefill_step_size=5)
    assert 0 < stats.accepted_tokens < stats.draft_tokens, "drafts are both accepted and rejected"


def test_greedy_lossless_with_lookup_threshold_and_trimmed_heads(family):
    arch, target, drafter, refs = family
    keep = list(range(0, 320, 2))  # half the rows: drafts outside them are never proposed
    trimmed = trimmed_copy(drafter, keep)
    check(target, trimmed, refs, num_draft_tokens=5, lookup_ngram=2, lookup_tokens=4)
    check(target, trimmed, refs, num_draft_tokens=6, draft_threshold=0.3, context_head=True)
    check(target, trimmed, refs, num_draft_tokens=8, lookup_ngram=1, lookup_tokens=8, adaptive=True)
    check(target, None, refs, lookup_ngram=1, lookup_tokens=6)  # the target alone with prompt lookup
    assert speculate(target, drafter, list(PROMPTS[0]), num_draft_tokens=3) == refs[tuple(PROMPTS[0])], (
        "the source drafter is untouched by its trimmed copy"
    )


def test_a_seed_gives_the_same_tokens_with_or_without_drafts(family):
    """Seeded sampling (the noise of (seed, position)): a speculative generation equals the target
    alone with that seed, token for token, across windows crossed and recurrent layers rolled back."""
    arch, target, _, _ = family
    drafter = noisy(target, arch, 0.05, seed=3)  # further off than the family's: rejected under sampling too
    sampling = dict(temp=1.0, top_p=0.95, seed=4)
    total = SpecStats()
    for prompt in PROMPTS:
        alone = speculate(target, None, prompt, **sampling)
        assert speculate(target, drafter, prompt, stats=total, num_draft_tokens=4, **sampling) == alone, arch
    assert 0 < total.accepted_tokens < total.draft_tokens, "drafts are both accepted and rejected"


def _ties(arch: str, tie: bool) -> bool:
    """Whether mlx-lm's class for `arch` builds a model with that tying (some are always tied or untied)."""
    model = make_arch(arch, seed=0, tie=tie)
    owner = model.get("language_model", model)
    untied = "lm_head" in owner and getattr(owner, "tie_word_embeddings", False) is not True
    return untied != tie


TIE_CASES = [(arch, tie) for arch in ARCHS for tie in (True, False) if _ties(arch, tie)]


@pytest.mark.parametrize(("arch", "tie"), TIE_CASES)
def test_trimmed_heads_tied_and_untied(arch, tie):
    target = make_arch(arch, seed=1, tie=tie)
    refs = {tuple(p): reference(target, p) for p in PROMPTS}
    drafter = noisy(target, arch, NOISE.get(arch, 0.005), seed=3, tie=tie)
    trimmed = trimmed_copy(drafter, list(range(320))[::-1])  # every row, reversed: index != id
    assert int(trimmed(mx.array([[1]])).shape[-1]) == 320
    stats = check(target, trimmed, refs, num_draft_tokens=4)
    plain = check(target, drafter, refs, num_draft_tokens=4)
    assert stats.accepted_tokens == plain.accepted_tokens > 0, "the remap gives the untrimmed drafter's drafts"


def test_every_architecture_has_a_tied_or_untied_case():
    assert {arch for arch, _ in TIE_CASES} == set(ARCHS)
    assert {tie for _, tie in TIE_CASES} == {True, False}


def ideal_counts(target_ref, drafter, prompt, gamma):
    """(drafts, accepted) of greedy speculation whose drafter decodes each round afresh from the whole
    context, without a cache to roll back: what exact drafter rollback must reproduce."""
    out, drafts, accepted = [], 0, 0
    while len(out) < len(target_ref):
        count = min(gamma, len(target_ref) - len(out) - 1)
        proposal = reference(drafter, list(prompt) + out, count) if count else []
        truth = target_ref[len(out) : len(out) + count]
        agree = next((i for i, (d, t) in enumerate(zip(proposal, truth, strict=True)) if d != t), count)
        drafts, accepted = drafts + count, accepted + agree
        out += target_ref[len(out) : len(out) + agree + 1]
    return drafts, accepted


@pytest.mark.parametrize("gamma", [3, 6])
def test_the_drafter_rolls_back_exactly(family, gamma):
    """Every round's drafts are the drafter's own greedy continuation of the context: counted
    against a drafter that starts afresh each round, rejected drafts (hence rollbacks) included."""
    arch, target, drafter, refs = family
    for prompt, ref in refs.items():
        stats = SpecStats()
        speculate(target, drafter, list(prompt), stats=stats, num_draft_tokens=gamma)
        drafts, accepted = ideal_counts(ref, drafter, prompt, gamma)
        assert (stats.draft_tokens, stats.accepted_tokens) == (drafts, accepted)
        assert accepted < drafts, "some drafts were rejected, so the drafter was rolled back"


def test_the_drafter_equal_to_the_target_accepts_everything(family):
    arch, target, _, refs = family
    stats = check(target, target, refs, num_draft_tokens=5)
    assert stats.accepted_tokens == stats.draft_tokens > 0, "a wrong rollback would make later drafts disagree"


def test_a_follow_up_reusing_the_cache(family):
    """A generator closed mid-round leaves both caches at what was emitted; a follow-up call on the
    same cache continues exactly like the target would."""
    arch, target, drafter, refs = family
    prompt = list(PROMPTS[1])
    ref = refs[tuple(prompt)]
    cache = make_prompt_cache(target) + make_prompt_cache(drafter)
    steps = speculative_generate_step(prompt, target, drafter, num_draft_tokens=4, prompt_cache=cache)
    out = [next(steps)[0] for _ in range(13)]
    steps.close()
    assert out == ref[:13]
    follow = speculative_generate_step(
        out[-1:],
        target,
        drafter,
        prompt_cache=cache,
        max_tokens=TOKENS - 13,
        num_draft_tokens=4,
        context=prompt + out[:-1],
    )
    assert [t for t, _, _ in follow] == ref[13:]


def test_mlx_lm_itself_loses_exactness_on_a_window_we_keep():
    """The case of the issue: gemma3_text with a window of 16, a noisy drafter and 4 drafts. mlx-lm's
    own speculative decoding differs from the target's greedy decoding; ours does not."""
    from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative

    differs = 0
    for seed in range(6):
        target = make_arch("gemma3_text", seed=seed, window=16)
        drafter = noisy(target, "gemma3_text", 0.01, seed=seed + 100, window=16)
        prompt = list(range(10, 30))
        ref = reference(target, prompt, 60)
        assert speculate_n(target, drafter, prompt, 60, 4) == ref, seed
        theirs = [
            t for t, _, _ in mlx_lm_speculative(mx.array(prompt), target, drafter, num_draft_tokens=4, max_tokens=60)
        ]
        differs += theirs != ref
    assert differs > 0, "mlx-lm's rotating-cache rollback is what this guards against"


def speculate_n(target, drafter, prompt, n, gamma):
    return [t for t, _, _ in speculative_generate_step(prompt, target, drafter, num_draft_tokens=gamma, max_tokens=n)]


def test_windows_really_rotate():
    target = make_arch("gemma3_text", seed=1)
    cache = make_prompt_cache(target)
    assert any(isinstance(c, RotatingKVCache) and c.max_size == WINDOW for c in cache)


def test_caches_that_cannot_roll_back_are_refused_up_front():
    from mlx_lm.models.cache import BatchKVCache

    target = make_arch("gemma3_text", seed=1)
    cache = make_prompt_cache(target)
    cache[0] = BatchKVCache([0])
    with pytest.raises(VocabTrimError, match="the target's BatchKVCache cannot be rolled back exactly"):
        next(speculative_generate_step([1, 2, 3], target, target, prompt_cache=cache + make_prompt_cache(target)))
    assert cache[1].offset == 0, "refused before any work"
