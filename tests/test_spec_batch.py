"""Speculation inside a batch on tiny real models: each sequence makes exactly the rounds it makes
alone (same drafts, same accepted counts, same tokens), whatever else is in the batch; sampled
sequences keep the target's distribution; the decoder follows its schedule as the batch grows and
shrinks (asserted on counters)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model, noisy_copy
from mlx_lm.generate import generate_step
from test_sampling import DRAWS, PROMPT, assert_rows_match, make_drafter, markov_rows, markov_target

from mlx_vocabtrim.batch import Decoder, Sequence
from mlx_vocabtrim.errors import VocabTrimError
from mlx_vocabtrim.speculative import SpecStats, speculative_generate_step
from mlx_vocabtrim.trim import trimmed_copy
from mlx_vocabtrim.tune import BATCH_MARGIN, BatchCosts, batch_schedule, measure_batch_costs

PROMPTS = [[5, 17, 33, 90, 200, 11], [7, 8, 9, 7, 8, 9, 7], list(range(40, 70)), [3], [250, 251, 252, 3, 250]]


@pytest.fixture(scope="module")
def pairs():
    target = make_model("qwen2", seed=41)
    close = noisy_copy(target, "qwen2", 0.01, seed=42)  # agrees often: long accepted runs
    return target, {"full": close, "trim+ctx": trimmed_copy(close, list(range(0, 256, 2)))}


def alone_greedy(target, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt, mx.uint32), target, max_tokens=n)]


def alone_rounds(target, drafter, prompt, n, setting):
    """A sequence's rounds alone, as the decoder makes them: its first token from the target's own pass,
    then speculative decoding from there."""
    stats = SpecStats()
    first = alone_greedy(target, prompt, 1)
    tokens = speculative_generate_step(prompt + first, target, drafter, max_tokens=n - 1, stats=stats, **setting)
    return first + [int(t) for t, _, _ in tokens], stats


def drive(decoder, arrivals):
    """Step `decoder`, adding each (step, sequence) at its step; the decoder's mode at every step."""
    step, modes = 0, []
    arrivals = sorted(arrivals, key=lambda a: a[0])
    while arrivals or decoder.size:
        while arrivals and arrivals[0][0] <= step:
            decoder.add(arrivals.pop(0)[1])
        size = decoder.size
        decoder.step()
        modes.append((size, decoder.mode))
        step += 1
    return modes


@pytest.mark.parametrize("head", ["full", "trim+ctx"])
@pytest.mark.parametrize("gamma,threshold,lookup", [(3, 0.0, 0), (5, 0.4, 0), (4, 0.0, 2)])
def test_each_sequence_makes_its_own_rounds_in_the_batch(pairs, head, gamma, threshold, lookup):
    """Five sequences of different lengths decode together (the batch shrinks to one, which goes on
    alone with the same setting): tokens, target calls, drafts (copied or drafted) and accepted drafts of
    each equal its speculative decoding alone, so neither cache lost or kept an entry it should not have."""
    target, drafters = pairs
    drafter = drafters[head]
    setting = {"num_draft_tokens": gamma, "draft_threshold": threshold, "lookup_ngram": lookup, "lookup_tokens": 3}
    decoder = Decoder(target, drafter, setting, eos=set(), schedule={n: (gamma, threshold) for n in range(2, 9)})
    seqs = [Sequence(p, 10 + 7 * i) for i, p in enumerate(PROMPTS)]
    modes = drive(decoder, [(0, s) for s in seqs])
    assert decoder.spec_rounds >= 8 and decoder.batched_steps == 0 and decoder.first_tokens == len(seqs)
    assert ("speculative batch" in {m for _, m in modes}) and modes[-1][1] in ("alone", "idle")
    for seq in seqs:
        tokens, stats = alone_rounds(target, drafter, seq.prompt, seq.max_tokens, setting)
        assert seq.tokens == tokens == alone_greedy(target, seq.prompt, seq.max_tokens), seq.prompt
        got = (seq.stats.target_calls, seq.stats.draft_tokens, seq.stats.accepted_tokens, seq.stats.lookup_tokens)
        assert got == (stats.target_calls, stats.draft_tokens, stats.accepted_tokens, stats.lookup_tokens), seq.prompt
    assert sum(s.stats.accepted_tokens for s in seqs) > 20, "drafts are accepted"
    assert (sum(s.stats.lookup_tokens for s in seqs) > 10) == bool(lookup)
    if head == "trim+ctx":
        assert all(s.stats.context_rows > 0 for s in seqs)


def test_sequences_joining_and_leaving_keep_their_rounds(pairs):
    """Arrivals while others decode, a cancelled sequence, the batch through every size: each finished
    sequence still equals its greedy decoding alone."""
    target, drafters = pairs
    drafter = drafters["trim+ctx"]
    decoder = Decoder(target, drafter, {"num_draft_tokens": 4}, eos=set(), schedule={2: (3, 0.0), 3: (4, 0.5)})
    seqs = [Sequence(p, 12 + 6 * i) for i, p in enumerate(PROMPTS)]  # tokens enough left to speculate at 3
    cancelled = Sequence(PROMPTS[2], 40)
    seeded = Sequence(PROMPTS[1], 9, temp=1.0, seed=5)  # speculates in the batch too
    arrivals = [(0, seqs[0]), (3, seeded), (4, seqs[1]), (5, cancelled), (6, seqs[2]), (8, seqs[3]), (11, seqs[4])]
    step, modes = 0, []
    while arrivals or decoder.size:
        while arrivals and arrivals[0][0] <= step:
            decoder.add(arrivals.pop(0)[1])
        if step == 10:
            decoder.remove(cancelled)
        size = decoder.size
        decoder.step()
        modes.append((size, decoder.mode))
        step += 1
    for seq in seqs:
        assert seq.tokens == alone_greedy(target, seq.prompt, seq.max_tokens), seq.prompt
    assert 0 < len(cancelled.tokens) < 40
    again = Sequence(PROMPTS[1], 9, temp=1.0, seed=5)
    drive(Decoder(target, drafter, {"num_draft_tokens": 4}, eos=set()), [(0, again)])
    plain = [t for t, _, _ in speculative_generate_step(PROMPTS[1], target, None, max_tokens=9, temp=1.0, seed=5)]
    assert seeded.tokens == again.tokens == plain, "seeded: the noise of its seed, whatever the batch"
    assert again.speculative_tokens > 0 and again.stats.draft_tokens > 0, "seeded sequences speculate"
    seen = {(n, m) for n, m in modes}
    assert {(2, "speculative batch"), (3, "speculative batch"), (1, "alone")} <= seen
    assert any(n >= 4 and m == "batch" for n, m in seen), "no schedule entry for 4 or 5: the plain batch"


@pytest.mark.parametrize("head", ["full", "trim+ctx"])
def test_seeded_sequences_in_the_speculative_batch_emit_what_their_seeds_give(pairs, head):
    """Seeded sampled sequences speculating together (copies and drafts, the batch shrinking to one)
    each emit what the target alone emits with that seed, token for token (the noise of (seed,
    position)), with drafts accepted and rejected inside the batch."""
    target, drafters = pairs
    setting = {"num_draft_tokens": 4, "lookup_ngram": 2, "lookup_tokens": 3}
    decoder = Decoder(target, drafters[head], setting, eos=set(), schedule={n: (4, 0.0) for n in range(2, 9)})
    sampling = {"temp": 0.8, "top_p": 0.9}
    seqs = [Sequence(p, 10 + 5 * i, seed=i, **sampling) for i, p in enumerate(PROMPTS)]
    drive(decoder, [(0, s) for s in seqs])
    assert decoder.spec_rounds >= 5
    for seq in seqs:
        plain = speculative_generate_step(
            seq.prompt, target, None, max_tokens=seq.max_tokens, seed=seq.seed, **sampling
        )
        assert seq.tokens == [t for t, _, _ in plain], seq.prompt
    accepted, drafted = (sum(getattr(s.stats, name) for s in seqs) for name in ("accepted_tokens", "draft_tokens"))
    assert 0 < accepted < drafted


def test_the_schedule_turns_speculation_off_and_on_as_the_batch_changes(pairs):
    """Counters per step: speculative alone, a speculative batch at the sizes the schedule names, the
    plain batch at the others, and back as the batch shrinks."""
    target, drafters = pairs
    decoder = Decoder(target, drafters["full"], {"num_draft_tokens": 3}, eos=set(), schedule={2: (2, 0.0)})
    long, mid, short = Sequence(PROMPTS[2], 60), Sequence(PROMPTS[0], 30), Sequence(PROMPTS[1], 4)
    modes = drive(decoder, [(0, long), (3, mid), (5, short)])  # mid has tokens enough left to speculate again
    busy = [m for _, m in modes if m not in ("idle", "first token")]
    order = [m for i, m in enumerate(busy) if i == 0 or m != busy[i - 1]]
    assert order == ["alone", "speculative batch", "batch", "speculative batch", "alone"], order
    assert all(m == {1: "alone", 2: "speculative batch", 3: "batch"}[n] for n, m in modes if m in busy)
    assert [n for n, m in modes if m == "first token"] == [1, 2], "each speculating arrival's first token alone"
    for seq in (long, mid, short):
        assert seq.tokens == alone_greedy(target, seq.prompt, seq.max_tokens)


def test_no_schedule_is_todays_decoder(pairs):
    target, drafters = pairs
    decoder = Decoder(target, drafters["full"], {"num_draft_tokens": 3}, eos=set())
    seqs = [Sequence(PROMPTS[0], 10), Sequence(PROMPTS[1], 6)]
    modes = drive(decoder, [(0, s) for s in seqs])
    assert decoder.spec_rounds == 0 and {m for n, m in modes if n == 2} == {"batch"}


@pytest.mark.parametrize("kind", ["trim", "ctx", "trim+lookup"])
def test_sampled_sequences_in_a_batch_follow_the_target(kind):
    """10,000 tokens from batches of four unseeded sampled 12-token generations after PROMPT (each
    given a random seed: the noise of (seed, position)), a Markov target (test_sampling's): every
    transition follows mlx-lm's row for the token before it, with drafts accepted and rejected inside
    the batch."""
    target = markov_target("qwen2", seed=17)
    drafter = make_drafter(kind.split("+")[0], "qwen2", target, seed=18)
    setting = {"num_draft_tokens": 3} | ({"lookup_ngram": 1, "lookup_tokens": 2} if "lookup" in kind else {})
    counts = np.zeros((5, 5), np.int64)
    batched = accepted = drafted = copied = 0
    while counts.sum() < DRAWS:
        decoder = Decoder(target, drafter, setting, eos=set(), schedule={n: (3, 0.0) for n in (2, 3, 4)})
        seqs = [Sequence(PROMPT, 12, temp=1.0) for _ in range(4)]
        drive(decoder, [(0, s) for s in seqs])
        batched += decoder.spec_rounds
        for seq in seqs:
            previous = PROMPT[-1]
            for token in seq.tokens:
                counts[previous, token] += 1
                previous = token
            accepted += seq.stats.accepted_tokens
            drafted += seq.stats.draft_tokens
            copied += seq.stats.lookup_tokens
    assert_rows_match(counts, markov_rows(target, 1.0, 1.0))
    assert batched > DRAWS // 20 and 0.1 < accepted / drafted < 0.9
    assert (copied > DRAWS // 10) == ("lookup" in kind)


def costs_of(verify, draft, overhead=lambda b: 0.0) -> BatchCosts:
    """Costs of a batch whose target pass over n tokens of b sequences takes verify(b, n), a drafter step
    draft(b), and a round `overhead(b)` beyond its passes."""
    sizes = (2, 3, 4, 6, 8)
    return BatchCosts(
        {b: verify(b, 1) for b in sizes},
        {b: {g: verify(b, g + 1) + g * draft(b) + overhead(b) for g in range(1, 6)} for b in sizes},
    )


TAUS = {1: 1.8, 2: 2.4, 3: 2.8, 4: 3.0, 5: 3.1}


def test_the_schedule_speculates_where_the_costs_make_it_pay():
    """Memory-bound passes (a pass costs the same for any number of tokens): speculation at every size,
    at the longest draft; compute-bound (cost per token): never; this CPU's shape (a fixed part plus a
    cost per token): where the gain is at least the margin (sizes 3 and 4 gain 7% and 2%: plain)."""
    flat = batch_schedule(costs_of(lambda b, n: 1.0, lambda b: 0.01), TAUS, 8)
    assert all(flat[b]["choice"] == [5, 0.0] for b in range(2, 9))
    linear = batch_schedule(costs_of(lambda b, n: 0.1 * b * n, lambda b: 0.03 * b), TAUS, 8)
    assert all(linear[b]["choice"] is None for b in range(2, 9))
    cpu = batch_schedule(costs_of(lambda b, n: 0.28 + 0.06 * b * n, lambda b: 0.06 + 0.025 * b), TAUS, 8)
    speculating = [b for b in range(2, 9) if cpu[b]["choice"]]
    assert speculating == [2]
    for b in (3, 4):
        gain = max(cpu[b]["speculative_tokens_per_s"].values()) / cpu[b]["plain_tokens_per_s"]
        assert 1 < gain < BATCH_MARGIN
    row = cpu[2]
    g = row["choice"][0]
    assert row["speculative_tokens_per_s"][g] == pytest.approx(2 * TAUS[g] / (0.28 + 0.12 * (g + 1) + g * 0.11))
    assert row["plain_tokens_per_s"] == pytest.approx(2 / 0.4)
    # a round's own overhead counts: 0.3 s of it per round and speculation pays at no size here
    costly = batch_schedule(
        costs_of(lambda b, n: 0.28 + 0.06 * b * n, lambda b: 0.06 + 0.025 * b, lambda b: 0.3), TAUS, 8
    )
    assert all(costly[b]["choice"] is None for b in range(2, 9))


def test_the_batch_passes_are_timed_per_size(pairs, monkeypatch):
    """Plain steps and whole rounds per size and draft length; the timed sequences differ (lengths,
    acceptance), so rounds roll entries back unevenly as real batches do."""
    import mlx_vocabtrim.spec_batch as spec_batch

    target, drafters = pairs
    drops, real = [], spec_batch.give_back
    monkeypatch.setattr(spec_batch, "give_back", lambda cache, drop: (drops.append(list(drop)), real(cache, drop)))
    costs = measure_batch_costs(target, drafters["trim+ctx"], True, PROMPTS[2], (2, 4), (1, 2, 3))
    assert any(len(set(d)) > 1 for d in drops), "every sequence gave back as much: the timed batch was uniform"
    assert sorted(costs.plain) == [2, 4] and all(t > 0 for t in costs.plain.values())
    assert sorted(costs.rounds) == [2, 4] and all(sorted(r) == [1, 2, 3] for r in costs.rounds.values())
    assert all(r[3] > costs.plain[b] for b, r in costs.rounds.items())  # a round drafts and verifies more
    assert costs.t_round(3, 2) == pytest.approx((costs.rounds[2][2] + costs.rounds[4][2]) / 2)


def test_batch_timings_that_disagree_are_refused(pairs, monkeypatch):
    """Repeats of a plain step or a round that disagree (here: any spread at all counts) are taken again,
    then refused with one line, never turned into a schedule."""
    import mlx_vocabtrim.tune as tune

    target, drafters = pairs
    monkeypatch.setattr(tune, "SPREAD", 0.5)
    monkeypatch.setattr(tune, "SLACK", 0.0)
    with pytest.raises(VocabTrimError, match="of 2 sequences is disturbed by other work"):
        measure_batch_costs(target, drafters["trim+ctx"], True, PROMPTS[2], (2,), (1, 2))
