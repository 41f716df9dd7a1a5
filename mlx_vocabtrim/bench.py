"""Spec-Bench harness: plain target, mlx-lm's speculative decoding, our full and trimmed
drafters, on the same prompts interleaved prompt by prompt; tau, acceptance, MBSU,
tokens/s, speed-ups, k sweep and auto-tuning of (k, num-draft-tokens)."""

import json
import os
import platform
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative_step
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from .errors import VocabTrimError
from .speculative import SpecStats, speculative_generate_step


@dataclass
class Method:
    """One way of decoding: a name, the drafter it uses (None: target alone) and its draft length."""

    name: str
    kind: str  # "target", "mlx-lm-spec" or "ours"
    drafter: nn.Module | None = None
    gamma: int = 0
    k: int | None = None
    threshold: float = 0.0  # draft_threshold: 0 drafts gamma tokens every round


@dataclass
class Run:
    """One method on one prompt."""

    method: str
    category: str
    question_id: Any
    prompt_tokens: int
    new_tokens: int
    seconds: float
    target_calls: int
    drafted: int
    accepted: int
    tokens: list
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    from_draft: list = field(default_factory=list)


def read_questions(path: str | Path, per_category: int | None) -> list[dict]:
    """The first `per_category` questions of each Spec-Bench category (first turn only)."""
    path = Path(path)
    if not path.is_file():
        raise VocabTrimError(f"questions file {path} does not exist: pass --questions spec_bench/question.jsonl")
    seen: dict[str, int] = defaultdict(int)
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            category, turns = item.get("category", "all"), item["turns"]
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise VocabTrimError(f"{path} line {n} is not a Spec-Bench question ({e}): give Spec-Bench JSONL") from e
        if per_category is None or seen[category] < per_category:
            seen[category] += 1
            questions.append({"category": category, "question_id": item.get("question_id", n), "prompt": turns[0]})
    if not questions:
        raise VocabTrimError(f"{path} holds no questions")
    return questions


def tuning_questions(path: str | Path, chosen: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """n questions for --auto spread over the file, outside the benchmarked ones when the
    file has enough; else taken from them. Returns (tuning, benchmarked)."""
    ids = {q["question_id"] for q in chosen}
    rest = [q for q in read_questions(path, None) if q["question_id"] not in ids]
    pool = rest if len(rest) >= n else chosen
    tuning = pool[:: max(len(pool) // max(n, 1), 1)][:n]
    return tuning, [q for q in chosen if q not in tuning]


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


def blas_library() -> str:
    """The BLAS MLX's CPU matmuls go through: an LD_PRELOADed library wins over the wheel's own."""
    preloaded = [Path(p).name for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if "blas" in p]
    if preloaded:
        return f"{', '.join(preloaded)} (LD_PRELOAD)"
    maps = Path("/proc/self/maps")
    if maps.exists():
        libs = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if "blas" in line.lower()}
        libs = {lib for lib in libs if "scipy_openblas" not in lib}  # numpy's own copy, unused by MLX
        return f"{', '.join(sorted(libs))} (the mlx wheel's reference BLAS)" if libs else "none found"
    return "Accelerate" if platform.system() == "Darwin" else "unknown"


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


def environment(model: nn.Module) -> dict:
    """What the numbers depend on: MLX version and device, weight dtype, BLAS, CPU, cores."""
    dtypes = sorted({str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters())})
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "dtype": ",".join(dtypes),
        "blas": blas_library(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
    }


def _decode(tokens_iter, max_tokens: int, eos: set[int]) -> tuple[list[int], list[bool], int, float]:
    """Tokens, their from-draft flags, and how many tokens / what time the first round ended at.

    A round ends with the token the target itself chose (from_draft False), so the time
    after the first such token covers whole rounds only: prefill and the first round's
    latency stay out of the decode rate, with no free tokens counted in it.
    """
    tokens, from_draft, first_round, first_time = [], [], 0, 0.0
    for item in tokens_iter:
        token = int(item[0])
        if token in eos:
            break
        tokens.append(token)
        from_draft.append(bool(item[2]) if len(item) > 2 else False)
        if not first_round and not from_draft[-1]:
            first_round, first_time = len(tokens), time.perf_counter()
        if len(tokens) == max_tokens:
            break
    return tokens, from_draft, first_round, first_time


def run_method(method: Method, model: nn.Module, prompt: list[int], max_tokens: int, temp: float, eos: set[int],
               stats: SpecStats | None = None) -> Run:  # fmt: skip
    """Decode `prompt` with `method`, timing the whole generation (prefill included) and,
    apart, the decoding after the first round (mlx-lm's "generation tokens-per-sec").
    `stats` collects our generator's counters (and drafter confidences, when a list)."""
    from mlx_lm.sample_utils import make_sampler

    ids = mx.array(prompt, mx.uint32)
    stats = SpecStats() if stats is None else stats
    tic = time.perf_counter()
    if method.kind == "target":
        gen = generate_step(ids, model, max_tokens=max_tokens, sampler=make_sampler(temp))
    elif method.kind == "mlx-lm-spec":
        gen = mlx_lm_speculative_step(ids, model, method.drafter, num_draft_tokens=method.gamma,
                                      max_tokens=max_tokens, sampler=make_sampler(temp))  # fmt: skip
    else:
        gen = speculative_generate_step(ids, model, method.drafter, num_draft_tokens=method.gamma,
                                        max_tokens=max_tokens, temp=temp, stats=stats,
                                        draft_threshold=method.threshold)  # fmt: skip
    tokens, from_draft, first_round, first_time = _decode(gen, max_tokens, eos)
    gen.close()
    end = time.perf_counter()
    seconds = end - tic
    decode_tokens = len(tokens) - first_round if first_round else 0
    decode_seconds = end - first_time if decode_tokens else 0.0
    if method.kind == "target":
        calls, drafted, accepted = len(tokens), 0, 0
    elif method.kind == "mlx-lm-spec":
        accepted = sum(from_draft)
        calls = len(tokens) - accepted
        drafted = calls * method.gamma
    else:
        calls, drafted, accepted = stats.target_calls, stats.draft_tokens, stats.accepted_tokens
    return Run(method.name, "", None, len(prompt), len(tokens), seconds, max(calls, 1), drafted, accepted, tokens,
               decode_tokens, decode_seconds, from_draft)  # fmt: skip


def summarize(runs: list[Run], methods: list[Method], c_of: dict[str, float]) -> dict[str, dict]:
    """Per method: tokens/s, tau, acceptance, draft length, MBSU and speed-ups."""
    out = {}
    for m in methods:
        rs = [r for r in runs if r.method == m.name]
        tokens, seconds = sum(r.new_tokens for r in rs), sum(r.seconds for r in rs)
        decode_tokens, decode_seconds = sum(r.decode_tokens for r in rs), sum(r.decode_seconds for r in rs)
        calls, drafted, accepted = (sum(getattr(r, f) for r in rs) for f in ("target_calls", "drafted", "accepted"))
        tau = tokens / calls if calls else 0.0
        gamma = drafted / calls if calls else 0.0
        out[m.name] = {
            "k": m.k,
            "num_draft_tokens": m.gamma,
            "draft_threshold": m.threshold,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
            "tau": tau,
            "acceptance": accepted / drafted if drafted else 0.0,
            "drafts_per_call": gamma,
            "c": c_of.get(m.name, 0.0),
            "mbsu": tau / (c_of.get(m.name, 0.0) * gamma + 1),
        }
    anchor = next((k for k in out if k.startswith("mlx-lm-spec")), None)
    for rate, prefix in (("decode_tokens_per_s", ""), ("tokens_per_s", "e2e_")):
        base = out["target"][rate] if "target" in out else None
        spec = out[anchor][rate] if anchor else None
        for v in out.values():
            v[f"{prefix}speedup_vs_target"] = v[rate] / base if base else None
            v[f"{prefix}speedup_vs_mlx_lm_spec"] = v[rate] / spec if spec else None
    return out


def by_category(runs: list[Run], methods: list[Method], c_of: dict[str, float]) -> dict[str, dict]:
    return {
        cat: summarize([r for r in runs if r.category == cat], methods, c_of)
        for cat in sorted({r.category for r in runs})
    }


def check_lossless(runs: list[Run]) -> None:
    """Greedy: every method must emit exactly the target's tokens; fail loudly otherwise."""
    reference = {r.question_id: r.tokens for r in runs if r.method == "target"}
    for r in runs:
        ref = reference.get(r.question_id)
        if ref is not None and r.tokens != ref:
            at = next(
                (i for i, (a, b) in enumerate(zip(r.tokens, ref, strict=False)) if a != b), min(len(r.tokens), len(ref))
            )
            raise VocabTrimError(
                f"greedy output of {r.method} differs from the target on question {r.question_id} at token {at}: "
                "this is a bug, please report it"
            )


def measure_step(model: nn.Module, context: list[int], n: int, repeats: int = 3) -> float:
    """Median seconds of one forward pass over n new tokens after `context` (cache rolled back)."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(context)[None], cache=cache))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(model(mx.array(context[:n])[None], cache=cache))
        times.append(time.perf_counter() - tic)
        trim_prompt_cache(cache, n)
    return sorted(times)[len(times) // 2]


def accepted_runs(tokens: list[int], from_draft: list[bool]) -> list[list[int]]:
    """The accepted drafts of every finished round: each round ends with the target's own token."""
    rounds, current = [], []
    for token, drafted in zip(tokens, from_draft, strict=True):
        if drafted:
            current.append(token)
        else:
            rounds.append(current)
            current = []
    return rounds


def accepted_prefix(accepted: list[int], kept: set[int] | None) -> int:
    """Drafts a head keeping `kept` (None: all) accepts of a round the full head drafted.

    A greedy draft is accepted when it equals the target's token. The trimmed argmax equals
    the full one whenever that id is kept, so a trimmed drafter accepts the same prefix
    up to the first accepted id it lacks (where it surely fails: the target's token is
    not in its head).
    """
    return next((i for i, t in enumerate(accepted) if kept is not None and t not in kept), len(accepted))


def draft_length(confidence: list[float], gamma: int, threshold: float) -> int:
    """Drafts a round makes: gamma, or fewer where the running product of the drafter's
    probabilities first falls below `threshold` (that draft still counts)."""
    return next((i + 1 for i, c in enumerate(confidence[:gamma]) if c < threshold), min(gamma, len(confidence)))


def predict(rounds: list[tuple[list[int], list[float]]], kept: set[int] | None, gamma: int, threshold: float,
            t_draft: float, t_verify: dict[int, float]) -> tuple[float, float]:  # fmt: skip
    """(tau, tokens/s) of drafting with at most gamma tokens and `threshold`, from rounds
    (accepted drafts, running confidences) greedily drafted longer with the full head.

    A round of n drafts yields 1 + min(accepted prefix, n) tokens and costs n drafter
    steps plus one target pass over n + 1 tokens. The confidences are the full head's;
    a trimmed head's, renormalised over fewer ids, are a little higher.
    """
    if not rounds:
        return 1.0, 1.0 / t_verify[1]
    tokens, seconds = 0, 0.0
    for accepted, confidence in rounds:
        n = draft_length(confidence, gamma, threshold)
        tokens += 1 + min(accepted_prefix(accepted, kept), n)
        seconds += n * t_draft + t_verify[n + 1]
    return tokens / len(rounds), tokens / seconds


GAMMAS = tuple(range(1, 9))  # draft lengths --auto weighs; its probe drafts the longest
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6)  # draft thresholds --auto weighs


def auto_tune(model: nn.Module, drafters: dict[int, nn.Module], rounds: list[tuple[list[int], list[float]]],
              gammas: list[int], context: list[int]) -> dict:  # fmt: skip
    """Pick (k, num_draft_tokens, draft_threshold) maximizing predicted tokens/s.

    `rounds` are the (accepted drafts, drafter confidences) of full-head greedy runs at
    max(gammas); tau for every choice follows from them (`predict`), step times are
    measured after `context`: the target over 1..max(gammas)+1 tokens, each drafter over one token.
    """
    t_verify = {n: measure_step(model, context, n) for n in range(1, max(gammas) + 2)}
    t_draft = {k: measure_step(d, context, 1) for k, d in drafters.items()}
    remaps = {k: getattr(d, "vocab_remap", None) for k, d in drafters.items()}
    kept = {k: None if r is None else set(r.tolist()) for k, r in remaps.items()}
    table = []
    for k in drafters:
        for g in gammas:
            for threshold in THRESHOLDS:
                tau, speed = predict(rounds, kept[k], g, threshold, t_draft[k], t_verify)
                table.append({"k": k, "num_draft_tokens": g, "draft_threshold": threshold, "expected_tau": tau,
                              "predicted_tokens_per_s": speed})  # fmt: skip
    best = max(table, key=lambda row: row["predicted_tokens_per_s"])
    return {"choice": best, "table": table, "t_verify": t_verify, "t_draft": {str(k): v for k, v in t_draft.items()},
            "rounds": len(rounds)}  # fmt: skip


def interleave(questions: list[dict], methods: list[Method], model: nn.Module, encode: Callable[[str], list[int]],
               max_tokens: int, temp: float, eos: set[int], advance: Callable[[], None],
               done: dict[tuple, Run] | None = None,
               record: Callable[[Run], None] | None = None) -> list[Run]:  # fmt: skip
    """Every method on each prompt in turn, so drift of the machine hits all methods alike.

    Runs found in `done` (by question id and method) are reused, new ones go to `record`.
    """
    runs = []
    for q in questions:
        prompt = encode(q["prompt"])
        for m in methods:
            run = (done or {}).get((q["question_id"], m.name))
            if run is None:
                if temp > 0:
                    mx.random.seed(zlib.crc32(str(q["question_id"]).encode()))
                run = run_method(m, model, prompt, max_tokens, temp, eos)
                run.category, run.question_id = q["category"], q["question_id"]
                if record is not None:
                    record(run)
            runs.append(run)
            advance()
    return runs


def _write_whole(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def resume_log(out: Path, config: dict) -> tuple[list[dict], Callable[[dict], None]]:
    """Entries an interrupted bench with the same `config` left in OUT/bench.partial.jsonl, and
    a function appending one entry durably (a line torn by a kill is dropped on resume)."""
    path = out / "bench.partial.jsonl"
    entries: list[dict] = []
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not parsed or parsed[0].get("config") != config:
            raise VocabTrimError(
                f"{path} holds an unfinished bench with other settings (or is damaged): rerun with those, "
                "pass another --out, or delete the file to start over"
            )
        entries = parsed[1:]
        if len(parsed) < len(lines):
            _write_whole(path, "".join(json.dumps(e) + "\n" for e in parsed))
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_whole(path, json.dumps({"config": config}) + "\n")

    def append(entry: dict) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    return entries, append


def markdown(summary: dict[str, dict], categories: dict[str, dict], env: dict, head_of: dict[str, int]) -> str:
    """The overall table, then speed-up over the target per category."""
    lines = [
        f"MLX {env['mlx']} on {env['device']} ({env['cpu']}, {env['cores']} cores), weights {env['dtype']}, "
        f"BLAS {env['blas']}. Decode: tokens/s after the first round, as mlx-lm's generation tokens-per-sec; "
        "end-to-end: all tokens over the whole call, prefill included.",
        "",
        "| method | k | draft tokens | drafter head MB | tau | acceptance | MBSU | decode tok/s | vs target "
        "| vs mlx-lm-spec | end-to-end tok/s | vs target | vs mlx-lm-spec |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(x: float | None) -> str:
        return f"{x:.2f}x" if x else "-"

    for name, s in summary.items():
        head = f"{head_of[name] / 1e6:.1f}" if name in head_of else "-"
        drafts = str(s["num_draft_tokens"] or "-")
        if s.get("draft_threshold"):
            drafts = f"<= {drafts}, {s['drafts_per_call']:.2f} mean"
        lines.append(
            f"| {name} | {s['k'] or '-'} | {drafts} | {head} | {s['tau']:.2f} | "
            f"{s['acceptance']:.1%} | {s['mbsu']:.2f} | {s['decode_tokens_per_s']:.3f} | "
            f"{ratio(s['speedup_vs_target'])} | {ratio(s['speedup_vs_mlx_lm_spec'])} | {s['tokens_per_s']:.3f} | "
            f"{ratio(s['e2e_speedup_vs_target'])} | {ratio(s['e2e_speedup_vs_mlx_lm_spec'])} |"
        )
    names = list(summary)
    lines += ["", "Decode speed-up over `target` by category:", "",
              "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for cat, s in categories.items():
        cells = [f"{s[n]['speedup_vs_target']:.2f}x" if s[n]["speedup_vs_target"] else "-" for n in names]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], full_rows: int, path: Path) -> bool:
    """PNG of speed-up over the target and tau against k; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = sorted(
        (s["k"] or full_rows, s)
        for n, s in summary.items()
        if n.startswith(("trim@", "full")) and s["speedup_vs_target"]
    )
    if not points:
        return False
    ks = [k for k, _ in points]
    fig, left = plt.subplots(figsize=(6, 3.6))
    left.plot(ks, [s["speedup_vs_target"] for _, s in points], "o-", label="decode speed-up vs target")
    left.plot(ks, [s["mbsu"] for _, s in points], "s--", label="MBSU")
    left.set_xscale("log", base=2)
    left.set_xlabel("k (drafter head rows)")
    left.set_ylabel("speed-up")
    right = left.twinx()
    right.plot(ks, [s["tau"] for _, s in points], "^:", color="gray", label="tau")
    right.set_ylabel("tokens per target call")
    fig.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(out: Path, report: dict, table: str, full_rows: int) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png, each written whole, then the
    resume log is removed."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    for path, text in zip(paths, (json.dumps(report, indent=1, default=str), table), strict=True):
        _write_whole(path, text)
    tmp = out / ".bench.tmp.png"
    if plot(report["summary"], full_rows, tmp):
        os.replace(tmp, out / "bench.png")
        paths.append(out / "bench.png")
    (out / "bench.partial.jsonl").unlink(missing_ok=True)
    return paths


def runs_as_dicts(runs: list[Run]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k not in ("tokens", "from_draft")} | {"tokens": r.tokens}
            for r in runs]  # fmt: skip
