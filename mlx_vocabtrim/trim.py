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


class TiedHead(nn.Module):
    """A tied embedding whose output side scores only the kept rows: for models whose logits
    always come from `embed_tokens.as_linear` (Cohere 2, LFM2, ...), so that their own scaling
    or soft-capping of the logits still applies, row by row."""

    def __init__(self, embedding: nn.Module, head: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.head = head

    @property
    def weight(self) -> mx.array:
        return self.embedding.weight

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding(x)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.head(x)


_EMBEDDINGS = ("model.embed_tokens", "language_model.model.embed_tokens", "backbone.embeddings")


def _owner(model: nn.Module) -> nn.Module:
    """The module holding the LM head and its tie flag (a wrapper's `language_model`, as in Qwen3.5)."""
    inner = model.get("language_model")
    return inner if isinstance(inner, nn.Module) and "model" in inner else model


def _tied(owner: nn.Module) -> bool:
    flag = getattr(owner, "tie_word_embeddings", None)  # Gemma 3 keeps it on the model, set from the weights
    if isinstance(flag, bool):
        return flag
    return bool(getattr(getattr(owner, "args", None), "tie_word_embeddings", "lm_head" not in owner))


def _embedding(model: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """(the module holding the input embedding, its name there, the embedding)."""
    for path in _EMBEDDINGS:
        *parents, name = path.split(".")
        holder = model
        for part in parents:
            holder = holder.get(part) if isinstance(holder, nn.Module) else None
        if isinstance(holder, nn.Module) and name in holder:
            return holder, name, holder[name]
    return None


def _output_head(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module that maps hidden states to logits, and whether it is the tied embedding."""
    owner = _owner(model)
    if "lm_head" in owner and not _tied(owner):
        return owner["lm_head"], False
    found = _embedding(model)
    if found is not None:
        embedding = found[2]
        return (embedding.head, False) if isinstance(embedding, TiedHead) else (embedding, True)
    raise VocabTrimError(
        f"cannot find the output head of a {type(model).__module__} model: "
        "only mlx-lm models with `lm_head` or a tied input embedding can be trimmed"
    )


def _scores(model: nn.Module, probe: mx.array, expected: mx.array) -> bool:
    """Whether `model` now gives exactly `expected`: the untrimmed logits of the kept rows."""
    logits = model(probe)
    return logits.shape == expected.shape and mx.allclose(logits, expected, rtol=1e-4, atol=1e-4).item()


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
    the replaced head's rows and bytes. A tied input embedding stays whole and the sliced rows
    score the output (`_attach_tied`); the model's own logit scaling or soft-capping still
    applies, and a probe checks the trimmed logits are the full ones' kept rows. An untied full
    head is released unless `keep_full_head` (the context-aware head gathers the rows of a
    request's own ids from it).
    """
    if getattr(draft_model, "vocab_remap", None) is not None:
        raise VocabTrimError("this drafter is already trimmed: load a fresh drafter to trim again")
    head, tied = _output_head(draft_model)
    ids = validate_keep_ids(keep_ids, _rows(head))
    rows = mx.array(ids, dtype=mx.int32)
    sliced = slice_rows(head, rows)
    mx.eval(sliced.parameters())
    owner = _owner(draft_model)
    probe = mx.array([[0, 1]], mx.uint32)
    expected = draft_model(probe)[..., rows]
    if tied:
        _attach_tied(draft_model, owner, head, sliced, probe, expected)
    else:
        owner["lm_head"] = sliced
    if not _scores(draft_model, probe, expected):
        raise VocabTrimError(
            f"trimming a {type(draft_model).__module__} model's head did not change its logits: "
            "this architecture cannot be trimmed; run it untrimmed"
        )
    kept = head if keep_full_head or tied else None
    draft_model["vocab_remap"] = rows
    draft_model.trim_record = TrimRecord(_rows(head), _bytes(head), kept, tied)
    draft_model.head_split = None  # the head changed: heads.DraftHead checks the split again
    del head
    mx.clear_cache()
    return draft_model


def _attach_tied(
    model: nn.Module, owner: nn.Module, embedding: nn.Module, sliced: nn.Module, probe: mx.array, expected: mx.array
) -> None:
    """Score a tied head's kept rows: as a separate `lm_head` with the tie flag off where the model
    reads the flag at call time (llama, qwen2, Gemma 3, ...: trimmed directories save it so),
    otherwise (the model always calls `as_linear`) by wrapping the embedding in a `TiedHead`."""
    args = getattr(owner, "args", None)
    before = owner.get("lm_head"), getattr(args, "tie_word_embeddings", None), owner.__dict__.get("tie_word_embeddings")
    owner["lm_head"] = sliced
    if args is not None:
        args.tie_word_embeddings = False
    if "tie_word_embeddings" in owner.__dict__:
        owner.tie_word_embeddings = False
    if _scores(model, probe, expected):
        return
    head, flag, own_flag = before
    if head is None:
        del owner["lm_head"]
    else:
        owner["lm_head"] = head
    if args is not None:
        args.tie_word_embeddings = flag
    if own_flag is not None:
        owner.tie_word_embeddings = own_flag
    holder, name, _ = _embedding(model)
    holder[name] = TiedHead(embedding, sliced)


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
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda p, _: f"{p}.scales" in weights,
        )
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


def _shallow(module: nn.Module) -> nn.Module:
    """A copy sharing `module`'s children and weights, with its own args (trimming edits the tie flag)."""
    view = copy.copy(module)
    if getattr(module, "args", None) is not None:
        view.args = copy.copy(module.args)
    return view


def trimmed_copy(draft_model: nn.Module, keep_ids: Sequence[int]) -> nn.Module:
    """A drafter sharing `draft_model`'s body and weights, with its own head trimmed to `keep_ids`.

    Lets one loaded drafter serve several k side by side (benchmarks) for the cost of the
    extra k-row heads only; the full head stays shared for context rows.
    """
    view = _shallow(draft_model)
    for path in _EMBEDDINGS:  # copy the modules on the way to the embedding and the head: trimming replaces them
        holder = view
        for part in path.split(".")[:-1]:
            child = holder.get(part)
            if not isinstance(child, nn.Module):
                break
            holder[part] = _shallow(child)
            holder = holder[part]
    return trim_drafter(view, keep_ids, keep_full_head=True)
