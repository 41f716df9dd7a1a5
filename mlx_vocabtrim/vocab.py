"""Ranked keep-ids: vocab files (counts for every id), ranked-id lists and top-k selection."""

import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VocabTrimError

VOCAB_FORMAT = "mlx-vocabtrim-vocab/1"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the id -> token-string table, so vocab files refuse other tokenizers."""
    vocab = tokenizer.get_vocab()
    table = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        table[i] = token
    digest = hashlib.sha256("\n".join(table).encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()[:32]


def special_ids(tokenizer: Any) -> list[int]:
    """Ids that must never be trimmed away: EOS and the tokenizer's special tokens."""
    ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    ids += list(getattr(tokenizer, "all_special_ids", None) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            ids.append(tokenizer.convert_tokens_to_ids(token.content))
    return sorted({int(i) for i in ids if i is not None})


def _open_text(path: Path, mode: str = "rt"):
    return gzip.open(path, mode, encoding="utf-8") if path.suffix == ".gz" else open(path, mode, encoding="utf-8")


def save_vocab(path: str | Path, counts: Sequence[int], metadata: dict) -> None:
    """Write a vocab file (counts for all V ids plus metadata) atomically."""
    path = Path(path)
    doc = {"format": VOCAB_FORMAT, "metadata": metadata, "counts": [int(c) for c in counts]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        with _open_text(Path(tmp), "wt") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_vocab(path: str | Path) -> dict:
    """Read a vocab file; returns {"counts": np.ndarray, "metadata": dict}."""
    path = Path(path)
    if not path.is_file():
        raise VocabTrimError(f"vocab file {path} does not exist: check the path")
    try:
        with _open_text(path) as f:
            doc = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabTrimError(f"vocab file {path} is corrupt ({e}): recreate it with `mlx-vocabtrim calibrate`") from e
    if not isinstance(doc, dict) or doc.get("format") != VOCAB_FORMAT:
        raise VocabTrimError(f"{path} is not a {VOCAB_FORMAT} file: recreate it with `mlx-vocabtrim calibrate`")
    counts = np.asarray(doc["counts"], dtype=np.int64)
    return {"counts": counts, "metadata": doc.get("metadata", {})}


def rank_ids(counts: np.ndarray) -> list[int]:
    """All ids, most counted first; ties broken by the smaller id."""
    return np.lexsort((np.arange(len(counts)), -np.asarray(counts))).tolist()


def check_vocab(vocab: dict, path: str | Path, tokenizer: Any) -> None:
    """Refuse a vocab file made for another tokenizer (fingerprint) or covering too few ids."""
    expected = vocab["metadata"].get("tokenizer_fingerprint")
    if expected and expected != tokenizer_fingerprint(tokenizer):
        raise VocabTrimError(
            f"vocab file {path} was made for another tokenizer: calibrate a vocab with this target's tokenizer"
        )
    if len(vocab["counts"]) < len(tokenizer.get_vocab()):
        raise VocabTrimError(
            f"vocab file {path} covers {len(vocab['counts'])} ids but the tokenizer has "
            f"{len(tokenizer.get_vocab())}: calibrate a vocab with this target's tokenizer"
        )


def read_ranked_ids(path: str | Path, tokenizer: Any = None) -> list[int]:
    """Ranked ids from a vocab file (.json/.json.gz) or a text file of ids, best first.

    A vocab file is checked against `tokenizer`'s fingerprint when both are given.
    """
    path = Path(path)
    if path.name.endswith((".json", ".json.gz")):
        vocab = load_vocab(path)
        if tokenizer is not None:
            check_vocab(vocab, path, tokenizer)
        return rank_ids(vocab["counts"])
    if not path.is_file():
        raise VocabTrimError(f"vocab file {path} does not exist: check the path")
    try:
        return [int(tok) for tok in _open_text(path).read().split()]
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:
        raise VocabTrimError(f"{path} is not a list of token ids ({e}): give one integer id per line") from e


def select_keep_ids(ranked: Sequence[int], k: int, vocab_size: int, always_keep: Iterable[int] = ()) -> list[int]:
    """The top-k ids: `always_keep` first (EOS, specials), then the best-ranked others."""
    if not 1 <= k <= vocab_size:
        raise VocabTrimError(f"--k {k} is out of range: choose 1 <= k <= {vocab_size} (the drafter's vocabulary)")
    bad = next((i for i in ranked if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise VocabTrimError(
            f"ranked id {bad} is outside the vocabulary [0, {vocab_size}): use a vocab made for this tokenizer"
        )
    keep = list(dict.fromkeys(i for i in always_keep if 0 <= i < vocab_size))
    seen = set(keep)
    for i in ranked:
        if len(keep) >= k:
            break
        if i not in seen:
            keep.append(i)
            seen.add(i)
    if len(keep) < k:
        raise VocabTrimError(f"the vocab ranks only {len(keep)} distinct ids: choose --k <= {len(keep)}")
    return keep[:k]
