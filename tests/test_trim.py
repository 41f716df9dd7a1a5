"""Trimming keeps exactly the chosen rows of every head kind and releases the full head."""

import gc

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import VOCAB, make_model

from mlx_vocabtrim import VocabTrimError, head_rows, trim_drafter

KEEP = [7, 300, 0, 42, 199, 5, 318, 64]
INPUT = mx.array([[3, 9, 27, 81, 243]])


def param_bytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_trimmed_logits_are_the_kept_rows(arch, tie, quantized):
    model = make_model(arch, seed=21, tie=tie)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    full = model(INPUT)
    embed_rows = model.model.embed_tokens.weight.shape[0]
    trim_drafter(model, KEEP)
    trimmed = model(INPUT)
    assert trimmed.shape == (1, 5, len(KEEP))
    expected = full[..., mx.array(KEEP)]
    if quantized or not tie:
        # the same rows through the same kernel: bit-identical
        assert mx.array_equal(trimmed, expected).item()
    else:
        assert mx.allclose(trimmed, expected, atol=1e-5).item()
    assert model.vocab_remap.dtype == mx.int32
    assert model.vocab_remap.tolist() == KEEP
    assert head_rows(model) == len(KEEP)
    # the input embedding stays whole
    assert model.model.embed_tokens.weight.shape[0] == embed_rows
    assert isinstance(model.lm_head, nn.QuantizedLinear if quantized else nn.Linear)


def test_full_head_memory_is_released():
    """The full head's memory is given back: by the model's parameters and by the allocator (which also
    sees a head kept anywhere outside the model)."""
    gc.collect()
    model = make_model("qwen2", seed=22)
    mx.eval(model.parameters())
    hidden = model.args.hidden_size
    before, active = param_bytes(model), mx.get_active_memory()
    trim_drafter(model, KEEP)
    gc.collect()
    mx.eval(model.parameters())
    head_saved = (VOCAB - len(KEEP)) * hidden * 4
    remap_added = len(KEEP) * 4
    assert before - param_bytes(model) == head_saved - remap_added
    assert active - mx.get_active_memory() >= head_saved - remap_added


@pytest.mark.parametrize(
    "keep, message",
    [
        ([], "keep ids are empty"),
        ([1, 2, VOCAB], f"keep id {VOCAB} is outside the drafter vocabulary"),
        ([-1], "keep id -1 is outside"),
        ([4, 5, 4], "keep id 4 appears twice"),
    ],
)
def test_bad_keep_ids(keep, message):
    model = make_model("qwen2", seed=23)
    with pytest.raises(VocabTrimError, match=message):
        trim_drafter(model, keep)
    assert "vocab_remap" not in model and model.lm_head.weight.shape[0] == VOCAB


def test_trimming_twice_is_refused():
    model = trim_drafter(make_model("llama", seed=24), KEEP)
    with pytest.raises(VocabTrimError, match="already trimmed"):
        trim_drafter(model, KEEP[:2])
