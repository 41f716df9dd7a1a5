"""The chat command driven through stdin: history, reset, quit, stats after each reply."""

from click.testing import CliRunner
from mlx_lm import load

from mlx_vocabtrim import generate
from mlx_vocabtrim.cli import cli


def test_chat_keeps_history_resets_and_quits(model_dirs):
    args = [
        "chat",
        "--model",
        str(model_dirs["target"]),
        "--draft-model",
        str(model_dirs["drafter"]),
        "--max-tokens",
        "12",
    ]
    result = CliRunner().invoke(cli, args, input="hello\nand more\nr\nhello\nq\n")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("tok/s") == 3 and "of drafts accepted" in out and "[conversation reset]" in out
    model, tokenizer = load(str(model_dirs["target"]))

    def reply(messages):
        """The target's own greedy reply, through the same streaming detokenizer."""
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return generate(model, tokenizer, prompt, None, max_tokens=12)

    first = reply([{"role": "user", "content": "hello"}])
    second = reply(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "and more"},
        ]
    )
    # each turn: ">> " + the echoed input line + the reply + "\n[stats]"
    replies = [chunk.split("\n", 1)[1].rsplit("\n[", 1)[0] for chunk in out.split(">> ")[1:5] if "tok/s" in chunk]
    assert replies == [first, second, first], "history kept, then reset"


def test_a_message_past_the_context_is_refused_and_the_conversation_kept(model_dirs):
    """The whole conversation and --max-tokens must fit the target's 1,024 tokens: a message that does
    not gets a one-line error and is dropped; the chat goes on from the conversation before it."""
    args = ["chat", "--model", str(model_dirs["target"]), "--max-tokens", "8"]
    result = CliRunner().invoke(cli, args, input="hello\n" + "word " * 1100 + "\nand more\nq\n")
    assert result.exit_code == 0, result.output
    assert "past the model's context of 1024 tokens: type `r` to reset the conversation" in result.output
    assert result.output.count("tok/s") == 2, "the turns before and after the refused one are answered"
