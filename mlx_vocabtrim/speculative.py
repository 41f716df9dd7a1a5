"""Speculative decoding with a (trimmed) drafter and prompt lookup: greedy and exact sampling.

One round: proposals are copied from the context (prompt lookup, q = 1 on its token) and/or
drafted by the drafter in its trimmed space (plus the request's own ids, mapped to target ids
by the head's remap); the target scores [last, x1..xg] in one forward pass, the accepted
prefix plus one correction/bonus token is emitted and both KV caches are rolled back to
what was emitted.
"""

import operator
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_p
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .checks import check_draft_threshold, check_lookup, check_num_draft_tokens, check_temp, check_top_p
from .engine import STEP_COST, TOKEN_COST, Plan, Policy, Rounds, greedy_accept, sampled_accept
from .errors import VocabTrimError
from .heads import DraftHead, model_body
from .lookup import PromptLookup
from .noise import gumbel, head_noise, pick
from .rollback import check_rollback, offset, rewind, save
from .trim import head_rows


@dataclass
class SpecStats:
    """Counters of one generation; updated in place while tokens are yielded."""

    draft_tokens: int = 0  # drafts the target verified, drafted or copied
    lookup_tokens: int = 0  # of them, copied from the context
    accepted_tokens: int = 0  # drafts emitted, counted as they are yielded (none after a stop)
    target_calls: int = 0
    generated_tokens: int = 0
    context_rows: int = 0  # rows the context head added for the request's own ids
    confidences: list[list[float]] | None = field(default=None)  # per round, when a list: see draft_threshold

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.generated_tokens / self.target_calls if self.target_calls else 0.0


@dataclass
class SpeculativeResponse(GenerationResponse):
    """mlx-lm's GenerationResponse plus the speculation counters so far."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_calls: int = 0
    lookup_tokens: int = 0


def sampling_logprobs(logits: mx.array, temp: float, top_p: float) -> mx.array:
    """Log-probs tokens are drawn from, as mlx-lm's make_sampler: top-p on raw log-probs, then temperature."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    # from the most likely token down: a temperature too small for float32 (1e-300 is 0 there) leaves
    # the most likely tokens, not 0 / 0 = NaN everywhere
    shifted = logprobs - logprobs.max(axis=-1, keepdims=True)
    scaled = mx.where(shifted < 0, shifted / temp, 0.0)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def _prefill(model: nn.Module, cache: list, tokens: mx.array, step: int) -> None:
    """Fill `cache` with `tokens` in passes of `step`, through the model body where there is one:
    the KV cache needs no logits."""
    body = model_body(model)
    body = model if body is None else body
    for start in range(0, tokens.size, step):
        body(tokens[start : start + step][None], cache=cache)
        mx.eval([c.state for c in cache])
    mx.clear_cache()


def _catch_up(model: nn.Module, cache: list, pending: list[int], step: int) -> None:
    """Feed a reused cache the pending tokens but the last, as the next call expects: the caller
    names only the tokens it holds, and a cache whose layers count no tokens cannot be told apart."""
    if len(pending) > 1:
        _prefill(model, cache, mx.array(pending[:-1], mx.uint32), step)


def proposal_row(q: mx.array, remap: mx.array | None, vocab: int) -> mx.array:
    """A drafter's probabilities over its rows as a distribution over the target's `vocab` ids.

    Trimmed: scattered through the remap (zero elsewhere). Untrimmed heads may score more
    or fewer rows than the target (padded vocabularies): ids the target cannot emit are
    dropped, which `verify_sampled` accounts for (they are never accepted).
    """
    if remap is not None:
        return mx.put_along_axis(mx.zeros((vocab,), mx.float32), remap, q, axis=-1)
    return q[:vocab] if q.shape[-1] >= vocab else mx.pad(q, [(0, vocab - q.shape[-1])])


def verify_sampled(p_logprobs: mx.array, drafted: mx.array, q: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
    """Speculative sampling of one round, on device.

    p_logprobs: (gamma+1, V) target log-probs; drafted: (gamma,) target ids, each drawn from
    its row of q: (gamma, V) proposal probabilities over the target's ids (one-hot for a
    copied token). Returns accept flags (draft x kept with probability min(1, p(x)/q(x))),
    a draw from normalize(max(p - q, 0)) for every position, and the bonus draw from p
    after the last draft. A drafted id the target cannot emit is never accepted.
    """
    gamma = drafted.size
    bonus = mx.random.categorical(p_logprobs[gamma])
    if gamma == 0:
        return mx.array([], mx.bool_), mx.array([], mx.uint32), bonus
    p = mx.exp(p_logprobs[:gamma])
    vocab = p.shape[-1]
    ids = drafted[:, None].astype(mx.int32)
    inside = ids < vocab
    ids = mx.minimum(ids, vocab - 1)
    p_draft = mx.where(inside, mx.take_along_axis(p, ids, axis=-1), 0.0)[:, 0]
    q_draft = mx.where(inside, mx.take_along_axis(q, ids, axis=-1), 1.0)[:, 0]
    accept = mx.random.uniform(shape=(gamma,)) * q_draft < p_draft
    residual = mx.maximum(p - q, 0.0)
    return accept, mx.random.categorical(mx.log(residual)), bonus


def bias_vector(logit_bias: dict[int, float], vocab: int) -> mx.array:
    bad = next((i for i in logit_bias if not 0 <= int(i) < vocab), None)
    if bad is not None:
        raise VocabTrimError(f"logit_bias names token id {bad}, outside the vocabulary [0, {vocab})")
    bias = mx.zeros((vocab,), mx.float32)
    ids = mx.array([int(i) for i in logit_bias], mx.int32)
    return mx.put_along_axis(bias, ids, mx.array(list(logit_bias.values()), mx.float32), axis=-1)


def speculative_generate_step(
    prompt: mx.array | Sequence[int],
    model: nn.Module,
    draft_model: nn.Module | None = None,
    *,
    num_draft_tokens: int = 3,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    stats: SpecStats | None = None,
    draft_threshold: float = 0.0,
    context_head: bool = True,
    lookup_ngram: int = 0,
    lookup_tokens: int = 8,
    logit_bias: dict[int, float] | None = None,
    context: Sequence[int] = (),
    adaptive: bool = False,
    step_cost: float = STEP_COST,
    token_cost: float = TOKEN_COST,
    seed: int | None = None,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield (token, target logprobs, from_draft) like mlx-lm's speculative_generate_step.

    Greedy (temp 0) output equals the target's own greedy decoding. With temp > 0 a draft
    x is accepted with probability min(1, p(x)/q(x)), otherwise a token is drawn from
    normalize(max(p - q, 0)); q is zero outside the drafter's rows (one-hot for a copied
    token), so the output follows the target's distribution exactly. `draft_model=None`
    decodes with the target alone (plus prompt lookup, when on). `prompt_cache` holds the
    target's layers, then the drafter's; `context` names the tokens the target's layers
    already hold, for lookup and the context head, and to catch the drafter's layers up where
    they lag (a generator closed early leaves the drafter's last tokens unprocessed).

    - `draft_threshold` > 0 ends a round's drafting once the product of the drafter's
      probabilities of its own drafts falls below it (the last of them is still verified).
      When `stats.confidences` is a list, each round appends its running products.
    - `context_head`: a trimmed drafter that kept its full head also scores the rows of
      every id in the context and output so far (`DraftHead`).
    - `lookup_ngram` n > 0: where the context's last n (or more) tokens occurred before, up
      to `lookup_tokens` tokens that followed are proposed first, for free; the drafter
      drafts the rest of `num_draft_tokens`, if any.
    - `adaptive`: `num_draft_tokens` and `lookup_tokens` are bounds; each round copies and drafts what
      this request's acceptance so far makes fastest, with `step_cost` and `token_cost` the relative
      costs of a drafter step and of a verified token (`engine.Policy`); with a `draft_threshold`, the
      threshold applies to the drafter's probabilities as this request's acceptance so far calibrates
      them (`engine.Calibration`).
    - `logit_bias` {id: bias} is added to the target's logits.
    - `seed` (with temp > 0): draws come from the noise of (seed, position) instead of the global
      generator, drafts and the target's tokens alike, and a draft is accepted where it is the
      target's draw (`noise`): the output is what decoding with that seed and no drafts gives,
      token for token, whatever the settings; positions count the tokens of `context` and `prompt`.
    """
    prompt = (prompt if isinstance(prompt, mx.array) else mx.array(list(prompt))).astype(mx.uint32)
    if prompt.size == 0:
        raise VocabTrimError("the prompt is empty: give at least one token")
    check_num_draft_tokens(num_draft_tokens)
    check_draft_threshold(draft_threshold)
    check_temp(temp)
    check_top_p(top_p)
    check_lookup(lookup_ngram, lookup_tokens)
    stats = SpecStats() if stats is None else stats
    if prompt_cache is None:
        target_cache = make_prompt_cache(model)
        draft_cache = [] if draft_model is None else make_prompt_cache(draft_model)
    else:
        split = len(make_prompt_cache(model))
        target_cache, draft_cache = prompt_cache[:split], prompt_cache[split:]
    if draft_model is not None or lookup_ngram > 0:
        check_rollback(target_cache, "target")
        check_rollback(draft_cache, "drafter")
    sampling = temp > 0
    coupled = sampling and seed is not None
    vocab = head_rows(model)
    track = draft_threshold > 0 or stats.confidences is not None
    history = [*context, *prompt.tolist()]
    head = None if draft_model is None else DraftHead(draft_model, context_head, vocab)
    lookup = PromptLookup(lookup_ngram) if lookup_ngram else None
    if head is not None:
        head.add(history)
    if lookup is not None:
        lookup.extend(history)
    bias = bias_vector(logit_bias, vocab) if logit_bias else None

    def draft(plan: Plan, at: int) -> tuple[list[mx.array], list[mx.array], list[float]]:
        """Up to `plan.count` drafted target ids after `plan.feed` (tokens the drafter has not seen), the
        first at position `at`, their q rows over the head's rows (when sampling by rejection) and, when
        tracked, the drafter's probability of each given the ones before; drafting stops where the plan
        says (`Plan.stops`)."""
        ids, qs, probs = [], [], []
        y = mx.array(plan.feed, mx.uint32)
        for j in range(plan.count):
            logits = head(y, draft_cache)
            if coupled:
                logq = sampling_logprobs(logits, temp, top_p)
                index = pick(logq, head_noise(gumbel(seed, at + j, 1, vocab)[0], head.remap, logq.shape[-1]))
            elif sampling:
                logq = sampling_logprobs(logits, temp, top_p)
                index = mx.random.categorical(logq)
                qs.append(mx.exp(logq))
            else:
                index = mx.argmax(logits, axis=-1)
            token = index if head.remap is None else head.remap[index]
            y = token.reshape(1).astype(mx.uint32)
            ids.append(y)
            if track:
                chosen = logq[index] if sampling else logits[index] - mx.logsumexp(logits)
                probs.append(mx.exp(chosen).item())
                if plan.stops(probs):
                    break
            else:
                mx.async_eval(y)
        return ids, qs, probs

    lag = 0
    if draft_model is not None and context:
        held, drafted = offset(target_cache), offset(draft_cache)
        lag = held - drafted if held is not None and drafted is not None else 0
    if not 0 <= lag <= len(context):
        raise VocabTrimError(
            f"the drafter's cache is {lag} tokens behind the target's, but `context` names {len(context)}: "
            "pass the tokens the target's cache holds as `context`"
        )
    _prefill(model, target_cache, prompt[:-1], prefill_step_size)
    if draft_model is not None:
        behind = mx.array(list(context[len(context) - lag :]), mx.uint32) if lag else prompt[:0]
        _prefill(draft_model, draft_cache, mx.concatenate([behind, prompt[:-1]]), prefill_step_size)
    rounds = Rounds(
        history[-1],
        max_tokens,
        Policy(num_draft_tokens, lookup_tokens, adaptive, step_cost, token_cost, draft_threshold),
        head is not None,
        lookup.propose if lookup is not None else lambda limit: [],
    )
    plan, ids, probs, target_saved, draft_saved, open_round = None, [], [], [], [], None

    def settle(kept: int, tokens: list[int]) -> None:
        rounds.settle(
            plan,
            len(ids),
            kept,
            tokens,
            lambda fed, keep: rewind(target_cache, target_saved, fed, keep, one_pass=True),
            lambda fed, keep, one_pass: rewind(draft_cache, draft_saved, fed, keep, one_pass),
            probs,
        )

    try:
        while rounds.more():
            plan = rounds.plan()
            copied = plan.copied
            draft_saved = save(draft_cache) if plan.count else []
            at = len(history) + rounds.emitted  # the position of the round's first proposal
            ids, qs, probs = draft(plan, at + len(copied)) if plan.count else ([], [], [])
            gamma = len(copied) + len(ids)
            if stats.confidences is not None:
                stats.confidences.append(list(accumulate(probs, operator.mul)))
            proposals = mx.concatenate([mx.array(copied, mx.uint32), *ids]) if gamma else mx.array([], mx.uint32)
            target_saved = save(target_cache) if gamma else []
            inputs = mx.concatenate([mx.array(rounds.target_pending, mx.uint32), proposals])
            logits = model(inputs[None], cache=target_cache)[0, -gamma - 1 :]
            if bias is not None:
                logits = logits + bias
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if coupled:
                picks = pick(sampling_logprobs(logits, temp, top_p), gumbel(seed, at, gamma + 1, vocab))
                mx.eval(picks, proposals)
                n, tokens = greedy_accept(proposals.tolist(), picks.tolist())
            elif sampling:
                q = None
                if gamma:
                    one_hot = [(mx.arange(vocab) == c).astype(mx.float32) for c in copied]
                    q = mx.stack(one_hot + [proposal_row(r, head.remap, vocab) for r in qs])
                accept, residual_draws, bonus = verify_sampled(sampling_logprobs(logits, temp, top_p), proposals, q)
                mx.eval(accept, residual_draws, bonus, proposals)
                n, tokens = sampled_accept(proposals.tolist(), accept.tolist(), residual_draws.tolist(), bonus.item())
            else:
                choice = mx.argmax(logits, axis=-1)
                mx.eval(choice, proposals)
                n, tokens = greedy_accept(proposals.tolist(), choice.tolist())
            stats.target_calls += 1
            stats.draft_tokens += gamma
            stats.lookup_tokens += len(copied)
            for j, token in enumerate(tokens):
                open_round = j
                stats.generated_tokens += 1
                stats.accepted_tokens += j < n
                yield token, logprobs[j], j < n
            open_round = None
            settle(n, tokens)
            if lookup is not None:
                lookup.extend(tokens)
            if head is not None:
                head.add(tokens)
                stats.context_rows = head.context_rows
    finally:
        if open_round is not None:
            settle(open_round, tokens[: open_round + 1])
        if prompt_cache is not None:
            _catch_up(model, target_cache, rounds.target_pending, prefill_step_size)
            if draft_model is not None and offset(draft_cache) is None:
                _catch_up(draft_model, draft_cache, rounds.pending, prefill_step_size)


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | mx.array | Sequence[int],
    draft_model: nn.Module | None = None,
    *,
    max_tokens: int = 256,
    **kwargs: Any,
) -> Generator[SpeculativeResponse, None, None]:
    """Stream text like mlx_lm.stream_generate; stops after EOS or max_tokens.

    Each response also carries the speculation counters so far. Extra keyword
    arguments go to `speculative_generate_step`.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        if not prompt:
            raise VocabTrimError("the prompt is empty: give some text")
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    prompt = prompt if isinstance(prompt, mx.array) else mx.array(list(prompt), mx.uint32)
    if max_tokens == 0:
        return
    stats = SpecStats()
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = set(tokenizer.eos_token_ids)
    tokens = speculative_generate_step(prompt, model, draft_model, max_tokens=max_tokens, stats=stats, **kwargs)
    tic = time.perf_counter()
    prompt_tps = 0.0
    try:
        for n, (token, logprobs, from_draft) in enumerate(tokens):
            if n == 0:
                prompt_tps = prompt.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            finish = "stop" if token in eos else None
            if finish is None:
                detokenizer.add_token(token)
                if n + 1 == max_tokens:
                    finish = "length"
            if finish is not None:
                detokenizer.finalize()
            yield SpeculativeResponse(
                text=detokenizer.last_segment,
                token=token,
                logprobs=logprobs,
                from_draft=from_draft,
                prompt_tokens=prompt.size,
                prompt_tps=prompt_tps,
                generation_tokens=n + 1,
                generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
                draft_tokens=stats.draft_tokens,
                accepted_tokens=stats.accepted_tokens,
                target_calls=stats.target_calls,
                lookup_tokens=stats.lookup_tokens,
            )
            if finish is not None:
                break
    finally:
        tokens.close()


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | mx.array | Sequence[int],
    draft_model: nn.Module | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole response text; `verbose` prints it as it comes plus timing and stats."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, draft_model, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(format_stats(response))
    return text


def format_stats(response: SpeculativeResponse) -> str:
    """mlx-lm's timing lines plus one line of speculation counters."""
    lines = [
        "=" * 10,
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec",
    ]
    if response.draft_tokens:
        rate = response.accepted_tokens / response.draft_tokens
        tau = response.generation_tokens / max(response.target_calls, 1)
        lines.append(
            f"Speculation: {response.accepted_tokens}/{response.draft_tokens} drafts accepted "
            f"({rate:.1%}), {tau:.2f} tokens per target call ({response.target_calls} calls)"
        )
    lines.append(f"Peak memory: {response.peak_memory:.3f} GB")
    return "\n".join(lines)
