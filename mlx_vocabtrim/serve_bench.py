"""`mlx-vocabtrim bench-serve`: `mlx-vocabtrim serve` against `mlx_lm.server --draft-model` through HTTP.

The two servers run one after the other (never both at once: memory) on free loopback ports
and get the same greedy chat requests (Spec-Bench first turns): first one at a time, then from
several clients at once. Per server: tokens/s of each request (completion tokens over its wall
time, as a client sees it), their median and mean, and the aggregate tokens/s of the
concurrent pass; every output is compared with ours one at a time and, unless
--no-check-target, with the target decoding alone.
"""

import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import click

from .errors import VocabTrimError
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET
from .options import count_option, draft_options, force_option

OURS, THEIRS = "mlx-vocabtrim serve", "mlx_lm.server --draft-model"
START_TIMEOUT = 1800  # seconds for a server to answer /health (models load before ours listens)


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


def ask(url: str, prompt: str, max_tokens: int) -> dict:
    """One greedy chat request: its text, completion tokens and wall time."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.0}
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    tic = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise VocabTrimError(f"{url} answered {e.code}: {e.read()[:300]!r}") from None
    seconds = time.perf_counter() - tic
    tokens = answer["usage"]["completion_tokens"]
    return {
        "text": answer["choices"][0]["message"]["content"],
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "finish_reason": answer["choices"][0]["finish_reason"],
    }


def ask_all(url: str, prompts: list[str], max_tokens: int, clients: int) -> tuple[list[dict], float]:
    """Every prompt, sent by `clients` threads at once; the answers in prompt order and the wall time."""
    todo: queue.Queue = queue.Queue()
    for i, prompt in enumerate(prompts):
        todo.put((i, prompt))
    answers: list[dict | None] = [None] * len(prompts)
    errors: list[Exception] = []

    def client() -> None:
        while not errors:
            try:
                i, prompt = todo.get_nowait()
            except queue.Empty:
                return
            try:
                answers[i] = ask(url, prompt, max_tokens)
            except Exception as e:  # reported once all clients stop
                errors.append(e)

    tic = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return answers, time.perf_counter() - tic


def target_texts(model: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt decoded greedily by the target alone."""
    from .resolve import load
    from .speculative import generate

    setup = load(model, "none")
    ids = [
        setup.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    return [generate(setup.target, setup.tokenizer, i, None, max_tokens=max_tokens) for i in ids]


def summarize(
    sequential: list[dict], concurrent: list[dict], wall: float, ours: list[str], target: list[str] | None
) -> dict:
    """A server's figures; `ours` and `target` are the reference texts."""
    speeds = [r["tokens_per_s"] for r in sequential]

    def differ(runs: list[dict], reference: list[str] | None) -> int | None:
        return None if reference is None else sum(r["text"] != t for r, t in zip(runs, reference, strict=True))

    return {
        "requests": len(sequential),
        "median_tokens_per_s": statistics.median(speeds),
        "mean_tokens_per_s": statistics.fmean(speeds),
        "concurrent_tokens_per_s": sum(r["completion_tokens"] for r in concurrent) / wall,
        "concurrent_wall_s": wall,
        "mismatches_vs_ours": [differ(sequential, ours), differ(concurrent, ours)],
        "mismatches_vs_target": [differ(sequential, target), differ(concurrent, target)],
    }


def markdown(summary: dict[str, dict], env: dict, clients: int, max_tokens: int) -> str:
    """The comparison table, ratios against mlx_lm.server last."""
    lines = [
        f"MLX {env['mlx']}, mlx-lm {env['mlx_lm']} on {env['device']} ({env['cpu']}, {env['cores']} cores), BLAS "
        f"{env['blas']}. Greedy chat requests of up to {max_tokens} tokens; tokens/s of a request = completion "
        f"tokens / its wall time at the client; aggregate = all completion tokens / wall time of the pass.",
        "",
        f"| server | requests | median tok/s, 1 client | mean tok/s, 1 client | aggregate tok/s, {clients} clients "
        "| outputs unlike ours (1 client, concurrent) | outputs unlike the target's (1 client, concurrent) |",
        "|---|---|---|---|---|---|---|",
    ]

    def count(pair: list) -> str:
        return "-" if pair[0] is None else f"{pair[0]}, {pair[1]}"

    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['requests']} | {s['median_tokens_per_s']:.3f} | {s['mean_tokens_per_s']:.3f} | "
            f"{s['concurrent_tokens_per_s']:.3f} | {count(s['mismatches_vs_ours'])} | "
            f"{count(s['mismatches_vs_target'])} |"
        )
    ours, theirs = summary[OURS], summary[THEIRS]
    ratio = {
        key: ours[key] / theirs[key] for key in ("median_tokens_per_s", "mean_tokens_per_s", "concurrent_tokens_per_s")
    }
    lines += [
        "",
        f"`{OURS}` over `{THEIRS}`: median {ratio['median_tokens_per_s']:.2f}x, mean "
        f"{ratio['mean_tokens_per_s']:.2f}x, aggregate with {clients} clients "
        f"{ratio['concurrent_tokens_per_s']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


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
@count_option("--per-category", 2, "Questions per Spec-Bench category.")
@count_option("--max-tokens", 128, "Tokens per answer.")
@count_option("--clients", 4, "Clients sending at once in the concurrent pass.")
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
    check_target,
    out,
    force,
):
    """Our server against mlx_lm.server --draft-model over HTTP: greedy Spec-Bench requests one at a
    time, then from several clients at once; tokens/s and outputs compared."""
    from .bench import environment
    from .cli import command_line
    from .files import check_output, output_lock, write_text_whole
    from .models import resolve_model
    from .questions import PACKAGED_QUESTIONS, read_questions
    from .trim import is_trimmed_dir

    picked = read_questions(questions or PACKAGED_QUESTIONS, per_category)
    report_path = check_output(Path(out) / "bench-serve.json", force=force)
    target_path, drafter_path = resolve_model(model), resolve_model(draft_model)
    if is_trimmed_dir(drafter_path):
        raise VocabTrimError(
            f"{draft_model} is a trimmed drafter directory, which mlx_lm.server cannot load: pass "
            "the untrimmed drafter (our server trims it with --vocab/--k)"
        )
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
    prompts = [q["prompt"] for q in picked]
    with output_lock(report_path, force=force):
        report_path.parent.mkdir(parents=True, exist_ok=True)
        commands = {
            OURS: [
                sys.executable,
                "-m",
                "mlx_vocabtrim",
                "serve",
                "--model",
                model,
                "--draft-model",
                draft_model,
                *flags,
                "--max-tokens",
                str(max_tokens),
                "--max-tokens-limit",
                str(max_tokens),
                "--max-queue",
                str(clients),
            ],
            THEIRS: [
                sys.executable,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                target_path,
                "--draft-model",
                drafter_path,
                "--log-level",
                "WARNING",
            ],
        }
        runs: dict[str, tuple[list[dict], list[dict], float]] = {}
        for name, command in commands.items():
            port = free_port()
            log = report_path.parent / f"{'ours' if name == OURS else 'mlx_lm'}.log"
            click.echo(f"{name}: {len(prompts)} requests one at a time, then from {clients} clients", err=True)
            with running(name, [*command, "--port", str(port)], port, log) as url:
                ask(url, prompts[0], min(8, max_tokens))  # warm-up: mlx_lm.server loads its models on first use
                sequential = [ask(url, p, max_tokens) for p in prompts]
                concurrent, wall = ask_all(url, prompts, max_tokens, clients)
            runs[name] = (sequential, concurrent, wall)
        ours = [r["text"] for r in runs[OURS][0]]
        target = None
        if check_target:
            click.echo("target alone: decoding every question for the comparison", err=True)
            target = target_texts(model, prompts, max_tokens)
        summary = {name: summarize(*run, ours, target) for name, run in runs.items()}
        env = environment()
        table = markdown(summary, env, clients, max_tokens)
        records = [
            {"server": name, "pass": kind, "question_id": q["question_id"], "category": q["category"], **r}
            for name, run in runs.items()
            for kind, answers in zip(("sequential", "concurrent"), run[:2], strict=True)
            for q, r in zip(picked, answers, strict=True)
        ]
        config = {
            "model": model,
            "draft_model": draft_model,
            "target_path": target_path,
            "drafter_path": drafter_path,
            "our_flags": flags,
            "questions": str(questions or PACKAGED_QUESTIONS),
            "per_category": per_category,
            "max_tokens": max_tokens,
            "clients": clients,
            "commands": {name: command for name, command in commands.items()},
        }
        report = {
            "environment": env,
            "config": config,
            "command": command_line(),
            "summary": summary,
            "requests": records,
        }
        write_text_whole(report_path, json.dumps(report, indent=1, default=str) + "\n")
        write_text_whole(report_path.with_name("bench-serve.md"), table)
    click.echo(table, nl=False)
    click.echo(f"Wrote {report_path} and {report_path.with_name('bench-serve.md')}")
