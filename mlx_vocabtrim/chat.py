"""`mlx-vocabtrim chat`: a terminal chat like mlx_lm.chat, with a trimmed drafter."""

import click

from .generate import load_models
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET
from .speculative import stream_generate


@click.command()
@click.option("--model", default=None, help=f"Target model [default: {DEFAULT_TARGET} with drafter {DEFAULT_DRAFTER}].")
@click.option("--draft-model", default=None, help="Drafter (a trimmed directory, or any drafter with --vocab).")
@click.option("--vocab", default=None, help="Vocab file to trim the drafter with.")
@click.option("--k", type=int, default=None, help="Rows to keep when trimming with --vocab.")
@click.option("--num-draft-tokens", type=int, default=3, show_default=True, help="Tokens drafted per target call.")
@click.option(
    "--draft-threshold", type=float, default=0.0, show_default=True,
    help="End drafting once the drafter's confidence falls below this (0: fixed length).",
)  # fmt: skip
@click.option("--system-prompt", default=None, help="System message.")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Most tokens per reply.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold.")
def chat(model, draft_model, vocab, k, num_draft_tokens, draft_threshold, system_prompt, max_tokens, temp, top_p):
    """Chat in the terminal: `q` quits, `r` resets the history; speed and acceptance follow each reply."""
    target, tokenizer, drafter = load_models(model, draft_model, vocab, k)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict] = []
    click.echo("Type a message; `q` quits, `r` resets the conversation.")
    while True:
        try:
            query = click.prompt(">>", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if query.strip() == "q":
            break
        if query.strip() == "r":
            history = []
            click.echo("[conversation reset]")
            continue
        if not query.strip():
            continue
        history.append({"role": "user", "content": query})
        prompt = tokenizer.apply_chat_template(system + history, add_generation_prompt=True)
        reply, response = "", None
        for response in stream_generate(target, tokenizer, prompt, drafter, max_tokens=max_tokens,
                                        num_draft_tokens=num_draft_tokens, draft_threshold=draft_threshold,
                                        temp=temp, top_p=top_p):  # fmt: skip
            click.echo(response.text, nl=False)
            reply += response.text
        history.append({"role": "assistant", "content": reply})
        rate = response.accepted_tokens / response.draft_tokens if response.draft_tokens else 0.0
        click.echo(f"\n[{response.generation_tokens} tokens, {response.generation_tps:.2f} tok/s, "
                   f"{rate:.0%} of drafts accepted]")  # fmt: skip
