"""One place for the checks every entry point shares (temperatures, top-p, token counts, seeds,
draft settings) and for the click options that declare them, so that generate, chat, serve,
bench, calibrate and the Python API cannot drift apart."""

from collections.abc import Callable
from typing import Any

import click

from .checks import (
    MAX_DRAFT_TOKENS,
    MAX_LOOKUP_NGRAM,
    check_count,
    check_draft_threshold,
    check_num_draft_tokens,
    check_seed,
    check_temp,
    check_top_p,
    check_utf8,
)


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


def seed_option(
    default: int | None = None,
    help: str = "Seed of the sampling noise (0 to 2**64 - 1): the same text with or without a drafter, "
    "whatever the draft settings.",
):
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
            "up to --lookup-tokens and --num-draft-tokens (with --draft-threshold, the threshold applies to "
            "the drafter's probabilities as calibrated by the request's acceptance); static: always as many "
            "[default: from the profile].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command
