"""Speculative rounds for several sequences at once: one batched drafter pass per draft step, one
batched target pass per round, acceptance and rollback per sequence.

Both models' caches are mlx-lm's `BatchKVCache` (plain KV caches only: nothing else gives back
entries per sequence). A round feeds each sequence its pending tokens and drafts in one pass,
right-padded to the longest; each sequence's round is planned and settled by its own `engine.Rounds`
(as for a sequence alone: budget, copies, drafts, what each model has yet to process), and the
entries it does not keep are given back from the batched caches at once: those no sequence keeps are
trimmed from the batch, and each sequence's own rejected entries are rolled into its
left padding, where the mask hides them (what `BatchKVCache.finalize` does for right-padded
prompts). A sequence's proposals are what its prompt lookup copies (at most the round's length),
then drafts up to that length unless its draft threshold stops it earlier; the target verifies
the longest proposal of the round for all of them (shorter ones padded with filler it ignores).

Greedy output is each sequence's own greedy decoding (up to the last bits of batched matmuls);
sampled sequences with a seed draw from the noise of their (seed, position) and accept a draft where
it is the target's draw (`noise`), so they emit what their seed gives without drafts, whatever the
batch; those without accept draft x with probability min(1, p(x)/q(x)) and draw a rejection's token
from normalize(max(p - q, 0)). Both as the single-sequence generator does.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, dynamic_roll

from .engine import Plan, Policy, Rounds, greedy_accept, sampled_accept
from .heads import DraftHead, model_body
from .lookup import PromptLookup
from .noise import gumbel, head_noise, pick
from .speculative import SpecStats, proposal_row, sampling_logprobs, verify_sampled
from .trim import head_rows


def batchable(cache: list) -> bool:
    """Whether a model's cache can join a speculative batch (every layer a plain KVCache)."""
    return bool(cache) and all(type(c) is KVCache for c in cache)


@dataclass(eq=False)
class Lane:
    """One sequence in the batch: its last token (neither model has processed it), its drafter head
    (context rows of its own), its prompt lookup, sampling (with `seed`, from the noise of (seed,
    position), `position` counting the tokens before the next one), logit bias, counters and the
    tokens it may still emit (-1: no limit); `rounds` (`engine.Rounds`) plans its proposals and keeps
    what each model has yet to process, as for a sequence alone."""

    last: int
    head: DraftHead
    lookup: PromptLookup | None = None
    temp: float = 0.0
    top_p: float = 1.0
    bias: mx.array | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    max_tokens: int = -1
    seed: int | None = None
    position: int = 0
    rounds: Rounds = field(init=False)

    def __post_init__(self) -> None:
        propose = self.lookup.propose if self.lookup is not None else lambda limit: []
        self.rounds = Rounds(self.last, self.max_tokens, Policy(0, 0), True, propose)

    @property
    def coupled(self) -> bool:
        return self.temp > 0 and self.seed is not None

    @property
    def at(self) -> int:
        """The position of the lane's next token."""
        return self.position + self.rounds.emitted


@dataclass
class Emitted:
    """What a round gave one lane: tokens, the target's log-prob row of each, how many were drafts."""

    tokens: list[int]
    logprobs: list[mx.array]
    accepted: int


def give_back(cache: list, drop: list[int]) -> None:
    """Drop each sequence's last `drop[i]` entries: the common part by trimming, the rest by rolling
    the sequence's entries right, into its left padding."""
    least = min(drop)
    shifts = [d - least for d in drop]
    for layer in cache:
        if least:
            layer.trim(least)
        if any(shifts):
            shift = mx.array(shifts)
            layer.keys = dynamic_roll(layer.keys, shift[:, None], axis=2)
            layer.values = dynamic_roll(layer.values, shift[:, None], axis=2)
            layer.offset = layer.offset - shift
            layer.left_padding = layer.left_padding + shift
    if any(shifts):
        _compact(cache)


def _compact(cache: list) -> None:
    """Cut the padding every sequence has on the left (it grows as sequences reject differently; every
    layer holds the same padding, so it is read once)."""
    cut = min(cache[0].left_padding.tolist())
    if cut <= 0:
        return
    for layer in cache:
        layer.keys = layer.keys[..., cut:, :]
        layer.values = layer.values[..., cut:, :]
        layer._idx -= cut
        layer.left_padding = layer.left_padding - cut


class SpecBatch:
    """Sequences decoding speculatively together (see the module's docstring). `join` hands a lane
    its caches (each model's per-sequence KVCaches: the target's hold all the sequence's tokens but
    its last, the drafter's likewise); `leave` hands them back holding all but the lane's
    `rounds.target_pending` and `rounds.pending`."""

    def __init__(self, target: nn.Module, drafter: nn.Module):
        self.target, self.drafter = target, drafter
        self.lanes: list[Lane] = []
        self.target_cache: list | None = None
        self.draft_cache: list | None = None
        self.vocab = head_rows(target)
        self.body = model_body(drafter)
        self.rounds = 0

    def __len__(self) -> int:
        return len(self.lanes)

    def join(self, lane: Lane, target_cache: list, draft_cache: list) -> None:
        new_target = [BatchKVCache.merge([c]) for c in target_cache]
        new_draft = [BatchKVCache.merge([c]) for c in draft_cache]
        if self.target_cache is None:
            self.target_cache, self.draft_cache = new_target, new_draft
        else:
            for mine, theirs in zip(self.target_cache + self.draft_cache, new_target + new_draft, strict=True):
                mine.extend(theirs)
        self.lanes.append(lane)

    def leave(self, lane: Lane, keep: bool = True) -> tuple[list, list] | None:
        """Take `lane` out; its caches as per-sequence KVCaches (unless `keep` is False: it ended)."""
        i = self.lanes.index(lane)
        caches = None
        if keep:
            caches = [c.extract(i) for c in self.target_cache], [c.extract(i) for c in self.draft_cache]
        self.lanes.pop(i)
        if not self.lanes:
            self.target_cache = self.draft_cache = None
        else:
            rest = mx.array([j for j in range(len(self.lanes) + 1) if j != i])
            for layer in self.target_cache + self.draft_cache:
                layer.filter(rest)
        return caches

    def _scores(self, hidden: mx.array) -> list[mx.array]:
        """Each lane's drafter logits over its head's rows, from the last hidden states (B, d)."""
        lanes = self.lanes
        split = lanes[0].head.split
        base = split.head(hidden[:, None])[:, 0]
        out = []
        for i, lane in enumerate(lanes):
            row = base[i]
            if lane.head.extra is not None:
                row = mx.concatenate([row, lane.head.extra(hidden[i : i + 1])[0]])
            out.append(row)
        return out

    def draft_pass(self, feeds: list[list[int]]) -> list[mx.array]:
        """Feed each lane its tokens (right-padded to the longest), return each lane's logits after its last."""
        width = max(map(len, feeds))
        pads = [width - len(f) for f in feeds]
        x = mx.array([f + [0] * p for f, p in zip(feeds, pads, strict=True)], mx.uint32)
        if any(pads):
            for layer in self.draft_cache:
                layer.prepare(right_padding=pads)
        at = mx.array([len(f) - 1 for f in feeds])
        if self.lanes[0].head.split:
            hidden = self.body(x, cache=self.draft_cache)
            last = mx.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]
            rows = self._scores(last)
        else:
            logits = self.drafter(x, cache=self.draft_cache)
            last = mx.take_along_axis(logits, at[:, None, None], axis=1)[:, 0]
            vocab = self.vocab if self.lanes[0].head.remap is None else last.shape[-1]
            rows = [last[i, :vocab] for i in range(len(feeds))]
        if any(pads):
            for layer in self.draft_cache:
                layer.finalize()
        return rows

    def _draft(self, plans: list[Plan]) -> tuple[list[list[int]], list[int], list[list], list[list[float]], int]:
        """Every lane's drafts after its copies (the round's most drafter steps for all), each lane's own
        count of them (up to its plan's count or stop), their q rows when sampling, the drafter's
        probability of each counted one when a threshold is set, and the drafter passes run."""
        longest = max(plan.count for plan in plans)
        drafts: list[list[int]] = [[] for _ in plans]
        rows: list[list] = [[] for _ in plans]
        probs: list[list[float]] = [[] for _ in plans]
        counts = [0] * len(plans)
        open_ = [plan.count > 0 for plan in plans]
        feeds = [plan.feed for plan in plans]
        passes = 0
        while True:
            scores = self.draft_pass(feeds)
            passes += 1
            picks = []
            for i, (lane, logits) in enumerate(zip(self.lanes, scores, strict=True)):
                if lane.coupled:
                    logq = sampling_logprobs(logits, lane.temp, lane.top_p)
                    at = lane.at + len(plans[i].copied) + passes - 1
                    index = pick(
                        logq, head_noise(gumbel(lane.seed, at, 1, self.vocab)[0], lane.head.remap, logq.shape[-1])
                    )
                    chosen = logq[index]
                elif lane.temp > 0:
                    logq = sampling_logprobs(logits, lane.temp, lane.top_p)
                    index = mx.random.categorical(logq)
                    rows[i].append(mx.exp(logq))
                    chosen = logq[index]
                else:
                    index = mx.argmax(logits, axis=-1)
                    chosen = logits[index] - mx.logsumexp(logits)
                token = index if lane.head.remap is None else lane.head.remap[index]
                picks.append((token, chosen))
            mx.eval(picks)
            for i, (plan, (token, chosen)) in enumerate(zip(plans, picks, strict=True)):
                drafts[i].append(int(token.item()))
                if open_[i]:
                    counts[i] += 1
                    if plan.threshold:
                        probs[i].append(float(mx.exp(chosen).item()))
                    if counts[i] >= plan.count or plan.stops(probs[i]):
                        open_[i] = False
            if passes >= longest or not any(open_):
                return drafts, counts, rows, probs, passes
            feeds = [[d[-1]] for d in drafts]

    def round(self, lengths: list[int], threshold: float = 0.0, copy_limit: int = 0) -> list[Emitted]:
        """One round: lane i proposes up to `lengths[i]` tokens (0: none; fewer near its end), first up to
        `copy_limit` copied by its prompt lookup, then drafts; the target verifies; what each lane
        emitted, in lane order."""
        lanes = self.lanes
        plans = []
        for lane, n in zip(lanes, lengths, strict=True):
            policy = lane.rounds.policy
            policy.num_draft_tokens, policy.lookup_tokens, policy.draft_threshold = n, min(copy_limit, n), threshold
            plans.append(lane.rounds.plan())
        copies = [plan.copied for plan in plans]
        if any(plan.count for plan in plans):
            drafts, counts, rows, probs, passes = self._draft(plans)
        else:
            drafts, rows, probs = ([[] for _ in lanes] for _ in range(3))
            counts, passes = [0] * len(lanes), 0
        proposals = [c + d[:g] for c, d, g in zip(copies, drafts, counts, strict=True)]
        width = max(map(len, proposals))
        x = mx.array(
            [
                lane.rounds.target_pending + (p + d[g:] + [0] * width)[:width]  # past its proposals: filler
                for lane, p, d, g in zip(lanes, proposals, drafts, counts, strict=True)
            ],
            mx.uint32,
        )
        logits = self.target(x, cache=self.target_cache)
        biased = [logits[i] if lane.bias is None else logits[i] + lane.bias for i, lane in enumerate(lanes)]
        greedy = mx.stack([mx.argmax(row, axis=-1) for row in biased]).tolist()  # one wait for every lane
        out = []
        for i, lane in enumerate(lanes):
            row = biased[i]
            logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
            proposed = proposals[i]
            g = len(proposed)
            if lane.coupled:
                drawn = pick(
                    sampling_logprobs(row[: g + 1], lane.temp, lane.top_p),
                    gumbel(lane.seed, lane.at, g + 1, self.vocab),
                )
                n, tokens = greedy_accept(proposed, drawn.tolist())
            elif lane.temp > 0:
                vocab = row.shape[-1]
                q = [(mx.arange(vocab) == c).astype(mx.float32) for c in copies[i]]
                q += [proposal_row(r, lane.head.remap, vocab) for r in rows[i][: counts[i]]]
                sampled = sampling_logprobs(row[: g + 1], lane.temp, lane.top_p)
                accept, residual, bonus = verify_sampled(
                    sampled, mx.array(proposed, mx.uint32), mx.stack(q) if g else None
                )
                mx.eval(accept, residual, bonus)
                n, tokens = sampled_accept(proposed, accept.tolist(), residual.tolist(), bonus.item())
            else:
                n, tokens = greedy_accept(proposed, greedy[i][: g + 1])
            out.append(Emitted(tokens, [logprobs[j] for j in range(n + 1)], n))
        # every lane was fed `width` proposals to the target and `passes` drafter steps: what each keeps
        # is what a sequence alone keeps (`Rounds.settle`), given back from the batched caches at once
        give_back(self.target_cache, [width - e.accepted for e in out])
        dropped = [0] * len(lanes)
        for i, (lane, plan, e) in enumerate(zip(lanes, plans, out, strict=True)):

            def drafter_keeps(fed: int, keep: int, one_pass: bool, i: int = i) -> int:
                dropped[i] = fed - keep
                return keep

            lane.rounds.settle(
                plan, counts[i], e.accepted, e.tokens, lambda fed, keep: keep, drafter_keeps, probs[i], passes
            )
        if passes:
            give_back(self.draft_cache, dropped)
        for lane, e, c in zip(lanes, out, copies, strict=True):
            lane.stats.lookup_tokens += len(c)
            if lane.lookup is not None:
                lane.lookup.extend(e.tokens)
        for lane, e, p in zip(lanes, out, proposals, strict=True):
            lane.head.add(e.tokens)
            lane.stats.target_calls += 1
            lane.stats.draft_tokens += len(p)
            lane.stats.accepted_tokens += e.accepted
            lane.stats.generated_tokens += len(e.tokens)
            lane.stats.context_rows = lane.head.context_rows
        self.rounds += 1
        return out
