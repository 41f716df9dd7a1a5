"""One place for the checks every entry point shares (temperatures, top-p, token counts, seeds,
draft settings) and for the click options that declare them, so that generate, chat, serve,
bench, calibrate and the Python API cannot drift apart."""

import math
from collections.abc import Callable
from typing import Any

import click

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


def chat_ids(tokenizer: Any, messages: list[dict], fix: str) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template. A template that raises (many
    refuse a system message, or roles out of order) is a one-line error with its own message and `fix`."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
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


def _callback(check: Callable[[Any], Any]) -> Callable:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        return value if value is None else check(value)

    return callback


def count_option(flag: str, default: int | None, help: str, minimum: int = 1, maximum: int | None = None, **kw):
    """An integer option checked by `check_count` as it is parsed."""
    return click.option(
        flag,
        type=int,
        default=default,
        show_default=default is not None,
        help=help,
        callback=_callback(lambda v: check_count(v, flag, minimum, maximum)),
        **kw,
    )


def temp_option(help: str = "Sampling temperature (0: greedy).", **kw):
    return click.option(
        "--temp", type=float, default=0.0, show_default=True, help=help, callback=_callback(check_temp), **kw
    )


def top_p_option():
    return click.option(
        "--top-p",
        type=float,
        default=1.0,
        show_default=True,
        callback=_callback(check_top_p),
        help="Nucleus sampling: keep the most likely tokens up to this mass (1: all).",
    )


def seed_option(default: int | None = None, help: str = "Random seed for sampling (0 to 2**64 - 1)."):
    return click.option(
        "--seed", type=int, default=default, show_default=default is not None, help=help, callback=_callback(check_seed)
    )


def num_draft_tokens_option(default: int | None, help: str):
    return click.option(
        "--num-draft-tokens",
        type=int,
        default=default,
        show_default=default is not None,
        help=help,
        callback=_callback(check_num_draft_tokens),
    )


def draft_threshold_option(default: float | None, help: str):
    return click.option(
        "--draft-threshold",
        type=float,
        default=default,
        show_default=default is not None,
        help=help,
        callback=_callback(check_draft_threshold),
    )


def text_option(flag: str, **kw):
    """A text option checked by `check_utf8` as it is parsed."""
    return click.option(flag, callback=_callback(lambda v: check_utf8(v, flag)), **kw)


def force_option(what: str = "an existing --out"):
    return click.option("--force", is_flag=True, help=f"Replace {what} (inputs are never replaced).")


def pair_options(target: str, drafter: str) -> Callable:
    """--model and --draft-model of the commands that run a pair through `resolve.load_for`
    (generate, chat, serve); unset, the packaged pair `target` and `drafter`."""

    def decorate(command: Callable) -> Callable:
        command = click.option(
            "--draft-model",
            default=None,
            help="Drafter sharing the target's tokenizer; 'none' decodes with the target alone "
            "(the default when only --model is given).",
        )(command)
        return click.option(
            "--model",
            default=None,
            help=f"Target: Hugging Face id, mlx-lm directory, .gguf file or packaged name [default: "
            f"{target}, with drafter {drafter}].",
        )(command)

    return decorate


def draft_options(command: Callable) -> Callable:
    """--vocab, --k, --num-draft-tokens, --draft-threshold, --context-head, --lookup-ngram,
    --lookup-tokens, --adaptive: left unset, they come from the pair's profile (see `--verbose`)."""
    options = [
        click.option(
            "--vocab",
            default=None,
            help="Ranked ids to keep: a vocab file (.json/.json.gz) or a text file of ids [default: a "
            "packaged vocab matching the target's tokenizer].",
        ),
        count_option(
            "--k",
            None,
            "Keep the top k ids of the vocab in the drafter head [default: from the profile].",
            maximum=None,
        ),
        num_draft_tokens_option(None, "Most tokens the drafter proposes per target call [default: from the profile]."),
        draft_threshold_option(
            None,
            "End a round's drafting once the drafter's confidence in its drafts falls "
            "below this (0: always draft --num-draft-tokens) [default: from the profile].",
        ),
        click.option(
            "--context-head/--no-context-head",
            default=None,
            help="Add the rows of the request's own ids (prompt and output) to the trimmed head "
            "[default: from the profile].",
        ),
        count_option(
            "--lookup-ngram",
            None,
            "Copy drafts from the context where its last N tokens occurred "
            "before (0: off) [default: from the profile].",
            0,
            MAX_LOOKUP_NGRAM,
        ),
        count_option(
            "--lookup-tokens",
            None,
            "Most tokens copied from the context per target call [default: from the profile].",
            1,
            MAX_DRAFT_TOKENS,
        ),
        click.option(
            "--adaptive/--static",
            default=None,
            help="Adaptive: each round copies and drafts what the request's acceptance so far makes fastest, "
            "up to --lookup-tokens and --num-draft-tokens; static: always as many [default: from the profile].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command
