"""Speculative sampling emits exactly what mlx-lm samples, checked with tests that have power.

Reference: the distribution mlx-lm's own `make_sampler(temp, top_p)` draws from, i.e. the
logits it hands to `mx.random.categorical` (captured with compilation off), softmaxed. None of
our code computes it.

Tiny vocabularies (5 ids) keep the degrees of freedom low. Most generator tests use a *Markov
target*: a real mlx-lm model whose attention output projections are zero, so its next-token
distribution depends on the last token only and is known exactly for every context (one
batched forward pass over the 5 ids). Then every emitted token, not only the first of a fresh
generation, is a draw from the known row of the token before it: a 12-token generation gives
12 draws, from rounds of every kind (accepted drafts, residual draws, bonus tokens, copied
tokens, context rows, early stops). The drafters keep their attention (q depends on the whole
context). One test uses a full-attention target and enumerates the first two tokens' joint law.

Statistics: Pearson's chi-square of the draws counted per context row (cells expecting fewer
than 5 draws merged within their row) must stay below its 1 - 1e-6 quantile (Wilson-Hilferty):
a correct sampler fails about once in a million runs, and seeds are fixed, so runs repeat. A
draw the reference gives probability 0 (outside top-p) fails at once.

Power: a bias of total variation d has chi-square divergence >= 4 d^2 from the reference (the
least favourable bias reaches it), so N draws give a noncentrality >= 4 d^2 N. The Markov tests
have at most 5 x 4 = 20 degrees of freedom (threshold 66.1 at 1e-6) and N = 10,000 draws: a
5% TV bias in every row gives lambda >= 100, detected with probability 0.998 (noncentral
chi-square; 4%: 0.85; `test_the_bound_detects_a_five_percent_bias` checks it by simulation).
The Markov target ignores its KV cache, so cache handling is left to the greedy tests
(test_speculative.py), whose exact counters see a drafter or target cache rolled back wrongly.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model, noisy_copy
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

import mlx_vocabtrim.speculative as speculative
from mlx_vocabtrim import SpecStats, speculative_generate_step
from mlx_vocabtrim.heads import DraftHead
from mlx_vocabtrim.lookup import PromptLookup
from mlx_vocabtrim.speculative import sampling_logprobs, verify_sampled
from mlx_vocabtrim.trim import trimmed_copy

V = 5
SIZE = {"vocab": V, "hidden": 16, "layers": 1}
PROMPT = [0, 1, 2, 0, 1]  # ids {0, 1, 2}; its bigram (0, 1) repeats, so lookups fire from the first round
DRAWS = 10_000  # per Markov test: see the module docstring for the power
DRAWS_TWO = 4000  # fresh generations for the two-token test (its docstring gives the power)
Z_1E6 = 4.753  # standard normal quantile for 1 - 1e-6


def chi2_threshold(dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 1e-6."""
    return dof * (1 - 2 / (9 * dof) + Z_1E6 * math.sqrt(2 / (9 * dof))) ** 3


def mlx_lm_probs(logits: mx.array, temp: float, top_p: float) -> np.ndarray:
    """Rows of the distribution mlx-lm's `make_sampler(temp, top_p)` draws from after `logits`.

    generate_step hands the sampler log-probs; the logits the sampler passes to
    mx.random.categorical are captured (compilation off, so the Python call happens)."""
    logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
    captured = []
    draw = mx.random.categorical

    def capture(x, *args, **kwargs):
        captured.append(x)
        return draw(x, *args, **kwargs)

    mx.disable_compile()
    mx.random.categorical = capture
    try:
        make_sampler(temp=temp, top_p=top_p)(logprobs)
    finally:
        mx.random.categorical = draw
        mx.enable_compile()
    (scaled,) = captured
    p = np.array(mx.softmax(scaled.astype(mx.float32), axis=-1), dtype=np.float64)
    return p / p.sum(axis=-1, keepdims=True)


def chi2_rows(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of draws counted per context row.

    counts[a, b]: draws of b where the reference is probs[a]; cells expecting < 5 draws are
    merged within their row, cells of probability 0 left out (see `assert_rows_match`)."""
    stat, dof = 0.0, 0
    for observed, p in zip(counts, probs, strict=True):
        expected = observed.sum() * p
        big = expected >= 5
        small = ~big & (p > 0)
        obs = np.append(observed[big], observed[small].sum())
        exp = np.append(expected[big], expected[small].sum())
        keep = exp > 0
        stat += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        dof += max(int(keep.sum()) - 1, 0)
    return stat, dof


def assert_rows_match(counts: np.ndarray, probs: np.ndarray) -> None:
    impossible = int(counts[probs == 0].sum())
    assert impossible == 0, f"{impossible} draws of tokens the reference never samples (outside top-p)"
    stat, dof = chi2_rows(counts, probs)
    assert dof > 0
    assert stat < chi2_threshold(dof), f"chi2 {stat:.1f} over {dof} dof (threshold {chi2_threshold(dof):.1f})"


def markov_target(arch: str, seed: int):
    """A real mlx-lm model whose attention adds nothing (zero output projections): its logits
    after any context depend on the context's last token only."""
    model = make_model(arch, seed=seed, **SIZE)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
    mx.eval(model.parameters())
    return model


def markov_rows(target, temp: float, top_p: float) -> np.ndarray:
    """P[a, b]: mlx-lm's probability of b after any context ending in a."""
    return mlx_lm_probs(target(mx.arange(V)[:, None])[:, -1], temp, top_p)


def resized_copy(target, arch: str, rows: int, seed: int):
    """A noisy copy of `target` (attention back on) whose head scores `rows` ids: fewer than the
    target's, or more (a padded vocabulary: the extra rows are random)."""
    drafter = make_model(arch, seed=seed, **{**SIZE, "vocab": rows})
    mx.random.seed(seed)
    weights = []
    for name, w in tree_flatten(target.parameters()):
        if w.shape[0] == V and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            w = mx.concatenate([w, 0.5 * mx.random.normal((max(rows - V, 0), w.shape[1]))])[:rows]
        weights.append((name, w + 0.1 * mx.random.normal(w.shape)))
    drafter.load_weights(weights)
    mx.eval(drafter.parameters())
    return drafter


def make_drafter(kind: str | None, arch: str, target, seed: int):
    """The drafters of the Markov tests; all have attention (q depends on the whole context)."""
    if kind is None:
        return None
    if kind in ("padded", "smaller"):
        return resized_copy(target, arch, V + 2 if kind == "padded" else V - 2, seed)
    noisy = noisy_copy(target, arch, 0.1, seed=seed, **SIZE)
    # static rows {1, 3, 4} (in that order: index != id), or {4} plus the context's ids
    return trimmed_copy(noisy, [4, 1, 3] if kind == "trim" else [4])


class Spy:
    """Records each round's copied proposals (L<n>) and drafter steps (D), in order."""

    def __init__(self, monkeypatch):
        self.events: list[str] = []
        spy = self

        class Lookup(PromptLookup):
            def propose(self, limit):
                out = super().propose(limit)
                spy.events.append(f"L{len(out)}")
                return out

        class Head(DraftHead):
            def __call__(self, tokens, cache):
                spy.events.append("D")
                return super().__call__(tokens, cache)

        monkeypatch.setattr(speculative, "PromptLookup", Lookup)
        monkeypatch.setattr(speculative, "DraftHead", Head)

    def draft_lengths(self) -> set[int]:
        """The numbers of drafter steps rounds made."""
        return {r.count("D") for r in " ".join(self.events).replace(" D", "D").split()}

    def mixed_rounds(self) -> int:
        """Rounds that drafted after copying at least one token."""
        rounds = " ".join(self.events).replace(" D", "D").split()
        return sum(r.startswith("L") and r[1] != "0" and r.endswith("D") for r in rounds)


def sample_transitions(target, drafter, draws: int, seed: int, max_tokens: int = 12, **kwargs):
    """Counts of (previous token, token) over fresh generations of `max_tokens` after PROMPT,
    until `draws` tokens; and the summed counters."""
    counts = np.zeros((V, V), np.int64)
    track = bool(kwargs.get("draft_threshold"))
    total = SpecStats(confidences=[] if track else None)
    mx.random.seed(seed)
    coupled = kwargs.pop("coupled", False)  # each generation its own seed: the noise of (seed, position)
    generations = 0
    while counts.sum() < draws:
        stats = SpecStats(confidences=[] if track else None)
        previous = PROMPT[-1]
        if coupled:
            kwargs["seed"] = seed * 100_000 + generations
        generations += 1
        for token, _, _ in speculative_generate_step(
            PROMPT, target, drafter, max_tokens=max_tokens, stats=stats, **kwargs
        ):
            counts[previous, token] += 1
            previous = token
        for name in ("draft_tokens", "lookup_tokens", "accepted_tokens", "target_calls", "generated_tokens"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.context_rows = max(total.context_rows, stats.context_rows)
        if track:
            total.confidences += stats.confidences
    return counts, total


# ---------------------------------------------------------------- the distribution itself


@pytest.mark.parametrize("temp", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95, 1.0])
def test_sampling_logprobs_is_what_mlx_lm_samples(temp, top_p):
    """Our target/drafter distribution equals the one mlx-lm's make_sampler draws from: top-p on
    the raw log-probs, then temperature (the other order keeps a different nucleus)."""
    mx.random.seed(1)
    logits = 3 * mx.random.normal((64, V))
    ours = np.array(mx.exp(sampling_logprobs(logits, temp, top_p)), dtype=np.float64)
    theirs = mlx_lm_probs(logits, temp, top_p)
    assert np.array_equal(ours == 0, theirs == 0), "a different nucleus"
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_markov_target_forgets_all_but_the_last_token():
    """The premise of the Markov tests: the target's logits depend on the last token only."""
    target = markov_target("qwen2", seed=3)
    contexts = mx.array([[4, 0, 3, 1, 4, 2], [2, 2, 2, 2, 1, 2], [4, 4, 3, 2, 1, 0]])
    logits = target(contexts)[:, -1]
    rows = target(contexts[:, -1:])[:, -1]
    assert mx.allclose(logits, rows, atol=1e-5).item()


# ---------------------------------------------------------------- one round, on device


def test_verify_sampled_emits_p_from_a_trimmed_q():
    """verify_sampled alone, 200,000 independent one-draft rounds with q zero on half the ids:
    the emitted token (the draft if accepted, else the residual draw) ~ p; the acceptance rate is
    sum(min(p, q)), above mlx-lm's two-sample agreement sum(p * q)."""
    mx.random.seed(5)
    p_lp = sampling_logprobs(mx.array([2.0, 1.5, 1.0, 0.5, 0.0]), 1.0, 0.8)  # top-p keeps ids 0, 1, 2
    q = mx.softmax(mx.array([1.0, -math.inf, 2.0, -math.inf, 1.5]))
    n = 200_000
    drafted = mx.random.categorical(mx.broadcast_to(mx.log(q), (n, V)))
    accept, residual, _ = verify_sampled(mx.broadcast_to(p_lp, (n + 1, V)), drafted, mx.broadcast_to(q, (n, V)))
    emitted = np.where(np.array(accept), np.array(drafted), np.array(residual))
    p, q = np.array(mx.exp(p_lp), dtype=np.float64), np.array(q, dtype=np.float64)
    assert_rows_match(np.bincount(emitted, minlength=V)[None], p[None])
    rate = np.array(accept).mean()
    best = np.minimum(p, q).sum()
    assert abs(rate - best) < 5 * math.sqrt(best * (1 - best) / n)
    assert rate > (p * q).sum() + 0.1


def test_bonus_follows_the_last_draft():
    """The bonus token comes from the target's row after the last draft, not the one before."""
    gamma = 3
    rows = mx.where(mx.arange(V)[None] == mx.arange(gamma + 1)[:, None], 0.0, -math.inf)  # row j: all on id j
    drafted = mx.arange(gamma).astype(mx.uint32)
    q = mx.where(mx.arange(V)[None] == drafted[:, None], 1.0, 0.0)
    accept, _, bonus = verify_sampled(rows, drafted, q)
    assert np.array(accept).all() and bonus.item() == gamma


# ---------------------------------------------------------------- the generator, with power

CASES = {  # name: (arch, drafter kind, sampling and drafting options)
    "trim-t0.5-p0.8": ("llama", "trim", dict(temp=0.5, top_p=0.8, num_draft_tokens=3, context_head=False)),
    "ctx-t1": ("qwen2", "ctx", dict(temp=1.0, top_p=1.0, num_draft_tokens=3)),
    "smaller-t1-p0.8": ("llama", "smaller", dict(temp=1.0, top_p=0.8, num_draft_tokens=2)),
    "lookup-t1.5-p0.8": ("llama", None, dict(temp=1.5, top_p=0.8, lookup_ngram=1, lookup_tokens=3)),
    "lookup+padded-t1.5-adaptive": (
        "qwen2",
        "padded",
        dict(temp=1.5, top_p=1.0, num_draft_tokens=3, lookup_ngram=1, lookup_tokens=1, draft_threshold=0.3),
    ),
    "adaptive+lookup-t1": (
        "llama",
        "trim",
        dict(temp=1.0, top_p=1.0, num_draft_tokens=5, lookup_ngram=1, lookup_tokens=4, adaptive=True)
        | dict(context_head=False),
    ),
    "ctx+threshold-t1-adaptive": (
        "qwen2",
        "ctx",
        dict(temp=1.0, top_p=1.0, num_draft_tokens=4, draft_threshold=0.4, adaptive=True),
    ),
    "ctx+lookup-t0.5-p0.8": (
        "llama",
        "ctx",
        dict(temp=0.5, top_p=0.8, num_draft_tokens=5, lookup_ngram=2, lookup_tokens=4),
    ),
    "seeded-trim+lookup-t1-p0.8": (  # the noise of (seed, position), a seed per generation
        "llama",
        "trim",
        dict(temp=1.0, top_p=0.8, num_draft_tokens=3, lookup_ngram=1, lookup_tokens=2, coupled=True)
        | dict(context_head=False),
    ),
    "seeded-ctx+threshold-t1.5-adaptive": (
        "qwen2",
        "ctx",
        dict(temp=1.5, top_p=1.0, num_draft_tokens=4, draft_threshold=0.4, adaptive=True, coupled=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_token_follows_the_target(case, monkeypatch):
    """10,000 tokens of 12-token generations after PROMPT with a Markov target: every transition
    (last token -> token) follows mlx-lm's row for the last token. Each case exercises what it
    names, asserted on the counters: static rows whose index != id, context rows, an untrimmed
    head scoring fewer ids than the target or more (a padded vocabulary), copied tokens (also
    past the end of the context: periodic), rounds mixing copied and drafted tokens, early
    stops."""
    arch, kind, options = CASES[case]
    target = markov_target(arch, seed=7)
    drafter = make_drafter(kind, arch, target, seed=8)
    spy = Spy(monkeypatch)
    counts, stats = sample_transitions(target, drafter, DRAWS, seed=9, **options)
    assert_rows_match(counts, markov_rows(target, options["temp"], options["top_p"]))
    drafted = stats.draft_tokens - stats.lookup_tokens
    assert 0.1 < stats.acceptance_rate < 0.9, "drafts are accepted and rejected"
    assert (drafted > DRAWS // (4 if options.get("adaptive") else 2)) == (kind is not None)
    if options.get("adaptive"):  # rounds told apart by their lookups, else by their confidences
        lengths = spy.draft_lengths() if "lookup_ngram" in options else {len(c) for c in stats.confidences}
        assert len(lengths) >= 4, "lengths that follow the rounds"
    assert (stats.lookup_tokens > DRAWS // 4) == ("lookup_ngram" in options)
    assert (stats.context_rows > 0) == (kind == "ctx")
    if kind is not None and "lookup_ngram" in options:
        assert spy.mixed_rounds() > DRAWS // 20, "rounds that copy and draft"
    if "draft_threshold" in options:
        stops = sum(c[-1] < options["draft_threshold"] for c in stats.confidences if c)
        assert stops > DRAWS // 10, "rounds the threshold ended early"


SEEDED = {  # name: (drafter kind, options): every way a round can propose
    "full": ("full", dict(num_draft_tokens=3)),
    "trim+ctx+threshold": ("trim", dict(num_draft_tokens=5, draft_threshold=0.5)),
    "lookup alone": (None, dict(lookup_ngram=1, lookup_tokens=3, temp=0.1)),  # cooler: loops to copy
    "trim+lookup+adaptive": ("trim", dict(num_draft_tokens=6, lookup_ngram=2, lookup_tokens=4, adaptive=True)),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(SEEDED))
def test_a_seed_gives_the_same_tokens_with_or_without_drafts(arch, case):
    """With a seed, a speculative generation emits what the target alone emits with that seed, token
    for token (the noise of (seed, position), `noise`), with drafts accepted and rejected on the way;
    another seed gives another text. Full-attention models: the rounds roll both caches back."""
    kind, options = SEEDED[case]
    options = dict(options)
    target = make_model(arch, seed=61)
    drafter = None
    if kind is not None:
        close = noisy_copy(target, arch, 0.05, seed=62)
        drafter = close if kind == "full" else trimmed_copy(close, list(range(0, 256, 2)))
    prompt, sampling = [5, 17, 33, 90, 200, 11], dict(temp=1.0, top_p=0.9, max_tokens=40)
    sampling |= {k: options.pop(k) for k in ("temp",) if k in options}
    stats = SpecStats()
    for seed in (1, 2):
        alone = [t for t, _, _ in speculative_generate_step(prompt, target, None, seed=seed, **sampling)]
        ours = [
            t
            for t, _, _ in speculative_generate_step(
                prompt, target, drafter, seed=seed, stats=stats, **sampling | options
            )
        ]
        assert ours == alone, (case, seed)
    assert 0 < stats.accepted_tokens < stats.draft_tokens, "drafts accepted and rejected"
    other = [t for t, _, _ in speculative_generate_step(prompt, target, None, seed=3, **sampling)]
    assert other != alone


def test_first_two_tokens_with_attention(monkeypatch):
    """A full-attention target (every token depends on the whole context): the first two tokens
    of fresh generations follow the exact joint law p(t1) p(t2 | t1), enumerated by running the
    target on PROMPT and on PROMPT + [t1] for every t1. A copied token, drafts and context rows
    share the first round. With top-p 0.8 the joint law has 16 nonzero cells (15 dof, threshold
    57.4): 4,000 draws detect a 7% TV bias with probability 0.98 (5%: 0.40); the 5% power is
    the Markov tests' job, this one checks a context-dependent target end to end."""
    target = make_model("llama", seed=12, **SIZE)
    drafter = trimmed_copy(noisy_copy(target, "llama", 0.1, seed=13, **SIZE), [4])
    temp, top_p = 1.0, 0.8
    p1 = mlx_lm_probs(target(mx.array([PROMPT]))[0, -1], temp, top_p)
    p2 = mlx_lm_probs(target(mx.array([PROMPT + [t] for t in range(V)]))[:, -1], temp, top_p)
    joint = (p1[:, None] * p2).reshape(1, -1)
    spy = Spy(monkeypatch)
    counts = np.zeros(V * V, np.int64)
    mx.random.seed(14)
    for _ in range(DRAWS_TWO):
        steps = speculative_generate_step(
            PROMPT,
            target,
            drafter,
            max_tokens=4,
            temp=temp,
            top_p=top_p,
            num_draft_tokens=3,
            lookup_ngram=2,
            lookup_tokens=1,
        )
        first, second = next(steps)[0], next(steps)[0]
        steps.close()
        counts[first * V + second] += 1
    assert_rows_match(counts[None], joint)
    assert spy.mixed_rounds() >= DRAWS_TWO, "every first round copies a token and drafts two"


def test_the_bound_detects_a_five_percent_bias():
    """The power claimed above, by simulation: a sampler whose rows are each off by 5% TV in
    about the least favourable direction (+5% spread over the likelier half of a row, -5% over
    the rest, proportionally), counted over 10,000 transitions of a Markov test's real rows, fails
    the bound in >= 95% of 400 runs; the unbiased rows pass."""
    target = markov_target("llama", seed=7)
    p = markov_rows(target, 1.0, 1.0)
    visits = np.full(V, DRAWS // V)
    d = 0.05
    biased = np.zeros_like(p)
    for a, row in enumerate(p):
        order = np.argsort(row)
        likely = order[np.searchsorted(np.cumsum(row[order]), 0.5) :]
        up = np.isin(np.arange(V), likely)
        mass = row[up].sum()
        biased[a] = np.where(up, row * (1 + d / mass), row * (1 - d / (1 - mass)))
    assert np.allclose(0.5 * np.abs(biased - p).sum(axis=1), d)
    rng = np.random.default_rng(0)
    failures = 0
    for _ in range(400):
        counts = np.stack([rng.multinomial(n, row) for n, row in zip(visits, biased, strict=True)])
        stat, dof = chi2_rows(counts, p)
        failures += stat >= chi2_threshold(dof)
    assert failures >= 0.95 * 400
    counts = np.stack([rng.multinomial(n, row) for n, row in zip(visits, p, strict=True)])
    stat, dof = chi2_rows(counts, p)
    assert stat < chi2_threshold(dof)


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_5"])
def test_first_two_tokens_after_a_rollback(arch):
    """Sampling stays exact where a rejected draft must be undone in a sliding window (gemma3_text,
    a window of 4 behind a 9-token prompt) or in recurrent state (qwen3_5's linear attention). One
    draft a round: when the first draft is rejected, the second token is drawn after the caches
    were rolled back, so the joint law of the first two tokens, enumerated from fresh target passes
    (25 cells), sees a wrong rollback in every such run. Power as in the test above."""
    from archs import make_arch, noisy

    # one windowed or linear layer and one full-attention layer; unscaled embeddings make the next token
    # depend strongly on each context token (a stale window entry or a lost token moves p2 by ~20% TV)
    size = {"vocab": V, "window": 4, "layers": 2, "embed": 1}
    target = make_arch(arch, seed=21, **size)
    drafter = noisy(target, arch, 0.3, seed=22, **size)
    prompt = [0, 1, 2, 3, 4, 0, 2, 4, 1]
    temp, top_p = 1.0, 1.0
    p1 = mlx_lm_probs(target(mx.array([prompt]))[0, -1], temp, top_p)
    p2 = mlx_lm_probs(target(mx.array([prompt + [t] for t in range(V)]))[:, -1], temp, top_p)
    joint = (p1[:, None] * p2).reshape(1, -1)
    counts = np.zeros(V * V, np.int64)
    rejected = 0
    mx.random.seed(23)
    for _ in range(DRAWS_TWO):
        steps = speculative_generate_step(prompt, target, drafter, max_tokens=2, temp=temp, num_draft_tokens=1)
        (first, _, drafted), (second, _, _) = next(steps), next(steps)
        steps.close()
        counts[first * V + second] += 1
        rejected += not drafted
    assert_rows_match(counts[None], joint)
    assert rejected > DRAWS_TWO // 5, "the first draft is often rejected, so the second token follows a rollback"


# ---------------------------------------------------------------- each event type, at full power

EVENT_DRAWS = 20_000


def event_counts(p_logprobs: mx.array, drafted: mx.array, q: mx.array, draws: int) -> np.ndarray:
    """Counts of (first rejected position or gamma = all accepted, emitted token there) over `draws` rounds."""
    gamma, vocab = drafted.size, p_logprobs.shape[-1]
    counts = np.zeros((gamma + 1, vocab))
    for _ in range(draws):
        accept, residual, bonus = verify_sampled(p_logprobs, drafted, q)
        flags = accept.tolist()
        n = next((i for i, ok in enumerate(flags) if not ok), gamma)
        counts[n, (residual[n] if n < gamma else bonus).item()] += 1
    return counts


@pytest.mark.parametrize("kind", ["rejected copy", "bonus after two drafts"])
def test_each_event_of_a_round_draws_the_exact_law(kind):
    """The joint law of (where a round stops, the token it emits there) against the exact one, cell by
    cell: a bias in a single kind of event (the residual after a rejected copy, the bonus token), diluted
    in the generator-level tests, is seen here at full strength."""
    mx.random.seed(5)
    p = np.array([[0.1, 0.4, 0.2, 0.25, 0.05], [0.3, 0.1, 0.1, 0.4, 0.1], [0.05, 0.05, 0.6, 0.1, 0.2]])
    if kind == "rejected copy":  # one copied token: q one-hot on it; accepted with p(copy) = 0.4
        drafted, q = np.array([1]), np.eye(5)[[1]]
        p = p[:2]
    else:  # two drafts from a q unlike p, then the bonus from the third row
        drafted, q = np.array([3, 0]), np.array([[0.1, 0.1, 0.1, 0.6, 0.1], [0.5, 0.2, 0.1, 0.1, 0.1]])
    gamma = len(drafted)
    exact = np.zeros((gamma + 1, 5))
    reach = 1.0
    for j in range(gamma):
        x = drafted[j]
        accept = min(1.0, p[j, x] / q[j, x])
        residual = np.maximum(p[j] - q[j], 0)
        exact[j] = reach * (1 - accept) * residual / residual.sum() if residual.sum() else 0
        reach *= accept
    exact[gamma] = reach * p[gamma]
    counts = event_counts(
        mx.log(mx.array(p, mx.float32)), mx.array(drafted, mx.uint32), mx.array(q, mx.float32), EVENT_DRAWS
    )
    assert abs(exact.sum() - 1) < 1e-9
    assert int(counts[exact == 0].sum()) == 0, "draws of events the law never produces"
    expected = exact * EVENT_DRAWS
    cells = expected > 0
    stat = float((((counts - expected) ** 2)[cells] / expected[cells]).sum())
    assert stat < chi2_threshold(int(cells.sum()) - 1), (stat, counts, expected)
