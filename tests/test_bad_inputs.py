"""Issue 14, one row per bad input: run through the command line, each must exit 1 with one line
`Error: <what is wrong>: <how to fix it>`, no traceback, and leave every input and earlier output
as it was (the row's directory, the shared inputs and the models are hashed before and after)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_vocabtrim import load_vocab, save_vocab, tokenizer_fingerprint
from mlx_vocabtrim.cli import cli

PARAGRAPHS = ["def add(a, b):\n    return a + b", "The quick brown fox.", "import numpy as np", "print(x.sum())"]


@dataclass
class Env:
    """What a row can use: its own directory, the tiny models and good shared inputs."""

    dir: Path
    target: str
    drafter: str
    vocab: Path  # a good vocab file of the models' tokenizer
    data: Path  # a good plain-text data file (4 prompts)
    questions: Path  # a good Spec-Bench questions file
    checkpoint: dict  # a genuine calibration checkpoint of `calibrate_args(env)` with --batch-size 1

    @property
    def unused_model(self) -> str:
        """A model that does not exist: a row naming it proves the error comes before any model work."""
        return str(self.dir / "never-loaded")


@dataclass
class Case:
    args: list[str]
    message: str
    stdin: bytes | None = None
    process: bool = False  # run `python -m mlx_vocabtrim` in a subprocess (real stdin bytes and locale)
    progress: str | None = None  # the label of a progress bar that may come before the error


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def vocab_text(env: Env, counts, fingerprint: bool = True) -> str:
    """A vocab file's JSON with any counts (NaN and Infinity included, as Python's json writes them)."""
    metadata = dict(load_vocab(env.vocab)["metadata"])
    if not fingerprint:
        metadata.pop("tokenizer_fingerprint")
    return json.dumps({"format": "mlx-vocabtrim-vocab/1", "metadata": metadata, "counts": counts})


def bad_vocab(counts, fingerprint: bool = True) -> Callable[[Env], Case]:
    def build(env: Env) -> Case:
        path = write(env.dir / "v.json", vocab_text(env, counts, fingerprint))
        return Case(["vocab", "show", str(path)], "recreate it with `mlx-vocabtrim calibrate`")

    return build


def calibrate_args(
    env: Env, *extra: str, model: str | None = None, data: Path | None = None, out: Path | None = None
) -> list[str]:
    """Counting the raw text of the shared data file (no model weights loaded), one prompt per batch."""
    return [
        "calibrate",
        "--model",
        model or env.target,
        "--source",
        "dataset",
        "--data",
        str(data or env.data),
        "--batch-size",
        "1",
        "--out",
        str(out or env.dir / "v.json"),
        *extra,
    ]


def bad_checkpoint(message: str, doc: object = None, **changes) -> Callable[[Env], Case]:
    """A genuine checkpoint with `changes` (None removes a field), or `doc`, then the same command again."""

    def build(env: Env) -> Case:
        changed = {k: v for k, v in {**env.checkpoint, **changes}.items() if v is not None}
        write(env.dir / "v.json.checkpoint", json.dumps(changed if doc is None else doc))
        return Case(calibrate_args(env), message)

    return build


def calibrate_out(out: Callable[[Env], str], message: str) -> Callable[[Env], Case]:
    """calibrate of the target's answers with a bad --out: refused before any model is loaded."""
    return lambda env: Case(
        ["calibrate", "--model", env.unused_model, "--data", str(env.data), "--out", out(env)], message
    )


def generate(*extra: str, message: str) -> Callable[[Env], Case]:
    return lambda env: Case(["generate", "--model", env.target, "--max-tokens", "4", *extra], message)


def chat(*extra: str, message: str) -> Callable[[Env], Case]:
    return lambda env: Case(
        ["chat", "--model", env.target, "--draft-model", env.drafter, *extra], message, stdin=b"hello\nq\n"
    )


def bench_args(env: Env, *extra: str, questions: Path | None = None, out: Path | None = None) -> list[str]:
    """A small bench whose models are never loaded: every bench row must fail before model work."""
    return [
        "bench",
        "--model",
        env.unused_model,
        "--draft-model",
        env.unused_model,
        "--vocab",
        str(env.vocab),
        "--questions",
        str(questions or env.questions),
        "--methods",
        "full",
        "--max-tokens",
        "2",
        "--per-category",
        "1",
        "--baseline",
        "2",
        "--out",
        str(out or env.dir / "bench-out"),
        *extra,
    ]


def serve(*extra: str, message: str) -> Callable[[Env], Case]:
    return lambda env: Case(["serve", "--model", env.unused_model, *extra], message)


SCHEDULE = "--batch-speculation '{}' is not auto, off or SIZES:DRAFTS entries"


def bench(*extra: str, message: str) -> Callable[[Env], Case]:
    return lambda env: Case(bench_args(env, *extra), message)


def convert(*extra: str, message: str) -> Callable[[Env], Case]:
    def build(env: Env) -> Case:
        gguf = write(env.dir / "m.gguf", b"GGUF" + bytes(60))  # never read: the options are refused first
        return Case(["convert", str(gguf), "--out", str(env.dir / "mlx"), *extra], message)

    return build


def broken_model(env: Env) -> str:
    """A copy of the target whose config.json is cut short."""
    path = env.dir / "broken"
    shutil.copytree(env.target, path)
    write(path / "config.json", '{"model_type": "qwen2", "hidden_')
    return str(path)


def existing_vocab(env: Env) -> Path:
    """An earlier output: a good vocab file at the row's --out."""
    return write(env.dir / "v.json", env.vocab.read_bytes())


def finished_bench(env: Env) -> Case:
    out = env.dir / "bench-out"
    out.mkdir()
    write(out / "bench.json", json.dumps({"config": {"max_tokens": 128}}))
    write(out / "bench.md", "| method |\n")
    return Case(bench_args(env, out=out), "holds a finished bench: pass --force")


def bench_questions(text: str | bytes, message: str) -> Callable[[Env], Case]:
    return lambda env: Case(bench_args(env, questions=write(env.dir / "q.jsonl", text)), message)


def calibrate_existing(env: Env) -> Case:
    existing_vocab(env)
    return Case(calibrate_args(env), "already exists: pass --force to replace it")


def calibrate_data_out(*extra: str) -> Callable[[Env], Case]:
    def build(env: Env) -> Case:
        data = write(env.dir / "mydata.jsonl", '{"prompt": "hi"}\n')
        return Case(calibrate_args(env, *extra, data=data, out=data), "is also an input: pick another --out")

    return build


def corrupt_checkpoint(env: Env) -> Case:
    write(env.dir / "v.json.checkpoint", '{"settings')
    return Case(calibrate_args(env), "is corrupt")


def trim_existing(env: Env) -> Case:
    (env.dir / "trimmed").mkdir()
    return Case(
        [
            "trim",
            "--draft-model",
            env.drafter,
            "--model",
            env.target,
            "--vocab",
            str(env.vocab),
            "--k",
            "40",
            "--out",
            str(env.dir / "trimmed"),
        ],
        "already exists: pass --force",
    )


def merge_existing(env: Env) -> Case:
    out = existing_vocab(env)
    return Case(["vocab", "merge", str(env.vocab), str(env.vocab), "--out", str(out)], "already exists: pass --force")


def trim_counts(env: Env) -> Case:
    """A vocab with negative counts (trim once reported 333% coverage)."""
    path = write(env.dir / "neg.json", vocab_text(env, [-1] * 10 + [3] * 310))
    return Case(
        [
            "trim",
            "--draft-model",
            env.drafter,
            "--model",
            env.target,
            "--vocab",
            str(path),
            "--k",
            "40",
            "--out",
            str(env.dir / "trimmed"),
        ],
        "holds the count -1",
    )


def model_copy(env: Env, model: str, name: str) -> Path:
    """A copy of a model in the row's directory, to change or to write beside."""
    return Path(shutil.copytree(model, env.dir / name))


def strict_template(env: Env) -> str:
    """A copy of the target whose chat template raises, as strict templates do (for a system message, say)."""
    path = model_copy(env, env.target, "strict")
    write(path / "chat_template.jinja", "{{ raise_exception('System role not supported') }}")
    return str(path)


def no_template(env: Env) -> str:
    """A copy of the target without a chat template (a base model)."""
    path = model_copy(env, env.target, "base")
    (path / "chat_template.jinja").unlink()
    return str(path)


def mute_model(env: Env) -> str:
    """A copy of the target that ends every answer at once: all its ids are ends of text."""
    path = model_copy(env, env.target, "mute")
    config = json.loads((path / "config.json").read_text())
    write(path / "config.json", json.dumps({**config, "eos_token_id": list(range(320))}))
    return str(path)


def fifo(env: Env) -> Path:
    """A named pipe nothing writes to: reading it blocks forever."""
    os.mkfifo(env.dir / "fifo")
    return env.dir / "fifo"


def calibrate_nothing(env: Env) -> Case:
    """0 tokens counted, with --force over an earlier vocab: refused, the earlier vocab kept (it once was
    replaced by an empty one)."""
    args = ["calibrate", "--model", mute_model(env), "--data", str(env.data), "--max-tokens", "4"]
    existing_vocab(env)
    return Case(
        [*args, "--out", str(env.dir / "v.json"), "--force"],
        "ended all 4 answers at once: 0 tokens counted, so no vocab is written; pick another --model or --data",
        progress="Calibrating",
    )


def changed_setting(message: str, **settings) -> Callable[[Env], Case]:
    """A genuine checkpoint whose recorded settings differ in `settings`, then the same command again."""

    def build(env: Env) -> Case:
        recorded = {**json.loads(env.checkpoint["settings"]), **settings}
        write(env.dir / "v.json.checkpoint", json.dumps({**env.checkpoint, "settings": json.dumps(recorded)}))
        return Case(calibrate_args(env), message)

    return build


def trim_into(out: Callable[[Path], Path], *extra: str, message: str) -> Callable[[Env], Case]:
    """trim of a copy of the drafter (in the row's models/ directory) to --out `out(copy)`."""

    def build(env: Env) -> Case:
        (env.dir / "models").mkdir()
        drafter = model_copy(env, env.drafter, "models/drafter")
        args = ["trim", "--draft-model", str(drafter), "--model", env.target, "--vocab", str(env.vocab), "--k", "40"]
        return Case([*args, "--out", str(out(drafter)), *extra], message)

    return build


ROWS: dict[str, Callable[[Env], Case]] = {
    # data lost or silently wrong
    "calibrate --data X --out X": calibrate_data_out(),
    "calibrate --data X --out X --force": calibrate_data_out("--force"),
    "calibrate over an existing --out": calibrate_existing,
    "vocab merge over an existing --out": merge_existing,
    "vocab merge --out an input": lambda env: Case(
        ["vocab", "merge", str(existing_vocab(env)), str(env.vocab), "--out", str(env.dir / "v.json"), "--force"],
        "is also an input",
    ),
    "calibrate --temp -1": lambda env: Case(calibrate_args(env, "--temp", "-1"), "--temp -1.0 is out of range: use"),
    "calibrate --temp nan": lambda env: Case(calibrate_args(env, "--temp", "nan"), "--temp nan is out of range: use"),
    "checkpoint batches_done past the end": bad_checkpoint("says 99 batches are done, of 4: delete", batches_done=99),
    "checkpoint batches_done negative": bad_checkpoint("says -1 batches are done", batches_done=-1),
    "checkpoint batches_done a string": bad_checkpoint("says '2' batches are done", batches_done="2"),
    "checkpoint batches_done missing": bad_checkpoint("says None batches are done", batches_done=None),
    "checkpoint counts of the wrong length": bad_checkpoint("does not hold 320 counts: delete it", counts=[1] * 319),
    "checkpoint counts missing": bad_checkpoint("does not hold 320 counts", counts=None),
    "checkpoint counts negative": bad_checkpoint("not non-negative integers", counts=[-1] + [0] * 319),
    "checkpoint counts float": bad_checkpoint("not non-negative integers", counts=[0.5] + [0] * 319),
    "checkpoint counts past int64": bad_checkpoint("not non-negative integers", counts=[2**70] + [0] * 319),
    "checkpoint not a dict": bad_checkpoint("is not a calibration checkpoint", doc=[1, 2]),
    "checkpoint not JSON": corrupt_checkpoint,
    "vocab counts negative": bad_vocab([-5] + [1] * 319),
    "vocab counts float": bad_vocab([1.5] + [1] * 319),
    "vocab counts string": bad_vocab(["7"] + [1] * 319),
    "vocab counts all zero": bad_vocab([0] * 320),
    "vocab counts NaN": bad_vocab([float("nan")] + [1] * 319),
    "vocab counts Infinity": bad_vocab([float("inf")] + [1] * 319),
    "vocab counts 1e30": bad_vocab([1e30] + [1] * 319),
    "vocab counts 2**70": bad_vocab([2**70] + [1] * 319),
    "vocab counts nested": bad_vocab([[1]] * 320),
    "vocab counts dict": bad_vocab({"0": 1}),
    "vocab counts boolean": bad_vocab([True] * 320),
    "vocab without fingerprint": bad_vocab([1] * 320, fingerprint=False),
    "trim with negative vocab counts": trim_counts,
    "vocab merge --weights 100000000000000000,1": lambda env: Case(
        [
            "vocab",
            "merge",
            str(env.vocab),
            str(env.vocab),
            "--weights",
            "100000000000000000,1",
            "--out",
            str(env.dir / "m.json"),
        ],
        "--weights are too large",
    ),
    "bench --temp -1": bench("--temp", "-1", message="--temp -1.0 is out of range"),
    "calibrate --data a directory of no data files": lambda env: Case(
        calibrate_args(env, data=write(env.dir / "notes" / "a.txt", "text").parent),
        "holds no .json or .jsonl files: give a prompts file",
    ),
    "calibrate counting 0 tokens, --force over a vocab": calibrate_nothing,
    "checkpoint of data since changed": changed_setting(
        "was made from other data (the --data content changed: sha256 sha256:000", data_sha256="sha256:" + "0" * 64
    ),
    "checkpoint of another --max-tokens": changed_setting(
        "other settings (--max-tokens was 999, now 256): run with the same settings again, or delete", max_tokens=999
    ),
    "trim --out inside the drafter's directory": trim_into(
        lambda drafter: drafter / "trimmed", message="is inside the input directory"
    ),
    "trim --out the drafter's parent, --force": trim_into(
        lambda drafter: drafter.parent, "--force", message="holds the input directory"
    ),
    # never ends
    "calibrate --data a FIFO": lambda env: Case(
        calibrate_args(env, data=fifo(env)), "is not a regular file (a FIFO, device or socket)", process=True
    ),
    "generate of a prompt past the context": generate(
        "--prompt", "word " * 1500, message="past the model's context of 1024 tokens: shorten"
    ),
    "chat --max-tokens -1": chat("--max-tokens", "-1", message="--max-tokens -1 is out of range: use 1 or more"),
    "bench --max-tokens -1": bench("--max-tokens", "-1", message="--max-tokens -1 is out of range: use 1 or more"),
    # tracebacks
    "generate stdin not UTF-8": lambda env: Case(
        ["generate", "--model", env.unused_model, "--prompt", "-"],
        "stdin is not UTF-8 text",
        stdin=b"hi \xff there",
        process=True,
    ),
    "chat stdin not UTF-8": lambda env: Case(
        ["chat", "--model", env.target, "--draft-model", env.drafter],
        "not UTF-8 text",
        stdin=b"hi \xff there\nq\n",
        process=True,
    ),
    "generate --prompt not UTF-8": lambda env: Case(
        ["generate", "--model", env.unused_model, "--prompt", os.fsdecode(b"hi \xff")],
        "--prompt is not UTF-8",
        process=True,
    ),
    "chat --system-prompt not UTF-8": lambda env: Case(
        ["chat", "--model", env.unused_model, "--system-prompt", os.fsdecode(b"\xfe")], "--system-prompt is not UTF-8"
    ),
    "calibrate data not UTF-8": lambda env: Case(
        calibrate_args(env, data=write(env.dir / "d.txt", b"caf\xe9 au lait")), "is not UTF-8 text"
    ),
    "bench questions not UTF-8": bench_questions(b'{"turns": ["caf\xe9"]}\n', "is not UTF-8 text"),
    "generate --seed -1": generate("--seed", "-1", message="--seed -1 is out of range: use an integer from 0"),
    "generate --seed 2**70": generate("--seed", str(2**70), message="is out of range: use an integer from 0"),
    "calibrate --seed -1": lambda env: Case(calibrate_args(env, "--seed", "-1"), "--seed -1 is out of range"),
    "chat --max-tokens 0": chat("--max-tokens", "0", message="--max-tokens 0 is out of range: use 1 or more"),
    "convert of a missing file": lambda env: Case(
        ["convert", str(env.dir / "none.gguf"), "--out", str(env.dir / "mlx")], "does not exist: check the path"
    ),
    "convert of a file that is not GGUF": lambda env: Case(
        ["convert", str(write(env.dir / "m.gguf", "text")), "--out", str(env.dir / "mlx")], "is not a GGUF file"
    ),
    "convert of a corrupt GGUF": convert(message="is truncated or corrupt"),
    "generate --prompt ''": lambda env: Case(
        ["generate", "--model", env.unused_model, "--prompt", " "], "the prompt is empty"
    ),
    "convert --q-bits 9": convert("--quantize", "--q-bits", "9", message="--q-bits 9 is out of range"),
    "convert --q-bits 0": convert("--quantize", "--q-bits", "0", message="--q-bits 0 is out of range"),
    "convert --q-bits 7": convert("--quantize", "--q-bits", "7", message="is not supported: bits are one of"),
    "convert --q-group-size -1": convert("--quantize", "--q-group-size", "-1", message="--q-group-size -1 is out of"),
    "convert --q-group-size 0": convert("--quantize", "--q-group-size", "0", message="--q-group-size 0 is out of"),
    "convert --q-group-size 7": convert("--quantize", "--q-group-size", "7", message="--q-group-size 7 is out of"),
    "convert --q-group-size 48": convert("--quantize", "--q-group-size", "48", message="group sizes one of"),
    "generate --model DIR with a corrupt config.json": lambda env: Case(
        ["generate", "--model", broken_model(env)], "config.json is not valid JSON"
    ),
    "calibrate --source dataset --model DIR with a corrupt config.json": lambda env: Case(
        calibrate_args(env, model=broken_model(env)), "config.json is not valid JSON"
    ),
    "calibrate --out a directory": calibrate_out(lambda env: str(env.dir), "is a directory: give a file path"),
    "calibrate --out whose parent is a file": calibrate_out(
        lambda env: str(write(env.dir / "file.txt", "x") / "v.json"), "is not a directory"
    ),
    "calibrate --out not writable": calibrate_out(lambda env: "/proc/v.json", "cannot write --out /proc/v.json"),
    "calibrate --out ''": calibrate_out(lambda env: "", "names no file"),
    "calibrate --out /": calibrate_out(lambda env: "/", "names no file"),
    "calibrate --checkpoint-every 0": lambda env: Case(
        calibrate_args(env, "--checkpoint-every", "0"), "--checkpoint-every 0 is out of range: use 1 or more"
    ),
    "bench --auto-prompts 0": bench("--auto", "--auto-prompts", "0", message="--auto-prompts 0 is out of range"),
    "bench --num-draft-tokens -1": bench("--num-draft-tokens", "-1", message="--num-draft-tokens -1 is out of range"),
    "bench question with empty turns": bench_questions('{"category": "x", "turns": []}\n', "has no first turn"),
    "bench --out an existing file": lambda env: Case(
        bench_args(env, out=write(env.dir / "b.txt", "mine")), "is a file: give a directory"
    ),
    "bench rerun over a finished bench with other settings": finished_bench,
    "generate --temp nan": generate("--temp", "nan", message="--temp nan is out of range"),
    "generate with a chat template that raises": lambda env: Case(
        ["generate", "--model", strict_template(env)],
        "chat template refused the messages (System role not supported): pass --ignore-chat-template",
    ),
    "generate --system-prompt with a chat template that raises": lambda env: Case(
        ["generate", "--model", strict_template(env), "--system-prompt", "Be brief."], "or drop --system-prompt"
    ),
    "chat with a chat template that raises": lambda env: Case(
        ["chat", "--model", strict_template(env)],
        "(System role not supported): send raw text with `mlx-vocabtrim generate --ignore-chat-template`",
        stdin=b"hello\nq\n",
        process=True,
    ),
    "chat with a model without a chat template": lambda env: Case(
        ["chat", "--model", no_template(env)], "has no chat template to chat with: pick a model that has one"
    ),
    "generate --max-tokens past the context": generate(
        "--max-tokens", "1020", message="run past the model's context of 1024 tokens: pass --max-tokens 954 or less"
    ),
    "chat --max-tokens past the context": chat("--max-tokens", "1024", message="--max-tokens 1024 leaves no room"),
    "vocab show DIR": lambda env: Case(["vocab", "show", str(env.dir)], "is a directory: give a vocab file"),
    "vocab show FIFO": lambda env: Case(["vocab", "show", str(fifo(env))], "is not a regular file (a FIFO, device"),
    "vocab show /dev/zero": lambda env: Case(["vocab", "show", "/dev/zero"], "/dev/zero is not a regular file"),
    "generate --vocab DIR": lambda env: Case(
        ["generate", "--model", env.target, "--draft-model", env.drafter, "--vocab", str(env.dir)],
        "is a directory: give a vocab file",
    ),
    "calibrate --data /dev/null": lambda env: Case(
        calibrate_args(env, data=Path("/dev/null")), "/dev/null is not a regular file"
    ),
    # with --k, an old '' that meant the default pair fails at once instead of loading that pair
    "generate --model ''": lambda env: Case(["generate", "--model", "", "--k", "5"], "--model '' names no model: give"),
    "generate --draft-model ''": lambda env: Case(
        ["generate", "--model", env.target, "--draft-model", ""],
        "--draft-model '' names no model: give a drafter, or none",
    ),
    "calibrate --model ''": lambda env: Case(
        ["calibrate", "--model", "", "--source", "dataset", "--data", str(env.data), "--out", str(env.dir / "v.json")],
        "'' is empty: give",
    ),
    "trim --draft-model ''": lambda env: Case(
        ["trim", "--draft-model", "", "--k", "40", "--out", str(env.dir / "t")], "the model name '' is empty"
    ),
    "trim over an existing --out": trim_existing,
    # chat and bench check what generate checks
    "chat --temp -1": chat("--temp", "-1", message="--temp -1.0 is out of range"),
    "chat --temp nan": chat("--temp", "nan", message="--temp nan is out of range"),
    "chat --top-p 0": chat("--top-p", "0", message="--top-p 0.0 is out of range: use 0 < p <= 1"),
    "chat --top-p 1.5": chat("--top-p", "1.5", message="--top-p 1.5 is out of range"),
    "chat --seed -1": chat("--seed", "-1", message="--seed -1 is out of range"),
    "chat --num-draft-tokens -1": chat("--num-draft-tokens", "-1", message="--num-draft-tokens -1 is out of range"),
    "generate --top-p 0": generate("--top-p", "0", message="--top-p 0.0 is out of range"),
    "generate --max-tokens -1": generate("--max-tokens", "-1", message="--max-tokens -1 is out of range"),
    "bench --temp nan": bench("--temp", "nan", message="--temp nan is out of range"),
    "bench --top-p 0": bench("--top-p", "0", message="--top-p 0.0 is out of range"),
    "bench --top-p 1.5": bench("--top-p", "1.5", message="--top-p 1.5 is out of range"),
    # serve's limits on clients
    "serve --read-timeout 0": lambda env: Case(
        ["serve", "--model", env.unused_model, "--read-timeout", "0"], "--read-timeout 0 is out of range: use 1 or more"
    ),
    "serve --max-connections 0": lambda env: Case(
        ["serve", "--model", env.unused_model, "--max-connections", "0"],
        "--max-connections 0 is out of range: use 1 or more",
    ),
    "serve --batch-speculation 1:2": serve("--batch-speculation", "1:2", message=SCHEDULE.format("1:2")),
    "serve --batch-speculation 2-x": serve("--batch-speculation", "2-x", message=SCHEDULE.format("2-x")),
    "serve --batch-speculation 2-99999999:1": serve(
        "--batch-speculation", "2-99999999:1", message=SCHEDULE.format("2-99999999:1")
    ),
    "serve --batch-speculation 2:65": serve("--batch-speculation", "2:65", message=SCHEDULE.format("2:65")),
    "serve --max-kv-memory 0": serve("--max-kv-memory", "0", message="--max-kv-memory 0.0 is not a positive number"),
    "serve --max-kv-memory inf": serve("--max-kv-memory", "inf", message="--max-kv-memory inf is not a positive"),
    "bench-serve --batch-speculation 9": lambda env: Case(
        ["bench-serve", "--model", env.unused_model, "--batch-speculation", "9"], SCHEDULE.format("9")
    ),
}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and directory under `roots`: its content hash, "dir", or "special" (a FIFO)."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            kind = "dir" if path.is_dir() else None if path.is_file() else "special"  # a FIFO is not read
            state[str(path)] = kind or hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def run_cli(args: list[str], stdin: bytes | None = None, process: bool = False) -> tuple[int, str]:
    """(exit code, the error output): stderr of a subprocess, or everything a CliRunner run printed."""
    if process:
        done = subprocess.run(
            [sys.executable, "-m", "mlx_vocabtrim", *args], input=stdin, capture_output=True, timeout=120
        )
        return done.returncode, done.stderr.decode("utf-8", "replace")
    result = CliRunner().invoke(cli, args, input=stdin)
    if result.exc_info and not isinstance(result.exception, SystemExit):  # show what a terminal would
        return result.exit_code, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, result.output


def assert_one_line_error(code: int, out: str, message: str, progress: str | None = None) -> None:
    """Exit code 1 and one line `Error: ...` holding `message`; only a progress bar labelled
    `progress` may come before it (an error found mid-way)."""
    assert code == 1, out
    assert "Traceback" not in out, out
    *before, last = out.splitlines()
    assert all(progress and line.startswith(progress) for line in before), out
    assert last.startswith("Error: ") and out.endswith("\n") and message in last, out


@pytest.fixture(scope="module")
def shared(model_dirs, tokenizer, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shared")
    vocab = root / "good.json"
    save_vocab(
        vocab, list(range(1, 321)), {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "source": "test"}
    )
    data = write(root / "data.txt", "\n\n".join(PARAGRAPHS))
    questions = write(
        root / "question.jsonl",
        "\n".join(
            json.dumps({"question_id": i, "category": c, "turns": [f"Add {i} and x."]}) for i, c in enumerate("ab")
        ),
    )
    # a genuine checkpoint: a calibration stopped just before it writes its vocab file
    env = Env(root / "ck", str(model_dirs["target"]), str(model_dirs["drafter"]), vocab, data, questions, {})
    env.dir.mkdir()

    def interrupted(*args) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mlx_vocabtrim.vocab.save_vocab", interrupted)
        CliRunner().invoke(cli, calibrate_args(env))
    checkpoint = json.loads((env.dir / "v.json.checkpoint").read_text())
    assert checkpoint["batches_done"] == len(PARAGRAPHS)
    return {"root": root, "env": env, "checkpoint": checkpoint}


@pytest.fixture
def env(shared, tmp_path) -> Env:
    base = shared["env"]
    return Env(tmp_path, base.target, base.drafter, base.vocab, base.data, base.questions, shared["checkpoint"])


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input(row, env, shared):
    case = ROWS[row](env)
    roots = [env.dir, shared["root"], Path(env.target), Path(env.drafter)]
    before = snapshot(*roots)
    code, out = run_cli(case.args, case.stdin, case.process)
    assert_one_line_error(code, out, case.message, case.progress)
    assert snapshot(*roots) == before, "an input or an earlier output changed, or something was left behind"


def test_force_replaces_an_earlier_output(env):
    old = existing_vocab(env)
    code, out = run_cli(calibrate_args(env, "--force"))
    assert code == 0, out
    assert load_vocab(old)["metadata"]["source"] == "dataset"
    merged = env.dir / "m.json"
    existing = write(merged, b"earlier output")
    code, out = run_cli(["vocab", "merge", str(env.vocab), str(env.vocab), "--out", str(existing), "--force"])
    assert code == 0, out
    assert load_vocab(merged)["counts"].tolist() == [2 * c for c in range(1, 321)]
    assert sorted(p.name for p in env.dir.iterdir()) == ["m.json", "v.json"], "no lock or temporary file left"


def test_two_calibrations_of_one_out(env):
    """The first run holds --out; a second one with other settings fails at once, the first still succeeds."""
    data = write(env.dir / "prompts.txt", "\n\n".join(f"Write function {i} that adds {i} to x." for i in range(40)))
    out = env.dir / "v.json"
    first = [
        "calibrate",
        "--model",
        env.target,
        "--data",
        str(data),
        "--max-tokens",
        "30",
        "--batch-size",
        "1",
        "--checkpoint-every",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_vocabtrim", *first], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    checkpoint = out.with_name("v.json.checkpoint")
    try:
        for _ in range(1200):
            if checkpoint.exists() or proc.poll() is not None:
                break
            time.sleep(0.025)
        proc.send_signal(signal.SIGSTOP)  # hold the first run mid-way, its lock held
        assert proc.poll() is None and checkpoint.exists() and not out.exists(), "the first run ended too soon"
        before = snapshot(env.dir)
        second = ["calibrate", "--model", env.target, "--source", "dataset", "--data", str(data), "--out", str(out)]
        code, message = run_cli(second)
        assert_one_line_error(code, message, f"another run is writing {out} now: wait for it to finish")
        assert snapshot(env.dir) == before
    finally:
        proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    meta = load_vocab(out)["metadata"]
    assert meta["source"] == "target" and meta["max_tokens"] == 30, "the first run's result is the one kept"
    assert sorted(p.name for p in env.dir.iterdir()) == ["prompts.txt", "v.json"]


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_partial_outputs_of_killed_runs_are_removed_by_the_next_run(env, tokenizer_dir):
    """A `.NAME.partial-PID-*` left by a run killed with -9 (its pid gone) is removed by the next
    trim or convert of NAME; one of a live process is left alone."""
    from conftest import make_model
    from test_convert import write_gguf

    write_gguf(env.dir / "m.gguf", "qwen2", make_model("qwen2", seed=5), tokenizer_dir)
    dead, live = _dead_pid(), os.getpid()
    runs = {
        "trimmed": [
            "trim",
            "--draft-model",
            env.drafter,
            "--model",
            env.target,
            "--vocab",
            str(env.vocab),
            "--k",
            "40",
            "--out",
            str(env.dir / "trimmed"),
        ],
        "converted": ["convert", str(env.dir / "m.gguf"), "--out", str(env.dir / "converted")],
    }
    for name, args in runs.items():
        stale = env.dir / f".{name}.partial-{dead}-k1ll3d"
        (stale / "float").mkdir(parents=True)
        write(stale / "float" / "model-00001-of-00001.safetensors", bytes(4096))
        stale_file = write(env.dir / f".{name}.partial-{dead}-old", b"x")
        running = env.dir / f".{name}.partial-{live}-busy"
        running.mkdir()
        odd = write(env.dir / f".{name}.partial-\u00b2-odd", b"x")  # no process id: left until an hour old
        code, out = run_cli(args)
        assert code == 0, out
        assert not stale.exists() and not stale_file.exists(), "the killed run's partial output is removed"
        assert running.exists(), "a running process's partial output is left alone"
        assert odd.exists()
        shutil.rmtree(running)
        odd.unlink()
    assert sorted(p.name for p in env.dir.iterdir()) == ["converted", "m.gguf", "trimmed"]


def test_a_failed_checkpoint_write_leaves_no_temporary_file(env, monkeypatch):
    """The disk fills while the checkpoint is written: a one-line error, and no temporary file left."""
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if ".checkpoint" not in self.name:
            return real(self, text, *args, **kwargs)
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, out = run_cli(calibrate_args(env))
    assert_one_line_error(code, out, "v.json.checkpoint (No space left on device): check free space", "Calibrating")
    assert list(env.dir.iterdir()) == [], "neither a temporary file, a checkpoint, a lock nor a vocab is left"


def test_an_output_finished_by_another_run_meanwhile_is_not_replaced(tmp_path):
    """Checked free, then another run writes it before this one holds the lock: refused without --force."""
    from mlx_vocabtrim.errors import VocabTrimError
    from mlx_vocabtrim.files import check_output, output_lock

    out = check_output(tmp_path / "v.json")
    write(out, "the other run's result")
    with pytest.raises(VocabTrimError, match="already exists: pass --force"):
        with output_lock(out, force=False):
            pass
    with output_lock(out, force=True):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["v.json"] and out.read_text() == "the other run's result"


def test_the_largest_seed_calibrates(env):
    """Per-batch seeds wrap around 2**64 instead of overflowing."""
    code, out = run_cli(calibrate_args(env, "--seed", str(2**64 - 1)))
    assert code == 0, out
