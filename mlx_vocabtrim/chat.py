"""`mlx-vocabtrim chat`: a terminal chat like mlx_lm.chat, with a trimmed drafter."""

import click

from .checks import chat_ids, check_context, check_utf8
from .errors import VocabTrimError
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET
from .options import count_option, draft_options, pair_options, seed_option, temp_option, text_option, top_p_option

RAW_TEXT = "send raw text with `mlx-vocabtrim generate --ignore-chat-template`"
LONG_CONVERSATION = "type `r` to reset the conversation, or restart chat with a smaller --max-tokens"


def _read_line() -> str | None:
    """One line typed at the prompt (None at end of input); it must be UTF-8."""
    try:
        line = click.prompt(">>", prompt_suffix=" ", default="", show_default=False)
    except (EOFError, click.Abort):
        return None
    except UnicodeDecodeError as e:
        raise VocabTrimError(f"the input is not UTF-8 text ({e.reason}): type or pipe UTF-8 text") from None
    return check_utf8(line, "the input", "type or pipe UTF-8 text")


@click.command()
@pair_options(DEFAULT_TARGET, DEFAULT_DRAFTER)
@draft_options
@text_option("--system-prompt", default=None, help="System message.")
@count_option("--max-tokens", 512, "Most tokens per reply.")
@temp_option()
@top_p_option()
@seed_option()
@click.option("--verbose", is_flag=True, help="Print the drafter head and every setting's source first.")
def chat(
    model,
    draft_model,
    vocab,
    k,
    num_draft_tokens,
    draft_threshold,
    context_head,
    lookup_ngram,
    lookup_tokens,
    adaptive,
    system_prompt,
    max_tokens,
    temp,
    top_p,
    seed,
    verbose,
):
    """Chat in the terminal: `q` quits, `r` resets the history; speed and acceptance follow each reply."""

    from .resolve import context_length, load_for
    from .speculative import stream_generate

    setup = load_for(click.get_current_context().params)
    name = setup.names[0]
    if not getattr(setup.tokenizer, "chat_template", None):
        raise VocabTrimError(
            f"{name} has no chat template to chat with: pick a model that has one, or send raw text with "
            "`mlx-vocabtrim generate`"
        )
    context = context_length(setup.target)
    if context is not None and max_tokens >= context:
        raise VocabTrimError(
            f"--max-tokens {max_tokens} leaves no room for a message in {name}'s context of {context} tokens: "
            f"pass less than {context}"
        )
    if verbose:
        for line in setup.describe():
            click.echo(line)
    template_fix = f"drop --system-prompt, or {RAW_TEXT}" if system_prompt else RAW_TEXT
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict] = []
    click.echo("Type a message; `q` quits, `r` resets the conversation.")
    while (query := _read_line()) is not None:
        if query.strip() == "q":
            break
        if query.strip() == "r":
            history = []
            click.echo("[conversation reset]")
            continue
        if not query.strip():
            continue
        history.append({"role": "user", "content": query})
        prompt = chat_ids(setup.tokenizer, system + history, template_fix)
        try:
            check_context(len(prompt), max_tokens, context, LONG_CONVERSATION)
        except VocabTrimError as e:  # the message is refused, the conversation kept
            click.echo(f"Error: {e.message}", err=True)
            history.pop()
            continue
        reply, response = "", None
        for response in stream_generate(
            setup.target,
            setup.tokenizer,
            prompt,
            setup.drafter,
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            seed=seed,
            **setup.generation_kwargs(),
        ):
            click.echo(response.text, nl=False)
            reply += response.text
        history.append({"role": "assistant", "content": reply})
        rate = response.accepted_tokens / response.draft_tokens if response.draft_tokens else 0.0
        click.echo(
            f"\n[{response.generation_tokens} tokens, {response.generation_tps:.2f} tok/s, "
            f"{rate:.0%} of drafts accepted]"
        )
