"""Speculative decoding with a (trimmed) drafter: greedy and exact sampling, with stats.

One round: the drafter proposes `gamma` tokens in its trimmed space (mapped to target
ids by `vocab_remap`), the target scores [last, d1..d_gamma] in one forward pass, the
accepted prefix plus one correction/bonus token is emitted and both KV caches are
rolled back to what was emitted.
"""

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_p
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import VocabTrimError


@dataclass
class SpecStats:
    """Counters of one generation; updated in place while tokens are yielded."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_calls: int = 0
    generated_tokens: int = 0
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


def sampling_logprobs(logits: mx.array, temp: float, top_p: float) -> mx.array:
    """Log-probs tokens are drawn from, as mlx-lm's make_sampler: top-p on raw log-probs, then temperature."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    scaled = logprobs / temp
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def _body(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (mlx-lm's `model.model`), or the model itself.

    Prefill needs only the KV cache: skipping the head saves a (tokens x vocab) matmul
    per chunk, a sixth of a 1.5B target's prefill and a quarter of a 0.5B drafter's.
    """
    body = getattr(model, "model", None)
    return body if isinstance(body, nn.Module) and hasattr(body, "layers") and hasattr(body, "embed_tokens") else model


def _prefill(model: nn.Module, cache: list, tokens: mx.array, step: int) -> None:
    body = _body(model)
    for start in range(0, tokens.size, step):
        body(tokens[start : start + step][None], cache=cache)
        mx.eval([c.state for c in cache])
    mx.clear_cache()


def check_draft_threshold(threshold: float) -> None:
    """A draft threshold is a probability below 1 (0 turns adaptive drafting off)."""
    if not 0 <= threshold < 1:
        raise VocabTrimError(f"--draft-threshold {threshold} is out of range: use 0 <= t < 1 (0: fixed length)")


def _first_rejected(flags: Sequence[bool]) -> int:
    return next((i for i, ok in enumerate(flags) if not ok), len(flags))


def verify_sampled(
    p_logprobs: mx.array,
    drafted: mx.array,
    indices: mx.array | None,
    q: mx.array | None,
    remap: mx.array | None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Speculative sampling of one round, on device.

    p_logprobs: (gamma+1, V) target log-probs; drafted: (gamma,) target ids drawn from
    q: (gamma, k) drafter probs over its kept ids (`indices` into q; `remap` maps them
    to target ids, None when untrimmed). Returns accept flags (draft x kept with
    probability min(1, p(x)/q(x))), a draw from normalize(max(p - q, 0)) for every
    position, and the bonus draw from p after the last draft. An untrimmed drafter may
    score more or fewer rows than the target (padded vocabularies): ids the target cannot
    emit are never accepted, which keeps the output distribution exact.
    """
    gamma = drafted.size
    bonus = mx.random.categorical(p_logprobs[gamma])
    if gamma == 0:
        return mx.array([], mx.bool_), mx.array([], mx.uint32), bonus
    p = mx.exp(p_logprobs[:gamma])
    vocab = p.shape[-1]
    ids = drafted[:, None].astype(mx.int32)
    p_draft = mx.where(ids < vocab, mx.take_along_axis(p, mx.minimum(ids, vocab - 1), axis=-1), 0.0)[:, 0]
    q_draft = mx.take_along_axis(q, indices[:, None].astype(mx.int32), axis=-1)[:, 0]
    accept = mx.random.uniform(shape=(gamma,)) * q_draft < p_draft
    if remap is not None:
        q_full = mx.put_along_axis(mx.zeros_like(p), mx.broadcast_to(remap[None], q.shape), q, axis=-1)
    elif q.shape[-1] >= vocab:  # ids the target cannot emit are never accepted; their mass leaves q
        q_full = q[:, :vocab]
    else:
        q_full = mx.pad(q, [(0, 0), (0, vocab - q.shape[-1])])
    residual = mx.maximum(p - q_full, 0.0)
    return accept, mx.random.categorical(mx.log(residual)), bonus


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
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield (token, target logprobs, from_draft) like mlx-lm's speculative_generate_step.

    Greedy (temp 0) output equals the target's own greedy decoding. With temp > 0 a
    draft x is accepted with probability min(1, p(x)/q(x)), otherwise a token is drawn
    from normalize(max(p - q, 0)); q is zero outside the drafter's kept ids, so the
    output follows the target's distribution exactly. `draft_model=None` decodes with
    the target alone. `prompt_cache` holds the target's layers, then the drafter's.

    `draft_threshold` > 0 ends a round's drafting early, once the product of the drafter's
    probabilities of its own drafts falls below it (the last of them is still verified):
    sure drafts run up to `num_draft_tokens`, doubtful ones stop at the first step. The
    stop depends on the drafter alone, so outputs and their distribution are unchanged.
    When `stats.confidences` is a list, each round (target call) appends its running products.
    """
    prompt = (prompt if isinstance(prompt, mx.array) else mx.array(list(prompt))).astype(mx.uint32)
    if prompt.size == 0:
        raise VocabTrimError("the prompt is empty: give at least one token")
    if num_draft_tokens < 0:
        raise VocabTrimError(f"--num-draft-tokens {num_draft_tokens} is negative: use 0 or more")
    check_draft_threshold(draft_threshold)
    stats = SpecStats() if stats is None else stats
    if prompt_cache is None:
        target_cache = make_prompt_cache(model)
        draft_cache = [] if draft_model is None else make_prompt_cache(draft_model)
    else:
        target_cache = prompt_cache[: len(model.layers)]
        draft_cache = prompt_cache[len(model.layers) :]
    if draft_model is not None and not can_trim_prompt_cache(target_cache + draft_cache):
        raise VocabTrimError("speculative decoding needs trimmable KV caches: use mlx-lm's default KVCache")
    remap = None if draft_model is None else getattr(draft_model, "vocab_remap", None)
    sampling = temp > 0
    track = draft_threshold > 0 or stats.confidences is not None

    def draft(pending: mx.array, gamma: int) -> tuple[mx.array, mx.array, mx.array | None, list[float]]:
        """Up to gamma drafted target ids, their trimmed indices, (when sampling) q rows and,
        when tracked, the running confidences."""
        ids, indices, probs = [], [], []
        y = pending
        confidence = [1.0]
        for _ in range(gamma):
            logits = draft_model(y[None], cache=draft_cache)[0, -1]
            if sampling:
                logq = sampling_logprobs(logits, temp, top_p)
                index = mx.random.categorical(logq)
                probs.append(mx.exp(logq))
            else:
                index = mx.argmax(logits, axis=-1)
            token = index if remap is None else remap[index]
            y = token.reshape(1).astype(mx.uint32)
            ids.append(y)
            indices.append(index)
            if track:
                chosen = logq[index] if sampling else logits[index] - mx.logsumexp(logits)
                confidence.append(confidence[-1] * mx.exp(chosen).item())
                if confidence[-1] < draft_threshold:
                    break
            else:
                mx.async_eval(y)
        return mx.concatenate(ids), mx.stack(indices), mx.stack(probs) if sampling else None, confidence[1:]

    def rewind(gamma: int, kept: int) -> None:
        """Keep `kept` of the gamma drafts in the target cache (the drafter lags one)."""
        trim_prompt_cache(target_cache, gamma - kept)
        if gamma:
            trim_prompt_cache(draft_cache, max(gamma - 1 - kept, 0))

    _prefill(model, target_cache, prompt[:-1], prefill_step_size)
    if draft_model is not None:
        _prefill(draft_model, draft_cache, prompt[:-1], prefill_step_size)
    last = prompt[-1:]
    pending = prompt[-1:]  # tokens the drafter has not processed yet
    emitted = 0
    open_round = None
    try:
        while max_tokens < 0 or emitted < max_tokens:
            remaining = max_tokens - emitted if max_tokens >= 0 else num_draft_tokens + 1
            gamma = 0 if draft_model is None else min(num_draft_tokens, remaining - 1)
            drafted, indices, q, confidence = (
                draft(pending, gamma) if gamma else (mx.array([], mx.uint32), None, None, [])
            )
            gamma = drafted.size
            if stats.confidences is not None:
                stats.confidences.append(confidence)
            logits = model(mx.concatenate([last, drafted])[None], cache=target_cache)[0]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if sampling:
                p_logprobs = sampling_logprobs(logits, temp, top_p)
                accept, residual_draws, bonus = verify_sampled(p_logprobs, drafted, indices, q, remap)
                mx.eval(accept, residual_draws, bonus, drafted)
                n = _first_rejected(accept.tolist())
                fix = residual_draws[n] if n < gamma else bonus
                tokens = drafted.tolist()[:n] + [fix.item()]
            else:
                choice = mx.argmax(logprobs, axis=-1)
                mx.eval(choice, drafted)
                draft_ids, target_ids = drafted.tolist(), choice.tolist()
                n = _first_rejected([d == t for d, t in zip(draft_ids, target_ids[:-1], strict=True)])
                tokens = draft_ids[:n] + [target_ids[n]]
            stats.target_calls += 1
            stats.draft_tokens += gamma
            stats.accepted_tokens += n
            for j, token in enumerate(tokens):
                open_round = (gamma, j)
                emitted += 1
                stats.generated_tokens += 1
                yield token, logprobs[j], j < n
            open_round = None
            rewind(gamma, n)
            last = mx.array(tokens[-1:], mx.uint32)
            if gamma:
                pending = mx.concatenate([drafted[-1:], last]) if n == gamma else last
            elif draft_model is not None:
                pending = mx.concatenate([pending, last])
    finally:
        if open_round is not None:
            rewind(*open_round)


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
