"""load_pair checks and the generate command line, including every bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import build_tokenizer, make_model, model_config, save_model

from mlx_vocabtrim import VocabTrimError, load_pair, save_vocab, tokenizer_fingerprint
from mlx_vocabtrim.cli import generate as generate_main


def run(*args):
    result = CliRunner().invoke(generate_main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def ranked_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "ranked.txt"
    path.write_text("\n".join(str(i) for i in range(319, -1, -1)))
    return path


def test_load_pair_accepts_a_matching_pair(model_dirs):
    model, tokenizer, drafter = load_pair(str(model_dirs["target"]), str(model_dirs["drafter"]))
    assert model.args.vocab_size == drafter.args.vocab_size == 320
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_mismatched_tokenizer_names_both_models_and_the_id(model_dirs, tmp_path):
    other_tok = tmp_path / "tok"
    build_tokenizer(other_tok, specials=["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    other = save_model(make_model("qwen2", seed=3), model_config("qwen2"), other_tok, tmp_path / "other")
    with pytest.raises(VocabTrimError) as err:
        load_pair(str(model_dirs["target"]), str(other))
    msg = str(err.value)
    assert str(model_dirs["target"]) in msg and str(other) in msg
    assert "different tokenizers: id 0 is '<|endoftext|>' in the target but '<|im_end|>' in the drafter" in msg


def test_different_eos_is_refused(model_dirs, tmp_path):
    other = tmp_path / "eos"
    shutil.copytree(model_dirs["drafter"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "eos_token_id": [0, 2]}))
    with pytest.raises(VocabTrimError, match=r"different EOS ids \(\[2\] vs \[0, 2\]\)"):
        load_pair(str(model_dirs["target"]), str(other))


def test_drafter_head_must_cover_the_target(model_dirs, tokenizer_dir, tmp_path):
    small = save_model(
        make_model("qwen2", seed=3, vocab=200), model_config("qwen2", vocab=200), tokenizer_dir, tmp_path / "s"
    )
    with pytest.raises(VocabTrimError, match="first uncovered id 200"):
        load_pair(str(model_dirs["target"]), str(small))


def test_load_pair_refuses_a_trimmed_drafter_as_the_target(model_dirs, tokenizer, tmp_path):
    """load_pair goes through the commands' own loaders: a trimmed directory cannot be the target."""
    from mlx_vocabtrim.cli import cli

    vocab = tmp_path / "v.json.gz"
    save_vocab(vocab, list(range(320)), {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
    target, drafter, out = str(model_dirs["target"]), str(model_dirs["drafter"]), tmp_path / "trimmed"
    args = ["trim", "--draft-model", drafter, "--model", target, "--vocab", str(vocab), "--k", "40"]
    made = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert made.exit_code == 0, made.output
    with pytest.raises(VocabTrimError, match="is a trimmed drafter directory"):
        load_pair(str(out), drafter)
    assert load_pair(target, str(out))[2].vocab_remap.size == 40


def test_generate_with_trimmed_drafter_matches_target_alone(model_dirs, ranked_file):
    common = ["--model", str(model_dirs["target"]), "--prompt", "def add(a, b):", "--max-tokens", "24"]
    code, alone = run(*common)
    assert code == 0, alone
    code, spec = run(
        *common,
        "--draft-model",
        str(model_dirs["drafter"]),
        "--vocab",
        str(ranked_file),
        "--k",
        "200",
        "--num-draft-tokens",
        "2",
        "--verbose",
    )
    assert code == 0, spec
    text = spec.split("==========")[0]
    assert text == alone
    assert "Speculation:" in spec and "tokens per target call" in spec
    assert "Drafter head: 320 -> 200 rows" in spec
    code, adaptive = run(
        *common, "--draft-model", str(model_dirs["drafter"]), "--num-draft-tokens", "6", "--draft-threshold", "0.01"
    )
    assert code == 0 and adaptive == alone, adaptive


def test_a_seed_samples_the_same_text_with_or_without_the_drafter(model_dirs, ranked_file):
    """--seed with --temp: the target alone and every drafting setting print the same text; another
    seed another text."""
    common = ["--model", str(model_dirs["target"]), "--prompt", "def add(a, b):", "--max-tokens", "24"]
    sampled = [*common, "--temp", "0.9", "--top-p", "0.95"]
    code, alone = run(*sampled, "--seed", "5")
    assert code == 0, alone
    drafter = ["--draft-model", str(model_dirs["drafter"]), "--vocab", str(ranked_file), "--k", "200"]
    for flags in (["--num-draft-tokens", "3"], ["--num-draft-tokens", "5", "--lookup-ngram", "1", "--adaptive"]):
        code, spec = run(*sampled, "--seed", "5", *drafter, *flags, "--verbose")
        assert code == 0 and spec.split("==========")[0] == alone, flags
        assert "Speculation:" in spec
    assert run(*sampled, "--seed", "6")[1] != alone


def test_vocab_file_with_counts_and_fingerprint(model_dirs, tokenizer, tmp_path):
    good = tmp_path / "good.json.gz"
    save_vocab(good, list(range(320)), {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
    common = ["--model", str(model_dirs["target"]), "--draft-model", str(model_dirs["drafter"]), "--max-tokens", "8"]
    code, out = run(*common, "--vocab", str(good), "--k", "16", "--verbose")
    assert code == 0, out
    assert "320 -> 16 rows" in out


def bad_cases(model_dirs, ranked_file, tmp_path):
    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    pair = ["--model", target, "--draft-model", drafter]
    foreign = tmp_path / "foreign.json"
    save_vocab(foreign, [1] * 320, {"tokenizer_fingerprint": "sha256:0000"})
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "mlx-vocabtrim-vocab/1", "counts": [1, 2')
    not_ids = tmp_path / "words.txt"
    not_ids.write_text("hello world")
    broken_model = tmp_path / "broken"
    shutil.copytree(model_dirs["target"], broken_model)
    (broken_model / "model.safetensors").write_bytes(b"\x00" * 100)
    return [
        ([*pair, "--vocab", str(ranked_file), "--k", "0"], "--k 0 is out of range: use 1 or more"),
        ([*pair, "--vocab", str(ranked_file), "--k", "321"], "--k 321 is out of range"),
        ([*pair, "--vocab", str(tmp_path / "missing.txt")], "does not exist"),
        ([*pair, "--vocab", str(foreign)], "was made for another tokenizer"),
        ([*pair, "--vocab", str(corrupt)], "is corrupt"),
        ([*pair, "--vocab", str(not_ids)], "is not a list of token ids"),
        ([*pair, "--k", "5"], "--k needs a vocab: none matches"),
        (["--model", target, "--vocab", str(ranked_file)], "also pass --draft-model"),
        ([*pair, "--prompt", "   "], "the prompt is empty"),
        (["--model", str(tmp_path / "nowhere")], "not found"),
        (["--model", str(tmp_path)], "has no config.json"),
        (["--model", str(broken_model)], "cannot load model"),
        (["--model", target, "--max-tokens", "0"], "--max-tokens 0 is out of range"),
        ([*pair, "--draft-threshold", "1.5"], "--draft-threshold 1.5 is out of range: use 0 <= t < 1"),
    ]


def test_bad_inputs_get_one_line_errors(model_dirs, ranked_file, tmp_path):
    for args, message in bad_cases(model_dirs, ranked_file, tmp_path):
        code, out = run(*args)
        assert code == 1, (args, out)
        assert message in out, (args, out)
        assert out.startswith("Error: ") and out.count("\n") == 1, out
        assert "Traceback" not in out


def test_module_entry_points(model_dirs, tmp_path):
    for cmd in (
        [sys.executable, "-m", "mlx_vocabtrim.generate", "--help"],
        [sys.executable, "-m", "mlx_vocabtrim", "--help"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert "Usage:" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "mlx_vocabtrim", "generate", "--model", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("Error: model") and done.stderr.count("\n") == 1
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_vocabtrim.generate",
            "--model",
            str(model_dirs["target"]),
            "--prompt",
            "-",
            "--max-tokens",
            "5",
        ],
        input="hello",
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_quick_second_ctrl_c_exits_cleanly(model_dirs):
    """Ctrl-C while generating, then more before the process is gone (during the first one's cleanup):
    exit 130 and one line, never click's "Aborted!" with exit 1, a traceback or death by the signal.
    The child starts with SIGINT at its default: a test run in the background (`cmd &` in a script)
    inherits SIGINT ignored, and a process that starts so rightly keeps ignoring it."""
    cmd = [sys.executable, "-m", "mlx_vocabtrim", "generate", "--model", str(model_dirs["target"])]
    proc = subprocess.Popen(
        [*cmd, "--max-tokens", "900"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.read(1), "generation started"
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.decode()) == (130, "Interrupted\n")
