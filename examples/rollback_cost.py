"""Per-round cost of rolling back rejected drafts, per cache type, against a round on plain KVCache.

Random models of mlx-lm's own classes at one size (width 768, 12 layers, vocabulary 32,000),
each after a 600-token context (past Gemma-style 512-token windows). A round verifies 1 + 4
tokens and rejects the last 2 drafts; the table gives the verify pass, the rollback itself
(saving the state before the pass and undoing the rejected part) and, for recurrent layers
that go back to the round's start, the extra cost of feeding the 3 kept tokens again in the
next pass (timed as a pass of 3 + 5 tokens against one of 5).

    python examples/rollback_cost.py            # float32 on this machine's default device
"""

import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from archs import make_arch  # noqa: E402

from mlx_vocabtrim.rollback import needs_restore, rewind, save  # noqa: E402

SIZE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "intermediate_size": 2048,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
CASES = {
    "llama (KVCache)": ("llama", {}),
    "gemma3_text (RotatingKVCache 512 + KVCache)": (
        "gemma3_text",
        {"sliding_window": 512, "query_pre_attn_scalar": 64, "sliding_window_pattern": 6},
    ),
    "qwen3_5 (ArraysCache + KVCache)": (
        "qwen3_5",
        {
            "linear_num_value_heads": 16,
            "linear_num_key_heads": 8,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "full_attention_interval": 4,
        },
    ),
    "mamba2 (ArraysCache)": (
        "mamba2",
        {
            "num_heads": 24,
            "head_dim": 64,
            "hidden_size": 768,
            "state_size": 64,
            "num_hidden_layers": 12,
            "intermediate_size": 1536,
        },
    ),
}
CONTEXT, GAMMA, REJECT, REPEATS = 600, 4, 2, 15


def timed(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(REPEATS):
        mx.synchronize()
        tic = time.perf_counter()
        fn()
        mx.synchronize()
        best = min(best, time.perf_counter() - tic)
    return best


def measure(arch: str, extra: dict) -> tuple[float, float, float, int]:
    import archs

    archs.CONFIGS[arch] = {**archs.CONFIGS[arch], **SIZE, **extra}
    model = make_arch(arch, vocab=32000)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    cache = make_prompt_cache(model)
    for start in range(0, CONTEXT, 256):
        model(mx.arange(start, min(start + 256, CONTEXT))[None] % 32000, cache=cache)
        mx.eval([c.state for c in cache])
    tokens = mx.arange(1 + GAMMA)[None]

    def verify_only():
        saved = save(cache)
        mx.eval(model(tokens, cache=cache))
        rewind(cache, saved, 1 + GAMMA, 0, one_pass=True)  # back to the context: every call sees the same state

    def rollback_only() -> float:
        """The rollback of one round alone: the verify pass runs untimed before it."""
        saved = save(cache)
        mx.eval(model(tokens, cache=cache))
        mx.synchronize()
        tic = time.perf_counter()
        kept = rewind(cache, saved, 1 + GAMMA, 1 + GAMMA - REJECT, one_pass=True)
        mx.eval([c.state for c in cache])
        mx.synchronize()
        elapsed = time.perf_counter() - tic
        if kept:
            rewind(cache, save(cache), kept, 0, one_pass=True)
        return elapsed

    restoring = needs_restore(cache)
    verify = timed(verify_only)
    rollback = min(rollback_only() for _ in range(REPEATS))
    refeed = 0.0
    if restoring:
        longer = mx.arange(1 + GAMMA - REJECT + 1 + GAMMA)[None]

        def longer_pass():
            saved = save(cache)
            mx.eval(model(longer, cache=cache))
            rewind(cache, saved, longer.size, 0, one_pass=True)

        refeed = timed(longer_pass) - verify
    return verify, rollback, refeed, params


def main() -> None:
    print(
        f"MLX {mx.__version__} on {mx.default_device()}, float32; context {CONTEXT}, verify 1 + {GAMMA}, "
        f"{REJECT} rejected; best of {REPEATS}"
    )
    print("| model (caches) | params | verify pass | rollback | re-feed of the kept tokens | rollback / verify |")
    print("|---|---|---|---|---|---|")
    for name, (arch, extra) in CASES.items():
        verify, rollback, refeed, params = measure(arch, extra)
        share = (rollback + refeed) / verify
        print(
            f"| {name} | {params / 1e6:.0f}M | {verify * 1e3:.1f} ms | {rollback * 1e3:.2f} ms | "
            f"{refeed * 1e3:.1f} ms | {share:.1%} |"
        )


if __name__ == "__main__":
    main()
