"""One drafter step with the full head and with the head trimmed to k rows, and the head's share of
the bytes a step reads.

    python examples/drafter_step.py --model DIR --vocab FILE [--k 8192 --k 16384 --k 32768]

A step is one token through the drafter after a 256-token context, its logits evaluated: the
best of 20 timed calls after a warm one, the cache rolled back after each.
"""

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_vocabtrim.heads import DraftHead
from mlx_vocabtrim.rollback import rewind, save
from mlx_vocabtrim.trim import _embedding, _output_head, head_bytes, trimmed_copy
from mlx_vocabtrim.vocab import keep_ids, load_vocab, ranked_for


def step_time(drafter, context: list[int]) -> float:
    cache = make_prompt_cache(drafter)
    drafter(mx.array(context)[None], cache=cache)
    mx.eval([c.state for c in cache])
    head = DraftHead(drafter, context_head=False)
    token = mx.array(context[-1:], mx.uint32)
    best = float("inf")
    for i in range(21):
        saved = save(cache)
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(head(token, cache))
        mx.synchronize()
        best = min(best, time.perf_counter() - tic) if i else best
        rewind(cache, saved, 1, 0, one_pass=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--k", type=int, action="append")
    args = parser.parse_args()
    drafter, tokenizer = load(args.model)
    ranked = ranked_for(load_vocab(args.vocab), args.vocab, tokenizer)
    context = tokenizer.encode("The history of the printing press begins in the fifteenth century, " * 20)[:256]
    total = sum(v.nbytes for _, v in tree_flatten(drafter.parameters()))
    full_head = head_bytes(drafter)
    embedding = sum(v.nbytes for _, v in tree_flatten(_embedding(drafter)[2].parameters()))
    # a step reads the body and the head; of the input embedding only the row of its token
    body = total - embedding - (0 if _output_head(drafter)[1] else full_head)
    dtype = next(iter(v.dtype for _, v in tree_flatten(drafter.parameters())))
    rows = full_head // (drafter.args.hidden_size * dtype.size)
    print(f"MLX {mx.__version__} on {mx.default_device()}, {dtype}, {total / 1e6:.0f} MB of weights")
    print("| head | step | head bytes | head share of the bytes a step reads | speed-up |")
    print("|---|---|---|---|---|")
    full = step_time(drafter, context)
    share = full_head / (body + full_head)
    print(f"| full, {rows} rows | {full * 1e3:.1f} ms | {full_head / 1e6:.0f} MB | {share:.0%} | 1.00x |")
    for k in args.k or [8192, 16384, 32768]:
        trimmed = trimmed_copy(drafter, keep_ids(ranked, k, rows, tokenizer))
        t = step_time(trimmed, context)
        head = head_bytes(trimmed)
        print(f"| k = {k} | {t * 1e3:.1f} ms | {head / 1e6:.0f} MB | {head / (body + head):.0%} | {full / t:.2f}x |")


if __name__ == "__main__":
    main()
