"""Pick the fastest settings for a pair on this machine by replaying greedy decoding exactly.

For greedy decoding, what a round accepts is known without running it: a draft is accepted
when it equals the target's next token, and while every earlier draft of the round was
right, the drafter's next draft is its prediction given the true context. One pass of the
drafter over the target's own answers (teacher forcing) therefore gives, at every position,
the draft any head would make (top-k rows, top-k plus the context's ids, or the full head)
and its confidence; prompt lookup depends on the context alone. Replaying rounds over those
answers gives tau for every setting; measured step times turn it into tokens/s.

The replay is exact for tau and for the number of drafts when drafting a fixed length; with
a draft threshold, the confidences of drafts made after a wrong one (whose context the
target never saw) are approximated by the teacher-forced ones.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .engine import STEP_COST, TOKEN_COST, Policy, Rounds, greedy_accept
from .errors import VocabTrimError
from .heads import DraftHead
from .lookup import PromptLookup
from .profiles import Setting
from .rollback import needs_restore, rewind, save
from .spec_batch import Lane, SpecBatch, batchable, give_back
from .speculative import _prefill, speculative_generate_step
from .trim import head_rows, trimmed_copy

GAMMAS = tuple(range(0, 13))  # drafter tokens per round (0: prompt lookup alone)
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# (lookup_ngram, lookup_tokens); (0, 0): off
LOOKUPS = ((0, 0), (1, 8), (2, 4), (2, 8), (2, 16), (3, 8), (3, 16), (3, 32), (4, 16), (4, 32), (5, 16), (5, 32))
CURVE_TRIES = 3  # measurements of the verify curve, each point's fastest kept, before a falling curve is refused
SPREAD = 1.3  # a cost whose repeats' median exceeds their fastest by more than this is disturbed by load
SLACK = 5e-3  # seconds of jitter never called disturbance (tiny models time in milliseconds)
CONTEXT_ROWS_TIMED = 256  # context rows added when timing a context head step
BATCH_SIZES = (2, 3, 4, 6, 8)  # batch sizes whose passes are timed (others interpolated)
BATCH_GAMMAS = (1, 2, 3, 4, 5)  # draft lengths a speculative batch may use (fixed: no threshold)
PREFILL_STEP = 512  # prompt tokens per prefill pass, as the benchmark and the server


@dataclass
class Trace:
    """One tuning question: the target's greedy answer and the drafter's teacher-forced picks."""

    prompt: list[int]
    answer: list[int]  # the target's greedy tokens, EOS included when reached
    max_tokens: int
    full_pick: np.ndarray  # (T,) full-head argmax at each answer position
    full_conf: np.ndarray  # (T,) its probability
    static: dict  # k -> (pick, best logit, logsumexp) arrays over the k kept rows
    context: dict  # k -> (ids, first position, running best value, running best id, running logsumexp)


def _teacher_forced_logits(drafter: nn.Module, prompt: list[int], answer: list[int]) -> mx.array:
    """(T, V) full-head logits predicting each answer token from the true context."""
    head = DraftHead(drafter, context_head=False)
    if not head.split:
        raise VocabTrimError("tuning needs an mlx-lm drafter whose logits are head(body(x)): this drafter's are not")
    cache = make_prompt_cache(drafter)
    tokens = mx.array(prompt + answer[:-1], mx.uint32)
    _prefill(drafter, cache, tokens[: len(prompt) - 1], PREFILL_STEP)
    hidden = head.split.body(tokens[len(prompt) - 1 :][None], cache=cache)
    return head.split.head(hidden)[0].astype(mx.float32)


def trace(
    model: nn.Module,
    drafter: nn.Module,
    prompt: list[int],
    max_tokens: int,
    eos: set[int],
    keeps: dict[int, list[int]],
    answer: list[int] | None = None,
) -> Trace:
    """Decode `prompt` greedily (losslessly, with the full drafter) unless its `answer` is given,
    and record what every head in `keeps` (k -> kept ids) and the full head would draft at
    each position."""
    if answer is None:
        answer = []
        for token, _, _ in speculative_generate_step(
            prompt, model, drafter, num_draft_tokens=4, max_tokens=max_tokens, context_head=False
        ):
            answer.append(token)
            if token in eos:
                break
    logits = np.array(_teacher_forced_logits(drafter, prompt, answer))
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse_full = np.log(np.exp(shifted).sum(axis=1))
    full_pick = logits.argmax(axis=1)
    full_conf = np.exp(shifted[np.arange(len(answer)), full_pick] - lse_full)
    order = {}  # ids of the context in order of first appearance: prompt ids at -1, answer ids at their index
    for i in prompt:
        order.setdefault(i, -1)
    for pos, i in enumerate(answer):
        order.setdefault(i, pos)
    static, context = {}, {}
    for k, keep in keeps.items():
        kept = np.asarray(keep)
        sub = logits[:, kept]
        best = sub.max(axis=1)
        lse = best + np.log(np.exp(sub - best[:, None]).sum(axis=1))
        static[k] = (kept[sub.argmax(axis=1)], best, lse)
        keep_set = set(keep)
        extra = [(i, p) for i, p in order.items() if i not in keep_set and i < logits.shape[1]]
        ids = np.asarray([i for i, _ in extra], dtype=np.int64)
        first = np.asarray([p for _, p in extra], dtype=np.int64)
        ext = logits[:, ids] if len(ids) else np.zeros((len(answer), 0), np.float32)
        run_best = np.maximum.accumulate(ext, axis=1) if len(ids) else ext
        run_id = np.zeros_like(ext, dtype=np.int64)
        best_val = np.full(len(answer), -np.inf)
        best_id = np.zeros(len(answer), dtype=np.int64)
        for j in range(len(ids)):
            better = ext[:, j] > best_val
            best_val = np.where(better, ext[:, j], best_val)
            best_id = np.where(better, ids[j], best_id)
            run_id[:, j] = best_id
        run_lse = np.logaddexp.accumulate(ext, axis=1) if len(ids) else ext
        context[k] = (ids, first, run_best, run_id, run_lse)
    return Trace(prompt, answer, max_tokens, full_pick, full_conf, static, context)


def _pick(tr: Trace, setting: Setting, pos: int, start: int) -> tuple[int, float]:
    """The draft a head makes at answer position `pos` in a round starting at `start`, and its probability."""
    if setting.k is None:
        return int(tr.full_pick[pos]), float(tr.full_conf[pos])
    pick, best, lse = tr.static[setting.k]
    top, chosen, total = best[pos], int(pick[pos]), lse[pos]
    if setting.context_head:
        ids, first, run_best, run_id, run_lse = tr.context[setting.k]
        m = int(np.searchsorted(first, start, side="left"))  # context ids known at the round's start
        if m:
            if run_best[pos, m - 1] > top:
                top, chosen = run_best[pos, m - 1], int(run_id[pos, m - 1])
            total = np.logaddexp(total, run_lse[pos, m - 1])
    return chosen, float(np.exp(top - total))


def _lookups(tr: Trace, ngram: int, longest: int) -> list[list[int]]:
    """Prompt lookup's proposal (up to `longest` tokens) at every round start position."""
    index = PromptLookup(ngram)
    index.extend(tr.prompt)
    proposals = []
    for token in tr.answer:
        proposals.append(index.propose(longest))
        index.extend([token])
    return proposals


@dataclass
class Costs:
    """Measured seconds: a target pass over n tokens, a drafter step per head, a drafter pass over n tokens."""

    verify: dict[int, float]
    draft: dict[tuple[int | None, bool], float]  # (k, context head) -> seconds of one step
    feed: dict[int, float]  # n tokens fed to the drafter at once -> extra seconds over one

    def t_verify(self, n: int) -> float:
        return float(np.interp(n, sorted(self.verify), [self.verify[x] for x in sorted(self.verify)]))

    def t_feed(self, n: int) -> float:
        return float(np.interp(n, sorted(self.feed), [self.feed[x] for x in sorted(self.feed)]))

    def record(self) -> dict:
        """A JSON form `Costs.of` reads back."""
        draft = [[k, ctx, t] for (k, ctx), t in self.draft.items()]
        return {"verify": self.verify, "draft": draft, "feed": self.feed}

    @classmethod
    def of(cls, record: dict) -> "Costs":
        verify = {int(n): t for n, t in record["verify"].items()}
        feed = {int(n): t for n, t in record["feed"].items()}
        return cls(verify, {(k, ctx): t for k, ctx, t in record["draft"]}, feed)

    def relative(self, k: int | None, context_head: bool) -> tuple[float, float]:
        """(drafter step, each verified token past the first) in one-token target passes: the costs
        adaptive lengths weigh, rounded so profiles stay readable."""
        one, longest = self.t_verify(1), max(self.verify)
        step = self.draft[(k, context_head and k is not None)] / one
        token = (self.t_verify(longest) - one) / max(longest - 1, 1) / one
        return round(step, 3), round(token, 3)


def replay(
    tr: Trace,
    setting: Setting,
    costs: Costs,
    lookups: dict[int, list[list[int]]],
    restores: tuple[bool, bool] = (False, False),
) -> tuple[int, int, int, float]:
    """(tokens, target calls, drafter steps, seconds) of decoding `tr`'s answer with `setting`: the
    generator's own rounds (`engine.Rounds`), with drafts and acceptance read off the trace.
    `restores` (target, drafter): that model's layers go back to the round's start after a rejection
    (recurrent layers), so its next pass feeds the kept tokens again."""
    answer, total = tr.answer, len(tr.answer)
    policy = Policy(
        setting.num_draft_tokens,
        setting.lookup_tokens,
        setting.adaptive,
        setting.step_cost,
        setting.token_cost,
        setting.draft_threshold,
    )
    offered = lookups[setting.lookup_ngram] if setting.lookup_ngram else None

    def propose(limit: int) -> list[int]:
        return offered[rounds.emitted][:limit] if offered else []

    rounds = Rounds(tr.prompt[-1], tr.max_tokens, policy, True, propose)
    calls = steps = 0
    seconds = 0.0
    t_step = costs.draft[(setting.k, setting.context_head and setting.k is not None)]
    while rounds.more() and rounds.emitted < total:
        start = rounds.emitted
        plan = rounds.plan()
        copied = plan.copied
        proposals, probs = list(copied), []
        for j in range(plan.count):  # the drafter's picks, up to its threshold stop
            pos = start + len(copied) + j
            pick, prob = _pick(tr, setting, pos, start) if pos < total else (-1, 0.5)
            proposals.append(pick)
            probs.append(prob)
            if plan.stops(probs):
                break
        made = len(proposals) - len(copied)
        accepted, tokens = greedy_accept(proposals, answer[start : start + len(proposals) + 1])
        seconds += made * t_step + costs.t_verify(len(rounds.target_pending) + len(copied) + made)
        if made:
            seconds += costs.t_feed(len(plan.feed))
        rounds.settle(
            plan,
            made,
            accepted,
            tokens,
            lambda fed, keep: keep if fed == keep or not restores[0] else 0,
            lambda fed, keep, one_pass: keep if fed == keep or not restores[1] else 0,
            probs,
        )
        calls += 1
        steps += made
    return total, calls, steps, seconds


def settings_grid(ks: Sequence[int], costs: Costs | None = None) -> list[Setting]:
    """Every setting tuning can weigh: heads (full, top-k, top-k plus context rows), draft lengths,
    thresholds, prompt lookup, static or adaptive lengths (priced with `costs` when given)."""
    heads = [(None, False)] + [(k, ctx) for k in ks for ctx in (False, True)]
    grid = []
    for k, ctx in heads:
        step, token = costs.relative(k, ctx) if costs is not None else (STEP_COST, TOKEN_COST)
        for gamma in GAMMAS if k is None else GAMMAS[1:]:  # lookup alone uses no head: weighed once
            for threshold in THRESHOLDS if gamma > 1 else (0.0,):
                for ngram, cap in LOOKUPS:
                    if gamma == 0 and not ngram:
                        continue
                    for adaptive in (False, True):
                        grid.append(Setting(k, gamma, threshold, ctx, ngram, cap or 8, adaptive, step, token))
    return grid


def search(
    traces: list[Trace],
    ks: Sequence[int],
    costs: Costs,
    lookups: list[dict],
    restores: tuple[bool, bool] = (False, False),
    finalists: int = 12,
) -> list[dict]:
    """Predictions for the settings worth weighing, in two stages (the whole grid is too large to
    replay): every head, draft length and threshold with static lengths and no lookup, then the
    `finalists` best of them (and every full-head length, mlx-lm's baseline) with every lookup,
    static and adaptive."""
    grid = settings_grid(ks, costs)
    first = [s for s in grid if not s.adaptive and (not s.lookup_ngram or s.num_draft_tokens == 0)]
    rows = [asdict(s) | predict(traces, s, costs, lookups, restores) for s in first]
    ranked = sorted(rows, key=lambda row: -row["predicted_tokens_per_s"])
    keep = {(r["k"], r["num_draft_tokens"], r["draft_threshold"], r["context_head"]) for r in ranked[:finalists]}
    seen = {Setting.of(r) for r in rows}
    for s in grid:
        if (s.k, s.num_draft_tokens, s.draft_threshold, s.context_head) in keep and s not in seen:
            rows.append(asdict(s) | predict(traces, s, costs, lookups, restores))
    return rows


def predict(
    traces: list[Trace],
    setting: Setting,
    costs: Costs,
    lookups: list[dict],
    restores: tuple[bool, bool] = (False, False),
) -> dict:
    """Expected tau, drafter steps per call and tokens/s of `setting` over the traces."""
    tokens = calls = steps = 0
    seconds = 0.0
    for tr, lk in zip(traces, lookups, strict=True):
        t, c, s, sec = replay(tr, setting, costs, lk, restores)
        tokens, calls, steps, seconds = tokens + t, calls + c, steps + s, seconds + sec
    return {
        "expected_tau": tokens / calls,
        "drafter_steps_per_call": steps / calls,
        "predicted_tokens_per_s": tokens / seconds,
    }


def _timed(fn: Callable[[], mx.array], what: str, repeats: int = 5, tries: int = 3) -> float:
    """The fastest of `repeats` timed calls after a warm one (see `_timed_in_turn`)."""
    return _timed_in_turn({0: fn}, lambda _: what, repeats, tries)[0]


def _timed_in_turn(
    steps: dict[int, Callable[[], Any]], what: Callable[[int], str], repeats: int, tries: int
) -> dict[int, float]:
    """The fastest of `repeats` timed calls of each of `steps` (name -> function whose result is evaluated),
    after a warm one each, taken in turn (each step, then each again) so that a machine whose speed
    drifts slows them alike. Repeats that disagree (their median over SPREAD times the fastest) are
    measured again, `tries` times in all, then refused: other work on the machine would make every
    prediction wrong."""
    for step in steps.values():
        step()
    for _ in range(tries):
        times: dict[int, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                mx.synchronize()
                tic = time.perf_counter()
                mx.eval(step())
                mx.synchronize()
                times[name].append(time.perf_counter() - tic)
        disturbed = [name for name, t in times.items() if float(np.median(t)) > SPREAD * min(t) + SLACK]
        if not disturbed:
            return {name: min(t) for name, t in times.items()}
    t = times[disturbed[0]]
    raise VocabTrimError(
        f"timing {what(disturbed[0])} is disturbed by other work ({min(t) * 1e3:.1f} to "
        f"{float(np.median(t)) * 1e3:.1f} ms over repeats): tune on an idle machine"
    )


def check_verify_curve(verify: dict[int, float]) -> None:
    """A pass over more tokens never costs much less than one over fewer: a curve that falls was
    disturbed by load while it was measured."""
    slowest = 0.0
    for n in sorted(verify):
        if verify[n] * SPREAD + SLACK < slowest:
            raise VocabTrimError(
                f"a target pass over {n} tokens timed {verify[n] * 1e3:.1f} ms, below {slowest * 1e3:.1f} ms for "
                "fewer: the timings were disturbed by other work; tune on an idle machine"
            )
        slowest = max(slowest, verify[n])


def measure_costs(
    model: nn.Module, drafters: dict[int | None, nn.Module], context: list[int], max_verify: int
) -> Costs:
    """Time a target pass over 1..max_verify tokens, one drafter step per head and the drafter
    over several fed tokens, each after `context` (caches rolled back between repeats)."""

    def step(run: Callable[[list], mx.array], cache: list, n: int) -> Callable[[], mx.array]:
        def call() -> mx.array:
            saved = save(cache)
            out = run(cache)
            mx.eval(out)
            rewind(cache, saved, n, 0, one_pass=True)
            return out

        return call

    cache = make_prompt_cache(model)
    _prefill(model, cache, mx.array(context, mx.uint32), PREFILL_STEP)
    points = sorted({n for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 25) if n <= max_verify} | {max_verify})
    verify: dict[int, float] = {}
    for attempt in range(CURVE_TRIES):  # a slow spell of a few seconds on a shared machine: the curve again
        for n in points:
            tokens = mx.array((context * n)[:n], mx.uint32)[None]
            t = _timed(step(lambda c, t=tokens: model(t, cache=c), cache, n), f"a target pass over {n} tokens")
            verify[n] = min(verify.get(n, t), t)
        try:
            check_verify_curve(verify)
            break
        except VocabTrimError:
            if attempt == CURVE_TRIES - 1:
                raise
    slowest = 0.0
    for n in points:  # a pass over more tokens never costs less: what noise remains is evened out upwards
        slowest = verify[n] = max(slowest, verify[n])
    draft, feed = {}, {}
    for k, drafter in drafters.items():
        cache = make_prompt_cache(drafter)
        _prefill(drafter, cache, mx.array(context, mx.uint32), PREFILL_STEP)
        for ctx in (False, True) if k is not None else (False,):
            head = DraftHead(drafter, context_head=ctx)
            if ctx:
                rows = head.full.weight.shape[0]
                head.add([i for i in range(rows) if i not in head.kept][:CONTEXT_ROWS_TIMED])
            token = mx.array(context[-1:], mx.uint32)
            draft[(k, ctx)] = _timed(step(lambda c, h=head, t=token: h(t, c), cache, 1), "a drafter step")
        if k is None:
            head = DraftHead(drafter, context_head=False)
            for n in (1, 4, 16):
                tokens = mx.array((context * n)[:n], mx.uint32)
                feed[n] = _timed(step(lambda c, h=head, t=tokens: h(t, c), cache, n), f"the drafter over {n} tokens")
    base = feed.get(1, 0.0)
    return Costs(verify, draft, {n: max(t - base, 0.0) for n, t in feed.items()})


BATCH_MARGIN = 1.1  # the predicted gain a speculative batch must show over the plain one


@dataclass
class BatchCosts:
    """Measured seconds per batch size: a plain step (a target pass over one token of every sequence)
    and a whole speculative round at each draft length (the drafter steps, the target pass, acceptance
    and rolling the caches back: everything a round of the batch runs, its Python work included)."""

    plain: dict[int, float]
    rounds: dict[int, dict[int, float]]

    def t_plain(self, size: int) -> float:
        sizes = sorted(self.plain)
        return float(np.interp(size, sizes, [self.plain[b] for b in sizes]))

    def t_round(self, size: int, gamma: int) -> float:
        sizes = sorted(self.rounds)
        return float(np.interp(size, sizes, [self.rounds[b][gamma] for b in sizes]))


def _time_batch(
    model: nn.Module, batch: "SpecBatch", context: list[int], gammas: Sequence[int], repeats: int = 3, tries: int = 3
) -> tuple[float, dict[int, float]]:
    """(seconds of a plain step, of a whole round at each draft length in `gammas`) for `batch`, timed
    in turn (`_timed_in_turn`)."""
    size = len(batch)
    one = mx.array([context[-1:]] * size, mx.uint32)

    def plain_step() -> list:
        mx.eval(model(one, cache=batch.target_cache))
        give_back(batch.target_cache, [1] * size)
        return [c.state for c in batch.target_cache]

    def whole_round(gamma: int) -> list:
        batch.round([gamma] * size)
        return [c.state for c in batch.target_cache + batch.draft_cache]

    steps = {0: plain_step} | {g: lambda g=g: whole_round(g) for g in gammas}

    def name(g: int) -> str:
        return f"{'a plain step' if g == 0 else f'a round of {g} drafts'} of {size} sequences"

    fastest = _timed_in_turn(steps, name, repeats, tries)
    return fastest.pop(0), fastest


def measure_batch_costs(
    model: nn.Module,
    drafter: nn.Module,
    context_head: bool,
    context: list[int],
    sizes: Sequence[int],
    gammas: Sequence[int],
) -> BatchCosts:
    """Time, for each batch size, a plain step and a whole speculative round (`spec_batch`) at each of
    `gammas` drafts, with the context rows of a context head as `measure_costs` times them. Sequence i
    holds `context` less its last 5i tokens: sequences of different lengths that accept differently, so
    rounds pay for rolling each one's rejected entries into its padding as real batches do."""
    contexts = [context[: len(context) - min(5 * i, len(context) // 2)] for i in range(max(sizes))]
    caches = []
    for ctx in contexts:
        target_cache, draft_cache = make_prompt_cache(model), make_prompt_cache(drafter)
        _prefill(model, target_cache, mx.array(ctx[:-1], mx.uint32), PREFILL_STEP)
        _prefill(drafter, draft_cache, mx.array(ctx[:-1], mx.uint32), PREFILL_STEP)
        caches.append((target_cache, draft_cache))
    plain, rounds = {}, {}
    for size in sizes:
        batch = SpecBatch(model, drafter)
        for ctx, (target_cache, draft_cache) in zip(contexts[:size], caches, strict=False):
            head = DraftHead(drafter, context_head, head_rows(model))
            if head.full is not None:
                head.add([i for i in range(head.full.weight.shape[0]) if i not in head.kept][:CONTEXT_ROWS_TIMED])
            batch.join(Lane(ctx[-1], head), target_cache, draft_cache)
        plain[size], rounds[size] = _time_batch(model, batch, context, gammas)
    return BatchCosts(plain, rounds)


def batched_setting(setting: Setting, gamma: int) -> Setting:
    """What a sequence of a speculative batch at draft length `gamma` runs: static lengths, no threshold,
    `setting`'s head and prompt lookup with at most `gamma` copies."""
    return replace(
        setting,
        num_draft_tokens=gamma,
        draft_threshold=0.0,
        adaptive=False,
        lookup_tokens=min(setting.lookup_tokens, gamma),
    )


def batch_schedule(costs: BatchCosts, taus: dict[int, float], largest: int) -> dict:
    """Per batch size 2..`largest`: aggregate tokens/s predicted for the plain batch and for a speculative
    batch at each draft length (every sequence accepting as the tuning answers did: tokens per round
    `taus[g]` in the measured time of a whole round), and the choice: the draft length
    (threshold 0) where speculation is predicted at least `BATCH_MARGIN` faster, else None (plain
    batching: a wrong choice of speculation is slower than mlx-lm's batch, a wrong choice of plain only
    forgoes a gain, and timings here vary by more than the smaller predicted gains)."""
    out = {}
    for size in range(2, largest + 1):
        plain = size / costs.t_plain(size)
        rates = {g: size * tau / costs.t_round(size, g) for g, tau in taus.items()}
        best = max(rates, key=rates.get)
        out[size] = {
            "plain_tokens_per_s": plain,
            "speculative_tokens_per_s": rates,
            "choice": [best, 0.0] if rates[best] > plain * BATCH_MARGIN else None,
        }
    return out


def tune(
    model: nn.Module,
    drafter: nn.Module,
    prompts: list[list[int]],
    max_tokens: int,
    eos: set[int],
    keeps: dict[int, list[int]],
    progress: Callable[[], None] = lambda: None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict:
    """Trace `prompts`, time the steps and predict every setting; returns the best setting, the
    best fixed-length full-head setting (mlx-lm's speculative decoding at its best draft
    length) and the whole prediction table."""
    traces = []
    for prompt in prompts:
        traces.append(trace(model, drafter, prompt, max_tokens, eos, keeps))
        progress()
    longest = max(cap for _, cap in LOOKUPS)
    lookups = [{n: _lookups(tr, n, longest) for n, _ in LOOKUPS if n} for tr in traces]
    drafters = {None: drafter} | {k: trimmed_copy(drafter, keep) for k, keep in keeps.items()}
    costs = measure_costs(model, drafters, prompts[0], max(GAMMAS) + longest + 1)
    restores = (needs_restore(make_prompt_cache(model)), needs_restore(make_prompt_cache(drafter)))
    table = search(traces, list(keeps), costs, lookups, restores)
    best = max(table, key=lambda row: row["predicted_tokens_per_s"])
    baseline = [
        row
        for row in table
        if row["k"] is None
        and not row["lookup_ngram"]
        and not row["draft_threshold"]
        and not row["adaptive"]
        and row["num_draft_tokens"] >= 1
    ]
    best_baseline = max(baseline, key=lambda row: row["predicted_tokens_per_s"])
    top = sorted(table, key=lambda row: -row["predicted_tokens_per_s"])[:40]
    batch = None
    if batch_sizes and batchable(make_prompt_cache(model)) and batchable(make_prompt_cache(drafter)):
        chosen = Setting.of(best)
        head = drafters[chosen.k] if chosen.k in drafters else drafter
        taus = {g: predict(traces, batched_setting(chosen, g), costs, lookups)["expected_tau"] for g in BATCH_GAMMAS}
        measured = measure_batch_costs(model, head, chosen.context_head, prompts[0], batch_sizes, BATCH_GAMMAS)
        plan = batch_schedule(measured, taus, max(batch_sizes))
        batch = {
            "taus": taus,
            "plain": measured.plain,
            "rounds": measured.rounds,
            "sizes": plan,
            "schedule": {size: row["choice"] for size, row in plan.items()},
        }
    return {
        "choice": best,
        "best_static": max((r for r in table if not r["adaptive"]), key=lambda r: r["predicted_tokens_per_s"]),
        "best_adaptive": max(
            (r for r in table if r["adaptive"]), key=lambda r: r["predicted_tokens_per_s"], default=None
        ),
        "mlx_lm_spec": {row["num_draft_tokens"]: row for row in baseline},
        "mlx_lm_spec_best": best_baseline["num_draft_tokens"],
        "top": top,
        "settings_weighed": len(table),
        "costs": costs.record(),
        "restores": restores,
        "t_verify": costs.verify,
        "t_draft": {f"{'full' if k is None else k}{'+ctx' if ctx else ''}": v for (k, ctx), v in costs.draft.items()},
        "t_feed": costs.feed,
        "answers": [len(tr.answer) for tr in traces],
        "full_rows": head_rows(drafter),
        "batch": batch,
    }


def _always_right(tr: Trace) -> Trace:
    """`tr` with a drafter that always drafts the target's next token, certain of it."""
    ones = np.ones(len(tr.answer))
    return Trace(tr.prompt, tr.answer, tr.max_tokens, np.asarray(tr.answer), ones, {}, {})


def bounds(traces: list[Trace], ks: Sequence[int], costs: Costs, restores: tuple[bool, bool] = (False, False)) -> list:
    """Per trace, what the replay says of limits on this machine: (tokens, seconds) of a drafter that is
    always right (its best draft length, at the cheapest head's step), of the best static setting for
    that question alone (an oracle chosen after the fact) and its name."""
    cheapest = min(costs.draft.values())
    right_costs = Costs(costs.verify, {(None, False): cheapest}, costs.feed)
    longest = max(cap for _, cap in LOOKUPS)
    out = []
    for tr in traces:
        lookups = {n: _lookups(tr, n, longest) for n, _ in LOOKUPS if n}
        right = _always_right(tr)
        best_right = max(
            (replay(right, Setting(None, g, 0.0, False, 0), right_costs, lookups, restores) for g in GAMMAS[1:]),
            key=lambda r: r[0] / r[3],
        )
        rows = [r for r in search([tr], ks, costs, [lookups], restores) if not r["adaptive"]]
        best = max(rows, key=lambda row: row["predicted_tokens_per_s"])
        seconds = len(tr.answer) / best["predicted_tokens_per_s"]
        out.append(
            {
                "always_right": (best_right[0], best_right[3]),
                "best_static": (len(tr.answer), seconds),
                "best_static_setting": Setting.of(best).name(),
            }
        )
    return out
