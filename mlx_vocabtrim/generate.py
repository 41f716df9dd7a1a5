"""`python -m mlx_vocabtrim.generate`: speculative generation with a trimmed drafter.

Flag names follow mlx_lm.generate.
"""

import sys
from pathlib import Path
from typing import Any

import click
import mlx.core as mx

from .errors import VocabTrimError
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET, load_model, load_pair
from .speculative import format_stats, stream_generate
from .trim import head_bytes, head_rows, trim_drafter
from .vocab import read_ranked_ids, select_keep_ids, special_ids

DEFAULT_K = 16384
DEFAULT_VOCAB = Path(__file__).parent / "data" / "qwen2.5-coder.vocab.json.gz"


def build_prompt(tokenizer: Any, prompt: str, system_prompt: str | None, ignore_chat_template: bool) -> list[int]:
    """Token ids of the prompt, through the chat template unless told otherwise."""
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise VocabTrimError("the prompt is empty: pass --prompt TEXT (or --prompt - to read stdin)")
    if ignore_chat_template or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def trim_with_vocab(draft_model: Any, tokenizer: Any, vocab: str, k: int | None) -> None:
    """Trim `draft_model` in place to the top-k ids of `vocab`, keeping EOS and specials."""
    vocab_size = head_rows(draft_model)
    ranked = read_ranked_ids(vocab, tokenizer)
    k = min(DEFAULT_K, vocab_size) if k is None else k
    trim_drafter(draft_model, select_keep_ids(ranked, k, vocab_size, special_ids(tokenizer)))


def load_models(model: str | None, draft_model: str | None, vocab: str | None, k: int | None):
    """(target, tokenizer, drafter or None) for the command line, the drafter trimmed with --vocab/--k.

    With no model named, the packaged pair and its calibrated vocab; with only a drafter
    named, the packaged target.
    """
    if model is None and draft_model is None:
        draft_model, vocab = DEFAULT_DRAFTER, vocab or str(DEFAULT_VOCAB)
    model = model or DEFAULT_TARGET
    if (vocab or k is not None) and draft_model is None:
        raise VocabTrimError("--vocab and --k trim a drafter: also pass --draft-model")
    if k is not None and vocab is None:
        raise VocabTrimError("--k needs --vocab: pass the vocab file to take the top k ids from")
    if draft_model is None:
        return (*load_model(model), None)
    target, tokenizer, drafter = load_pair(model, draft_model)
    if vocab is not None:
        trim_with_vocab(drafter, tokenizer, vocab, k)
    return target, tokenizer, drafter


@click.command(name="generate")
@click.option(
    "--model",
    default=None,
    help=f"Target: Hugging Face id, mlx-lm directory, .gguf file or packaged name [default: {DEFAULT_TARGET}, "
    f"with drafter {DEFAULT_DRAFTER} and its calibrated vocab].",
)
@click.option(
    "--draft-model", default=None, help="Drafter sharing the target's tokenizer (no drafter: plain decoding)."
)
@click.option("--vocab", default=None, help="Ranked ids to keep: a vocab file (.json/.json.gz) or a text file of ids.")
@click.option(
    "--k", type=int, default=None, help=f"Keep the top k ids of --vocab in the drafter head [default: {DEFAULT_K}]."
)
@click.option(
    "--num-draft-tokens", type=int, default=3, show_default=True, help="Tokens the drafter proposes per target call."
)
@click.option(
    "--draft-threshold",
    type=float,
    default=0.0,
    show_default=True,
    help="End a round's drafting once the drafter's confidence in its drafts falls below this (0: always draft "
    "--num-draft-tokens).",
)
@click.option(
    "--prompt",
    "-p",
    default="Write a Python function that checks whether a number is prime.",
    show_default=True,
    help="Message to the model; '-' reads it from stdin.",
)
@click.option("--system-prompt", default=None, help="System message for the chat template.")
@click.option("--max-tokens", "-m", type=int, default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option(
    "--verbose", is_flag=True, help="Print timing, acceptance, tokens per target call and drafter head sizes."
)
def main(
    model,
    draft_model,
    vocab,
    k,
    num_draft_tokens,
    draft_threshold,
    prompt,
    system_prompt,
    max_tokens,
    temp,
    top_p,
    seed,
    ignore_chat_template,
    verbose,
):
    """Generate text with VocabTrim speculative decoding."""
    if max_tokens < 1:
        raise VocabTrimError(f"--max-tokens {max_tokens} is out of range: use 1 or more")
    if temp < 0 or not 0 < top_p <= 1:
        raise VocabTrimError("--temp must be >= 0 and --top-p in (0, 1]")
    if seed is not None:
        mx.random.seed(seed)
    target, tokenizer, drafter = load_models(model, draft_model, vocab, k)
    ids = build_prompt(tokenizer, prompt, system_prompt, ignore_chat_template)
    response = None
    for response in stream_generate(
        target,
        tokenizer,
        ids,
        drafter,
        max_tokens=max_tokens,
        num_draft_tokens=num_draft_tokens,
        draft_threshold=draft_threshold,
        temp=temp,
        top_p=top_p,
    ):
        click.echo(response.text, nl=False)
    click.echo()
    if verbose and response is not None:
        click.echo(format_stats(response))
        if drafter is not None:
            full_rows, full_bytes = getattr(drafter, "trimmed_from", (head_rows(drafter), head_bytes(drafter)))
            click.echo(
                f"Drafter head: {full_rows} -> {head_rows(drafter)} rows "
                f"({full_bytes / 1e6:.1f} MB -> {head_bytes(drafter) / 1e6:.1f} MB)"
            )


if __name__ == "__main__":
    main()
