"""Spec-Bench harness: the target alone, mlx-lm's speculative decoding (at its default and at its
best draft length) and our generator's settings, on the same prompts, each repeated in a
seeded random order; counts observed where they happen, speed-ups with bootstrap intervals."""

import json
import os
import platform
import random
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative_step
from mlx_lm.models.cache import CacheList, KVCache, RotatingKVCache, make_prompt_cache

from .blas import blas_library
from .checks import check_count, check_draft_threshold, check_lookup, check_num_draft_tokens
from .errors import VocabTrimError
from .files import write_text_whole
from .profiles import Setting
from .progress import progress
from .speculative import SpecStats, speculative_generate_step
from .trim import head_bytes, head_rows
from .tune import PREFILL_STEP

BOOTSTRAP = 2000


@dataclass
class Method:
    """One way of decoding: the target alone, mlx-lm's speculative loop or ours with a setting."""

    name: str
    kind: str  # "target", "mlx-lm-spec" or "ours"
    drafter: nn.Module | None = None
    setting: Setting | None = None


@dataclass
class Run:
    """One method on one prompt, once. Counts come from the passes observed in the KV caches."""

    method: str
    category: str
    question_id: Any
    repeat: int
    prompt_tokens: int
    emitted: int  # tokens emitted, a stopping EOS included
    seconds: float  # the whole call, prefill included
    decode_tokens: int  # tokens emitted after the first round
    decode_seconds: float  # time after the first round
    target_calls: int
    drafted: int  # drafts the target verified, up to the stop
    accepted: int  # emitted tokens that were drafts
    drafter_steps: int
    context_rows: int = 0
    tokens: list = field(default_factory=list)  # emitted tokens, EOS excluded (checked against the target)
    from_draft: list = field(default_factory=list)


def step_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: all parameters but the input embedding,
    whose rows are gathered one per token (a tied embedding counts, as it is the head)."""
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    return sum(
        v.nbytes
        for name, v in tree_flatten(model.parameters())
        if tied or not name.startswith("model.embed_tokens.")
        if name != "vocab_remap"
    )


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        import subprocess

        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip() or platform.processor()
    return platform.processor() or "unknown"


def environment(model: nn.Module | None = None) -> dict:
    """What the numbers depend on: versions, device, BLAS, CPU, cores and (given the model) its weight dtype."""
    from importlib.metadata import version

    env = {
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "mlx_vocabtrim": version("mlx-vocabtrim"),
        "device": str(mx.default_device()),
        "blas": blas_library(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
    }
    if model is not None:
        dtypes = {str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters())}
        env["dtype"] = ",".join(sorted(dtypes))
    return env


def counting_cache(model: nn.Module, known: Callable[[], int] = lambda: 0) -> list:
    """A fresh prompt cache for `model` whose first attention layer logs every forward pass through
    it as (offset before, tokens fed, `known()`: tokens of prompt and output the caller had then)."""
    cache = make_prompt_cache(model)
    layer = next((c for c in _layers(cache) if isinstance(c, (KVCache, RotatingKVCache))), None)
    if layer is None:
        raise VocabTrimError(
            f"bench counts passes in an attention layer's cache, and this model has none ({type(cache[0]).__name__} "
            "only): run it with generate or serve"
        )
    layer.passes = []
    update = layer.update_and_fetch

    def logged(keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        layer.passes.append((layer.offset, keys.shape[2], known()))
        return update(keys, values)

    layer.update_and_fetch = logged
    return cache


def _layers(cache: list) -> list:
    return [c for layer in cache for c in (_layers(list(layer.caches)) if type(layer) is CacheList else [layer])]


def _passes(cache: list) -> list[tuple[int, int, int]]:
    return next((c.passes for c in _layers(cache) if hasattr(c, "passes")), [])


def count_passes(target: list[tuple[int, int, int]], drafter: list[tuple[int, int, int]], prompt: int, emitted: int):
    """(target calls, drafts verified, drafter steps) of one run, from the passes logged.

    Positions are 0-based; the prompt holds [0, prompt) and the last emitted token sits at
    `last`. Prefill passes end before the last prompt token. A target pass over n tokens from
    offset o, when the caller knew k tokens, feeds context up to position k - 1 (more than one
    token when a recurrent model feeds its kept tokens again; a caller that reads ahead may know
    fewer: then o + 1 is used) and drafts after it; it counts only if it decides a token that was
    emitted, its drafts only up to `last`: the same stop for every method, whether it was EOS or
    max tokens, and passes queued ahead are ignored. A drafter pass proposes position o + n.
    """
    last = prompt + emitted - 1
    calls = drafted = 0
    for offset, n, known in target:
        first = max(known, offset + 1)  # the first position this pass decides
        if offset + n > prompt - 1 and first <= last:
            calls += 1
            drafted += max(0, min(offset + n - 1, last) - first + 1)
    steps = sum(1 for offset, n, _ in drafter if prompt - 1 < offset + n <= last)
    return calls, drafted, steps


def _decode(tokens_iter, max_tokens: int, eos: set[int], tokens: list[int]) -> tuple[list[bool], int, float]:
    """Append the emitted tokens (EOS included when reached) to `tokens`; returns their from-draft
    flags, and how many tokens / what time the first round ended at.

    A round ends with the token the target itself chose (from_draft False), so the time
    after the first such token covers whole rounds only: prefill and the first round's
    latency stay out of the decode rate, with no free tokens counted in it.
    """
    from_draft, first_round, first_time = [], 0, 0.0
    for item in tokens_iter:
        tokens.append(int(item[0]))
        from_draft.append(bool(item[2]) if len(item) > 2 else False)
        if not first_round and not from_draft[-1]:
            mx.synchronize()
            first_round, first_time = len(tokens), time.perf_counter()
        if tokens[-1] in eos or len(tokens) == max_tokens:
            break
    return from_draft, first_round, first_time


def run_method(
    method: Method, model: nn.Module, prompt: list[int], max_tokens: int, temp: float, top_p: float, eos: set[int]
) -> Run:
    """Decode `prompt` with `method`, timing the whole call (prefill included) and, apart, the
    decoding after the first round; counts come from the passes logged in the KV caches."""
    from mlx_lm.sample_utils import make_sampler

    ids = mx.array(prompt, mx.uint32)
    tokens: list[int] = []
    target_cache = counting_cache(model, lambda: len(prompt) + len(tokens))
    draft_cache = counting_cache(method.drafter) if method.drafter is not None else []
    stats = SpecStats()
    mx.synchronize()
    tic = time.perf_counter()
    if method.kind == "target":
        gen = generate_step(
            ids,
            model,
            max_tokens=max_tokens,
            sampler=make_sampler(temp, top_p),
            prompt_cache=target_cache,
            prefill_step_size=PREFILL_STEP,
        )
    elif method.kind == "mlx-lm-spec":
        gen = mlx_lm_speculative_step(
            ids,
            model,
            method.drafter,
            num_draft_tokens=method.setting.num_draft_tokens,
            max_tokens=max_tokens,
            sampler=make_sampler(temp, top_p),
            prompt_cache=target_cache + draft_cache,
            prefill_step_size=PREFILL_STEP,
        )
    else:
        gen = speculative_generate_step(
            ids,
            model,
            method.drafter,
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            stats=stats,
            prompt_cache=target_cache + draft_cache,
            prefill_step_size=PREFILL_STEP,
            **method.setting.generation_kwargs(),
        )
    from_draft, first_round, first_time = _decode(gen, max_tokens, eos, tokens)
    gen.close()
    mx.synchronize()
    end = time.perf_counter()
    calls, drafted, steps = count_passes(_passes(target_cache), _passes(draft_cache), len(prompt), len(tokens))
    decode_tokens = len(tokens) - first_round if first_round else 0
    kept = tokens[:-1] if tokens and tokens[-1] in eos else tokens
    return Run(
        method.name,
        "",
        None,
        0,
        len(prompt),
        len(tokens),
        end - tic,
        decode_tokens,
        end - first_time if decode_tokens else 0.0,
        calls,
        drafted,
        sum(from_draft),
        steps,
        stats.context_rows,
        kept,
        from_draft,
    )


def interleave(
    questions: list[dict],
    methods: list[Method],
    model: nn.Module,
    encode: Callable[[str], list[int]],
    max_tokens: int,
    temp: float,
    top_p: float,
    eos: set[int],
    repeats: int,
    seed: int,
    advance: Callable[[], None],
    done: dict[tuple, Run] | None = None,
    record: Callable[[Run], None] | None = None,
) -> list[Run]:
    """Every method `repeats` times on each prompt in turn, in an order shuffled per prompt
    (seeded), so drift of the machine hits all methods alike.

    Runs found in `done` (by question id, method and repeat) are reused, new ones go to `record` and
    `advance`."""
    runs = []
    for q in questions:
        prompt = encode(q["prompt"])
        order = [(m, r) for m in methods for r in range(repeats)]
        random.Random(f"{seed}:{q['question_id']}").shuffle(order)
        for m, r in order:
            run = (done or {}).get((q["question_id"], m.name, r))
            if run is None:
                if temp > 0:
                    mx.random.seed(zlib.crc32(f"{seed}:{q['question_id']}:{r}".encode()))
                run = run_method(m, model, prompt, max_tokens, temp, top_p, eos)
                run.category, run.question_id, run.repeat = q["category"], q["question_id"], r
                if record is not None:
                    record(run)
                advance()
            runs.append(run)
    return runs


def _per_question(runs: list[Run], method: str, rate: str) -> dict[Any, tuple[float, float]]:
    """Per question: (tokens, seconds), each the median over the repeats."""
    groups: dict[Any, list[Run]] = defaultdict(list)
    for r in runs:
        if r.method == method:
            groups[r.question_id].append(r)
    pick = {"decode": ("decode_tokens", "decode_seconds"), "e2e": ("emitted", "seconds")}[rate]
    tokens, seconds = pick
    return {
        q: (float(np.median([getattr(r, tokens) for r in rs])), float(np.median([getattr(r, seconds) for r in rs])))
        for q, rs in groups.items()
    }


def ratio_interval(runs: list[Run], method: str, base: str, rate: str, seed: int = 0) -> dict:
    """Speed-up of `method` over `base` (tokens/s of each over the same questions, medians over
    repeats) and a 95% bootstrap interval over questions."""
    ours, theirs = _per_question(runs, method, rate), _per_question(runs, base, rate)
    questions = sorted(set(ours) & set(theirs), key=str)
    if not questions:
        return {"ratio": None, "low": None, "high": None}
    a = np.array([ours[q] for q in questions])
    b = np.array([theirs[q] for q in questions])

    def ratio(index: np.ndarray) -> np.ndarray:
        tokens_a, seconds_a = a[index, 0].sum(-1), a[index, 1].sum(-1)
        tokens_b, seconds_b = b[index, 0].sum(-1), b[index, 1].sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (tokens_a / seconds_a) / (tokens_b / seconds_b)

    point = float(ratio(np.arange(len(questions))[None])[0])
    samples = ratio(np.random.default_rng(seed).integers(0, len(questions), (BOOTSTRAP, len(questions))))
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return {"ratio": point, "low": float(low), "high": float(high)}


def decode_rate(runs: list[Run], method: str) -> float:
    """Decode tokens/s of a method over all questions (medians over repeats)."""
    per_q = _per_question(runs, method, "decode")
    seconds = sum(s for _, s in per_q.values())
    return sum(t for t, _ in per_q.values()) / seconds if seconds else 0.0


def fastest(names: list[str], runs: list[Run]) -> str:
    """The baseline: of mlx-lm's default and its tuned draft length, the one measured faster."""
    return max(names, key=lambda name: decode_rate(runs, name))


def summarize(runs: list[Run], methods: list[Method], c_of: dict[str, float], baseline: str) -> dict[str, dict]:
    """Per method: counts, tau, acceptance, drafter steps and MBSU, tokens/s and speed-ups."""
    out = {}
    for m in methods:
        rs = [r for r in runs if r.method == m.name]
        fields = ("emitted", "target_calls", "drafted", "accepted", "drafter_steps")
        emitted, calls, drafted, accepted, steps = (sum(getattr(r, f) for r in rs) for f in fields)
        tau = emitted / calls if calls else 0.0
        steps_per_call = steps / calls if calls else 0.0
        rates = {rate: _per_question(runs, m.name, rate) for rate in ("decode", "e2e")}
        out[m.name] = {
            "setting": asdict(m.setting) if m.setting else None,
            "runs": len(rs),
            "emitted": emitted,
            "target_calls": calls,
            "drafted": drafted,
            "accepted": accepted,
            "drafter_steps": steps,
            "tau": tau,
            "acceptance": accepted / drafted if drafted else 0.0,
            "drafts_per_call": drafted / calls if calls else 0.0,
            "drafter_steps_per_call": steps_per_call,
            "context_rows": float(np.mean([r.context_rows for r in rs])) if rs else 0.0,
            "c": c_of.get(m.name, 0.0),
            "mbsu": tau / (c_of.get(m.name, 0.0) * steps_per_call + 1),
        }
        for rate, per_q in rates.items():
            seconds = sum(s for _, s in per_q.values())
            out[m.name][f"{rate}_tokens_per_s"] = sum(t for t, _ in per_q.values()) / seconds if seconds else 0.0
            out[m.name][f"{rate}_vs_target"] = ratio_interval(runs, m.name, "target", rate)
            out[m.name][f"{rate}_vs_baseline"] = ratio_interval(runs, m.name, baseline, rate)
    return out


def by_category(runs: list[Run], methods: list[Method], c_of: dict[str, float], baseline: str) -> dict[str, dict]:
    return {
        cat: summarize([r for r in runs if r.category == cat], methods, c_of, baseline)
        for cat in sorted({r.category for r in runs})
    }


def check_lossless(runs: list[Run]) -> str | None:
    """Greedy: every run must emit exactly the target's tokens; the first difference, described, or None."""
    reference = {r.question_id: r.tokens for r in runs if r.method == "target"}
    for r in runs:
        ref = reference.get(r.question_id)
        if ref is not None and r.tokens != ref:
            at = next(
                (i for i, (a, b) in enumerate(zip(r.tokens, ref, strict=False)) if a != b), min(len(r.tokens), len(ref))
            )
            return (
                f"greedy output of {r.method} (repeat {r.repeat}) differs from the target on question "
                f"{r.question_id} at token {at}: this is a bug, please report it"
            )
    return None


def resume_log(out: Path, config: dict, name: str = "bench.partial.jsonl") -> tuple[list[dict], Callable[[dict], None]]:
    """Entries an interrupted bench with the same `config` left in OUT/`name` (another config is an
    error), and a function appending one entry durably (a line torn by a kill is dropped on resume)."""
    path = out / name
    entries: list[dict] = []
    if path.exists():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not parsed or not isinstance(parsed[0], dict) or parsed[0].get("config") != config:
            raise VocabTrimError(
                f"{path} holds an unfinished bench with other settings (or is damaged): rerun with those, "
                "pass another --out, or delete the file to start over"
            )
        entries = parsed[1:]
        if len(parsed) < len(lines):
            write_text_whole(path, "".join(json.dumps(e) + "\n" for e in parsed))

    def append(entry: dict) -> None:
        if not path.exists():  # started on the first finished entry: a run that fails earlier leaves nothing
            out.mkdir(parents=True, exist_ok=True)
            write_text_whole(path, json.dumps({"config": config}) + "\n")
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    return entries, append


def _interval(r: dict) -> str:
    if not r or r["ratio"] is None:
        return "-"
    return f"{r['ratio']:.2f}x [{r['low']:.2f}, {r['high']:.2f}]"


def markdown(
    summary: dict[str, dict],
    categories: dict[str, dict],
    env: dict,
    head_of: dict[str, int],
    baseline: str,
    repeats: int,
    lossless: str,
    limits: dict | None = None,
) -> str:
    """The overall table, the decode speed-up over the baseline per category, then the replay's limits."""
    lines = [
        f"MLX {env['mlx']}, mlx-lm {env['mlx_lm']} on {env['device']} ({env['cpu']}, {env['cores']} cores), "
        f"weights {env['dtype']}, BLAS {env['blas']}. Each method ran {repeats} time(s) per question in a seeded "
        f"random order; speed-ups are medians over repeats with 95% bootstrap intervals over questions. "
        f"Baseline: `{baseline}`. Decode: tokens after the first round over the time after it. "
        f"Lossless check: {lossless}.",
        "",
        "| method | head rows | drafts/call | tau | acceptance | MBSU | decode tok/s | vs target | vs baseline "
        "| end-to-end tok/s | vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        setting = s["setting"] or {}
        rows = f"{head_of[name]:,}" if name in head_of else "-"
        if setting.get("context_head") and name in head_of:
            rows += f" +{s['context_rows']:.0f}"
        lines.append(
            f"| {name} | {rows} | {s['drafts_per_call']:.2f} | {s['tau']:.2f} | {s['acceptance']:.1%} | "
            f"{s['mbsu']:.2f} | {s['decode_tokens_per_s']:.3f} | {_interval(s['decode_vs_target'])} | "
            f"{_interval(s['decode_vs_baseline'])} | {s['e2e_tokens_per_s']:.3f} | {_interval(s['e2e_vs_baseline'])} |"
        )
    names = list(summary)
    lines += [
        "",
        f"Decode speed-up over `{baseline}` by category:",
        "",
        "| category | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for cat, s in categories.items():
        cells = [
            f"{s[n]['decode_vs_baseline']['ratio']:.2f}x" if s[n]["decode_vs_baseline"]["ratio"] else "-" for n in names
        ]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    if limits:
        lines += [
            "",
            "Limits on these questions, from the tuner's replay with its measured costs (replayed tokens/s over "
            "tuned mlx-lm replayed alike; prefill left out): a drafter that is always right, the best static "
            "setting of each question chosen after the fact, and the tuned choice. The choice's tau replayed here "
            f"{limits['choice_tau']['these_questions']:.2f}, predicted on the tuning questions "
            f"{limits['choice_tau']['tuning_questions']:.2f}.",
            "",
            "| category | always right | best static per question | tuned choice |",
            "|---|---|---|---|",
        ]
        for cat, r in limits["categories"].items():
            cells = [f"{r[key]['vs_mlx_lm']:.2f}x" for key in ("always_right", "best_static", "choice")]
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], baseline: str, path: Path) -> bool:
    """PNG of each method's decode speed-up over the baseline with its interval; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n, s in summary.items() if s["decode_vs_baseline"]["ratio"]]
    if not names:
        return False
    values = [summary[n]["decode_vs_baseline"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    y = range(len(names))
    ratios = [v["ratio"] for v in values]
    errors = [
        [r - v["low"] for r, v in zip(ratios, values, strict=True)],
        [v["high"] - r for r, v in zip(ratios, values, strict=True)],
    ]
    ax.barh(list(y), ratios, xerr=errors, color="#4c72b0", capsize=3)
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"decode tokens/s over {baseline} (95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long method names widen the figure
    plt.close(fig)
    return True


def write_outputs(out: Path, report: dict, table: str) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png, each written whole, then the
    resume log is removed."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    for path, text in zip(paths, (json.dumps(report, indent=1, default=str), table), strict=True):
        write_text_whole(path, text)
    png = out / "bench.png"
    from .files import write_whole

    drawn = []
    write_whole(png, lambda tmp: drawn.append(plot(report["summary"], report["baseline"], tmp)))
    if drawn and drawn[0]:
        paths.append(png)
    else:
        png.unlink(missing_ok=True)
    (out / "bench.partial.jsonl").unlink(missing_ok=True)
    return paths


def runs_as_dicts(runs: list[Run]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "from_draft"} for r in runs]


METHOD_FORM = "full or trim@K, then +ctx, +lookup[N/C], +adaptive, then ' xG' (or ' x<=G adaptive') and ' stop<T'"
PROFILE_METHOD = "profile"  # the setting `generate` uses with no flags: the pair's profile on this machine
# the labels bench reports before a setting's name ('auto: ', 'auto, best static: ', 'profile: ')
REPORTED_LABEL = re.compile(r"(?:^|(?<=,))\s*(?:auto(?:, best (?:static|adaptive)|, both features)?|profile):\s*")


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit() also takes '²', which int() refuses


def parse_method(name: str, defaults: Setting) -> Setting:
    """One of --methods in the notation bench reports methods under (`Setting.name`), so a reported
    method runs again as named: e.g. 'trim@16384+ctx+lookup4/16 x5 stop<0.6'. What it leaves out
    comes from `defaults` (the --num-draft-tokens, --draft-threshold and --lookup-* flags), except
    that a named length (' xG') drafts to it without a threshold unless ' stop<T' names one."""
    bad = VocabTrimError(f"--methods: {name!r} is not {METHOD_FORM}: e.g. 'trim@16384+ctx+lookup3/8 x5 stop<0.6'")
    words = name.split()
    head, *extras = words[0].split("+")
    if head != "full" and not (head.startswith("trim@") and _digits(head[5:]) and int(head[5:]) > 0):
        raise bad
    setting = replace(defaults, k=None if head == "full" else int(head[5:]), lookup_ngram=0)
    seen = set()
    for extra in extras:
        kind = "lookup" if extra.startswith("lookup") else extra
        if kind not in ("ctx", "lookup", "adaptive") or kind in seen or (head == "full" and kind == "ctx"):
            raise VocabTrimError(
                f"--methods: {name!r} takes +ctx (trimmed heads only), +lookup and +adaptive, each once"
            )
        seen.add(kind)
        if kind == "lookup":
            n, slash, c = extra[6:].partition("/")
            if extra != "lookup" and not (_digits(n) and slash and _digits(c)):
                raise bad
            setting = replace(setting, lookup_ngram=int(n) if n else defaults.lookup_ngram)
            setting = replace(setting, lookup_tokens=int(c) if c else defaults.lookup_tokens)
        else:
            setting = replace(setting, **{"context_head" if kind == "ctx" else "adaptive": True})
    if any(word.startswith("x") for word in words[1:]):  # a named length is fixed unless it names a threshold
        setting = replace(setting, draft_threshold=0.0)
    for word in words[1:]:
        if word.startswith("x<=") and _digits(word[3:]):
            setting = replace(setting, num_draft_tokens=int(word[3:]), adaptive=True)
        elif word.startswith("x") and _digits(word[1:]):
            setting = replace(setting, num_draft_tokens=int(word[1:]))
        elif word == "adaptive":
            setting = replace(setting, adaptive=True)
        elif word.startswith("stop<"):
            try:
                setting = replace(setting, draft_threshold=float(word[5:]))
            except ValueError:
                raise bad from None
        else:
            raise bad
    try:
        check_num_draft_tokens(setting.num_draft_tokens)
        check_draft_threshold(setting.draft_threshold)
        check_lookup(setting.lookup_ngram, setting.lookup_tokens)
        if "lookup" in seen:  # a lookup of n = 0 would be none under a name that says lookup
            check_count(setting.lookup_ngram, "--lookup-ngram", 1)
    except VocabTrimError as e:
        raise VocabTrimError(f"--methods: {name!r}: {e}") from None
    return setting


def parse_methods(
    spec: str, num_draft_tokens: int, draft_threshold: float, lookup_ngram: int, lookup_tokens: int
) -> list[tuple[str, Setting | None]]:
    """(name, setting) of each of --methods (see `parse_method`); the setting None for `profile`,
    which needs the pair to be known."""
    defaults = Setting(None, num_draft_tokens, draft_threshold, False, lookup_ngram, lookup_tokens)
    methods = []
    spec = REPORTED_LABEL.sub("", spec)  # a name copied from a report, label and all, runs as its setting
    for name in [" ".join(m.split()) for m in spec.split(",") if m.strip()]:
        methods.append((name, None if name == PROFILE_METHOD else parse_method(name, defaults)))
    return methods


def replay_limits(target, drafter, keeps, tuned, qs, encode, answers, max_tokens, mlx_lm_gamma) -> dict:
    """What the tuner's replay says of the benchmarked questions with the tuning's measured costs, overall
    and per category, in replayed tokens/s and over tuned mlx-lm replayed alike: a drafter that is always
    right, the best static setting of each question (chosen after the fact), the tuned choice; and the
    choice's tau replayed on these questions (exact for greedy without a threshold) beside the tuning's."""
    from .tune import Costs, _lookups, bounds, replay, trace

    costs = Costs.of(tuned["costs"])
    restores = tuple(tuned.get("restores", (False, False)))
    choice, baseline = Setting.of(tuned["choice"]), Setting(None, mlx_lm_gamma, 0.0, False, 0)
    per: dict[str, list] = defaultdict(list)
    tokens = calls = 0
    for q in qs:
        tr = trace(target, drafter, encode(q["prompt"]), max_tokens, set(), keeps, answers[q["question_id"]])
        lookups = {n: _lookups(tr, n, max(choice.lookup_tokens, 1)) for n in (choice.lookup_ngram,) if n}
        ours, base = replay(tr, choice, costs, lookups, restores), replay(tr, baseline, costs, {}, restores)
        tokens, calls = tokens + ours[0], calls + ours[1]
        limit = bounds([tr], list(keeps), costs, restores)[0]
        row = {"choice": (ours[0], ours[3]), "mlx_lm": (base[0], base[3])} | limit
        per[q["category"]].append(row)
        per["overall"].append(row)

    def rates(rows: list[dict]) -> dict:
        keys = [key for key in rows[0] if key != "best_static_setting"]
        speed = {key: sum(r[key][0] for r in rows) / sum(r[key][1] for r in rows) for key in keys}
        return {key: {"tokens_per_s": v, "vs_mlx_lm": v / speed["mlx_lm"]} for key, v in speed.items()}

    return {
        "categories": {cat: rates(rows) for cat, rows in per.items()},
        "best_static_settings": [r["best_static_setting"] for r in per["overall"]],
        "choice_tau": {"tuning_questions": tuned["choice"]["expected_tau"], "these_questions": tokens / calls},
    }


def _pair(model: str, draft_model: str, vocab: str | None, needs_vocab: bool):
    """Target, tokenizer, untrimmed drafter, ranked ids (or None) and their provenance."""
    from .resolve import load_drafter, load_target, vocab_for
    from .vocab import read_ranked_ids

    target, tokenizer, target_path = load_target(model)
    drafter, drafter_path = load_drafter(draft_model, target, tokenizer, model)
    if getattr(drafter, "vocab_remap", None) is not None:
        raise VocabTrimError(f"{draft_model} is already trimmed: benchmark and tune with the untrimmed drafter")
    path, how = vocab_for(tokenizer, vocab)
    if path is None and needs_vocab:
        raise VocabTrimError(
            f"no vocab matches {model}'s tokenizer: pass --vocab FILE (`mlx-vocabtrim calibrate` makes one)"
        )
    ranked = read_ranked_ids(path, tokenizer) if path else None
    return target, tokenizer, drafter, ranked, f"{path} ({how})" if path else None, target_path, drafter_path


def _tune(target, tokenizer, drafter, ranked, ks, tuning, max_tokens, max_prompt_tokens, echo) -> dict:
    """Run tune.tune on the tuning questions with a progress bar."""
    from .calibrate import chat_prompt
    from .tune import tune
    from .vocab import keep_ids

    rows = head_rows(drafter)
    keeps = {k: keep_ids(ranked, k, rows, tokenizer) for k in ks if k < rows}
    prompts = [chat_prompt(tokenizer, q["prompt"], max_prompt_tokens) for q in tuning]
    with progress(len(prompts), "Tuning") as bar:
        result = tune(target, drafter, prompts, max_tokens, set(tokenizer.eos_token_ids), keeps, lambda: bar.update(1))
    result["tuning_questions"] = [q["question_id"] for q in tuning]
    return result


def _save_profile(result: dict, model: str, draft_model: str, target, paths, vocab_used, out, command) -> Path:
    from .profiles import model_key, save_profile

    choice = result["choice"]
    setting = Setting.of(choice)
    measured = {
        "predicted_tokens_per_s": choice["predicted_tokens_per_s"],
        "expected_tau": choice["expected_tau"],
        "tuned_on": result["tuning_questions"],
        "vocab": vocab_used,
        "environment": environment(target),
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "mlx_lm_spec_best": result["mlx_lm_spec_best"],  # bench-serve runs mlx_lm.server --draft-model at it
    }
    batch = result.get("batch")
    if batch:
        measured["batch"] = {k: batch[k] for k in ("taus", "plain", "rounds", "sizes")}
    schedule = batch["schedule"] if batch else None
    return save_profile(model_key(model, paths[0]), model_key(draft_model, paths[1]), setting, measured, out, schedule)


def tune_pair(
    model, draft_model, vocab, ks, questions, prompts, max_tokens, max_prompt_tokens, out, force, echo
) -> dict:
    """`mlx-vocabtrim tune`: tune on `prompts` questions spread over the file, save the profile (to
    this machine's store, replacing the pair's earlier one, or to `out`)."""
    from .files import check_output
    from .questions import PACKAGED_QUESTIONS, tuning_questions

    if out is not None:
        check_output(out, inputs=[questions, vocab], force=force)
    target, tokenizer, drafter, ranked, vocab_used, *paths = _pair(model, draft_model, vocab, needs_vocab=True)
    tuning, _ = tuning_questions(questions or PACKAGED_QUESTIONS, [], prompts)
    result = _tune(target, tokenizer, drafter, ranked, ks, tuning, max_tokens, max_prompt_tokens, echo)
    from .files import command_line

    path = _save_profile(result, model, draft_model, target, paths, vocab_used, out, command_line())
    choice, rows = result["choice"], head_rows(drafter)
    setting = Setting.of(choice)
    best = result["mlx_lm_spec"][result["mlx_lm_spec_best"]]
    echo(
        f"Chose {setting.name(rows)}: {choice['predicted_tokens_per_s']:.3f} tokens/s predicted, tau "
        f"{choice['expected_tau']:.2f} (mlx-lm's speculative decoding at its best, {result['mlx_lm_spec_best']} "
        f"drafts: {best['predicted_tokens_per_s']:.3f} tokens/s)"
    )
    echo(f"Wrote {path}")
    return result


def run_bench(*, out: Path, force: bool, questions: str | None, per_category: int, **options) -> dict:
    """`mlx-vocabtrim bench`: see the command's help. Its output directory is checked before any
    work and locked while it runs: a second bench on the same --out stops with an error."""
    from .files import check_output, output_lock
    from .questions import PACKAGED_QUESTIONS, read_questions

    if out.exists() and not out.is_dir():
        raise VocabTrimError(f"--out {out} is a file: give a directory for bench.json, bench.md and bench.png")
    if (out / "bench.json").exists() and not (out / "bench.partial.jsonl").exists() and not force:
        raise VocabTrimError(f"{out} holds a finished bench: pass --force to replace it, or pick another --out")
    check_output(out / "bench.json", force=True)
    questions = questions or str(PACKAGED_QUESTIONS)
    qs = read_questions(questions, per_category)
    with output_lock(out):
        return _bench(out=out, questions=questions, qs=qs, per_category=per_category, **options)


def _bench(
    *,
    model,
    draft_model,
    vocab,
    methods,
    num_draft_tokens,
    draft_threshold,
    lookup_ngram,
    lookup_tokens,
    ks,
    baseline,
    auto,
    auto_prompts,
    questions,
    qs,
    per_category,
    max_tokens,
    max_prompt_tokens,
    temp,
    top_p,
    repeats,
    seed,
    out,
    save_profile,
    echo,
) -> dict:
    from .calibrate import chat_prompt
    from .files import command_line
    from .questions import tuning_questions
    from .trim import trimmed_copy
    from .vocab import keep_ids

    sweep = parse_methods(methods, num_draft_tokens, draft_threshold, lookup_ngram, lookup_tokens)
    config = {
        "model": model,
        "draft_model": draft_model,
        "vocab": vocab,
        "methods": methods,
        "num_draft_tokens": num_draft_tokens,
        "draft_threshold": draft_threshold,
        "lookup_ngram": lookup_ngram,
        "lookup_tokens": lookup_tokens,
        "k": ks,
        "baseline": baseline,
        "auto": auto,
        "auto_prompts": auto_prompts,
        "questions": str(questions),
        "per_category": per_category,
        "max_tokens": max_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "temp": temp,
        "top_p": top_p,
        "repeats": repeats,
        "seed": seed,
    }
    entries, log = resume_log(out, config)
    needs_vocab = auto or any(s is not None and s.k is not None for _, s in sweep)
    target, tokenizer, drafter, ranked, vocab_used, *paths = _pair(model, draft_model, vocab, needs_vocab)
    rows = head_rows(drafter)
    if any(s is None for _, s in sweep):
        from .profiles import DEFAULT, find_profile, model_key

        found, where = find_profile(model_key(model, paths[0]), model_key(draft_model, paths[1]))
        profile = found or DEFAULT
        source = f"from the {where or 'built-in default'}"
        if profile.k is not None and ranked is None:  # as generate: with no vocab, the full head
            profile, source = replace(profile, k=None), f"{source}; the full head: no vocab matches"
        if profile.k is not None and profile.k >= rows:  # a head that keeps every row is the full head
            profile = replace(profile, k=None)
        echo(f"{PROFILE_METHOD}: {profile.name(rows)} ({source})", err=True)
        sweep = [(f"{PROFILE_METHOD}: {profile.name(rows)}", profile) if s is None else (n, s) for n, s in sweep]
    drafters = {None: drafter}

    def method(name: str, setting: Setting) -> Method:
        """Our generator with `setting`: a drafter trimmed to its k (one copy per k, sharing the body),
        none when it drafts nothing (prompt lookup alone)."""
        k = None if setting.k is None or setting.k >= rows else setting.k
        if k not in drafters:
            drafters[k] = trimmed_copy(drafter, keep_ids(ranked, k, rows, tokenizer))
        return Method(name, "ours", drafters[k] if setting.num_draft_tokens else None, setting)

    env = environment(target)
    echo(f"BLAS: {env['blas']}; weights {env['dtype']}; {env['device']}; {env['cpu']}", err=True)
    eos = set(tokenizer.eos_token_ids)
    encode = lambda text: chat_prompt(tokenizer, text, max_prompt_tokens)  # noqa: E731
    done = {
        (e["run"]["question_id"], e["run"]["method"], e["run"]["repeat"]): Run(**e["run"])
        for e in entries
        if "run" in e
    }
    if entries:
        echo(f"Resuming the unfinished bench in {out}: {len(done)} runs done", err=True)
    tuned = None
    if auto or baseline == "auto":
        tuning, qs = tuning_questions(questions, qs, auto_prompts)
        tuned = next((e["tune"] for e in entries if "tune" in e), None)
        if tuned is None:
            tuned = _tune(
                target, tokenizer, drafter, ranked, ks if auto else [], tuning, max_tokens, max_prompt_tokens, echo
            )
            log({"tune": tuned})
        tuned["mlx_lm_spec"] = {int(g): row for g, row in tuned["mlx_lm_spec"].items()}
    best_gamma = tuned["mlx_lm_spec_best"] if baseline == "auto" else baseline
    spec = lambda g: Method(f"mlx-lm-spec@{g}", "mlx-lm-spec", drafter, Setting(None, g, 0.0, False, 0))  # noqa: E731
    method_list = [Method("target", "target"), spec(3)] + ([spec(best_gamma)] if best_gamma != 3 else [])
    method_list += [method(name, setting) for name, setting in sweep]
    if auto:
        choice = tuned["choice"]
        chosen = Setting.of(choice)
        method_list.append(method(f"auto: {chosen.name(rows)}", chosen))
        other = tuned.get("best_static" if chosen.adaptive else "best_adaptive")
        if other:  # adaptive and static lengths, each at its best, measured side by side
            kind = "static" if chosen.adaptive else "adaptive"
            method_list.append(method(f"auto, best {kind}: {Setting.of(other).name(rows)}", Setting.of(other)))
        echo(
            f"Auto choice: {chosen.name(rows)} (predicted {choice['predicted_tokens_per_s']:.3f} tok/s, tau "
            f"{choice['expected_tau']:.2f})",
            err=True,
        )
    names = [m.name for m in method_list]
    if len(set(names)) != len(names):
        raise VocabTrimError(f"--methods repeats a method: {', '.join(names)}")
    warm = encode("Say hi.")
    for m in method_list:  # every method starts warm
        run_method(m, target, warm, 4, temp, top_p, eos)
    planned = [(q["question_id"], m.name, r) for q in qs for m in method_list for r in range(repeats)]
    with progress(len(planned), "Benchmark", done=sum(key in done for key in planned)) as bar:
        runs = interleave(
            qs,
            method_list,
            target,
            encode,
            max_tokens,
            temp,
            top_p,
            eos,
            repeats,
            seed,
            lambda: bar.update(1),
            done,
            lambda run: log({"run": asdict(run)}),
        )
    mismatch = check_lossless(runs) if temp == 0 else None
    limits = None
    if tuned is not None and temp == 0 and not mismatch and "costs" in tuned:
        keeps = {k: keep_ids(ranked, k, rows, tokenizer) for k in ks if k < rows} if ranked is not None else {}
        stop = [tokenizer.eos_token_id]  # the EOS a target's answer stopped at (which one does not matter here)
        answers = {
            r.question_id: r.tokens + (stop if r.emitted > len(r.tokens) else [])
            for r in runs
            if r.method == "target" and r.repeat == 0
        }
        limits = replay_limits(target, drafter, keeps, tuned, qs, encode, answers, max_tokens, best_gamma)
    target_bytes = step_bytes(target)
    row_bytes = head_bytes(drafter) / rows
    c_of, head_of = {}, {}
    for m in method_list:
        if m.drafter is not None:
            context_rows = np.mean([r.context_rows for r in runs if r.method == m.name] or [0])
            c_of[m.name] = (step_bytes(m.drafter) + context_rows * row_bytes) / target_bytes
            head_of[m.name] = head_rows(m.drafter)
    base_name = fastest([m.name for m in method_list if m.kind == "mlx-lm-spec"], runs)
    summary = summarize(runs, method_list, c_of, base_name)
    categories = by_category(runs, method_list, c_of, base_name)
    report = {
        "environment": env,
        "config": config,
        "command": command_line(),
        "baseline": base_name,
        "lossless": mismatch or ("every greedy output equals the target's" if temp == 0 else "sampled"),
        "vocab": vocab_used,
        "tune": tuned,
        "limits": limits,
        "summary": summary,
        "categories": categories,
        "c": c_of,
        "head_rows": head_of,
        "runs": runs_as_dicts(runs),
        "c_note": "drafter/target weight bytes read per decode step, input embedding excluded",
    }
    table = markdown(summary, categories, env, head_of, base_name, repeats, report["lossless"], limits)
    written = write_outputs(out, report, table)
    echo(table)
    echo("Wrote " + ", ".join(map(str, written)))
    if mismatch:  # the figures are written, then the run fails loudly
        raise VocabTrimError(mismatch)
    if auto and save_profile:
        path = _save_profile(tuned, model, draft_model, target, paths, vocab_used, None, command_line())
        echo(f"Saved the choice as this pair's profile: {path}")
    return report
