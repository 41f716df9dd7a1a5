"""Settings of a (target, drafter) pair: the built-in defaults, profiles saved by `tune` or
`bench --auto` for the machine they ran on, the profile a trimmed drafter directory carries,
and the packaged pair's profile measured by this project."""

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .engine import STEP_COST, TOKEN_COST
from .errors import VocabTrimError
from .files import read_json, write_text_whole

PROFILE_FORMAT = "mlx-vocabtrim-profile/1"
PACKAGED_PROFILES = Path(__file__).parent / "data" / "profiles"
SAMPLE = 1 << 16  # bytes read from each end of a weight file to tell models apart


@dataclass(frozen=True)
class Setting:
    """How our generator runs; k None is the full (untrimmed) head."""

    k: int | None = 16384
    num_draft_tokens: int = 7
    draft_threshold: float = 0.6
    context_head: bool = True
    lookup_ngram: int = 0
    lookup_tokens: int = 8
    adaptive: bool = False  # lengths are bounds; each round picks what the request's acceptance favours
    step_cost: float = STEP_COST  # a drafter step, in one-token target passes (for adaptive lengths)
    token_cost: float = TOKEN_COST  # each verified token past the first, likewise

    def name(self, full_rows: int | None = None) -> str:
        """e.g. 'trim@16384+ctx+lookup3/8 x7 stop<0.6'."""
        head = "full" if self.k is None or self.k == full_rows else f"trim@{self.k}"
        head += "+ctx" if self.context_head and head != "full" else ""
        head += f"+lookup{self.lookup_ngram}/{self.lookup_tokens}" if self.lookup_ngram else ""
        stop = f" stop<{self.draft_threshold:g}" if self.draft_threshold else ""
        lengths = f"x<={self.num_draft_tokens} adaptive" if self.adaptive else f"x{self.num_draft_tokens}"
        return f"{head} {lengths}{stop}"

    @classmethod
    def of(cls, row: dict) -> "Setting":
        """The setting a row of tuning results (or any dict with these fields) describes."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    def generation_kwargs(self) -> dict:
        """Keyword arguments of `speculative_generate_step` (k is applied by trimming)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "k"}


DEFAULT = Setting()  # pairs with no profile start from it (the packaged pair's earlier tuned choice)
SETTING_FIELDS = tuple(f.name for f in fields(Setting))


def setting_from(data: dict, where: str) -> Setting:
    """A Setting from a profile's "settings", checked field by field (types and ranges)."""
    from .checks import check_count, check_draft_threshold, check_lookup, check_num_draft_tokens

    def integer(value: object) -> bool:
        return type(value) is int

    kinds = {
        "k": lambda v: v is None or integer(v),
        "num_draft_tokens": integer,
        "lookup_ngram": integer,
        "lookup_tokens": integer,
        "context_head": lambda v: type(v) is bool,
        "adaptive": lambda v: type(v) is bool,
        "step_cost": lambda v: type(v) in (int, float) and 0 <= v <= 100,
        "token_cost": lambda v: type(v) in (int, float) and 0 <= v <= 100,
        "draft_threshold": lambda v: type(v) in (int, float),
    }
    try:
        if not isinstance(data, dict):
            raise ValueError("settings are not an object")
        unknown = set(data) - set(SETTING_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        wrong = next((name for name, value in data.items() if not kinds[name](value)), None)
        if wrong is not None:
            raise ValueError(f"{wrong} is {data[wrong]!r}")
        setting = replace(DEFAULT, **data)
        if setting.k is not None:
            check_count(setting.k, "k", 1)
        check_num_draft_tokens(setting.num_draft_tokens)
        check_draft_threshold(float(setting.draft_threshold))
        check_lookup(setting.lookup_ngram, setting.lookup_tokens)
    except (TypeError, ValueError, VocabTrimError) as e:
        raise VocabTrimError(f"{where} holds bad settings ({e}): run `mlx-vocabtrim tune` again") from None
    return setting


def _sampled_hash(files: list[Path], digest: "hashlib._Hash") -> str:
    """Names, sizes and the first and last 64 KiB of `files`: enough to tell weights apart, cheap to read."""
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as weights:
            digest.update(weights.read(SAMPLE))
            weights.seek(max(size - SAMPLE, 0))
            digest.update(weights.read(SAMPLE))
    return digest.hexdigest()[:16]


def model_key(given: str, resolved: str | None = None) -> str:
    """A stable name for a model in profiles, without converting or downloading anything: the
    packaged name (also for its converted copy in the cache), 'gguf:'/'dir:' and a hash of a
    local file's or directory's config and weights (a copy or a re-conversion still matches,
    other weights do not), or the hub id as given."""
    from .convert import DTYPES
    from .models import PACKAGED, cache_dir

    if given in PACKAGED:
        return given
    path = Path(given).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return "gguf:" + _sampled_hash([path], hashlib.sha256())
    local = Path(resolved).expanduser() if resolved else path
    if not local.is_dir():
        return given
    if local.resolve().parent == cache_dir().resolve():
        packaged = next((name for name in PACKAGED for dtype in DTYPES if local.name == f"{name}-{dtype}"), None)
        if packaged:
            return packaged
    digest = hashlib.sha256((local / "config.json").read_bytes() if (local / "config.json").is_file() else b"")
    return "dir:" + _sampled_hash(sorted(local.glob("*.safetensors")), digest)


def _store(target_key: str, drafter_key: str) -> Path:
    from .models import cache_dir

    slug = hashlib.sha256(f"{target_key}\n{drafter_key}".encode()).hexdigest()[:16]
    return cache_dir() / "profiles" / f"{slug}.json"


def _read(path: Path) -> dict:
    doc = read_json(path, "is corrupt", "delete it or run `mlx-vocabtrim tune` again")
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT or not isinstance(doc.get("settings"), dict):
        raise VocabTrimError(f"{path} is not a {PROFILE_FORMAT} file: delete it or run `mlx-vocabtrim tune` again")
    return doc


def _find(target_key: str, drafter_key: str) -> tuple[dict | None, str, str]:
    """The pair's saved or packaged profile document, its path and how it was found."""
    saved = _store(target_key, drafter_key)
    if saved.is_file():
        doc = _read(saved)
        if (doc.get("target"), doc.get("draft_model")) == (target_key, drafter_key):
            return doc, str(saved), f"profile {saved}"
    for path in sorted(PACKAGED_PROFILES.glob("*.json")):
        doc = _read(path)
        if (doc.get("target"), doc.get("draft_model")) == (target_key, drafter_key):
            return doc, str(path), f"packaged profile {path.name}"
    return None, "", ""


def find_profile_document(target_key: str, drafter_key: str) -> dict | None:
    """The pair's profile as saved (settings and what was measured), or None."""
    return _find(target_key, drafter_key)[0]


def find_profile(target_key: str, drafter_key: str, carried: dict | None = None) -> tuple[Setting | None, str]:
    """The pair's settings and where they came from: a profile saved on this machine, the
    profile a trimmed drafter directory carries, or a packaged profile; (None, '') if none."""
    doc, path, where = _find(target_key, drafter_key)
    if doc is not None and where.startswith("profile "):
        return setting_from(doc["settings"], path), where
    if carried:
        return setting_from(carried, "the trimmed drafter's config.json"), "profile carried by the trimmed drafter"
    if doc is not None:
        return setting_from(doc["settings"], path), where
    return None, ""


def schedule_from(data: object, where: str) -> dict[int, tuple[int, float]]:
    """A profile's "batch_schedule" ({"2": [draft length, threshold] or null, ...}) as the batched
    decoder takes it: the sizes that speculate."""
    from .checks import check_draft_threshold, check_num_draft_tokens

    if data is None:
        return {}
    try:
        if not isinstance(data, dict):
            raise ValueError("it is not an object")
        out = {}
        for size, entry in data.items():
            if not str(size).isdigit() or int(size) < 2:
                raise ValueError(f"batch size {size!r}")
            if entry is None:
                continue
            if not isinstance(entry, list) or len(entry) != 2 or type(entry[0]) is not int:
                raise ValueError(f"the entry of {size} is {entry!r}")
            check_num_draft_tokens(entry[0])
            check_draft_threshold(float(entry[1]))
            out[int(size)] = (entry[0], float(entry[1]))
    except (TypeError, ValueError, VocabTrimError) as e:
        raise VocabTrimError(f"{where} holds a bad batch_schedule ({e}): run `mlx-vocabtrim tune` again") from None
    return out


def find_schedule(target_key: str, drafter_key: str) -> dict[int, tuple[int, float]]:
    """The batch sizes at which the pair's profile speculates inside a batch, and how ({} if none)."""
    doc, path, _ = _find(target_key, drafter_key)
    return schedule_from(doc.get("batch_schedule"), path) if doc else {}


def save_profile(
    target_key: str,
    drafter_key: str,
    setting: Setting,
    measured: dict,
    out: Path | None = None,
    schedule: dict | None = None,
) -> Path:
    """Write the pair's profile (to this machine's store unless `out`), replacing an earlier one;
    `schedule` (batch size -> [draft length, threshold] or None) when tuning measured batches."""
    path = out or _store(target_key, drafter_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": PROFILE_FORMAT,
        "target": target_key,
        "draft_model": drafter_key,
        "settings": asdict(setting),
        "measured": measured,
    }
    if schedule is not None:
        doc["batch_schedule"] = {str(size): entry for size, entry in schedule.items()}
    write_text_whole(path, json.dumps(doc, indent=1, default=str) + "\n")
    return path
