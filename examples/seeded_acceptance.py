"""How often drafts are accepted with seeded sampling (the noise of (seed, position)) against rejection
sampling (MLX's global generator), with the same pair and settings.

The default pair and its packaged profile, one Spec-Bench first turn from each of six categories,
two seeds each, 64 tokens. Both keep the target's distribution; seeded sampling also gives the
text the target alone samples with that seed, and accepts a draft only where both draws agree.

    python examples/seeded_acceptance.py [temperature]     # 0.7 by default, top-p 0.95
"""

import json
import sys

import mlx.core as mx

import mlx_vocabtrim as vt
from mlx_vocabtrim.checks import chat_ids
from mlx_vocabtrim.questions import PACKAGED_QUESTIONS

CATEGORIES = ("coding", "writing", "math", "translation", "extraction", "roleplay")
TOP_P, TOKENS, SEEDS = 0.95, 64, (0, 1)


def main(temp: float) -> None:
    setup = vt.load()
    first = {}
    for line in open(PACKAGED_QUESTIONS):
        question = json.loads(line)
        first.setdefault(question["category"], question)
    totals = {"rejection": [0, 0, 0, 0], "seeded": [0, 0, 0, 0]}  # accepted, drafted, tokens, target calls
    for category in CATEGORIES:
        ids = chat_ids(setup.tokenizer, [{"role": "user", "content": first[category]["turns"][0]}], "")
        for mode, total in totals.items():
            for seed in SEEDS:
                stats = vt.SpecStats()
                mx.random.seed(seed)
                steps = vt.speculative_generate_step(
                    ids,
                    setup.target,
                    setup.drafter,
                    max_tokens=TOKENS,
                    temp=temp,
                    top_p=TOP_P,
                    stats=stats,
                    seed=seed if mode == "seeded" else None,
                    **setup.generation_kwargs(),
                )
                for _ in steps:
                    pass
                counts = (stats.accepted_tokens, stats.draft_tokens, stats.generated_tokens, stats.target_calls)
                total[:] = [a + b for a, b in zip(total, counts, strict=True)]
                print(category, mode, seed, *counts, flush=True)
    for mode, (accepted, drafted, tokens, calls) in totals.items():
        print(
            f"{mode}: temp {temp}, top-p {TOP_P}: {accepted} of {drafted} drafts accepted "
            f"({accepted / drafted:.1%}), {tokens / calls:.2f} tokens per target call"
        )


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.7)
