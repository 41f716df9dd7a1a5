"""One speculation round, planned and settled in one place, for live decoding and for the tuner's replay.

A round has a budget (tokens still allowed, less the one the target always adds); prompt lookup
may copy tokens from the context (free, q one-hot on them); the drafter drafts after them; the
target scores its pending tokens and the proposals in one pass; the accepted prefix and one token
of the target's own are emitted (`greedy_accept`, `sampled_accept`: one rule for a sequence alone,
a batch and the replay); each model's cache keeps what it can (`rollback.rewind`) and the
tokens it gave back stay pending for its next pass. `Rounds` holds that bookkeeping and the
request's `Policy` (how many tokens to copy and draft). The generator runs it on models
(speculative.py), the speculative batch once per sequence (spec_batch.py), the tuner's replay on
recorded traces (tune.py): all make the same rounds.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Relative costs of this project's CPU (float32, OpenBLAS; 0.5B drafter at k = 16384, 1.5B target):
# a drafter step is 0.25 of a one-token target pass, each further verified token adds about 0.2.
STEP_COST = 0.25
TOKEN_COST = 0.2
DECAY = 0.8  # weight of the evidence of earlier rounds, per round
PRIOR = {"draft": (1.0, 0.5), "copy": (0.5, 0.5)}  # (accepted, rejected) pseudo-counts a request starts from
CALIBRATION_PRIOR = 2.0  # pseudo-drafts a request's calibration starts from, accepted as often as predicted
SCALE_BOUNDS = (0.5, 2.0)  # how far a calibration may scale the drafter's probabilities, per draft


@dataclass
class Plan:
    """What a round proposes: `copied` tokens from the context, then up to `count` drafter steps
    after `feed` (the tokens the drafter has not processed, then the copies), stopped early by the
    draft threshold (`stops`)."""

    copied: list[int]
    count: int
    feed: list[int]
    threshold: float = 0.0
    scale: float = 1.0  # the request's calibration of the drafter's probabilities (`Calibration`)

    def stops(self, probs: Sequence[float]) -> bool:
        """Whether drafting ends after drafts the drafter gave probabilities `probs` (each given the ones
        before): once the calibrated chance that all of them are accepted, their product times
        `scale**len(probs)`, is below the threshold (the last draft is still verified)."""
        return math.prod(probs) * self.scale ** len(probs) < self.threshold


@dataclass
class Rate:
    """A request's running estimate of how often a proposal is accepted, given all before it were."""

    kind: str
    accepted: float = 0.0
    rejected: float = 0.0

    @property
    def value(self) -> float:
        prior_accepted, prior_rejected = PRIOR[self.kind]
        return (self.accepted + prior_accepted) / (self.accepted + self.rejected + prior_accepted + prior_rejected)

    def observe(self, tried: int, kept: int) -> None:
        """A round proposed `tried` such tokens in a row (maybe none: older evidence still fades) and
        `kept` of them were accepted."""
        self.accepted = DECAY * self.accepted + kept
        self.rejected = DECAY * self.rejected + (kept < tried)


@dataclass
class Calibration:
    """How much more (or less) often this request's drafts are accepted than the drafter's own
    probabilities say: accepted / predicted over the drafts judged so far, older judged rounds
    fading, starting from agreement. A drafter sure of wrong guesses (translation) gets a scale below 1 and
    stops drafting sooner; one that hedges on code it gets right, a scale above 1."""

    accepted: float = 0.0
    predicted: float = 0.0

    @property
    def scale(self) -> float:
        low, high = SCALE_BOUNDS
        ratio = (self.accepted + CALIBRATION_PRIOR) / (self.predicted + CALIBRATION_PRIOR)
        return min(high, max(low, ratio))

    def observe(self, probs: Sequence[float], kept: int) -> None:
        """A round drafted tokens with probabilities `probs` (each given the ones before) and the first
        `kept` were accepted: the drafts up to the first rejection were judged."""
        self.accepted = DECAY * self.accepted + kept
        self.predicted = DECAY * self.predicted + sum(probs[: kept + 1])


@dataclass
class Policy:
    """How many tokens a round copies and drafts.

    Static: as many as the setting allows (`lookup_tokens` copies at most, `num_draft_tokens` in
    all). Adaptive: within the same bounds, the lengths that maximise the expected tokens per unit
    of time, from this request's acceptance so far (copies and drafts apart) and the relative costs
    `step_cost` (a drafter step) and `token_cost` (each verified token past the first), both in
    one-token target passes. With a `draft_threshold` (drafting ends where the drafter is unsure, a
    sharper signal per round than past acceptance) the drafter steps run to their bound, the copies
    adapt as before, and the threshold is applied to the drafter's probabilities as this request's
    `Calibration` scales them. Decisions use past rounds only, so greedy output and the sampling
    distribution stay the target's own.
    """

    num_draft_tokens: int
    lookup_tokens: int
    adaptive: bool = False
    step_cost: float = STEP_COST
    token_cost: float = TOKEN_COST
    draft_threshold: float = 0.0
    drafts: Rate = field(default_factory=lambda: Rate("draft"))
    copies: Rate = field(default_factory=lambda: Rate("copy"))
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def scale(self) -> float:
        """What the threshold multiplies each draft's probability by: this request's calibration
        when adaptive, else 1 (the threshold as set)."""
        return self.calibration.scale if self.adaptive and self.draft_threshold > 0 else 1.0

    def copy_limit(self, budget: int) -> int:
        return min(self.lookup_tokens, budget)

    def lengths(self, budget: int, available: int, can_draft: bool, pending: int) -> tuple[int, int]:
        """(copies, drafter steps) for a round with `budget` proposals allowed, `available` copies
        offered, and `pending` tokens the target must process anyway."""
        copies = min(available, self.copy_limit(budget))
        drafts = max(0, min(self.num_draft_tokens, budget) - copies) if can_draft else 0
        if not self.adaptive:
            return copies, drafts
        a_copy, a_draft = self.copies.value, self.drafts.value
        best, best_rate = (0, 0), 0.0
        for c in range(copies + 1):
            reach = a_copy**c  # probability that every copy is accepted
            expected = 1 + (a_copy * (1 - reach) / (1 - a_copy) if a_copy < 1 else c)
            most = max(0, min(self.num_draft_tokens, budget) - c) if can_draft else 0
            for g in [most] if self.draft_threshold > 0 else range(most, -1, -1):
                gain = reach * (a_draft * (1 - a_draft**g) / (1 - a_draft) if a_draft < 1 else g)
                cost = 1 + self.token_cost * (pending + c + g - 1) + self.step_cost * g
                rate = (expected + gain) / cost
                if rate > best_rate:
                    best, best_rate = (c, g), rate
        return best

    def observe(self, copied: int, drafted: int, kept: int, probs: Sequence[float] = ()) -> None:
        """A round proposed `copied` copies then `drafted` drafts (drafted with probabilities `probs`,
        when known), and the first `kept` were accepted."""
        self.copies.observe(copied, min(kept, copied))
        reached = kept >= copied  # drafts were judged only when every copy was accepted
        self.drafts.observe(drafted if reached else 0, kept - copied if reached else 0)
        if reached and drafted and probs:
            self.calibration.observe(probs[:drafted], kept - copied)


def first_rejected(flags: Sequence[bool]) -> int:
    return next((i for i, ok in enumerate(flags) if not ok), len(flags))


def greedy_accept(proposals: Sequence[int], choice: Sequence[int]) -> tuple[int, list[int]]:
    """Greedy verification, for live rounds and the replay alike: `choice[j]` is the target's token
    after the first j proposals (one more than there are proposals; fewer where a recorded answer
    ends). The proposals accepted in a row, and what the round emits: those, then the target's own."""
    n = first_rejected([p == c for p, c in zip(proposals, choice, strict=False)])
    return n, [*proposals[:n], *choice[n : n + 1]]


def sampled_accept(
    proposals: Sequence[int], accept: Sequence[bool], residual: Sequence[int], bonus: int
) -> tuple[int, list[int]]:
    """Sampled verification from `verify_sampled`'s draws: the proposals accepted in a row, then the
    residual draw at the first rejection, or the bonus draw when none was rejected."""
    n = first_rejected(accept)
    return n, [*proposals[:n], residual[n] if n < len(proposals) else bonus]


class Rounds:
    """One request's rounds: what each model has yet to process, how many tokens were emitted, the
    policy; the same for a live decoding and a replay.

    The target always has its last context token pending (more after a recurrent layer went back to
    the round's start); the drafter, when there is one, its last token and what it did not process of
    the previous round.
    """

    def __init__(self, last: int, max_tokens: int, policy: Policy, drafter: bool, propose: Callable[[int], list[int]]):
        self.max_tokens = max_tokens
        self.policy = policy
        self.drafter = drafter
        self.propose = propose
        self.target_pending = [last]
        self.pending = [last] if drafter else []
        self.emitted = 0

    def more(self) -> bool:
        return self.max_tokens < 0 or self.emitted < self.max_tokens

    def plan(self) -> Plan:
        """This round's copies and drafter steps."""
        unlimited = self.policy.num_draft_tokens + self.policy.lookup_tokens
        budget = self.max_tokens - self.emitted - 1 if self.max_tokens >= 0 else unlimited
        offered = self.propose(self.policy.copy_limit(budget))
        copies, count = self.policy.lengths(budget, len(offered), self.drafter, len(self.target_pending))
        copied = offered[:copies]
        return Plan(copied, count, self.pending + copied, self.policy.draft_threshold, self.policy.scale)

    def settle(
        self,
        plan: Plan,
        drafted: int,
        kept: int,
        tokens: list[int],
        rewind_target: Callable[[int, int], int],
        rewind_drafter: Callable[[int, int, bool], int],
        probs: Sequence[float] = (),
        steps: int | None = None,
    ) -> None:
        """`kept` of the round's `len(plan.copied) + drafted` proposals were accepted and `tokens` emitted
        (fewer than kept + 1 when the caller stopped early): each cache keeps what it can of what it was
        fed; the rest of the emitted tokens stays pending. `rewind_*(fed, keep[, one_pass])` return
        how many of the fed tokens the cache holds afterwards; `probs` are the drafter's probabilities of
        its drafts, each given the ones before (for the calibration); `steps` the drafter steps run for
        this sequence, when more than its drafts (a batch's passes run for every sequence: the extra
        drafts were fed to the drafter, past this sequence's proposals)."""
        gamma = len(plan.copied) + drafted
        held = len(self.target_pending)
        held = rewind_target(held + gamma, held + kept) if gamma else held
        self.target_pending = (self.target_pending + tokens)[held:]
        if self.drafter:
            steps = drafted if steps is None else steps
            fed = len(plan.feed) + steps - 1 if steps else 0
            held = rewind_drafter(fed, min(fed, len(self.pending) + kept), steps == 1) if steps else 0
            self.pending = (self.pending + tokens)[held:]
        self.emitted += len(tokens)
        self.policy.observe(len(plan.copied), drafted, kept, probs)
