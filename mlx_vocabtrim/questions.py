"""Spec-Bench questions: the packaged copy (Apache-2.0, license beside it), per-category picks,
and held-out questions for tuning."""

import json
from collections import defaultdict
from pathlib import Path

from .errors import VocabTrimError

PACKAGED_QUESTIONS = Path(__file__).parent / "data" / "spec_bench" / "question.jsonl"


def read_questions(path: str | Path, per_category: int | None) -> list[dict]:
    """The first `per_category` questions of each Spec-Bench category (first turn only)."""
    path = Path(path)
    if not path.is_file():
        raise VocabTrimError(f"questions file {path} does not exist: pass --questions spec_bench/question.jsonl")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise VocabTrimError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): give Spec-Bench JSONL") from e
    seen: dict[str, int] = defaultdict(int)
    questions = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            category, turns = str(item.get("category", "all")), item["turns"]
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise VocabTrimError(f"{path} line {n} is not a Spec-Bench question ({e}): give Spec-Bench JSONL") from e
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise VocabTrimError(f"{path} line {n} has no first turn: each question needs a non-empty turns[0]")
        if per_category is None or seen[category] < per_category:
            seen[category] += 1
            questions.append({"category": category, "question_id": item.get("question_id", n), "prompt": turns[0]})
    if not questions:
        raise VocabTrimError(f"{path} holds no questions")
    return questions


def in_turn(questions: list[dict]) -> list[dict]:
    """The questions with categories taken in turn, so any first N span categories."""
    by: dict[str, list[dict]] = {}
    for q in questions:
        by.setdefault(q["category"], []).append(q)
    out = []
    while any(by.values()):
        out += [qs.pop(0) for qs in by.values() if qs]
    return out


def tuning_questions(path: str | Path, chosen: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """n questions for tuning, outside the benchmarked ones when the file has enough (else taken from
    them): one per category while n allows (fewer than the categories: categories spread over the
    file's order), then more of each in turn. Returns (tuning, benchmarked)."""
    ids = {q["question_id"] for q in chosen}
    rest = [q for q in read_questions(path, None) if q["question_id"] not in ids]
    pool = rest if len(rest) >= n else chosen
    categories = list(dict.fromkeys(q["category"] for q in pool))
    if n < len(categories):
        wanted = {categories[i * len(categories) // n] for i in range(n)}
        pool = [q for q in pool if q["category"] in wanted]
    tuning = in_turn(pool)[:n]
    return tuning, [q for q in chosen if q not in tuning]
