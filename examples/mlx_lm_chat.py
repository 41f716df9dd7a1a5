"""A terminal chat on mlx-lm's own stream_generate with a trimmed drafter (TrimmedDraft).

    mlx-vocabtrim trim --vocab mlx_vocabtrim/data/qwen2.5-coder.vocab.json.gz --k 16384 --out trimmed-0.5b
    python examples/mlx_lm_chat.py --model qwen2.5-coder-1.5b --draft-model trimmed-0.5b

Type `q` to quit, `r` to reset the conversation.
"""

import argparse

import mlx_lm

from mlx_vocabtrim import TrimmedDraft, load_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-coder-1.5b")
parser.add_argument("--draft-model", required=True, help="a directory written by `mlx-vocabtrim trim`")
parser.add_argument("--max-tokens", type=int, default=512)
args = parser.parse_args()

model, tokenizer = load_model(args.model)
draft, _ = load_model(args.draft_model)
draft_model = TrimmedDraft(draft, model.args.vocab_size)

messages = []
while True:
    query = input(">> ")
    if query == "q":
        break
    if query == "r":
        messages = []
        continue
    messages.append({"role": "user", "content": query})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    reply, drafted = "", 0
    for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, draft_model=draft_model):
        print(r.text, end="", flush=True)
        reply += r.text
        drafted += r.from_draft
    print(f"\n[{r.generation_tps:.2f} tok/s, {drafted}/{r.generation_tokens} tokens from the drafter]")
    messages.append({"role": "assistant", "content": reply})
