"""One setup for every entry point: which target and drafter, which vocab, which settings, and
where each came from. `generate`, `chat`, `serve`, `bench`, `tune` and the Python API
(`mlx_vocabtrim.load`) all call this, so a new default reaches them all at once.

Settings come from, first to last: the command line (or keyword arguments), the pair's
profile (saved by `tune` on this machine, carried by a trimmed drafter directory, or
packaged), the built-in defaults. A drafter is trimmed with `--vocab`, else with a vocab file
found by the target's tokenizer fingerprint; with none, it drafts with its full head.
"""

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.nn as nn

from . import blas
from .errors import VocabTrimError
from .files import read_json
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET, check_pair, load_model, resolve_model
from .profiles import DEFAULT, SETTING_FIELDS, Setting, find_profile, find_schedule, model_key
from .trim import head_bytes, head_rows, is_trimmed_dir, trim_drafter
from .vocab import find_vocab, keep_ids, read_ranked_ids


@dataclass
class Setup:
    """A loaded run: target, tokenizer, drafter (None: the target alone) and settings."""

    target: nn.Module
    tokenizer: Any
    drafter: nn.Module | None
    setting: Setting
    sources: dict[str, str] = field(default_factory=dict)  # setting field -> where its value came from
    names: tuple[str, str | None] = ("", None)
    vocab: str | None = None
    notes: list[str] = field(default_factory=list)  # one-line notices for the user
    schedule: dict[int, tuple[int, float]] = field(default_factory=dict)  # batch size -> speculative batch

    def generation_kwargs(self) -> dict:
        """Keyword arguments for `stream_generate` / `speculative_generate_step`."""
        return self.setting.generation_kwargs()

    def describe(self) -> list[str]:
        """What --verbose prints: the models, the drafter head, each setting and its source."""
        lines = [f"Target: {self.names[0]}"]
        if self.drafter is None:
            lines.append("Drafter: none (the target decodes alone)")
        else:
            record = getattr(self.drafter, "trim_record", None)
            full = (head_rows(self.drafter), head_bytes(self.drafter))
            rows, nbytes = (record.rows, record.nbytes) if record else full
            lines.append(f"Drafter: {self.names[1]}")
            lines.append(
                f"Drafter head: {rows} -> {head_rows(self.drafter)} rows "
                f"({nbytes / 1e6:.1f} MB -> {head_bytes(self.drafter) / 1e6:.1f} MB)"
            )
            if self.vocab:
                lines.append(f"Vocab: {self.vocab}")
        shown = {"k": "full" if self.setting.k is None else self.setting.k}
        parts = [
            f"{name.replace('_', '-')}={shown.get(name, getattr(self.setting, name))} ({self.sources[name]})"
            for name in SETTING_FIELDS
            if name in self.sources
        ]
        lines.append("Settings: " + ", ".join(parts))
        return lines


def describe_schedule(schedule: dict[int, tuple[int, float]]) -> str:
    """e.g. 'batches of 2-4: 1 draft, 5: 2 drafts; other sizes: the plain batch'."""
    if not schedule:
        return "off (several requests decode in the plain batch)"
    runs: list[list] = []
    for size in sorted(schedule):
        if runs and runs[-1][1] == size - 1 and runs[-1][2] == schedule[size]:
            runs[-1][1] = size
        else:
            runs.append([size, size, schedule[size]])
    parts = []
    for first, last, (drafts, threshold) in runs:
        sizes = f"{first}-{last}" if last > first else f"{first}"
        stop = f" stop<{threshold:g}" if threshold else ""
        parts.append(f"{sizes}: {drafts} draft{'s' if drafts > 1 else ''}{stop}")
    return "batches of " + ", ".join(parts) + "; other sizes: the plain batch"


def context_length(model: nn.Module) -> int | None:
    """The model's context in tokens (its config's max_position_embeddings), None where it names none."""
    context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 1 else None


def load_target(name: str) -> tuple[nn.Module, Any, str]:
    """(target, tokenizer, resolved path); a trimmed drafter directory is refused as a target."""
    resolved = resolve_model(name)
    if is_trimmed_dir(resolved):
        raise VocabTrimError(
            f"{name} is a trimmed drafter directory (its head scores only some ids): pass it as --draft-model "
            "and a full model as --model"
        )
    model, tokenizer = load_model(resolved)
    return model, tokenizer, resolved


def load_drafter(name: str, target: nn.Module, tokenizer: Any, target_name: str) -> tuple[nn.Module, str]:
    """(drafter, resolved path), checked to work with the target."""
    resolved = resolve_model(name)
    drafter, draft_tokenizer = load_model(resolved)
    check_pair(target, tokenizer, drafter, draft_tokenizer, target_name, name)
    return drafter, resolved


def load_pair(target: str, drafter: str) -> tuple[nn.Module, Any, nn.Module]:
    """(target model, tokenizer, drafter model), checked to share one tokenizer: the loaders every
    command uses, with no settings applied (see `load` for a run set up as the commands set it up)."""
    model, tokenizer, _ = load_target(target)
    draft_model, _ = load_drafter(drafter, model, tokenizer, target)
    return model, tokenizer, draft_model


def _carried_profile(path: str) -> dict | None:
    if not is_trimmed_dir(path):
        return None
    config = read_json(Path(path) / "config.json", "is not valid JSON", "trim the drafter again")
    return config["vocabtrim"].get("profile")


def vocab_for(tokenizer: Any, vocab: str | None) -> tuple[str | None, str]:
    """(vocab path, how it was chosen): `vocab` as given, or a vocab file found by the tokenizer."""
    if vocab is not None:
        return vocab, "--vocab"
    found = find_vocab(tokenizer)
    return (str(found), "matched by the target's tokenizer") if found else (None, "")


def load(
    model: str | None = None,
    draft_model: str | None = None,
    *,
    vocab: str | None = None,
    k: int | None = None,
    num_draft_tokens: int | None = None,
    draft_threshold: float | None = None,
    context_head: bool | None = None,
    lookup_ngram: int | None = None,
    lookup_tokens: int | None = None,
    adaptive: bool | None = None,
) -> Setup:
    """Load and set up a run. With no models named, the packaged pair; with only a drafter, the
    packaged target; with only a target (or draft_model "none"), the target alone. Settings
    left None come from the pair's profile, else the built-in defaults."""
    explicit = {
        "k": k,
        "num_draft_tokens": num_draft_tokens,
        "draft_threshold": draft_threshold,
        "context_head": context_head,
        "lookup_ngram": lookup_ngram,
        "lookup_tokens": lookup_tokens,
        "adaptive": adaptive,
    }
    if model is not None and not model.strip():
        raise VocabTrimError(f"--model {model!r} names no model: give one, or leave --model out for the default pair")
    if draft_model is not None and not draft_model.strip():
        raise VocabTrimError(
            f"--draft-model {draft_model!r} names no model: give a drafter, or none to decode with the target alone"
        )
    if model is None and draft_model is None:
        model, draft_model = DEFAULT_TARGET, DEFAULT_DRAFTER
    model = model or DEFAULT_TARGET
    draft_model = None if draft_model == "none" else draft_model
    if draft_model is None and (vocab is not None or k is not None):
        raise VocabTrimError("--vocab and --k trim a drafter: also pass --draft-model")
    notes = [line for line in [blas.notice()] if line]
    target, tokenizer, target_path = load_target(model)
    if draft_model is None:
        lookup = {"lookup_ngram": lookup_ngram or 0, "lookup_tokens": lookup_tokens or DEFAULT.lookup_tokens}
        setting = replace(DEFAULT, k=None, num_draft_tokens=0, draft_threshold=0.0, context_head=False, **lookup)
        sources = {"lookup_ngram": "command line" if lookup_ngram is not None else "off without a drafter"}
        return Setup(target, tokenizer, None, setting, sources, (model, None), None, notes)
    drafter, drafter_path = load_drafter(draft_model, target, tokenizer, model)
    carried = _carried_profile(drafter_path)
    profile, where = find_profile(model_key(model, target_path), model_key(draft_model, drafter_path), carried)
    base = profile or DEFAULT
    chosen = {name: value for name, value in explicit.items() if value is not None}
    setting = replace(base, **chosen)
    sources = {name: "command line" if name in chosen else where or "built-in default" for name in SETTING_FIELDS}
    if setting.num_draft_tokens == 0:  # prompt lookup alone (or nothing): the drafter would only cost its prefill
        setting = replace(setting, k=None, context_head=False, draft_threshold=0.0)
        return Setup(target, tokenizer, None, setting, sources, (model, None), None, notes)
    rows = head_rows(drafter)
    vocab_path = None
    if getattr(drafter, "vocab_remap", None) is not None:
        if vocab is not None or k is not None:
            raise VocabTrimError(
                f"{draft_model} is already trimmed to {rows} rows: drop --vocab/--k, or pass the "
                "untrimmed drafter to trim it"
            )
        setting = replace(setting, k=rows)
        sources["k"] = "the trimmed drafter directory"
    elif vocab is not None or k is not None or (setting.k is not None and setting.k < rows):
        vocab_path, how = vocab_for(tokenizer, vocab)
        if vocab_path is None:
            if k is not None:
                raise VocabTrimError(
                    f"--k needs a vocab: none matches {model}'s tokenizer; pass --vocab FILE "
                    f"(`mlx-vocabtrim calibrate --model {model} --out FILE` makes one)"
                )
            notes.append(
                f"Note: no vocab matches {model}'s tokenizer, so the drafter keeps its full head; "
                f"`mlx-vocabtrim calibrate --model {model} --out v.vocab.json.gz` makes one "
                "(then pass --vocab v.vocab.json.gz)"
            )
            setting, sources["k"] = replace(setting, k=None), "full head: no matching vocab"
        else:
            ranked = read_ranked_ids(vocab_path, tokenizer)
            wanted = k if k is not None else min(setting.k or rows, rows)
            keep = keep_ids(ranked, wanted, rows, tokenizer)
            setting = replace(setting, k=wanted)
            trim_drafter(drafter, keep, keep_full_head=setting.context_head)
            vocab_path = f"{vocab_path} ({how})"
    else:
        setting = replace(setting, k=None)
    if setting.context_head and setting.k is not None and getattr(drafter, "trim_record", None) is not None:
        if drafter.trim_record.head is None:
            notes.append(
                f"Note: {draft_model} has no full head to add context rows from (trimmed with "
                "--no-context-head): drafting with its kept rows only"
            )
            setting, sources["context_head"] = replace(setting, context_head=False), "unavailable in the drafter"
    schedule = find_schedule(model_key(model, target_path), model_key(draft_model, drafter_path)) if profile else {}
    return Setup(target, tokenizer, drafter, setting, sources, (model, draft_model), vocab_path, notes, schedule)


DRAFT_OPTIONS = (
    "vocab",
    "k",
    "num_draft_tokens",
    "draft_threshold",
    "context_head",
    "lookup_ngram",
    "lookup_tokens",
    "adaptive",
)


def load_for(params: dict) -> Setup:
    """`load` from a command's parsed options (--model, --draft-model and `options.draft_options`),
    its one-line notes printed on stderr."""
    setup = load(params["model"], params["draft_model"], **{name: params[name] for name in DRAFT_OPTIONS})
    for line in setup.notes:
        print(line, file=sys.stderr)
    return setup
