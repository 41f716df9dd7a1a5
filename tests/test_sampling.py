"""Speculative sampling keeps the target's distribution and accepts at least as often as mlx-lm.

Statistical bound: Pearson's chi-square over the tokens (bins with expected count < 5
merged) must stay below its 1 - 1e-6 quantile (Wilson-Hilferty), so a correct sampler
fails about once in a million runs while a biased one (e.g. emitting q's draws
unchecked) fails every time at these sample sizes; seeds are fixed, so runs repeat.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import VOCAB, make_model, noisy_copy

from mlx_vocabtrim import SpecStats, speculative_generate_step, trim_drafter
from mlx_vocabtrim.speculative import sampling_logprobs, verify_sampled

Z_1E6 = 4.753  # standard normal quantile for 1 - 1e-6


def chi2_threshold(dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 1e-6."""
    return dof * (1 - 2 / (9 * dof) + Z_1E6 * math.sqrt(2 / (9 * dof))) ** 3


def chi2_statistic(samples: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    n = len(samples)
    observed = np.bincount(samples, minlength=len(p)).astype(float)
    expected = p * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def assert_matches(samples: np.ndarray, p: np.ndarray) -> None:
    stat, dof = chi2_statistic(samples, p)
    assert stat < chi2_threshold(dof), f"chi2 {stat:.1f} over {dof} dof"


@pytest.fixture(scope="module")
def logits():
    target = make_model("qwen2", seed=31)
    drafter = noisy_copy(target, "qwen2", 0.05, seed=32)
    context = mx.array([[10, 20, 30, 40, 50]])
    return target, drafter, target(context)[0, -1], drafter(context)[0, -1]


@pytest.mark.parametrize("temp, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_one_step_matches_target(logits, temp, top_p):
    """Many independent one-token rounds with a trimmed q: emitted ~ p."""
    _, _, t_logits, d_logits = logits
    p_lp = sampling_logprobs(t_logits, temp, top_p)
    p = np.array(mx.exp(p_lp))
    keep = mx.array(np.argsort(-p)[: VOCAB // 4].astype(np.int32))  # q is zero on 3/4 of the ids
    q_lp = sampling_logprobs(d_logits[keep], temp, top_p)
    n = 40_000
    mx.random.seed(7)
    indices = mx.random.categorical(mx.broadcast_to(q_lp, (n, keep.size)))
    drafted = keep[indices]
    p_rows = mx.broadcast_to(p_lp, (n + 1, VOCAB))
    accept, residual, _ = verify_sampled(p_rows, drafted, indices, mx.broadcast_to(mx.exp(q_lp), (n, keep.size)), keep)
    emitted = np.where(np.array(accept), np.array(drafted), np.array(residual))
    assert_matches(emitted, p)
    q_full = np.zeros(VOCAB)
    q_full[np.array(keep)] = np.array(mx.exp(q_lp))
    rate = np.array(accept).mean()
    # acceptance is sum(min(p, q)), never below mlx-lm's two-sample agreement sum(p * q)
    best = np.minimum(p, q_full).sum()
    assert abs(rate - best) < 5 * math.sqrt(best * (1 - best) / n)
    assert rate > (p * q_full).sum()


def test_generator_first_token_matches_target(logits):
    """End to end: the first emitted token (a judged draft) follows the target's softmax."""
    target, drafter, t_logits, _ = logits
    p = np.array(mx.exp(sampling_logprobs(t_logits, 1.0, 1.0)))
    keep = np.argsort(-p)[:80].tolist()
    trim_drafter(drafter, keep)
    mx.random.seed(11)
    samples = []
    from_draft = 0
    for _ in range(2500):
        steps = speculative_generate_step(
            [10, 20, 30, 40, 50], target, drafter, num_draft_tokens=2, max_tokens=3, temp=1.0
        )
        token, _, drafted = next(steps)
        steps.close()
        samples.append(token)
        from_draft += drafted
    assert_matches(np.array(samples), p)
    assert from_draft > 0


@pytest.mark.parametrize("drafter_rows", [VOCAB, VOCAB + 10, VOCAB - 5])
def test_untrimmed_sampling_matches_target(logits, drafter_rows):
    """Also with padded vocabularies: a drafter scoring more or fewer rows than the target."""
    target, _, t_logits, _ = logits
    drafter = make_model("llama", seed=33, vocab=drafter_rows)
    p = np.array(mx.exp(sampling_logprobs(t_logits, 1.0, 1.0)))
    mx.random.seed(12)
    samples = []
    for _ in range(1500):
        steps = speculative_generate_step(
            [10, 20, 30, 40, 50], target, drafter, num_draft_tokens=1, max_tokens=2, temp=1.0
        )
        samples.append(next(steps)[0])
        steps.close()
    assert_matches(np.array(samples), p)


def test_biased_sampler_would_fail(logits):
    """The bound has power: emitting the drafter's own draws is rejected."""
    _, _, t_logits, d_logits = logits
    p = np.array(mx.exp(sampling_logprobs(t_logits, 1.0, 1.0)))
    mx.random.seed(13)
    draws = np.array(mx.random.categorical(mx.broadcast_to(sampling_logprobs(d_logits, 1.0, 1.0), (40_000, VOCAB))))
    stat, dof = chi2_statistic(draws, p)
    assert stat > chi2_threshold(dof)


def test_adaptive_drafting_keeps_the_second_token_distribution(logits):
    """A stop that depends on the drafted token (its q) leaves the output ~ p: the second
    token, emitted after a stop (bonus) or after a second draft, follows the target's marginal."""
    target, drafter, t_logits, _ = logits
    context = [10, 20, 30, 40, 50]
    p1 = np.array(mx.exp(sampling_logprobs(t_logits, 1.0, 1.0)))
    rows = mx.concatenate([mx.broadcast_to(mx.array(context), (VOCAB, 5)), mx.arange(VOCAB)[:, None]], axis=1)
    p2_given = np.array(mx.softmax(target(rows)[:, -1].astype(mx.float32), axis=-1))
    p2 = p1 @ p2_given
    q1 = np.array(mx.softmax(drafter(mx.array([context]))[0, -1].astype(mx.float32)))
    threshold = float(np.median(q1))  # about half the first drafts stop the round
    mx.random.seed(14)
    second, stopped = [], 0
    for _ in range(3000):
        stats = SpecStats(confidences=[])
        steps = speculative_generate_step(
            context, target, drafter, num_draft_tokens=2, max_tokens=3, temp=1.0, stats=stats, draft_threshold=threshold
        )
        first, _, from_draft = next(steps)
        second.append(next(steps)[0])
        steps.close()
        stopped += from_draft and len(stats.confidences[0]) == 1
    assert_matches(np.array(second), p2)
    assert stopped > 100, "the stop rule never cut a round after an accepted draft"
