"""Ranked keep-ids: vocab files (counts for every id), ranked-id lists, top-k selection, and
the packaged vocab files found by tokenizer."""

import functools
import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VocabTrimError
from .files import input_file, write_whole

VOCAB_FORMAT = "mlx-vocabtrim-vocab/1"
A_VOCAB_FILE = "a vocab file (.json or .json.gz, or a text file of ids)"
PACKAGED_VOCABS = Path(__file__).parent / "data"
MAX_COUNT = 2**63 - 1
_PADDING = re.compile(r"\[PAD\d+\]")  # llama.cpp's placeholders for head rows past the tokenizer


def _token_table(tokenizer: Any, padding: bool) -> list[str]:
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if padding or not _PADDING.fullmatch(t)}
    table = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        table[i] = token
    return table


def _digest(table: list[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(table).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the id -> token-string table, so vocab files refuse other tokenizers.

    llama.cpp's `[PADn]` placeholder tokens (GGUF files pad the table to the head's rows) are
    left out: a Qwen2.5 tokenizer from a GGUF file and from the hub get the same fingerprint.
    """
    return _digest(_token_table(tokenizer, padding=False))


def _base_table(tokenizer: Any) -> list[str]:
    """The token table without the tokenizer's added tokens (its specials and the control tokens a
    release adds to a BPE vocabulary), ids kept: added ids inside are blanked, trailing ones cut."""
    added = getattr(tokenizer, "get_added_vocab", None)
    added = set(added().values()) if callable(added) else set()
    table = ["" if i in added else t for i, t in enumerate(_token_table(tokenizer, padding=False))]
    while table and not table[-1]:
        table.pop()
    return table


def family_fingerprint(tokenizer: Any) -> dict:
    """The base vocabulary's hash and size: equal for the releases of a family that keep their BPE
    vocabulary and differ only in added tokens (Qwen 1.5 to Qwen 3), different for any other."""
    table = _base_table(tokenizer)
    return {"base_fingerprint": _digest(table), "base_size": len(table)}


def _family_match(vocab: dict, tokenizer: Any) -> bool:
    meta = vocab["metadata"]
    return "base_fingerprint" in meta and {k: meta.get(k) for k in ("base_fingerprint", "base_size")} == (
        family_fingerprint(tokenizer)
    )


def _fingerprints(tokenizer: Any) -> set[str]:
    """This tokenizer's fingerprint and the one files written before padding was left out carry."""
    return {tokenizer_fingerprint(tokenizer), _digest(_token_table(tokenizer, padding=True))}


def real_size(tokenizer: Any) -> int:
    """Ids the tokenizer can produce: its table without padding placeholders."""
    return len(_token_table(tokenizer, padding=False))


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
    """Write a vocab file (counts for all V ids plus metadata) whole: temporary file, then rename."""
    doc = {"format": VOCAB_FORMAT, "metadata": metadata, "counts": [int(c) for c in counts]}

    def write(tmp: Path) -> None:
        with _open_text(tmp, "wt") as f:
            json.dump(doc, f, separators=(",", ":"))

    write_whole(path, write)


def _check_counts(counts: Any, where: str) -> np.ndarray:
    """Counts as int64 after checking they are a list of non-negative integers, not all zero."""
    fix = "recreate it with `mlx-vocabtrim calibrate`"
    if not isinstance(counts, list) or not counts:
        raise VocabTrimError(f"{where} has no list of counts: {fix}")
    bad = next((c for c in counts if type(c) is not int or not 0 <= c <= MAX_COUNT), None)
    if bad is not None:
        raise VocabTrimError(f"{where} holds the count {bad!r}: counts are integers from 0 to 2**63 - 1; {fix}")
    array = np.asarray(counts, dtype=np.int64)
    if not array.any():
        raise VocabTrimError(f"{where} counts no tokens at all: {fix}")
    return array


def load_vocab(path: str | Path) -> dict:
    """Read and check a vocab file; returns {"counts": np.ndarray, "metadata": dict}."""
    path = input_file(path, "vocab file", A_VOCAB_FILE)
    try:
        with _open_text(path) as f:
            doc = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise VocabTrimError(f"vocab file {path} is corrupt ({e}): recreate it with `mlx-vocabtrim calibrate`") from e
    if not isinstance(doc, dict) or doc.get("format") != VOCAB_FORMAT:
        raise VocabTrimError(f"{path} is not a {VOCAB_FORMAT} file: recreate it with `mlx-vocabtrim calibrate`")
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tokenizer_fingerprint"), str):
        raise VocabTrimError(
            f"vocab file {path} does not say which tokenizer it was made for (no tokenizer_fingerprint): "
            "recreate it with `mlx-vocabtrim calibrate`"
        )
    return {"counts": _check_counts(doc.get("counts"), f"vocab file {path}"), "metadata": metadata}


def rank_ids(counts: np.ndarray) -> list[int]:
    """All ids, most counted first; ties broken by the smaller id."""
    return np.lexsort((np.arange(len(counts)), -np.asarray(counts))).tolist()


def check_vocab(vocab: dict, path: str | Path, tokenizer: Any) -> None:
    """Refuse a vocab file made for another tokenizer (fingerprint, or the base vocabulary of its
    family) or covering too few ids."""
    if vocab["metadata"]["tokenizer_fingerprint"] not in _fingerprints(tokenizer):
        if _family_match(vocab, tokenizer):
            return
        raise VocabTrimError(
            f"vocab file {path} was made for another tokenizer: calibrate a vocab with this target's tokenizer"
        )
    if len(vocab["counts"]) < real_size(tokenizer):
        raise VocabTrimError(
            f"vocab file {path} covers {len(vocab['counts'])} ids but the tokenizer has "
            f"{real_size(tokenizer)}: calibrate a vocab with this target's tokenizer"
        )


def ranked_for(vocab: dict, path: str | Path, tokenizer: Any) -> list[int]:
    """A loaded vocab's ids best first, checked against `tokenizer`, without the padded rows past it."""
    check_vocab(vocab, path, tokenizer)
    counts = vocab["counts"]
    if vocab["metadata"]["tokenizer_fingerprint"] not in _fingerprints(tokenizer):
        # same base vocabulary, other added tokens: only the base ids' counts carry over (the file's
        # added ids may be other tokens here); this tokenizer's specials are kept by `keep_ids`
        base = np.zeros(len(counts), bool)
        base[[i for i, t in enumerate(_base_table(tokenizer)[: len(counts)]) if t]] = True
        counts = np.where(base, counts, 0)
    size = real_size(tokenizer)
    return [i for i in rank_ids(counts) if i < size]


def keep_ids(ranked: Sequence[int], k: int, rows: int, tokenizer: Any) -> list[int]:
    """The top k of `ranked` for a head of `rows` rows, the tokenizer's EOS and specials first."""
    return select_keep_ids(ranked, k, rows, special_ids(tokenizer))


def read_ranked_ids(path: str | Path, tokenizer: Any = None) -> list[int]:
    """Ranked ids from a vocab file (.json/.json.gz) or a text file of ids, best first.

    A vocab file is checked against `tokenizer`'s fingerprint when both are given, and its
    ranking keeps only ids the tokenizer can produce (not the padded rows past it).
    """
    path = Path(path)
    if path.name.endswith((".json", ".json.gz")):
        vocab = load_vocab(path)
        return rank_ids(vocab["counts"]) if tokenizer is None else ranked_for(vocab, path, tokenizer)
    input_file(path, "vocab file", A_VOCAB_FILE)
    try:
        return [int(tok) for tok in _open_text(path).read().split()]
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:
        raise VocabTrimError(f"{path} is not a list of token ids ({e}): give one integer id per line") from e


def vocab_dirs() -> list[Path]:
    """Where vocab files are found by tokenizer: the package's, then $MLX_VOCABTRIM_CACHE/vocabs."""
    from .models import cache_dir

    return [PACKAGED_VOCABS, cache_dir() / "vocabs"]


@functools.cache
def _fingerprints_of(path: Path, mtime: float) -> tuple[str | None, tuple | None]:
    """A vocab file's tokenizer fingerprint and (base fingerprint, base size), None where absent."""
    try:
        meta = load_vocab(path)["metadata"]
    except VocabTrimError:
        return None, None
    base = (meta["base_fingerprint"], meta.get("base_size")) if "base_fingerprint" in meta else None
    return meta["tokenizer_fingerprint"], base


def find_vocab(tokenizer: Any) -> Path | None:
    """The first vocab file in `vocab_dirs()` made with this tokenizer, else the first made with a
    tokenizer of the same base vocabulary (`family_fingerprint`), or None."""
    prints = _fingerprints(tokenizer)
    family = tuple(family_fingerprint(tokenizer).values())
    files = [p for folder in vocab_dirs() if folder.is_dir() for p in sorted(folder.glob("*.vocab.json*"))]
    found = [(p, *_fingerprints_of(p, p.stat().st_mtime)) for p in files]
    exact = next((p for p, fingerprint, _ in found if fingerprint in prints), None)
    return exact or next((p for p, _, base in found if base == family), None)


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
