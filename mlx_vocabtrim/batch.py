"""Many sequences at once: speculative decoding while a sequence is alone, mlx-lm's continuous batch
while others run with it.

A drafter step and a verify pass cost nearly as much for one sequence as for several on memory-bound
hardware, but on a CPU (this project's machine) a pass over B tokens costs about B one-token passes
past a few tokens, so a batch of B plain decoding steps already fills the pass that speculation would
fill with drafts. The schedule here: a sequence decodes speculatively (the pair's setting) while it is
the only one; with others, in the speculative batch (`spec_batch`) where the tuned schedule names that
batch size, else in mlx-lm's `BatchGenerator` (one batched target pass per step, prompts prefilled
between steps). A sequence moves between them with its KV cache: greedy output is the target's own
either way (up to the last bits of batched matmuls, see the README), sampling draws from the target's
distribution either way.

Prompts joining the plain batch together are prefilled together only while padding them to the
longest adds at most a quarter (`PADDING_LIMIT`): mlx-lm pads a batch of prompts to its longest, and
a prefill pass past a few dozen tokens is compute-bound, so padding is work thrown away (8 MT-bench
prompts of 51 to 201 tokens on this project's CPU: 114.5 s prefilled together, 50.2 s one at a time),
while prompts of similar lengths are cheaper in one pass than one after another.

A sequence that will speculate (alone, or in the speculative batch) takes its first token from the
target's pass over its prompt, in a step of its own (shortest prompt first), before its drafter is
fed: its first token then comes after the target's prefill alone, not after the drafter's prefill and
a whole round too (this project's CPU, a 51-token MT-bench prompt alone: 5.1 s against 8.4 s; two of
51 and 61 tokens together: 6.0 and 12.8 s against 16.8 s for both).

A sampled sequence draws every token from the noise of its seed (its request's, else a random one)
and the token's position (`noise`), in every mode, drafts included: a seeded one emits the same
tokens whether it speculates or not and whatever else runs. Sequences whose caches cannot give back
a token exactly (sliding windows past their size, recurrent layers) stay in the batch once they
joined it.
"""

import secrets
from collections.abc import Generator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from .engine import STEP_COST, TOKEN_COST
from .heads import DraftHead
from .lookup import PromptLookup
from .noise import gumbel, pick
from .rollback import check_rollback, offset
from .spec_batch import Lane, SpecBatch, batchable
from .speculative import SpecStats, _catch_up, bias_vector, sampling_logprobs, speculative_generate_step
from .trim import head_rows


@dataclass(eq=False)
class Sequence:
    """One request's decoding. `tokens` grows as tokens are emitted; `finish` is set once it ends."""

    prompt: list[int]
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    speculative_tokens: int = 0  # tokens emitted while decoding speculatively
    batched_tokens: int = 0  # tokens emitted in the batch
    plain_tokens: int = 0  # tokens of the target's own pass outside both (the first, before speculating)
    stream: Generator | None = None
    target_cache: list | None = None  # while alone: the target's cache (the drafter's follows)
    draft_cache: list | None = None
    uid: int | None = None  # while in the batch
    lane: Lane | None = None  # while in the speculative batch
    stats: SpecStats = field(default_factory=SpecStats)  # of the speculative stretches

    @property
    def history(self) -> list[int]:
        return self.prompt + self.tokens


@dataclass
class Event:
    """A token a sequence emitted: its target log-probs, whether it was a draft, why it ended (if it did)."""

    sequence: Sequence
    token: int
    logprobs: mx.array
    from_draft: bool
    finish: str | None


def _sampler(seq: Sequence) -> Any:
    """The per-sequence sampler of the batch from the sequence's next position on: greedy, or the draw
    of the noise of (seed, position) from the distribution the speculative path samples (top-p, then
    temperature). mlx-lm calls it once per token, in order (the last call's token is dropped when
    the sequence leaves the batch; it gets a new sampler when it joins again)."""
    if seq.temp == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    positions = count(len(seq.history))

    def draw(logprobs: mx.array) -> mx.array:
        noise = gumbel(seq.seed, next(positions), 1, logprobs.shape[-1])
        return pick(sampling_logprobs(logprobs, seq.temp, seq.top_p), noise)

    return draw


def _bias(seq: Sequence, vocab: int) -> list:
    """The batch's logits processor adding the sequence's logit bias (the speculative path's own vector)."""
    if not seq.logit_bias:
        return []
    bias = bias_vector(seq.logit_bias, vocab)
    return [lambda tokens, logits: logits + bias]


def _held(cache: list | None) -> int:
    """Tokens a model's cache holds (none for no cache)."""
    return (offset(cache) or 0) if cache else 0


# Target passes a token saves when its sequence speculates alone rather than decoding plainly: the
# default pair's tune on this project's CPU predicts 1.82 tok/s speculating against 1.28 plain, 0.30.
ALONE_GAIN = 0.25

PADDING_LIMIT = 1.25  # prompts prefilled together: their padded tokens over their own at most

Schedule = dict[int, tuple[int, float]]  # batch size -> (draft length, draft threshold) of a speculative batch


class Decoder:
    """Decode many sequences together, one `step` at a time (see the module's docstring).

    `setting` holds `speculative_generate_step`'s keyword arguments for a sequence alone;
    `schedule` the draft length and threshold of a speculative batch per batch size (a size it does
    not name decodes in mlx-lm's plain batch). Counters: `speculative_steps` (tokens of sequences
    alone), `spec_rounds` (rounds of the speculative batch), `batched_steps` (steps of the plain
    batch), `first_tokens` (first tokens of speculating sequences, each from the target's own pass),
    `moves` (sequences moved from one way to another)."""

    def __init__(
        self,
        target: nn.Module,
        drafter: nn.Module | None,
        setting: dict,
        eos: set[int],
        *,
        max_batch: int = 8,
        prefill_step: int = 512,
        schedule: Schedule | None = None,
    ):
        from mlx_lm.generate import BatchGenerator

        self.target, self.drafter, self.setting, self.eos = target, drafter, setting, eos
        self.speculate = drafter is not None or bool(setting.get("lookup_ngram"))
        self.prefill_step = prefill_step
        self.max_batch = max_batch
        self.batch = BatchGenerator(
            target,
            max_tokens=1 << 30,
            stop_tokens=[[e] for e in sorted(eos)],
            completion_batch_size=max_batch,
            prefill_batch_size=1,  # set per arrival: `_prefill_together`
            prefill_step_size=prefill_step,
        )
        self.sequences: list[Sequence] = []
        self.by_uid: dict[int, Sequence] = {}
        self.vocab = head_rows(target)  # ids the target scores: the bias vector's length
        target_layers = make_prompt_cache(target)
        draft_layers = make_prompt_cache(drafter) if drafter is not None else []
        self.trimmable = batchable(target_layers)  # plain KV caches: they give back entries per sequence
        self.schedule = {n: s for n, s in (schedule or {}).items() if s and s[0] > 0}
        if not (self.trimmable and batchable(draft_layers)):
            self.schedule = {}
        self.lanes = SpecBatch(target, drafter) if self.schedule else None
        self.speculative_steps = self.spec_rounds = self.batched_steps = self.first_tokens = self.moves = 0
        # both caches say how many tokens they hold: then a drafter left behind (by a first token from the
        # target alone, or by decoding in the plain batch) is caught up; one that counts nothing cannot be
        self.counted = offset(target_layers) is not None and (drafter is None or offset(draft_layers) is not None)
        self.gave_first_token = False  # the last step was a first-token step
        self.group: int | None = None  # prompts to prefill together, set after the group forms (`_batched`)
        if self.speculate:
            check_rollback(target_layers, "target")
            check_rollback(draft_layers, "drafter")

    def add(self, seq: Sequence, target_cache: list | None = None, draft_cache: list | None = None) -> None:
        """Start decoding `seq`; caches may hold a prefix of its prompt (all of the prompt but its
        last token at most), which only the speculative paths reuse."""
        if seq.temp > 0 and seq.seed is None:
            seq.seed = secrets.randbits(63)  # unpredictable from what other requests drew
        seq.target_cache, seq.draft_cache = target_cache, draft_cache
        self.sequences.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Stop decoding `seq` (finished or cancelled)."""
        if seq.stream is not None:
            seq.stream.close()
            seq.stream = None
        if seq.uid is not None:
            self.batch.remove([seq.uid])
            del self.by_uid[seq.uid]
            seq.uid = None
        if seq.lane is not None:
            self.lanes.leave(seq.lane, keep=False)
            seq.lane = None
        if seq in self.sequences:
            self.sequences.remove(seq)

    def close(self) -> None:
        for seq in list(self.sequences):
            self.remove(seq)
        self.batch.close()

    @property
    def size(self) -> int:
        return len(self.sequences)

    @property
    def mode(self) -> str:
        """How the last step decoded: 'alone', 'speculative batch', 'batch', 'first token' (or 'idle')."""
        if not self.sequences:
            return "idle"
        if self.gave_first_token:
            return "first token"
        if any(s.stream is not None for s in self.sequences):
            return "alone"
        if any(s.lane is not None for s in self.sequences):
            return "speculative batch"
        return "batch"

    def step(self) -> list[Event]:
        """One step: a sequence about to speculate with no token yet gets its first one from the target
        (one such sequence a step). Else a speculative sequence alone yields its next token. Several:
        where the schedule names their number, those that may speculate take one round of the
        speculative batch (each yields its accepted tokens and one of the target's); the others (those
        that cannot move, or all where the schedule names no speculation) take one pass of the plain
        batch (each yields a token, or a prompt chunk is prefilled)."""
        if not self.sequences:
            return []
        speculative = len(self.sequences) == 1 or len(self.sequences) in self.schedule
        starting = [s for s in self.sequences if speculative and self._starting(s)]
        self.gave_first_token = bool(starting)
        if starting:  # one a step, the shortest prompt first: each first token is sent as soon as it is made
            return [self._first_token(min(starting, key=self._unfed))]
        alone = self.sequences[0] if len(self.sequences) == 1 else None
        if alone is not None and (alone.stream is not None or (self.speculate and self._pays(alone))):
            if alone.stream is None and not self._leave_batch(alone):
                return self._batched()
            return self._speculative(alone)
        planned = self.schedule.get(len(self.sequences))
        candidates = [s for s in self.sequences if s.lane is None and self.speculate and self._movable(s)]
        if planned and not all(self._pays(s) for s in candidates):
            planned = None  # one would feed its drafter more than speculating saves: all decode plainly
        lanes = [s for s in self.sequences if planned and self.speculate and self._movable(s)]
        joining = []
        for seq in self.sequences:
            if seq in lanes and seq.lane is None:
                self._join_lanes(seq)
            elif seq not in lanes:
                if seq.lane is not None:
                    self._leave_lanes(seq)
                if seq.uid is None:
                    joining.append(seq)
        self._prefill_together(joining)
        plain = len(lanes) < len(self.sequences)
        events = self._round(*planned) if lanes else []
        return events + (self._batched() if plain else [])

    def _starting(self, seq: Sequence) -> bool:
        """Whether `seq` is about to speculate and has no token yet (nor a place where it decodes)."""
        fresh = not seq.tokens and seq.stream is None and seq.lane is None and seq.uid is None
        return fresh and self.counted and self.speculate

    def _first_token(self, seq: Sequence) -> Event:
        """`seq`'s first token from the target's pass over its prompt (the shapes a target decoding
        alone uses: its prefill, then a pass over the last prompt token), its drafter not fed yet.
        Afterwards the target's cache holds all of its tokens but the last, as after any token."""
        history = seq.history
        cache = self._caught_up(self.target, seq.target_cache, history)
        logits = self.target(mx.array(history[-1:], mx.uint32)[None], cache=cache)[0, -1]
        if seq.logit_bias:
            logits = logits + bias_vector(seq.logit_bias, self.vocab)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token = _sampler(seq)(logprobs[None])
        seq.target_cache = cache
        seq.plain_tokens += 1
        self.first_tokens += 1
        return self._emit(seq, int(token.item()), logprobs, False)

    def _pays(self, seq: Sequence) -> bool:
        """Whether `seq`, decoding in the plain batch, should speculate (alone, or in the speculative
        batch): the tokens its drafter lacks (those decoded in the plain batch), fed in one pass, must
        cost less than its remaining tokens save by speculating (`ALONE_GAIN` target passes each). A
        sequence near its end finishes in the plain batch (of one, when alone: plain decoding)."""
        if seq.uid is None or self.drafter is None:
            return True
        if not self.counted:  # its drafter could not be caught up on what the batch decoded
            return False
        held = _held(seq.draft_cache)
        lacking = len(seq.history) - 1 - held
        step, per_token = self.setting.get("step_cost", STEP_COST), self.setting.get("token_cost", TOKEN_COST)
        return ALONE_GAIN * self._remaining(seq) > step * (1 + per_token * max(lacking - 1, 0))

    def _remaining(self, seq: Sequence) -> int:
        return seq.max_tokens - len(seq.tokens)

    def _movable(self, seq: Sequence) -> bool:
        """Whether `seq` can leave where it decodes now (the plain batch keeps caches that cannot give
        back the token it fed)."""
        return seq.uid is None or self.trimmable

    def _park(self, seq: Sequence) -> None:
        """Bring `seq`'s target cache out of wherever it decodes: afterwards it holds all of the
        sequence's tokens but the last (or a prefix of the prompt, or is None)."""
        if seq.stream is not None:  # the stream, closed, leaves the target holding all but the last token
            seq.stream.close()
            seq.stream = None
            self.moves += 1
        elif seq.uid is not None:
            cache, _ = self.batch.extract_cache([seq.uid])[seq.uid]
            for layer in cache:  # the batch fed the last emitted token already
                layer.trim(1)
            self.batch.remove([seq.uid])
            del self.by_uid[seq.uid]
            seq.uid, seq.target_cache = None, cache
            self.moves += 1
        elif seq.lane is not None:
            self._leave_lanes(seq)

    def _leave_batch(self, seq: Sequence) -> bool:
        """Start `seq`'s speculative stream (taking its cache out of either batch); False when its
        cache cannot give back the token the plain batch already fed."""
        if not self._movable(seq):
            return False
        self._park(seq)
        history = seq.history
        if seq.target_cache is None:
            seq.target_cache = make_prompt_cache(self.target)
        held = _held(seq.target_cache)
        if self.drafter is not None and seq.draft_cache is None:
            seq.draft_cache = make_prompt_cache(self.drafter)
        seq.stream = speculative_generate_step(
            history[held:],
            self.target,
            self.drafter,
            max_tokens=self._remaining(seq),
            temp=seq.temp,
            top_p=seq.top_p,
            prompt_cache=seq.target_cache + (seq.draft_cache or []),
            prefill_step_size=self.prefill_step,
            logit_bias=seq.logit_bias,
            context=history[:held],
            stats=seq.stats,
            seed=seq.seed,
            **self.setting,
        )
        return True

    def _join_batch(self, seq: Sequence) -> None:
        """Move `seq` into the plain batch, with the target cache it holds (none, a prefix of its prompt,
        or all its tokens but the last after decoding elsewhere)."""
        self._park(seq)
        history, cache = seq.history, seq.target_cache
        if cache is not None:
            history = history[_held(cache) :]
        seq.target_cache = None
        (seq.uid,) = self.batch.insert(
            [history],
            max_tokens=[self._remaining(seq)],
            caches=[cache],
            samplers=[_sampler(seq)],
            logits_processors=[_bias(seq, self.vocab)],
        )
        self.by_uid[seq.uid] = seq

    def _prefill_together(self, joining: list[Sequence]) -> None:
        """Move `joining` into the plain batch, shortest prompt first, prefilled together as many as
        `PADDING_LIMIT` allows: mlx-lm pads a batch of prompts to its longest, and a prefill pass past a
        few dozen tokens is compute-bound, so padding is work thrown away (one pass per prompt instead
        costs a decode step of the others between them)."""
        lengths = sorted(n for n in map(self._unfed, joining) if n > 1)  # prompts (others fed all but one)
        # those with one token to feed sort first, and each takes a place in the group mlx-lm prefills together
        # (then goes straight to decoding): the group holds them and the `together` shortest prompts
        for seq in sorted(joining, key=self._unfed):
            self._join_batch(seq)
        together = 1
        while together < len(lengths) and lengths[together] * (together + 1) <= PADDING_LIMIT * sum(
            lengths[: together + 1]
        ):
            together += 1
        if lengths:
            self.batch.prefill_batch_size = len(joining) - len(lengths) + together
            self.group = together  # the size once those with one token to feed have left the group

    def _unfed(self, seq: Sequence) -> int:
        """Tokens of `seq` its target cache has yet to process."""
        return len(seq.history) - _held(seq.target_cache)

    def _caught_up(self, model: nn.Module, cache: list | None, history: list[int]) -> list:
        """`cache` (made when None) fed all of `history` but its last token."""
        cache = make_prompt_cache(model) if cache is None else cache
        _catch_up(model, cache, history[_held(cache) :], self.prefill_step)
        return cache

    def _join_lanes(self, seq: Sequence) -> None:
        """Move `seq` into the speculative batch, both models' caches holding all its tokens but the last."""
        self._park(seq)
        history = seq.history
        target = self._caught_up(self.target, seq.target_cache, history)
        draft = self._caught_up(self.drafter, seq.draft_cache, history)
        head = DraftHead(self.drafter, self.setting.get("context_head", True), self.vocab)
        head.add(history)
        bias = bias_vector(seq.logit_bias, self.vocab) if seq.logit_bias else None
        lookup = None
        if self.setting.get("lookup_ngram"):
            lookup = PromptLookup(self.setting["lookup_ngram"])
            lookup.extend(history)
        seq.lane = Lane(
            history[-1],
            head,
            lookup,
            seq.temp,
            seq.top_p,
            bias,
            seq.stats,
            self._remaining(seq),
            seq.seed,
            len(history),
        )
        seq.target_cache = seq.draft_cache = None
        self.lanes.join(seq.lane, target, draft)

    def _leave_lanes(self, seq: Sequence) -> None:
        """Take `seq` out of the speculative batch: its caches back, the target's holding all its tokens
        but the last, the drafter's all but those it has yet to process."""
        seq.target_cache, seq.draft_cache = self.lanes.leave(seq.lane)
        seq.lane = None
        self.moves += 1

    def _speculative(self, seq: Sequence) -> list[Event]:
        try:
            token, logprobs, from_draft = next(seq.stream)
        except StopIteration:
            seq.stream = None
            return []
        self.speculative_steps += 1
        seq.speculative_tokens += 1
        return [self._emit(seq, int(token), logprobs, from_draft)]

    def _round(self, num_draft_tokens: int, draft_threshold: float) -> list[Event]:
        lanes = list(self.lanes.lanes)
        by_lane = {s.lane: s for s in self.sequences}
        copies = self.setting.get("lookup_tokens", 0) if self.setting.get("lookup_ngram") else 0
        emitted = self.lanes.round(
            [num_draft_tokens] * len(lanes), draft_threshold, copies
        )  # each lane's Rounds caps it near its end
        self.spec_rounds += 1
        events = []
        for lane, out in zip(lanes, emitted, strict=True):
            seq = by_lane[lane]
            for j, token in enumerate(out.tokens):
                seq.speculative_tokens += 1
                events.append(self._emit(seq, token, out.logprobs[j], j < out.accepted))
                if seq.finish is not None:
                    break
        return events

    def _batched(self) -> list[Event]:
        events = []
        self.batched_steps += 1
        while True:  # mlx-lm's next_generated, one pass at a time
            prompts, generated = self.batch.next()
            if self.group is not None:  # its first pass formed the prefill group: later ones take `together`
                self.batch.prefill_batch_size, self.group = self.group, None
            if generated or not prompts:
                break
        for response in generated:
            seq = self.by_uid.get(response.uid)
            if seq is None:
                continue
            seq.batched_tokens += 1
            events.append(self._emit(seq, int(response.token), response.logprobs, False))
            if response.finish_reason is not None and seq.uid is not None:
                del self.by_uid[seq.uid]
                seq.uid = None  # the batch dropped it itself
        return events

    def _emit(self, seq: Sequence, token: int, logprobs: mx.array, from_draft: bool) -> Event:
        seq.tokens.append(token)
        finish = "stop" if token in self.eos else "length" if len(seq.tokens) >= seq.max_tokens else None
        if finish is not None:
            seq.finish = finish
            self.remove(seq)
        return Event(seq, token, logprobs, from_draft, finish)


def batch_generate(
    target: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    drafter: nn.Module | None = None,
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    max_batch: int = 8,
    schedule: Schedule | None = None,
    **setting: Any,
) -> list[list[int]]:
    """The completions (token ids, EOS excluded) of `prompts`, decoded together: an offline batch job.
    `setting` holds `speculative_generate_step`'s keyword arguments (for a sequence alone), `schedule`
    the speculative batch's draft length per batch size (`Setup.schedule`: the profile's)."""
    eos = set(tokenizer.eos_token_ids)
    decoder = Decoder(target, drafter, setting, eos, max_batch=max_batch, schedule=schedule)
    waiting = [Sequence(list(p), max_tokens, temp, top_p) for p in prompts]
    order = list(waiting)
    try:
        while waiting or decoder.size:
            while waiting and decoder.size < max_batch:
                decoder.add(waiting.pop(0))
            decoder.step()
    finally:
        decoder.close()
    return [s.tokens[:-1] if s.finish == "stop" else s.tokens for s in order]
