"""`mlx-vocabtrim bench-serve`: `mlx-vocabtrim serve` against `mlx_lm.server`, plain (batched, no
drafter) and with `--draft-model` at its best draft length, through HTTP.

The servers run one after the other (never two at once: memory) on free loopback ports and get
the same greedy chat requests (Spec-Bench first turns, categories in turn), streamed. For each
level of concurrency N and each pass, N clients each send one distinct question at once, questions
no other level or pass (and not the warm-up request) sends: more questions measured for the same
time than passes repeating theirs, and mlx_lm.server reuses the KV cache of a prompt it has seen (its
prompt cache), so a question sent again would skip its prefill there, which distinct requests never
do (ours reuses only whole prefill passes, the bitwise exact ones). Per server and level:
aggregate tokens/s (all completion tokens over the wall time of the pass), each request's latency
(median and p95) and time to its first token (median and p95), and the outputs unlike the target's own
greedy decoding (unless --no-check-target). Levels repeat `--repeats` times, each figure a median;
each repeat runs every server in turn on the same questions (on a machine whose speed drifts, passes
of one server are not all at one time).
"""

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from .errors import VocabTrimError
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET
from .options import count_option, draft_options, force_option

OURS, PLAIN, SPEC = "mlx-vocabtrim serve", "mlx_lm.server", "mlx_lm.server --draft-model"
PARTIAL = "bench-serve.partial.jsonl"  # each finished level, so an interrupted run resumes
START_TIMEOUT = 1800  # seconds for a server to answer /health (models load before ours listens)
CONNECT_TRIES = 5  # a request whose connection the server dropped before answering is sent again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(name: str, command: list[str], port: int, log: Path):
    """Run a server command until the block ends; yield its URL once /health answers."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise VocabTrimError(f"{name} exited with code {proc.returncode} ({tail[0]}): see {log}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise VocabTrimError(f"{name} did not answer in {START_TIMEOUT} s: see {log}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _connect(request: urllib.request.Request, tries: int = CONNECT_TRIES) -> Any:
    """The response to `request`, sent again where the server dropped the connection before
    answering (mlx_lm.server resets some of 16 connections opened at once: its listen queue holds
    5); the time of each try counts in the request's latency, as for a client that retries."""
    for attempt in range(tries - 1):
        try:
            return urllib.request.urlopen(request, timeout=3600)
        except urllib.error.HTTPError:
            raise
        except (ConnectionError, urllib.error.URLError) as e:
            if not isinstance(getattr(e, "reason", e), ConnectionError):
                raise
            time.sleep(0.2 * (attempt + 1))
    return urllib.request.urlopen(request, timeout=3600)


def ask(url: str, prompt: str, max_tokens: int) -> dict:
    """One greedy streamed chat request: its text, completion tokens, wall time and time to the first token."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    tic = time.perf_counter()
    text, first, tokens, finish, usage = "", None, None, None, {}
    try:
        with _connect(request) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    tokens = usage["completion_tokens"]
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter() - tic
                    text += piece
                    finish = c.get("finish_reason") or finish
    except urllib.error.HTTPError as e:
        raise VocabTrimError(f"{url} answered {e.code}: {e.read()[:300]!r}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, IncompleteRead: it broke while streaming
        raise VocabTrimError(f"{url} broke off a streamed answer ({e}): see the server's log in --out") from None
    seconds = time.perf_counter() - tic
    if tokens is None:
        raise VocabTrimError(f"{url} sent no usage in its stream: cannot count its tokens")
    return {
        "text": text,
        "completion_tokens": tokens,
        "seconds": seconds,
        "first_token_s": first if first is not None else seconds,
        "finish_reason": finish,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
    }


def ask_all(url: str, prompts: list[str], max_tokens: int) -> tuple[list[dict], float]:
    """Every prompt from its own client, all at once; the answers in prompt order and the wall time."""
    answers: list[dict | None] = [None] * len(prompts)
    errors: list[Exception] = []

    def client(i: int) -> None:
        try:
            answers[i] = ask(url, prompts[i], max_tokens)
        except Exception as e:  # reported once all clients stop
            errors.append(e)

    tic = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return answers, time.perf_counter() - tic


def target_texts(model: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt decoded greedily by the target alone."""
    from .calibrate import chat_prompt
    from .resolve import load
    from .speculative import generate

    setup = load(model, "none")
    return [
        generate(setup.target, setup.tokenizer, chat_prompt(setup.tokenizer, p), max_tokens=max_tokens) for p in prompts
    ]


def level_figures(passes: list[tuple[list[dict], float]], target: list[list[str]] | None) -> dict:
    """One server at one level: medians over the repeated passes of each figure (`target`: the target's
    own text of each pass's questions)."""

    def p95(values: list[float]) -> float:
        return sorted(values)[min(len(values) - 1, round(0.95 * (len(values) - 1)))]

    aggregate = [sum(r["completion_tokens"] for r in answers) / wall for answers, wall in passes]
    requests = [r for answers, _ in passes for r in answers]
    latency = [r["seconds"] for r in requests]
    first = [r["first_token_s"] for r in requests]
    counted = all(r.get("prompt_tokens") is not None for r in requests)  # passes logged before these were kept
    unlike = None
    if target is not None:
        texts = [t for texts in target for t in texts]
        unlike = sum(r["text"] != t for r, t in zip((r for answers, _ in passes for r in answers), texts, strict=False))
    return {
        "aggregate_tokens_per_s": statistics.median(aggregate),
        "aggregate_range": [min(aggregate), max(aggregate)],
        "median_latency_s": statistics.median(latency),
        "p95_latency_s": p95(latency),
        "median_first_token_s": statistics.median(first),
        "p95_first_token_s": p95(first),
        "requests": len(latency),
        "unlike_target": unlike,
        "prompt_tokens": sum(r["prompt_tokens"] for r in requests) if counted else None,
        "cached_prompt_tokens": sum(r["cached_tokens"] for r in requests) if counted else None,
    }


def markdown(summary: dict[str, dict], env: dict, levels: list[int], max_tokens: int, repeats: int) -> str:
    """Aggregate tokens/s per level and server, ours over the better mlx_lm.server mode; then latencies."""
    names = list(summary)
    lines = [
        f"MLX {env['mlx']}, mlx-lm {env['mlx_lm']} on {env['device']} ({env['cpu']}, {env['cores']} cores), BLAS "
        f"{env['blas']}. Greedy streamed chat requests of up to {max_tokens} tokens; at N clients, N questions "
        "sent at once, each level and pass its own (no server has seen them); aggregate = completion tokens / wall "
        f"time of the pass, median of {repeats} pass(es) [range]; latencies over every request.",
        "",
        "| clients | " + " | ".join(f"{n} tok/s" for n in names) + " | ours over the better mlx_lm.server |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for level in levels:
        cells = []
        for n in names:
            f = summary[n][str(level)]
            low, high = f["aggregate_range"]
            cells.append(f"{f['aggregate_tokens_per_s']:.3f} [{low:.2f}, {high:.2f}]")
        theirs = max(summary[n][str(level)]["aggregate_tokens_per_s"] for n in names if n != OURS)
        ratio = summary[OURS][str(level)]["aggregate_tokens_per_s"] / theirs if theirs else 0.0
        lines.append(f"| {level} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    lines += [
        "",
        "| clients | server | median latency s | p95 latency s | median first token s | p95 first token s "
        "| prompt tokens cached | outputs unlike the target's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        for n in names:
            f = summary[n][str(level)]
            unlike = "-" if f["unlike_target"] is None else f"{f['unlike_target']} of {f['requests']}"
            cached = "-" if f.get("prompt_tokens") is None else f"{f['cached_prompt_tokens']} of {f['prompt_tokens']}"
            lines.append(
                f"| {level} | {n} | {f['median_latency_s']:.2f} | {f['p95_latency_s']:.2f} | "
                f"{f['median_first_token_s']:.2f} | {f['p95_first_token_s']:.2f} | {cached} | {unlike} |"
            )
    return "\n".join(lines) + "\n"


def parse_levels(text: str) -> list[int]:
    """--clients '1,2,4': distinct positive counts, in order."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(n < 1 for n in levels) or len(set(levels)) != len(levels):
        raise VocabTrimError(f"--clients {text!r} is not a list of distinct positive counts: e.g. --clients 1,2,4,8")
    return levels


def level_slices(levels: list[int], repeats: int) -> dict[tuple[int, int], slice]:
    """Each (level, pass)'s own questions among the picked ones (the first is the warm-up): none sent twice."""
    start, slices = 1, {}
    for repeat in range(repeats):
        for level in levels:
            slices[(level, repeat)] = slice(start, start + level)
            start += level
    return slices


def pick_questions(
    path: str | Path, per_category: int | None, levels: list[int], repeats: int
) -> tuple[list[dict], int]:
    """Questions enough for one warm-up and a distinct set per level and pass, categories in turn, with
    the `per_category` they took (given, or the fewest that give enough)."""
    from .questions import in_turn, read_questions

    need = 1 + sum(levels) * repeats
    picked = in_turn(read_questions(path, per_category))[:need]  # categories in turn: the fewest rounds
    if len(picked) >= need:
        rounds = max(Counter(q["category"] for q in picked).values())
        return picked, per_category or rounds
    raise VocabTrimError(
        f"--clients {','.join(map(str, levels))} with --repeats {repeats} need {need} distinct questions (each "
        f"level and pass its own, one to warm the servers up), and {path} gives {len(picked)}"
        + (f" at --per-category {per_category}: raise --per-category or leave it out" if per_category else "")
        + ("" if per_category else ": pass fewer --clients or --repeats, or a longer --questions file")
    )


def mlx_lm_best_draft(model: str, draft_model: str, target_path: str, drafter_path: str) -> tuple[int, str]:
    """mlx-lm's best draft length for this pair on this machine, as `bench`/`tune` measured it (the
    pair's profile), else mlx-lm's default 3; and where it came from."""
    from .profiles import find_profile_document, model_key

    doc = find_profile_document(model_key(model, target_path), model_key(draft_model, drafter_path))
    best = (doc or {}).get("measured", {}).get("mlx_lm_spec_best")
    return (int(best), "the pair's profile") if isinstance(best, int) and best > 0 else (3, "mlx-lm's default")


@click.command(name="bench-serve")
@click.option("--model", default=DEFAULT_TARGET, show_default=True, help="Target model.")
@click.option(
    "--draft-model",
    default=DEFAULT_DRAFTER,
    show_default=True,
    help="Drafter, untrimmed: mlx_lm.server drafts with all of it, ours trims it like `serve`.",
)
@draft_options
@click.option("--questions", default=None, help="Spec-Bench question.jsonl [default: the packaged Spec-Bench].")
@count_option(
    "--per-category",
    None,
    "Questions per Spec-Bench category [default: the fewest that give each level and pass its own questions].",
)
@count_option("--max-tokens", 64, "Tokens per answer.")
@click.option(
    "--clients", default="1,2,4,8,16", show_default=True, help="Levels of concurrency: clients sending at once."
)
@count_option("--repeats", 1, "Passes per level and server.")
@count_option(
    "--mlx-lm-num-draft-tokens",
    None,
    "Draft length of mlx_lm.server --draft-model [default: its best on this machine from the pair's profile, else 3].",
)
@count_option("--max-batch", 16, "Sequences our server decodes together (its --max-batch).")
@click.option(
    "--batch-speculation",
    default="auto",
    show_default=True,
    help="Our server's --batch-speculation: auto (the pair's profile), off, or SIZES:DRAFTS entries.",
)
@click.option(
    "--check-target/--no-check-target",
    default=True,
    show_default=True,
    help="Also decode every question with the target alone and count the outputs unlike it.",
)
@click.option(
    "--out",
    default="bench-serve-out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Directory for bench-serve.json, bench-serve.md and the servers' logs.",
)
@force_option("a finished bench-serve in --out")
def bench_serve(
    model,
    draft_model,
    vocab,
    k,
    num_draft_tokens,
    draft_threshold,
    context_head,
    lookup_ngram,
    lookup_tokens,
    adaptive,
    questions,
    per_category,
    max_tokens,
    clients,
    repeats,
    mlx_lm_num_draft_tokens,
    max_batch,
    batch_speculation,
    check_target,
    out,
    force,
):
    """Our server against mlx_lm.server, plain and with --draft-model, over HTTP: greedy Spec-Bench
    requests from 1, 2, 4, ... clients at once; tokens/s, latency and outputs compared."""
    from .bench import environment, resume_log
    from .checks import parse_batch_schedule
    from .files import check_output, command_line, output_lock, write_text_whole
    from .models import resolve_model
    from .questions import PACKAGED_QUESTIONS
    from .trim import is_trimmed_dir

    levels = parse_levels(clients)
    parse_batch_schedule(batch_speculation)  # a bad value fails here, not after the references
    picked, per_category = pick_questions(questions or PACKAGED_QUESTIONS, per_category, levels, repeats)
    warm_up, sets = picked[0], level_slices(levels, repeats)
    report_path = check_output(Path(out) / "bench-serve.json", force=force)
    target_path, drafter_path = resolve_model(model), resolve_model(draft_model)
    if is_trimmed_dir(drafter_path):
        raise VocabTrimError(
            f"{draft_model} is a trimmed drafter directory, which mlx_lm.server cannot load: pass "
            "the untrimmed drafter (our server trims it with --vocab/--k)"
        )
    gamma, gamma_from = mlx_lm_num_draft_tokens, "--mlx-lm-num-draft-tokens"
    if gamma is None:
        gamma, gamma_from = mlx_lm_best_draft(model, draft_model, target_path, drafter_path)
    settings = {
        "--vocab": vocab,
        "--k": k,
        "--num-draft-tokens": num_draft_tokens,
        "--draft-threshold": draft_threshold,
        "--lookup-ngram": lookup_ngram,
        "--lookup-tokens": lookup_tokens,
    }
    flags = [word for flag, value in settings.items() if value is not None for word in (flag, str(value))]
    if context_head is not None:
        flags.append("--context-head" if context_head else "--no-context-head")
    if adaptive is not None:
        flags.append("--adaptive" if adaptive else "--static")
    mlx_lm = [sys.executable, "-m", "mlx_lm", "server", "--model", target_path, "--log-level", "WARNING"]
    commands = {
        OURS: [
            *[sys.executable, "-m", "mlx_vocabtrim", "serve", "--model", model, "--draft-model", draft_model],
            *flags,
            *["--max-tokens", str(max_tokens), "--max-tokens-limit", str(max_tokens)],
            *["--max-queue", str(max(levels)), "--max-batch", str(max_batch)],
            *["--batch-speculation", batch_speculation],
        ],
        PLAIN: mlx_lm,
        SPEC: [*mlx_lm, "--draft-model", drafter_path, "--num-draft-tokens", str(gamma)],
    }
    config = {
        "model": model,
        "draft_model": draft_model,
        "target_path": target_path,
        "drafter_path": drafter_path,
        "our_flags": flags,
        "mlx_lm_num_draft_tokens": [gamma, gamma_from],
        "questions": str(questions or PACKAGED_QUESTIONS),
        "per_category": per_category,
        "max_tokens": max_tokens,
        "levels": levels,
        "warm_up_question": warm_up["question_id"],
        "level_questions": {
            str(level): [[q["question_id"] for q in picked[sets[(level, n)]]] for n in range(repeats)]
            for level in levels
        },
        "repeats": repeats,
        "max_batch": max_batch,
        "batch_speculation": batch_speculation,
        "check_target": check_target,
    }
    with output_lock(report_path, force=force):
        entries, log = resume_log(report_path.parent, config, PARTIAL)
        if entries:
            click.echo(f"Resuming the unfinished bench-serve in {out}: {len(entries)} entries done", err=True)
        target = next((e["target"] for e in entries if "target" in e), None)
        if check_target and target is None:
            click.echo("target alone: decoding every question for the comparison", err=True)
            target = [""] + target_texts(model, [q["prompt"] for q in picked[1:]], max_tokens)  # none for the warm-up
            log({"target": target})
        done: dict[tuple[str, int], list] = {(name, level): [] for name in commands for level in levels}
        for e in entries:
            if "server" in e:
                done[(e["server"], e["clients"])] += e["passes"]
        for repeat in range(repeats):  # each repeat runs every server in turn: a machine that drifts hits all
            for name, command in commands.items():
                todo = [level for level in levels if len(done[(name, level)]) <= repeat]
                if not todo:
                    continue
                port = free_port()
                log_path = report_path.parent / f"{name.replace(' ', '_').replace('-', '')}.log"
                with running(name, [*command, "--port", str(port)], port, log_path) as url:
                    ask(url, warm_up["prompt"], min(8, max_tokens))  # mlx_lm.server loads its models on first use
                    for level in todo:
                        click.echo(f"{name}: {level} clients at once, pass {repeat + 1} of {repeats}", err=True)
                        asked = picked[sets[(level, len(done[(name, level)]))]]
                        answers = ask_all(url, [q["prompt"] for q in asked], max_tokens)
                        log({"server": name, "clients": level, "passes": [answers]})
                        done[(name, level)].append(answers)
        summary: dict[str, dict] = {}
        records = []
        for name in commands:
            summary[name] = {}
            for level in levels:
                passes = [(answers, wall) for answers, wall in done[(name, level)][:repeats]]
                texts = [target[sets[(level, n)]] for n in range(len(passes))] if target else None
                summary[name][str(level)] = level_figures(passes, texts)
                records += [
                    {"server": name, "clients": level, "pass": n, "question_id": q["question_id"], **r}
                    for n, (answers, _) in enumerate(passes)
                    for q, r in zip(picked[sets[(level, n)]], answers, strict=True)
                ]
        env = environment()
        table = markdown(summary, env, levels, max_tokens, repeats)
        report = {"environment": env, "config": config | {"commands": commands}, "command": command_line()}
        report["summary"] = summary
        report["requests"] = records
        write_text_whole(report_path, json.dumps(report, indent=1, default=str) + "\n")
        write_text_whole(report_path.with_name("bench-serve.md"), table)
        (report_path.parent / PARTIAL).unlink(missing_ok=True)
    click.echo(table, nl=False)
    click.echo(f"Wrote {report_path} and {report_path.with_name('bench-serve.md')}")
