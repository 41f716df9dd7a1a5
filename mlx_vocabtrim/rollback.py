"""Undo the rejected part of a speculation round in mlx-lm's caches, exactly, for each cache type.

A round feeds a model tokens of which only a prefix is kept. How a layer gives back the rest
depends on its cache:

- `KVCache`, `QuantizedKVCache`, `ConcatenateKVCache`, `ChunkedKVCache`: entries are appended,
  so moving the offset back is exact (`trim`), as long as the chunked cache kept its front.
- `RotatingKVCache` (sliding window): until it wraps it is a `KVCache`. Past the window, a pass
  of several tokens first puts the window in temporal order and appends the whole pass, so
  cutting the pass's rejected tail leaves exactly the window a fresh decoding holds. Single
  tokens written in place past the window overwrite the oldest entries: then the saved state
  is restored.
- `ArraysCache` (the convolution and recurrent state of Mamba, GatedDeltaNet, LFM2, ...): the
  state after a pass cannot be unwound, so the state saved before the round is restored.
- `CacheList`: each of its caches.

A model's layers always move together: when one layer must restore its saved state, all do,
and the caller feeds the kept tokens again in its next pass (their outputs are already known,
so this costs tokens in a pass, not a pass). Any other cache type is refused up front by
`check_rollback`, before any work.
"""

from typing import Any

from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    ChunkedKVCache,
    ConcatenateKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from .errors import VocabTrimError

APPENDING = (KVCache, QuantizedKVCache, ConcatenateKVCache)
SUPPORTED = (*APPENDING, ChunkedKVCache, RotatingKVCache, ArraysCache, CacheList)


def check_rollback(cache: list, role: str) -> None:
    """Raise a one-line error when a layer of `role`'s cache has a type no round can roll back."""
    for layer in cache:
        if type(layer) is CacheList:
            check_rollback(list(layer.caches), role)
        elif not isinstance(layer, SUPPORTED) or type(layer).__name__.startswith("Batch"):
            raise VocabTrimError(
                f"the {role}'s {type(layer).__name__} cannot be rolled back exactly after rejected drafts: "
                f"speculative decoding supports {', '.join(c.__name__ for c in SUPPORTED)}; "
                "decode this model without a drafter or prompt lookup"
            )


def needs_restore(cache: list) -> bool:
    """Whether rejected tokens can make this model's layers restore a saved state (recurrent layers)."""
    return any(isinstance(c, ArraysCache) or (type(c) is CacheList and needs_restore(list(c.caches))) for c in cache)


def offset(cache: list) -> int | None:
    """Tokens the model's caches hold, read off the first layer that counts them; None when none does."""
    for layer in cache:
        found = offset(list(layer.caches)) if type(layer) is CacheList else getattr(layer, "offset", None)
        if found is not None:
            return int(found)
    return None


def save(cache: list) -> list:
    """What each layer needs to go back to now. Cheap: references, no copies (a rotating window
    that is later written in place is copied once by MLX, since the saved view still reads it)."""
    return [_save(layer) for layer in cache]


def _save(layer: Any) -> Any:
    if type(layer) is CacheList:
        return save(list(layer.caches))
    if isinstance(layer, ArraysCache):
        return list(layer.cache), layer.left_padding, layer.lengths
    if isinstance(layer, RotatingKVCache):
        keys, values = (None, None) if layer.keys is None else (layer.keys[...], layer.values[...])
        return keys, values, layer.offset, layer._idx
    if isinstance(layer, ChunkedKVCache):
        return layer.keys, layer.values, layer.offset, layer.start_position
    return layer.offset


def rewind(cache: list, saved: list, fed: int, keep: int, one_pass: bool) -> int:
    """Leave in `cache` the first `keep` of the `fed` tokens it processed since `saved` was taken
    (`one_pass`: in a single forward pass). Returns how many of them it holds now: `keep`, or 0 when
    the layers went back to `saved` and the caller must feed the kept tokens again."""
    drop = fed - keep
    if drop == 0:
        return keep
    if all(_can_trim(c, s, fed, one_pass) for c, s in zip(cache, saved, strict=True)):
        for layer in cache:
            _trim(layer, drop)
        return keep
    for layer, state in zip(cache, saved, strict=True):
        _restore(layer, state, fed)
    return 0


def _can_trim(layer: Any, state: Any, fed: int, one_pass: bool) -> bool:
    if type(layer) is CacheList:
        return all(_can_trim(c, s, fed, one_pass) for c, s in zip(layer.caches, state, strict=True))
    if isinstance(layer, ArraysCache):
        return False
    if isinstance(layer, RotatingKVCache):
        unwrapped = layer.offset <= layer.max_size
        return unwrapped or (one_pass and fed > 1 and layer._idx == layer.keys.shape[2])
    if isinstance(layer, ChunkedKVCache):
        return layer.start_position == state[3]
    return True


def _trim(layer: Any, n: int) -> None:
    if type(layer) is CacheList:
        for c in layer.caches:
            _trim(c, n)
    elif isinstance(layer, RotatingKVCache) and layer.offset > layer.max_size:
        # the last pass's entries, in temporal order, end the buffer: cut its rejected tail
        end = layer._idx - n
        layer.keys, layer.values = layer.keys[..., :end, :], layer.values[..., :end, :]
        layer.offset -= n
        layer._idx = end
    else:
        layer.trim(n)


def _restore(layer: Any, state: Any, fed: int) -> None:
    if type(layer) is CacheList:
        for c, s in zip(layer.caches, state, strict=True):
            _restore(c, s, fed)
    elif isinstance(layer, ArraysCache):
        layer.cache, layer.left_padding, layer.lengths = list(state[0]), state[1], state[2]
    elif isinstance(layer, RotatingKVCache):
        layer.keys, layer.values, layer.offset, layer._idx = state
    elif isinstance(layer, ChunkedKVCache):
        layer.keys, layer.values, layer.offset, layer.start_position = state
    else:
        layer.trim(fed)
