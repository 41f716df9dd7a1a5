"""The batched decoder on tiny real models: every sequence decodes exactly as it would alone, whatever
else runs, and speculation follows the schedule (alone: speculative; with others: the batch)."""

import mlx.core as mx
import pytest
from conftest import make_model, noisy_copy
from mlx_lm.generate import generate_step

from mlx_vocabtrim.batch import Decoder, Sequence, batch_generate
from mlx_vocabtrim.speculative import speculative_generate_step

PROMPTS = [[5, 17, 33, 90, 200, 11], [7, 8, 9, 7, 8, 9, 7], list(range(40, 70)), [3], [250, 251, 252, 3, 250]]
SETTING = {"num_draft_tokens": 4, "lookup_ngram": 2, "lookup_tokens": 4}


@pytest.fixture(scope="module")
def pair():
    target = make_model("qwen2", seed=31)
    return target, noisy_copy(target, "qwen2", 0.05, seed=32)


def alone(target, prompt, n, **kw):
    if kw.get("temp", 0) == 0 and not kw.get("logit_bias"):
        return [int(t) for t, _ in generate_step(mx.array(prompt, mx.uint32), target, max_tokens=n)]
    return [int(t) for t, _, _ in speculative_generate_step(prompt, target, None, max_tokens=n, **kw)]


def run(decoder, arrivals, cancel=None):
    """Step `decoder`, adding each (step, sequence) of `arrivals` at its step and cancelling `cancel`
    = (step, sequence); returns the batch sizes seen and the events."""
    step, sizes, events = 0, [], []
    arrivals = sorted(arrivals, key=lambda a: a[0])
    while arrivals or decoder.size:
        while arrivals and arrivals[0][0] <= step:
            decoder.add(arrivals.pop(0)[1])
        if cancel and cancel[0] == step:
            decoder.remove(cancel[1])
        sizes.append(decoder.size)
        events += decoder.step()
        step += 1
    return sizes, events


def test_mixed_sequences_each_decode_as_alone(pair):
    target, drafter = pair
    decoder = Decoder(target, drafter, SETTING, eos=set(), max_batch=8)
    seqs = [Sequence(p, 12 + 3 * i) for i, p in enumerate(PROMPTS)]
    seeded = Sequence(PROMPTS[0], 10, temp=1.0, seed=7)
    biased = Sequence(PROMPTS[1], 10, logit_bias={9: 5.0})
    cancelled = Sequence(PROMPTS[2], 30)
    arrivals = [(0, seqs[0]), (3, seqs[1]), (4, seqs[2]), (4, seeded), (9, biased), (9, cancelled), (20, seqs[3])]
    arrivals += [(60, seqs[4])]  # alone at the end: back to speculation
    sizes, events = run(decoder, arrivals, cancel=(15, cancelled))
    assert max(sizes) >= 5
    for seq in seqs + [biased]:
        assert seq.tokens == alone(target, seq.prompt, seq.max_tokens, logit_bias=seq.logit_bias), seq.prompt
    repeat = Sequence(PROMPTS[0], 10, temp=1.0, seed=7)
    other = Decoder(target, drafter, SETTING, eos=set())
    run(other, [(0, repeat)])
    assert seeded.tokens == repeat.tokens, "a seeded sequence repeats whatever runs beside it"
    assert seeded.tokens == alone(target, PROMPTS[0], 10, temp=1.0, seed=7), "as without drafts"
    assert repeat.speculative_tokens > 0 and repeat.stats.draft_tokens > 0, "alone, seeded sequences speculate"
    assert 0 < len(cancelled.tokens) < 30 and cancelled.finish is None
    assert seqs[0].speculative_tokens and seqs[0].batched_tokens, "speculative alone, batched with others"
    assert seqs[4].batched_tokens == 0 and seqs[4].plain_tokens == 1 and decoder.moves >= 2
    assert seqs[4].speculative_tokens == seqs[4].max_tokens - 1, "alone: its first token, then speculation"
    assert any(e.from_draft for e in events) and decoder.batched_steps and decoder.speculative_steps


@pytest.mark.parametrize("together,schedule", [(1, None), (2, {2: (2, 0.0)}), (3, {2: (2, 0.0)})])
def test_a_speculating_sequence_takes_its_first_token_before_its_drafter_is_fed(pair, together, schedule):
    """Alone, or arriving together where the schedule names their number, each sequence's first token
    comes in a step of its own (shortest prompt first) from the target's pass over its prompt, the
    drafter not fed yet (its prefill and a round would delay it); where the schedule names no
    speculation, the plain batch prefills them. Afterwards each speculates (or not) as before, and
    decodes the target's output."""
    from mlx_vocabtrim.rollback import offset

    target, drafter = pair
    decoder = Decoder(target, drafter, SETTING, eos=set(), schedule=schedule)
    prompts = PROMPTS[:together][::-1]  # the longest first
    seqs = [Sequence(p, 14, logit_bias={9: 2.0} if i == 1 else None) for i, p in enumerate(prompts)]
    for seq in seqs:
        decoder.add(seq)
    first = together < 3
    if first:
        for n, seq in enumerate(sorted(seqs, key=lambda s: len(s.prompt)), 1):
            events = decoder.step()
            assert [e.sequence for e in events] == [seq] and not events[0].from_draft
            assert decoder.mode == "first token" and decoder.first_tokens == n
            assert seq.draft_cache is None and offset(seq.target_cache) == len(seq.prompt)
    else:
        decoder.step()
        assert decoder.mode == "batch" and decoder.first_tokens == 0
    run(decoder, [])
    for seq in seqs:
        assert seq.tokens == alone(target, seq.prompt, 14, logit_bias=seq.logit_bias), seq.prompt
        assert seq.plain_tokens == first and bool(seq.speculative_tokens) == first


def test_a_drafter_whose_cache_counts_nothing_is_fed_the_whole_prompt(pair, monkeypatch):
    """A recurrent drafter (mamba2: no layer of its cache counts tokens) beside a target whose cache
    counts: nothing could tell how far behind such a drafter is, so the first token comes from the
    speculative stream, which feeds both models the prompt (a first token from the target alone would
    leave the drafter never fed it); and a sequence of the plain batch stays there. The target's output."""
    from archs import make_arch

    target, _ = pair
    drafter = make_arch("mamba2", seed=5)
    fed, call = [], type(drafter).__call__

    def counting(self, inputs, *args, **kwargs):
        fed.append(inputs.shape[-1])
        return call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(drafter), "__call__", counting)
    decoder = Decoder(target, drafter, SETTING, eos=set())
    seq = Sequence(PROMPTS[2], 10)
    run(decoder, [(0, seq)])
    assert decoder.first_tokens == 0 and max(fed) == len(seq.prompt) - 1, fed
    assert seq.tokens == alone(target, seq.prompt, 10) and seq.speculative_tokens == 10
    fed.clear()
    seqs = [Sequence(PROMPTS[2], 30), Sequence(PROMPTS[0], 4)]
    run(decoder, [(0, seqs[0]), (0, seqs[1])])  # the second ends first: the first is left alone in the batch
    assert fed == [] and seqs[0].batched_tokens == 30, "no drafter to catch up: it finishes plainly"
    assert [s.tokens for s in seqs] == [alone(target, s.prompt, s.max_tokens) for s in seqs]


def test_speculation_stops_while_others_run_and_resumes(pair):
    """Counters, not timings: with two sequences no drafts; once one is left, drafts again."""
    target, drafter = pair
    decoder = Decoder(target, drafter, SETTING, eos=set())
    first, second = Sequence(PROMPTS[2], 30), Sequence(PROMPTS[0], 8)
    sizes, events = run(decoder, [(0, first), (5, second)])
    together = [e for e, n in zip(events, sizes, strict=False) if n == 2]
    drafted_alone = [e.from_draft for e in events if e.sequence is first and first.tokens.index(e.token) > 20]
    assert not any(e.from_draft for e in together)
    assert first.speculative_tokens > 8 and any(drafted_alone)
    assert first.tokens == alone(target, first.prompt, 30)


def test_a_sequence_left_alone_near_its_end_finishes_plainly(pair):
    """Left alone after decoding in the batch, a sequence speculates again only where its remaining
    tokens pay for feeding its drafter what it missed: near its end it finishes in the batch of one (no
    drafts), far from it it drafts again; both outputs are the target's."""
    target, drafter = pair
    for max_tokens, speculates in ((8, False), (40, True)):
        decoder = Decoder(target, drafter, SETTING, eos=set())  # no schedule: two sequences decode plainly
        first, second = Sequence(PROMPTS[2], max_tokens), Sequence(PROMPTS[0], 5)
        run(decoder, [(0, first), (0, second)])
        assert first.tokens == alone(target, PROMPTS[2], max_tokens)
        assert first.batched_tokens >= 2 and bool(first.speculative_tokens) == speculates, max_tokens


def test_sequences_near_their_end_do_not_form_a_speculative_batch(pair):
    """Two sequences left after a third ends form the speculative batch the schedule names for 2 only
    where both have enough tokens left to pay for feeding their drafters what they missed."""
    target, drafter = pair
    for max_tokens, speculates in ((6, False), (40, True)):
        decoder = Decoder(target, drafter, SETTING, eos=set(), schedule={2: (2, 0.0)})  # 3: plain
        seqs = [Sequence(PROMPTS[2], max_tokens), Sequence(PROMPTS[4], max_tokens), Sequence(PROMPTS[0], 3)]
        run(decoder, [(0, s) for s in seqs])
        for seq in seqs:
            assert seq.tokens == alone(target, seq.prompt, seq.max_tokens)
        assert bool(decoder.spec_rounds) == speculates, max_tokens


def test_prompts_joining_the_plain_batch_are_prefilled_together_only_where_padding_is_small(pair, monkeypatch):
    """A batch of prompts is padded to its longest (work thrown away on compute-bound passes): of prompts
    of 6, 7 and 30 tokens arriving together, the two short ones are prefilled together, the long one
    alone."""
    target, drafter = pair
    shapes, real = [], type(target).__call__

    def spy(self, inputs, *args, **kwargs):
        if self is target:
            shapes.append(tuple(inputs.shape))
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(target), "__call__", spy)
    decoder = Decoder(target, drafter, SETTING, eos=set())
    seqs = [Sequence(p, 4) for p in PROMPTS[:3]]
    run(decoder, [(0, s) for s in seqs])
    prefills = sorted(shape for shape in shapes if shape[1] > 1)
    assert prefills == [(1, 29), (2, 6)], prefills  # all but each prompt's last token
    for seq in seqs:
        assert seq.tokens == alone(target, seq.prompt, 4)
    # the same two short prompts joining a sequence that leaves its stream for the plain batch (its one
    # token to feed must not take a place of the prompts prefilled together)
    decoder, shapes[:] = Decoder(target, drafter, SETTING, eos=set()), []
    first, joining = Sequence(PROMPTS[2], 30), [Sequence(p, 4) for p in PROMPTS[:2]]
    run(decoder, [(0, first), (3, joining[0]), (3, joining[1])])
    assert first.speculative_tokens and first.batched_tokens
    assert (2, 6) in shapes, shapes
    for seq in [first, *joining]:
        assert seq.tokens == alone(target, seq.prompt, seq.max_tokens)
    # prompts of 20 and 60 tokens (not together) in passes of 8 beside a returning sequence: the group it
    # shared with the 20-token prompt takes no other prompt once it has gone on to decoding
    decoder, shapes[:] = Decoder(target, drafter, SETTING, eos=set(), prefill_step=8), []
    first, joining = Sequence(PROMPTS[2], 30), [Sequence(list(range(100, 100 + n)), 4) for n in (20, 60)]
    run(decoder, [(0, first), (3, joining[0]), (3, joining[1])])
    assert first.speculative_tokens and first.batched_tokens
    assert not [shape for shape in shapes if shape[0] > 1 and shape[1] > 1], shapes  # no padded prefill pass
    for seq in [first, *joining]:
        assert seq.tokens == alone(target, seq.prompt, seq.max_tokens)


def test_batch_generate_is_each_prompt_alone(pair):
    target, drafter = pair

    class Tok:
        eos_token_ids = [0]

    out = batch_generate(target, Tok(), PROMPTS, drafter, max_tokens=10, max_batch=3, **SETTING)
    for prompt, tokens in zip(PROMPTS, out, strict=True):
        ref = alone(target, prompt, 10)
        assert tokens == (ref[: ref.index(0)] if 0 in ref else ref)
