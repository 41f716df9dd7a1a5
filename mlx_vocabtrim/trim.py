"""Slice a drafter's output head to the kept vocabulary rows and record the remap."""

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import VocabTrimError
from .files import partial_dir, read_json


@dataclass
class TrimRecord:
    """What `trim_drafter` replaced: the full head's rows and bytes and, when kept for context
    rows, the head itself. Held off the module tree, so it is neither saved with the sliced
    weights nor counted among the bytes a drafter step reads."""

    rows: int
    nbytes: int
    head: nn.Module | None = None
    tied: bool = False


def full_head(model: nn.Module) -> nn.Module | None:
    """The drafter's full output head when a trimmed drafter kept it (None otherwise)."""
    record = getattr(model, "trim_record", None)
    return None if record is None else record.head


def head_rows(model: nn.Module) -> int:
    """Rows of the model's output head: the ids it can score (after any trimming)."""
    remap = getattr(model, "vocab_remap", None)
    if remap is not None:
        return int(remap.size)
    head, _ = _output_head(model)
    return _rows(head)


def head_bytes(model: nn.Module) -> int:
    """Bytes of the output head's weights (the tied embedding when there is no separate head)."""
    return _bytes(_output_head(model)[0])


def _rows(layer: nn.Module) -> int:
    return int(layer.weight.shape[0])


def _bytes(layer: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(layer.parameters()))


def _output_head(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module that maps hidden states to logits, and whether it is the tied embedding."""
    args = getattr(model, "args", None)
    tied = bool(getattr(args, "tie_word_embeddings", False))
    if not tied and "lm_head" in model:
        return model["lm_head"], False
    inner = model.get("model")
    if inner is not None and "embed_tokens" in inner:
        return inner["embed_tokens"], True
    raise VocabTrimError(
        f"cannot find the output head of a {type(model).__module__} model: "
        "only mlx-lm models with `lm_head` or tied `model.embed_tokens` can be trimmed"
    )


def validate_keep_ids(keep_ids: Sequence[int], vocab_size: int) -> list[int]:
    """Check keep ids are non-empty, unique and inside [0, vocab_size)."""
    ids = [int(i) for i in keep_ids]
    if not ids:
        raise VocabTrimError("keep ids are empty: keep at least one token (k >= 1)")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise VocabTrimError(
            f"keep id {bad} is outside the drafter vocabulary [0, {vocab_size}): use a vocab made for this tokenizer"
        )
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise VocabTrimError(f"keep id {dup} appears twice: keep ids must be unique")
    return ids


def slice_rows(layer: nn.Module, rows: mx.array) -> nn.Module:
    """A new Linear/QuantizedLinear holding only `rows` of `layer`'s weight matrix."""
    k = int(rows.size)
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        dims = layer.weight.shape[1] * 32 // layer.bits
        sliced = nn.QuantizedLinear(
            dims,
            k,
            bias="bias" in layer,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        for name in ("weight", "scales", "biases", "bias"):
            if name in layer:
                sliced[name] = layer[name][rows]
        return sliced
    if isinstance(layer, (nn.Linear, nn.Embedding)):
        sliced = nn.Linear(layer.weight.shape[1], k, bias="bias" in layer)
        sliced.weight = layer.weight[rows]
        if "bias" in layer:
            sliced.bias = layer.bias[rows]
        return sliced
    raise VocabTrimError(f"cannot trim an output head of type {type(layer).__name__}")


def trim_drafter(draft_model: nn.Module, keep_ids: Sequence[int], keep_full_head: bool = False) -> nn.Module:
    """Replace the drafter's output head by one with only `keep_ids` rows, in that order.

    The model then returns k logits per position; `draft_model.vocab_remap` (int32)
    maps each trimmed index back to a target token id and `draft_model.trim_record` holds
    the replaced head's rows and bytes. A tied input embedding stays whole and a separate
    sliced head is attached. An untied full head is released unless `keep_full_head`
    (the context-aware head gathers the rows of a request's own ids from it).
    """
    if getattr(draft_model, "vocab_remap", None) is not None:
        raise VocabTrimError("this drafter is already trimmed: load a fresh drafter to trim again")
    head, tied = _output_head(draft_model)
    ids = validate_keep_ids(keep_ids, _rows(head))
    rows = mx.array(ids, dtype=mx.int32)
    sliced = slice_rows(head, rows)
    mx.eval(sliced.parameters())
    if tied:
        draft_model.args.tie_word_embeddings = False
    kept = head if keep_full_head or tied else None
    draft_model["lm_head"] = sliced
    draft_model["vocab_remap"] = rows
    draft_model.trim_record = TrimRecord(_rows(head), _bytes(head), kept, tied)
    draft_model.head_split = None  # the head changed: heads.DraftHead checks the split again
    del head
    mx.clear_cache()
    return draft_model


def save_trimmed(
    draft_model: nn.Module, tokenizer: Any, config: dict, out: str | Path, info: dict, force: bool = False
) -> Path:
    """Write a self-contained trimmed-drafter directory (weights with remap, config, tokenizer).

    `info` (k, coverage, source, ...) is stored under "vocabtrim" in config.json. A full
    head kept by `trim_drafter` is saved too (as `full_head.*`, or noted as the tied input
    embedding), so the directory supports the context-aware head. The directory appears
    only when complete (an existing one is replaced only with `force`).
    """
    record = draft_model.trim_record
    weights = dict(tree_flatten(draft_model.parameters()))
    if record.head is not None and not record.tied:
        weights |= {f"full_head.{k}": v for k, v in tree_flatten(record.head.parameters())}
    info = {**info, "full_head": None if record.head is None else "embed_tokens" if record.tied else "full_head"}
    with partial_dir(out, force=force) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps({**config, "vocabtrim": info}, indent=2))
        tokenizer.save_pretrained(str(tmp))
    return Path(out)


def is_trimmed_dir(path: str | Path) -> bool:
    """True for a directory written by `mlx-vocabtrim trim` (its config.json has "vocabtrim")."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    doc = read_json(config, "is not valid JSON", "repair it or convert the model again")
    return isinstance(doc, dict) and "vocabtrim" in doc


def load_draft(path: str | Path) -> tuple[nn.Module, Any]:
    """(trimmed drafter, tokenizer) from a directory written by `mlx-vocabtrim trim`."""
    from mlx_lm.utils import _get_classes, load_tokenizer

    path = Path(path)
    if not is_trimmed_dir(path):
        raise VocabTrimError(f"{path} is not a trimmed drafter directory: make one with `mlx-vocabtrim trim`")
    config = json.loads((path / "config.json").read_text())
    try:
        weights = mx.load(str(path / "model.safetensors"))
    except Exception as e:
        raise VocabTrimError(f"{path}/model.safetensors is missing or corrupt ({e}): run `trim` again") from e
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if "quantization" in config:
        q = config["quantization"]
        nn.quantize(
            model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
            class_predicate=lambda p, _: f"{p}.scales" in weights,
        )  # fmt: skip
    remap = weights.pop("vocab_remap", None)
    if remap is None:
        raise VocabTrimError(f"{path} has no vocab_remap weights: run `mlx-vocabtrim trim` again")
    full = {k.removeprefix("full_head."): weights.pop(k) for k in [k for k in weights if k.startswith("full_head.")]}
    saved_head = config["vocabtrim"].get("full_head")
    trim_drafter(model, remap.tolist(), keep_full_head=saved_head is not None)
    model.load_weights(list(weights.items()) + [("vocab_remap", remap)])
    if saved_head == "full_head":
        if not full:
            raise VocabTrimError(f"{path} lacks its full head weights: run `mlx-vocabtrim trim` again")
        model.trim_record.head.load_weights(list(full.items()))
    mx.eval(model.parameters(), [] if model.trim_record.head is None else model.trim_record.head.parameters())
    model.eval()
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))


def trimmed_copy(draft_model: nn.Module, keep_ids: Sequence[int]) -> nn.Module:
    """A drafter sharing `draft_model`'s body and weights, with its own head trimmed to `keep_ids`.

    Lets one loaded drafter serve several k side by side (benchmarks) for the cost of the
    extra k-row heads only; the full head stays shared for context rows.
    """
    view = copy.copy(draft_model)
    view.args = copy.copy(draft_model.args)
    return trim_drafter(view, keep_ids, keep_full_head=True)
