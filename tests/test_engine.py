"""The round engine alone: static and adaptive lengths, and what each model has pending after a round."""

from mlx_vocabtrim.engine import SCALE_BOUNDS, Policy, Rounds, greedy_accept, sampled_accept


def run_rounds(policy: Policy, accept: int, rounds: int, offered: int = 0) -> list[tuple[int, int]]:
    """(copies, drafter steps) of `rounds` rounds in which the first `accept` proposals are always accepted."""
    engine = Rounds(0, -1, policy, True, lambda limit: [1] * min(offered, limit))
    lengths = []
    for _ in range(rounds):
        plan = engine.plan()
        lengths.append((len(plan.copied), plan.count))
        kept = min(accept, len(plan.copied) + plan.count)
        engine.settle(plan, plan.count, kept, [2] * (kept + 1), lambda fed, keep: keep, lambda fed, keep, one: keep)
    return lengths


def test_static_lengths_are_the_settings_own():
    assert set(run_rounds(Policy(5, 3), accept=0, rounds=4, offered=2)) == {(2, 3)}
    assert set(run_rounds(Policy(5, 3), accept=9, rounds=4, offered=9)) == {(3, 2)}


def test_adaptive_lengths_follow_what_the_request_accepts():
    always = run_rounds(Policy(8, 8, adaptive=True), accept=99, rounds=12)
    assert always[-1] == (0, 8), "every draft accepted: the longest drafts"
    never = run_rounds(Policy(8, 8, adaptive=True), accept=0, rounds=12)
    assert never[0][1] > 0 and never[-1] == (0, 0), "nothing accepted: no drafting at all"
    copies = run_rounds(Policy(1, 16, adaptive=True), accept=99, rounds=12, offered=16)
    assert copies[-1] == (16, 0), "copies always right: every copy offered"
    costly = run_rounds(Policy(8, 8, adaptive=True, step_cost=2.0), accept=2, rounds=12)
    cheap = run_rounds(Policy(8, 8, adaptive=True, step_cost=0.01, token_cost=0.01), accept=2, rounds=12)
    assert costly[-1][1] < cheap[-1][1], "dearer drafter steps: shorter drafts"


def test_a_request_that_stopped_drafting_tries_again():
    """Without drafts there is no evidence: the estimate drifts back to the prior and drafting resumes."""
    policy = Policy(6, 8, adaptive=True)
    run_rounds(policy, accept=0, rounds=12)
    assert policy.lengths(20, 0, True, 1) == (0, 0)
    for _ in range(30):
        policy.observe(0, 0, 0)  # rounds with nothing proposed
    assert policy.lengths(20, 0, True, 1)[1] > 0


def test_pending_tokens_after_a_restore_and_a_trim():
    """A recurrent target goes back to the round's start: its next pass feeds the kept tokens again; a
    trimmable drafter holds what it was fed of them."""
    engine = Rounds(7, 50, Policy(3, 0), True, lambda limit: [])
    plan = engine.plan()
    assert (plan.copied, plan.count, plan.feed) == ([], 3, [7])
    engine.settle(plan, 3, 1, [10, 11], lambda fed, keep: 0, lambda fed, keep, one: keep)
    assert engine.target_pending == [7, 10, 11] and engine.pending == [11] and engine.emitted == 2
    plan = engine.plan()
    engine.settle(plan, 3, 3, [12, 13, 14, 15], lambda fed, keep: keep, lambda fed, keep, one: keep)
    assert engine.target_pending == [15] and engine.pending == [14, 15], "all accepted: the last draft unseen"


def test_copies_and_drafts_are_judged_apart():
    """A rejected copy says nothing of the drafts after it; drafts are judged by the tokens past the copies."""
    policy = Policy(6, 8, adaptive=True)
    policy.observe(3, 2, 1)  # the 2nd copy rejected: the drafts were never judged
    assert (policy.copies.accepted, policy.copies.rejected) == (1, 1)
    assert (policy.drafts.accepted, policy.drafts.rejected) == (0, 0)
    policy.observe(2, 4, 3)  # both copies and 1 of 4 drafts accepted
    assert (policy.copies.accepted, policy.copies.rejected) == (0.8 + 2, 0.8)
    assert (policy.drafts.accepted, policy.drafts.rejected) == (1, 1)


def test_with_a_draft_threshold_drafts_run_to_their_bound_and_copies_adapt():
    """The threshold ends drafting where the drafter is unsure: the drafter steps stay at their bound, copies adapt."""
    policy = Policy(6, 8, adaptive=True, draft_threshold=0.5)
    for _ in range(12):
        policy.observe(4, 2, 1)  # copies rejected early, the drafts never judged
        policy.observe(0, 6, 6)  # drafts all accepted
    assert policy.lengths(20, 8, True, 1) == (0, 6)
    policy = Policy(6, 8, adaptive=True, draft_threshold=0.5)
    for _ in range(12):
        policy.observe(8, 0, 8)  # every copy accepted
    copies, drafts = policy.lengths(20, 8, True, 1)
    assert copies == 8 and drafts == 0
    assert all(sum(policy.lengths(20, c, True, 1)) == max(6, c) for c in range(9)), "drafts fill the rest"


def test_one_acceptance_rule_for_live_rounds_and_the_replay():
    """Greedy: the proposals the target agrees with in a row, then its own token; a recorded answer that
    ends inside the round emits what it has. Sampled: the residual draw at the first rejection, else the
    bonus draw."""
    assert greedy_accept([5, 6, 7], [5, 6, 9, 4]) == (2, [5, 6, 9])
    assert greedy_accept([5, 6, 7], [5, 6, 7, 4]) == (3, [5, 6, 7, 4])
    assert greedy_accept([8, 6], [5, 6, 1]) == (0, [5])
    assert greedy_accept([], [3]) == (0, [3])
    assert greedy_accept([5, 6, 7], [5, 6]) == (2, [5, 6]), "the answer ended after two tokens"
    assert sampled_accept([5, 6, 7], [True, False, True], [11, 12, 13], 14) == (1, [5, 12])
    assert sampled_accept([5, 6], [True, True], [11, 12], 14) == (2, [5, 6, 14])
    assert sampled_accept([], [], [], 14) == (0, [14])


def test_an_adaptive_threshold_follows_how_well_the_drafter_knows_the_request():
    """Drafts accepted more often than the drafter was sure of them scale its probabilities up (drafting goes
    on past the threshold as set); sure drafts that are rejected scale them down (it stops sooner). A static
    setting keeps the threshold as set."""

    def plan_after(policy: Policy, drafted: int, kept: int, probs: list[float]):
        for _ in range(10):
            policy.observe(0, drafted, kept, probs)
        return Rounds(0, -1, policy, True, lambda limit: []).plan()

    hedging = plan_after(Policy(6, 0, adaptive=True, draft_threshold=0.5), 6, 6, [0.6] * 6)
    assert 1.5 < hedging.scale <= SCALE_BOUNDS[1] and hedging.threshold == 0.5
    assert not hedging.stops([0.6, 0.6]), "two drafts at 60% each: on, the request accepts more"
    assert Policy(6, 0, draft_threshold=0.5).draft_threshold == 0.5
    static = plan_after(Policy(6, 0, draft_threshold=0.5), 6, 6, [0.6] * 6)
    assert static.scale == 1.0 and static.stops([0.6, 0.6])
    sure = plan_after(Policy(6, 0, adaptive=True, draft_threshold=0.5), 6, 0, [0.95] * 6)
    assert sure.scale == SCALE_BOUNDS[0] and sure.stops([0.95]), "a sure first draft, rejected every time"
    assert not plan_after(Policy(6, 0, draft_threshold=0.5), 6, 0, [0.95] * 6).stops([0.95])


def test_a_calibration_judges_the_drafts_up_to_the_first_rejection():
    """Drafts after a rejected one (or after a rejected copy) were never judged: they do not count."""
    policy = Policy(6, 8, adaptive=True, draft_threshold=0.5)
    policy.observe(3, 4, 1, [0.9] * 4)  # the 2nd copy rejected
    assert (policy.calibration.accepted, policy.calibration.predicted) == (0, 0)
    policy.observe(0, 4, 1, [0.5, 0.25, 0.125, 0.0625])  # the 2nd draft rejected
    assert (policy.calibration.accepted, policy.calibration.predicted) == (1, 0.75)
    policy.observe(2, 2, 4, [0.5, 0.5])  # both copies and both drafts accepted
    assert (policy.calibration.accepted, policy.calibration.predicted) == (0.8 + 2, 0.8 * 0.75 + 1)


def test_a_batch_that_drafted_past_a_sequences_proposals_keeps_only_what_it_accepted():
    """In a speculative batch the drafter runs the round's most steps for every sequence: one that proposed
    only copies was still fed filler drafts after them; it keeps its pending token and the accepted copies."""
    engine = Rounds(7, 50, Policy(0, 2), True, lambda limit: [8, 9][:limit])
    plan = engine.plan()
    assert (plan.copied, plan.count, plan.feed) == ([8, 9], 0, [7, 8, 9])
    seen = []
    engine.settle(
        plan, 0, 1, [8, 5], lambda fed, keep: keep, lambda fed, keep, one: seen.append((fed, keep)) or keep, steps=3
    )
    assert seen == [(5, 2)], "fed its pending token, 2 copies and 2 filler drafts; keeps 7 and the accepted 8"
    assert engine.pending == [5] and engine.target_pending == [5] and engine.emitted == 2
