"""Sampling that a seed repeats, whatever the rounds: Gumbel noise fixed by (seed, position).

The token after a sequence's first `position` tokens is argmax(log p + G), with G the Gumbel noise
of (seed, position) over the target's ids: a draw from p (the Gumbel-max trick), G fresh at every
position. A drafter drafts at that position argmax(log q + G) over its own rows (the same noise, read
at the ids they stand for), and a draft is accepted exactly when it is the target's pick. So what is
emitted is what decoding without drafts emits with that seed: a seeded request repeats token for token
with or without speculation, alone or in any batch, and every token is drawn from the target's
distribution. The price against rejection sampling (accept with min(1, p/q), which draws fresh
randomness per round and so depends on how rounds fall): a draft is accepted when both picks agree,
with a chance between (1 - TV) / (1 + TV) and rejection sampling's 1 - TV (TV: the total variation
distance between p and q).
"""

import hashlib

import mlx.core as mx


def key(seed: int, position: int) -> mx.array:
    """The random key of one position of one seed's sequence (a hash: any seed, any position)."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return mx.random.key(int.from_bytes(digest, "little"))


def gumbel(seed: int, start: int, count: int, vocab: int) -> mx.array:
    """The noise of positions start .. start + count - 1, (count, vocab)."""
    return mx.stack([mx.random.gumbel((vocab,), key=key(seed, t)) for t in range(start, start + count)])


def pick(logprobs: mx.array, noise: mx.array) -> mx.array:
    """The token each row's noise draws from its log-probs (the last axis)."""
    return mx.argmax(logprobs + noise, axis=-1)


def head_noise(noise: mx.array, remap: mx.array | None, count: int) -> mx.array:
    """One position's noise at a drafter head's `count` rows: row i stands for target id remap[i]
    (remap None: id i; an untrimmed head scores at most the target's ids)."""
    return noise[:count] if remap is None else noise[remap]
