"""Checks of the values every entry point takes (temperatures, counts, seeds, text, the context): one-line
errors naming the flag and the fix. No click here: the core uses them as much as the command line."""

import math
from typing import Any

from .errors import VocabTrimError, first_line

MAX_SEED = 2**64 - 1
MAX_DRAFT_TOKENS = 64
MAX_LOOKUP_NGRAM = 16


def check_temp(temp: float, flag: str = "--temp") -> float:
    if not math.isfinite(temp) or temp < 0:
        raise VocabTrimError(f"{flag} {temp} is out of range: use a number >= 0 (0: greedy)")
    return temp


def check_top_p(top_p: float) -> float:
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise VocabTrimError(f"--top-p {top_p} is out of range: use 0 < p <= 1 (1: no nucleus cut)")
    return top_p


def check_count(value: int, flag: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer option within [minimum, maximum]."""
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise VocabTrimError(f"{flag} {value} is out of range: use {minimum} or more{upper}")
    return value


def check_seed(seed: int | None) -> int | None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise VocabTrimError(f"--seed {seed} is out of range: use an integer from 0 to 2**64 - 1")
    return seed


def check_utf8(text: str, what: str, fix: str = "give UTF-8 text") -> str:
    """Text Python read with surrogateescape (stdin, arguments) must be valid UTF-8: tokenizers refuse the rest."""
    try:
        text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError as e:
        raise VocabTrimError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start}): {fix}") from None
    return text


def chat_ids(tokenizer: Any, messages: list[dict], fix: str, tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` (and `tools`) through the tokenizer's chat template, ready for the reply:
    every command's prompt is built here. A template that raises (many refuse a system message, or
    roles out of order) is a one-line error with its own message and `fix`."""
    try:
        return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
    except Exception as e:  # templates raise their own types: jinja2's TemplateError, ValueError, ...
        raise VocabTrimError(f"the model's chat template refused the messages ({first_line(e)}): {fix}") from None


def check_context(prompt_tokens: int, max_tokens: int, context: int | None, fix: str | None = None) -> None:
    """Refuse a prompt that, with --max-tokens more, runs past the model's context (None: unknown):
    before any work, not after a long prefill of positions the model was never trained on."""
    if context is None or prompt_tokens + max_tokens <= context:
        return
    if fix is None:
        room = context - prompt_tokens
        fix = f"pass --max-tokens {room} or less, or shorten the prompt" if room > 0 else "shorten the prompt"
    raise VocabTrimError(
        f"the prompt is {prompt_tokens} tokens and --max-tokens {max_tokens} more would run past the "
        f"model's context of {context} tokens: {fix}"
    )


def check_num_draft_tokens(n: int) -> int:
    return check_count(n, "--num-draft-tokens", 0, MAX_DRAFT_TOKENS)


def check_draft_threshold(threshold: float) -> float:
    """A draft threshold is a probability below 1 (0 turns adaptive drafting off)."""
    if not (math.isfinite(threshold) and 0 <= threshold < 1):
        raise VocabTrimError(f"--draft-threshold {threshold} is out of range: use 0 <= t < 1 (0: fixed length)")
    return threshold


def check_lookup(ngram: int, tokens: int) -> None:
    check_count(ngram, "--lookup-ngram", 0, MAX_LOOKUP_NGRAM)
    check_count(tokens, "--lookup-tokens", 1, MAX_DRAFT_TOKENS)


MAX_BATCH_SIZE = 1024  # batch sizes --batch-speculation may name


def parse_batch_schedule(text: str) -> dict[int, tuple[int, float]] | None:
    """--batch-speculation: 'auto' (None: the pair's profile), 'off' ({}), or batch sizes and draft
    lengths such as '2-4:2,5:1' (sizes 2 to MAX_BATCH_SIZE, drafts of fixed length)."""
    value = text.strip().lower()
    if value == "auto":
        return None
    if value == "off":
        return {}
    schedule: dict[int, tuple[int, float]] = {}
    try:
        for part in value.split(","):
            sizes, drafts = part.split(":")
            low, _, high = sizes.partition("-")
            first, last = int(low), int(high or low)
            if not 2 <= first <= last <= MAX_BATCH_SIZE or not 1 <= int(drafts) <= MAX_DRAFT_TOKENS:
                raise ValueError(part)
            schedule.update({size: (int(drafts), 0.0) for size in range(first, last + 1)})
    except ValueError:
        raise VocabTrimError(
            f"--batch-speculation {text!r} is not auto, off or SIZES:DRAFTS entries: e.g. --batch-speculation 2-4:2,5:1"
        ) from None
    return schedule
