"""One setup for every entry point: vocab found by tokenizer, profiles and where each setting came
from, model roles, the packaged pair's profile, a light import and the Linux BLAS switch."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import build_tokenizer, make_model, model_config, save_model
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_vocabtrim import VocabTrimError, blas, load, save_vocab, speculative_generate_step, tokenizer_fingerprint
from mlx_vocabtrim.cli import cli
from mlx_vocabtrim.models import cache_dir
from mlx_vocabtrim.profiles import DEFAULT, PACKAGED_PROFILES, Setting, find_profile, model_key, save_profile
from mlx_vocabtrim.vocab import find_vocab, keep_ids, load_vocab, real_size


@pytest.fixture
def vocab_dir(monkeypatch, tmp_path):
    """An empty vocab store for this test only."""
    monkeypatch.setenv("MLX_VOCABTRIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vocabs"


def register_vocab(folder: Path, tokenizer, rows: int = 320) -> Path:
    """A vocab file for `tokenizer` (counts favour low ids) where vocabs are found by tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.vocab.json.gz"
    save_vocab(path, [rows - i for i in range(rows)], {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
    return path


def test_a_matching_vocab_is_found_by_tokenizer(model_dirs, tokenizer, vocab_dir):
    path = register_vocab(vocab_dir, tokenizer)
    assert find_vocab(tokenizer) == path
    setup = load(str(model_dirs["target"]), str(model_dirs["drafter"]), k=40)
    assert setup.drafter.vocab_remap.size == 40
    assert setup.vocab == f"{path} (matched by the target's tokenizer)" and setup.sources["k"] == "command line"
    assert "Drafter head: 320 -> 40 rows" in "\n".join(setup.describe())


def test_a_pair_with_no_matching_vocab_runs_untrimmed_with_a_notice(model_dirs, vocab_dir):
    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    save_profile(model_key(target, target), model_key(drafter, drafter), Setting(k=40), {})  # would trim to 40
    setup = load(target, drafter)
    assert getattr(setup.drafter, "vocab_remap", None) is None and setup.setting.k is None
    (note,) = setup.notes
    assert note.startswith("Note: no vocab matches") and "mlx-vocabtrim calibrate --model" in note
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "--model",
            str(model_dirs["target"]),
            "--draft-model",
            str(model_dirs["drafter"]),
            "--max-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0 and "Note: no vocab matches" in result.output


def test_padded_rows_and_padding_tokens_still_match(tokenizer_dir, tokenizer, vocab_dir, tmp_path):
    """A tokenizer with llama.cpp's [PADn] placeholders has the same fingerprint; a target and a
    drafter declaring different padded row counts are matched, trimmed and decode losslessly."""
    from transformers import AutoTokenizer

    padded_dir = tmp_path / "padded-tok"
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = real_size(tokenizer)
    hf.add_tokens([f"[PAD{i}]" for i in range(size, 320)])
    hf.save_pretrained(padded_dir)
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    padded = TokenizerWrapper(AutoTokenizer.from_pretrained(padded_dir))
    assert len(padded.get_vocab()) == 320 > size == real_size(padded)
    assert tokenizer_fingerprint(padded) == tokenizer_fingerprint(tokenizer)
    register_vocab(vocab_dir, tokenizer, rows=320)
    target = make_model("qwen2", seed=21, vocab=336)
    drafter = make_model("qwen2", seed=22, vocab=328)
    target_dir = save_model(target, model_config("qwen2", vocab=336), padded_dir, tmp_path / "t336")
    drafter_dir = save_model(drafter, model_config("qwen2", vocab=328), tokenizer_dir, tmp_path / "d328")
    setup = load(str(target_dir), str(drafter_dir), k=50)
    remap = setup.drafter.vocab_remap.tolist()
    assert len(remap) == 50 and max(remap) < size, "padded rows past the tokenizer are never kept"
    prompt = [5, 17, 33, 90, 200, 11]
    out = [t for t, _, _ in speculative_generate_step(prompt, setup.target, setup.drafter, max_tokens=24)]
    assert out == [t for t, _ in generate_step(mx.array(prompt), setup.target, max_tokens=24)]


def test_profiles_give_settings_and_flags_win(model_dirs, tokenizer, vocab_dir):
    register_vocab(vocab_dir, tokenizer)
    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    tuned = Setting(k=40, num_draft_tokens=5, draft_threshold=0.3, context_head=False, lookup_ngram=2, lookup_tokens=4)
    path = save_profile(model_key(target, target), model_key(drafter, drafter), tuned, {"note": "test"})
    assert path.parent == cache_dir() / "profiles"
    setup = load(target, drafter)
    assert setup.setting == tuned and setup.sources["draft_threshold"] == f"profile {path}"
    setup = load(target, drafter, num_draft_tokens=2, context_head=True)
    assert setup.setting == Setting(40, 2, 0.3, True, 2, 4)
    assert setup.sources["num_draft_tokens"] == setup.sources["context_head"] == "command line"
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "--model",
            target,
            "--draft-model",
            drafter,
            "--max-tokens",
            "4",
            "--num-draft-tokens",
            "2",
            "--verbose",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "num-draft-tokens=2 (command line)" in result.output
    assert f"draft-threshold=0.3 (profile {path})" in result.output and "k=40 (profile" in result.output


def test_a_trimmed_directory_carries_the_pair_profile(model_dirs, tokenizer, vocab_dir, tmp_path):
    register_vocab(vocab_dir, tokenizer)
    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    save_profile(model_key(target, target), model_key(drafter, drafter), Setting(40, 6, 0.4, True, 3, 8), {})
    out = tmp_path / "trimmed"
    result = CliRunner().invoke(
        cli, ["trim", "--model", target, "--draft-model", drafter, "--k", "30", "--out", str(out)]
    )
    assert result.exit_code == 0 and "carries profile" in result.output, result.output
    assert json.loads((out / "config.json").read_text())["vocabtrim"]["profile"]["num_draft_tokens"] == 6
    other_target = save_model(make_model("qwen2", seed=1), model_config("qwen2"), model_dirs["target"], tmp_path / "t")
    setup = load(str(other_target), str(out))
    assert setup.setting == Setting(30, 6, 0.4, True, 3, 8)
    assert setup.sources["lookup_ngram"] == "profile carried by the trimmed drafter"
    assert setup.sources["k"] == "the trimmed drafter directory"


def test_a_trimmed_drafter_is_refused_as_the_target(model_dirs, tokenizer, vocab_dir, tmp_path):
    register_vocab(vocab_dir, tokenizer)
    out = tmp_path / "trimmed"
    result = CliRunner().invoke(
        cli,
        [
            "trim",
            "--draft-model",
            str(model_dirs["drafter"]),
            "--k",
            "30",
            "--out",
            str(out),
            "--model",
            str(model_dirs["target"]),
        ],
    )
    assert result.exit_code == 0, result.output
    with pytest.raises(VocabTrimError, match="is a trimmed drafter directory .* pass it as --draft-model"):
        load(str(out), str(model_dirs["drafter"]))
    result = CliRunner().invoke(cli, ["generate", "--model", str(out), "--max-tokens", "4"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_the_packaged_pair_has_its_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_VOCABTRIM_CACHE", str(tmp_path))
    setting, where = find_profile("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
    path = PACKAGED_PROFILES / where.removeprefix("packaged profile ")
    doc = json.loads(path.read_text())
    assert setting == replace(DEFAULT, **doc["settings"]) and setting.k and setting.num_draft_tokens
    measured = doc["measured"]
    assert measured["environment"]["dtype"] == "float32" and measured["command"].startswith("mlx-vocabtrim ")
    assert find_profile("qwen2.5-coder-1.5b", "some-other-drafter") == (None, ""), "for that pair only"
    converted = tmp_path / "qwen2.5-coder-1.5b-float32"
    converted.mkdir()
    assert model_key(str(converted), str(converted)) == "qwen2.5-coder-1.5b", "its converted directory matches too"


def test_import_is_light_and_the_module_entry_point_warns_nothing():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, mlx_vocabtrim; print(sorted(m for m in sys.modules "
            "if m.startswith(('mlx', 'numpy', 'click'))))",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.strip() == "['mlx_vocabtrim']", done.stdout + done.stderr
    command = [sys.executable, "-W", "error", "-m", "mlx_vocabtrim.generate", "--help"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0 and "Usage:" in done.stdout and done.stderr == "", done.stderr
    from mlx_vocabtrim import generate

    assert callable(generate) and generate.__module__ == "mlx_vocabtrim.speculative"


def test_linux_blas_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(blas, "bundled_reference_blas", lambda: True)
    monkeypatch.setattr(blas, "find_openblas", lambda: "/opt/lib/libopenblas.so.0")
    for key in ("LD_PRELOAD", blas._REEXEC):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(blas.ENV, "0")
    blas.use_system_openblas()
    assert calls == [] and blas.notice() is None, "opted out: neither switch nor notice"
    monkeypatch.delenv(blas.ENV)
    blas.use_system_openblas()
    ((exe, argv, env),) = calls
    assert exe == sys.executable and argv[1:] == sys.orig_argv[1:]
    assert env["LD_PRELOAD"] == "/opt/lib/libopenblas.so.0" and env[blas._REEXEC] == "1"
    monkeypatch.setenv(blas._REEXEC, "1")
    blas.use_system_openblas()
    assert len(calls) == 1, "never re-runs twice"
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    assert "apt-get install libopenblas0-pthread" in blas.notice()
    monkeypatch.setattr(blas, "bundled_reference_blas", lambda: False)
    assert blas.notice() is None, "macOS and non-reference builds: nothing to say"


def test_model_keys_tell_weights_apart_and_survive_a_copy(model_dirs, tmp_path):
    import shutil

    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    copy = shutil.copytree(target, tmp_path / "copy")
    assert model_key(target, target) != model_key(drafter, drafter), "same config and sizes, other weights"
    assert model_key(str(copy), str(copy)) == model_key(target, target)
    assert model_key("mlx-community/Qwen2.5-7B-Instruct-4bit", "mlx-community/Qwen2.5-7B-Instruct-4bit").startswith(
        "mlx-community/"
    )


def test_a_release_that_only_adds_tokens_shares_its_familys_vocab(tokenizer, tokenizer_dir, tmp_path, vocab_dir):
    """A vocab made for one release serves a later one with the same BPE vocabulary and more added
    tokens (as Qwen 1.5 to Qwen 3 are): found by its base vocabulary, with the counts of ids that are
    added tokens here dropped and this release's specials kept; a tokenizer trained on other text
    never matches."""
    from transformers import AutoTokenizer

    from mlx_vocabtrim.vocab import family_fingerprint, ranked_for

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    later = TokenizerWrapper(hf)
    assert tokenizer_fingerprint(later) != tokenizer_fingerprint(tokenizer)
    assert family_fingerprint(later) == family_fingerprint(tokenizer)
    folder = vocab_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "first.vocab.json.gz"
    counts = [1000 if i == 2 else 320 - i for i in range(320)]  # id 2, an added token (<|im_end|>), counted most
    save_vocab(
        path, counts, {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), **family_fingerprint(tokenizer)}
    )
    assert find_vocab(later) == path
    doc = load_vocab(path)
    ranked = ranked_for(doc, path, later)
    assert ranked[0] == 3 and ranked.index(2) > 300, "added ids' counts do not carry over"
    assert set(keep_ids(ranked, 8, real_size(later), later)) >= {later.convert_tokens_to_ids("<think>"), 2}
    ranked_here = ranked_for(doc, path, tokenizer)
    assert ranked_here[0] == 2, "the release it was made for keeps every count"

    other_dir = tmp_path / "other-tokenizer"
    build_tokenizer(other_dir, text=["completely different training text, numbers 0123456789"] * 20)
    other = TokenizerWrapper(AutoTokenizer.from_pretrained(other_dir))
    assert family_fingerprint(other) != family_fingerprint(tokenizer)
    assert find_vocab(other) is None
    with pytest.raises(VocabTrimError, match="was made for another tokenizer"):
        ranked_for(doc, path, other)
