"""Ranking, top-k selection with specials, and vocab files."""

import gzip

import numpy as np
import pytest
from conftest import build_tokenizer
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_vocabtrim import VocabTrimError, load_vocab, read_ranked_ids, save_vocab, select_keep_ids
from mlx_vocabtrim.vocab import rank_ids, real_size, special_ids, tokenizer_fingerprint


def test_rank_breaks_ties_by_smaller_id():
    assert rank_ids(np.array([0, 5, 2, 5, 0])) == [1, 3, 2, 0, 4]


def test_specials_come_first_then_best_ranked():
    assert select_keep_ids([9, 8, 2, 7], 3, 10, always_keep=[2, 0]) == [2, 0, 9]
    assert select_keep_ids([9, 8, 2, 7], 4, 10) == [9, 8, 2, 7]


@pytest.mark.parametrize(
    "ranked, k, message",
    [
        ([1, 2], 0, "--k 0 is out of range: choose 1 <= k <= 10"),
        ([1, 2], 11, "--k 11 is out of range"),
        ([1, 12], 1, "ranked id 12 is outside the vocabulary"),
        ([1, 2, 2], 3, "the vocab ranks only 2 distinct ids: choose --k <= 2"),
    ],
)
def test_bad_selection(ranked, k, message):
    with pytest.raises(VocabTrimError, match=message):
        select_keep_ids(ranked, k, 10)


def test_vocab_file_round_trip_is_atomic_and_gzip(tmp_path, tokenizer):
    path = tmp_path / "v.json.gz"
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "source": "test"}
    save_vocab(path, [3, 0, 9], meta)
    assert gzip.open(path).read().startswith(b'{"format":"mlx-vocabtrim-vocab/1"')
    assert [p.name for p in tmp_path.iterdir()] == ["v.json.gz"]
    vocab = load_vocab(path)
    assert vocab["counts"].tolist() == [3, 0, 9] and vocab["metadata"] == meta
    with pytest.raises(VocabTrimError, match="covers 3 ids but the tokenizer has"):
        read_ranked_ids(path, tokenizer)


def test_fingerprint_tells_token_tables_apart(tokenizer_dir, tmp_path):
    """The fingerprint names the id -> token table: two tokenizer objects holding the same table
    (a raw Hugging Face tokenizer and mlx-lm's wrapper of another load) agree; a tokenizer
    trained with other special tokens, or with one more real token, differs; llama.cpp's
    `[PADn]` placeholders past the real table change neither the fingerprint nor real_size."""
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tokenizer_dir)
    wrapped = TokenizerWrapper(AutoTokenizer.from_pretrained(tokenizer_dir))
    fingerprint = tokenizer_fingerprint(raw)
    assert fingerprint.startswith("sha256:") and tokenizer_fingerprint(wrapped) == fingerprint
    build_tokenizer(tmp_path / "other", specials=["<s>", "</s>", "<pad>"])
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "other")) != fingerprint
    size = real_size(raw)
    padded = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert padded.add_tokens([f"[PAD{i}]" for i in range(size, size + 5)]) == 5
    assert len(padded.get_vocab()) == size + 5
    assert tokenizer_fingerprint(padded) == fingerprint and real_size(padded) == size
    assert padded.add_tokens(["<extra>"]) == 1
    assert tokenizer_fingerprint(padded) != fingerprint


class Table:
    """The one thing the fingerprint reads from a tokenizer."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_fingerprint_reads_which_id_holds_which_token():
    """Same size, same tokens, two ids swapped: another tokenizer. Only tokens named like
    llama.cpp's placeholders (`[PAD<n>]`) are left out as padding."""
    base = {"a": 0, "b": 1, "c": 2}
    assert tokenizer_fingerprint(Table(base)) != tokenizer_fingerprint(Table({"a": 0, "c": 1, "b": 2}))
    padded = Table(base | {"[PAD3]": 3, "[PAD4]": 4})
    assert tokenizer_fingerprint(padded) == tokenizer_fingerprint(Table(base)) and real_size(padded) == 3
    assert tokenizer_fingerprint(Table(base | {"[PAD]": 3})) != tokenizer_fingerprint(Table(base))


def test_special_ids_keep_the_chat_tokens(tokenizer):
    ids = special_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
