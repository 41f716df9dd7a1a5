"""Greedy speculative output equals plain mlx-lm target decoding, token for token."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import VOCAB, make_model, noisy_copy
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_vocabtrim import SpecStats, VocabTrimError, speculative_generate_step, stream_generate, trim_drafter
from mlx_vocabtrim.trim import trimmed_copy
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


def test_a_follow_up_with_context_catches_the_drafter_up(pair):
    """A generator closed after a fully accepted round leaves the drafter a token behind; a follow-up
    that names the cached tokens (`context`) feeds them to the drafter first, so both caches line up."""
    arch, target, refs = pair
    prompt, ref = next(iter(refs.items()))
    cache = make_prompt_cache(target) + make_prompt_cache(target)
    steps = speculative_generate_step(list(prompt), target, target, num_draft_tokens=3, prompt_cache=cache)
    out = [next(steps)[0] for _ in range(8)]  # two rounds of 3 accepted drafts + bonus: the drafter lags
    steps.close()
    n_layers = len(target.layers)
    assert cache[0].offset == len(prompt) + 7 > cache[n_layers].offset
    stats = SpecStats()
    follow = speculative_generate_step(
        out[-1:], target, target, prompt_cache=cache, max_tokens=8, stats=stats, context=list(prompt) + out[:-1]
    )
    assert [t for t, _, _ in follow] == reference(target, list(prompt) + out, 8)
    assert stats.accepted_tokens == stats.draft_tokens > 0, "the caught-up drafter agrees with the target"
    assert cache[0].offset - cache[n_layers].offset <= 1, "the earlier lag was made up (a new one is at most 1)"


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

    def lossless(**options) -> SpecStats:
        stats = SpecStats(confidences=[])
        for prompt, ref in refs.items():
            steps = speculative_generate_step(list(prompt), target, drafter, max_tokens=48, stats=stats, **options)
            assert [t for t, _, _ in steps] == ref, options
        return stats

    stats = lossless(num_draft_tokens=6, draft_threshold=threshold)
    lengths = [len(c) for c in stats.confidences]
    assert sum(lengths) == stats.draft_tokens and len(lengths) == stats.target_calls
    assert min(lengths) < 6 and max(lengths) > 1 and stats.draft_tokens < fixed.draft_tokens
    assert all(x >= threshold for c in stats.confidences for x in c[:-1]), "drafting went on below the threshold"
    assert any(c[-1] < threshold for c in stats.confidences)
    # adaptive: the same threshold on probabilities calibrated by the request's acceptance so far
    calibrated = lossless(num_draft_tokens=6, draft_threshold=threshold, adaptive=True)
    assert [len(c) for c in calibrated.confidences] != lengths, "the calibration moved no stop"


def test_draft_threshold_out_of_range(pair):
    _, target, _ = pair
    with pytest.raises(VocabTrimError, match="--draft-threshold 1.0 is out of range"):
        next(speculative_generate_step([1, 2], target, target, draft_threshold=1.0))


# ------------------------------------------------ context head and prompt lookup: lossless, with exact counters

FEATURE_PROMPTS = [
    [5, 17, 33, 90, 5, 17, 33, 91, 5, 17],  # a repeated trigram: lookups fire in the first round
    [7, 8, 7, 8, 7, 8, 7],  # periodic: copies run past the end of the context
    [5, 17, 33, 90, 200, 11],
    [300, 2, 2, 2, 9, 150, 151, 152, 40, 41, 42, 43],
    list(range(60, 90)),
]
FEATURE_TOKENS = 40


def lookup_proposals(history: list[int], ngram: int, limit: int) -> list[int]:
    """Prompt lookup as specified, restated independently of lookup.py: the longest suffix of
    max(4, n) down to n tokens that occurred before; the `limit` tokens that followed its latest
    earlier occurrence, continuing periodically past the end of the context."""
    end = len(history)
    for size in range(max(4, ngram), ngram - 1, -1):
        if end <= size:
            continue
        for start in range(end - size - 1, -1, -1):  # earlier occurrences, latest first
            if history[start : start + size] == history[end - size :]:
                follow = start + size
                return [history[follow + i % (end - follow)] for i in range(limit)]
    return []


def expected_counters(ref, prompt, gamma, rows=None, ngram=0, lookup_tokens=8, max_tokens=FEATURE_TOKENS):
    """SpecStats counters of a greedy run whose drafter is the target itself, scoring the ids
    `rows(context)` (None: no drafter): it drafts the target's next token while that id has a
    row, a wrong one from the first that has none; copied tokens are the lookup's proposals.
    Returns (draft_tokens, lookup_tokens, accepted_tokens, target_calls, mixed rounds)."""
    history, emitted = list(prompt), 0
    drafts = copied_total = accepted = calls = mixed = 0
    while emitted < max_tokens:
        budget = max_tokens - emitted - 1
        copied = lookup_proposals(history, ngram, min(lookup_tokens, budget)) if ngram else []
        count = 0 if rows is None else max(0, min(gamma, budget) - len(copied))
        future = ref[emitted:]
        n = 0
        while n < len(copied) and copied[n] == future[n]:
            n += 1
        if n == len(copied):
            scored = rows(history) if count else ()
            while n < len(copied) + count and future[n] in scored:
                n += 1
        tokens = future[: n + 1]
        drafts += len(copied) + count
        copied_total += len(copied)
        accepted += n
        calls += 1
        mixed += bool(copied) and count > 0
        history += tokens
        emitted += len(tokens)
    return drafts, copied_total, accepted, calls, mixed


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def feature_pair(request):
    """A target, its greedy outputs on FEATURE_PROMPTS, and static kept ids for a drafter that is
    the target itself: every id it emits except the prompts' ids and two it emits (those get
    rows only from the context head), plus ids it never emits, in an order where index != id."""
    arch = request.param
    target = make_model(arch, seed=11)
    refs = {tuple(p): reference(target, p, FEATURE_TOKENS) for p in FEATURE_PROMPTS}
    prompt_ids = {t for p in FEATURE_PROMPTS for t in p}
    emitted = list(dict.fromkeys(t for ref in refs.values() for t in ref))
    new = [t for t in emitted if t not in prompt_ids]
    filler = [i for i in range(VOCAB) if i not in emitted][:10]
    keep = sorted(new[2:] + filler, reverse=True)
    return arch, target, refs, keep


def target_copy(arch, keep=None):
    """A fresh drafter with the target's weights (the fixture's model is never modified),
    trimmed to `keep` with its full head kept for context rows (None: untrimmed)."""
    drafter = make_model(arch, seed=11)
    return drafter if keep is None else trimmed_copy(drafter, keep)


def test_trimmed_copy_of_the_target_accepts_every_draft(feature_pair):
    """A drafter equal to the target, trimmed to a set covering every id it emits (listed in an
    order where index != id), drafts exactly the target's tokens: every draft is accepted, so a
    draft not mapped back through the remap, or mapped wrongly, fails here (greedy output alone
    would not show it: verification repairs it)."""
    arch, target, refs, _ = feature_pair
    emitted = {t for ref in refs.values() for t in ref}
    keep = sorted(emitted | {0, 1, 2}, reverse=True)
    drafter = target_copy(arch, keep)
    stats = SpecStats()
    for prompt, ref in refs.items():
        steps = speculative_generate_step(
            list(prompt),
            target,
            drafter,
            num_draft_tokens=4,
            max_tokens=FEATURE_TOKENS,
            stats=stats,
            context_head=False,
        )
        assert [t for t, _, _ in steps] == ref
    # 40 tokens in rounds of 5: 8 rounds, 32 drafts, every one accepted
    assert stats.draft_tokens == stats.accepted_tokens == 32 * len(refs)
    assert stats.target_calls == 8 * len(refs)


FEATURES = {
    # name: (drafter kept ids? "keep" = the fixture's, "all" = untrimmed, None = no drafter; options)
    "static": ("keep", dict(context_head=False)),
    "ctx": ("keep", dict(context_head=True)),
    "lookup": (None, dict(lookup_ngram=2, lookup_tokens=4)),
    "lookup+drafter": ("all", dict(lookup_ngram=1, lookup_tokens=2)),
    "ctx+lookup": ("keep", dict(context_head=True, lookup_ngram=2, lookup_tokens=3)),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_are_lossless_with_exact_counters(feature_pair, feature):
    """Greedy output equals mlx-lm's generate_step on the target, and with the target itself as
    drafter every counter is determined: drafts are the target's tokens while they have rows
    (static kept ids, plus with the context head the ids of the prompt and output so far),
    copied tokens are the lookup's proposals. So a wrong remap (static or context rows), a
    drafter KV cache not rolled back to what was emitted (after rounds mixing copied and drafted
    tokens), or lookups proposing other tokens change the counters."""
    arch, target, refs, keep = feature_pair
    kind, options = FEATURES[feature]
    drafter = None if kind is None else target_copy(arch, keep if kind == "keep" else None)
    gamma = 4
    static = set(keep) if kind == "keep" else set(range(VOCAB))
    if kind is None:
        rows = None
    elif options.get("context_head"):
        rows = lambda history: static | set(history)  # noqa: E731
    else:
        rows = lambda history: static  # noqa: E731
    lookup = dict(ngram=options.get("lookup_ngram", 0), lookup_tokens=options.get("lookup_tokens", 8))
    totals = np.zeros(5, int)
    for prompt, ref in refs.items():
        stats = SpecStats()
        steps = speculative_generate_step(
            list(prompt), target, drafter, num_draft_tokens=gamma, max_tokens=FEATURE_TOKENS, stats=stats, **options
        )
        assert [t for t, _, _ in steps] == ref, f"prompt {list(prompt)}"
        want = expected_counters(ref, list(prompt), gamma, rows, **lookup)
        got = (stats.draft_tokens, stats.lookup_tokens, stats.accepted_tokens, stats.target_calls)
        assert got == want[:4], f"prompt {list(prompt)}: counters {got}, expected {want[:4]}"
        totals += want
    drafts, copied, accepted, calls, mixed = totals
    assert accepted > 0 and calls < FEATURE_TOKENS * len(refs)
    if kind == "keep":  # trimming costs drafts, and the context rows win some back

        def accepted_with(scored):
            return sum(expected_counters(r, list(p), gamma, scored, **lookup)[2] for p, r in refs.items())

        assert accepted < accepted_with(lambda history: set(range(VOCAB)))
        if options.get("context_head"):
            assert accepted > accepted_with(lambda history: static)
    if "lookup_ngram" in options:
        assert copied >= 10, "lookups fired"
        assert mixed > 0 or kind is None, "rounds mixed copied and drafted tokens"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_target_is_never_fed_an_id_it_cannot_embed(arch, temp):
    """An untrimmed drafter with a padded vocabulary (more head rows than the target's embedding
    table) drafts ids the target cannot emit. They are never accepted, and must not reach the
    target's forward pass either: an embedding lookup past the table reads undefined memory,
    often NaN, which poisons every row of that pass (greedy then emits 0s, sampling a biased law).
    Here the drafter is the target plus a doubled copy of its head: it always prefers an id
    past the target's table."""
    target = make_model(arch, seed=11)
    drafter = make_model(arch, seed=11, vocab=2 * VOCAB)
    head, embed = target.lm_head.weight, target.model.embed_tokens.weight
    drafter.load_weights(
        [(k, v) for k, v in tree_flatten(target.parameters()) if "lm_head" not in k and "embed_tokens" not in k]
        + [
            ("lm_head.weight", mx.concatenate([head, 2 * head])),
            ("model.embed_tokens.weight", mx.concatenate([embed] * 2)),
        ]
    )
    prompt = [5, 17, 33, 90, 200, 11]
    ref = reference(target, prompt, 16)
    fed: list[int] = []

    class Recording(nn.Embedding):  # the target's embedding, recording the ids it looks up
        def __call__(self, x):
            fed.extend(x.reshape(-1).tolist())
            return super().__call__(x)

    recording = Recording(*embed.shape)
    recording.weight = embed
    target.model.embed_tokens = recording
    mx.random.seed(3)
    out = [t for t, _, _ in speculative_generate_step(prompt, target, drafter, max_tokens=16, temp=temp)]
    assert max(fed) < VOCAB, f"the target was fed id {max(fed)} (its embedding table has {VOCAB} rows)"
    if temp == 0:
        assert out == ref
