"""Ranking, top-k selection with specials, and vocab files."""

import gzip

import numpy as np
import pytest

from mlx_vocabtrim import VocabTrimError, load_vocab, read_ranked_ids, save_vocab, select_keep_ids
from mlx_vocabtrim.vocab import rank_ids, special_ids, tokenizer_fingerprint


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


def test_fingerprint_and_specials(tokenizer):
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer).startswith("sha256:")
    ids = special_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
