"""The `mlx-vocabtrim` command group: convert, calibrate, vocab, trim, generate."""

import shlex
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from . import __version__
from .calibrate import SOURCES, calibrate, count_dataset, count_generated, progress_bar, read_records, sample_records
from .chat import chat
from .convert import DTYPES
from .errors import VocabTrimError
from .generate import main as generate
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET, convert_with_progress, load_model, load_tokenizer, resolve_model
from .serve import serve
from .trim import head_bytes, head_rows, save_trimmed, trim_drafter
from .vocab import check_vocab, load_vocab, rank_ids, save_vocab, select_keep_ids, special_ids, tokenizer_fingerprint

COVERAGE_KS = (1024, 2048, 4096, 8192, 16384, 32768)


def command_line() -> str:
    """The running command with every option's resolved value: provenance that reruns it."""
    ctx = click.get_current_context()
    words = ["mlx-vocabtrim", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words += [str(v) for v in (value if isinstance(value, tuple) else [value])]
        elif getattr(param, "is_flag", False):
            words += [param.opts[0]] if value else []
        elif value is not None:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


@click.group()
@click.version_option(__version__)
def cli():
    """VocabTrim speculative decoding for MLX."""


cli.add_command(generate)
cli.add_command(chat)
cli.add_command(serve)


@cli.command()
@click.argument("gguf", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write (must not exist).")
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Weight dtype [default: float32 on CPU, float16 on GPU].",
)
@click.option("--quantize", is_flag=True, help="Quantize the converted weights with mlx-lm.")
@click.option("--q-bits", type=int, default=4, show_default=True, help="Bits per weight when quantizing.")
@click.option("--q-group-size", type=int, default=64, show_default=True, help="Group size when quantizing.")
def convert(gguf, out, dtype, quantize, q_bits, q_group_size):
    """Convert a llama.cpp GGUF file (llama or qwen2) into an mlx-lm directory."""
    convert_with_progress(gguf, out, f"Converting {gguf.name}", dtype=dtype, quantize=quantize, q_bits=q_bits,
                          q_group_size=q_group_size)  # fmt: skip
    click.echo(f"Wrote {out}")


@cli.command(name="calibrate")
@click.option(
    "--model", default=DEFAULT_TARGET, show_default=True, help="Target model (its tokenizer defines the vocab)."
)
@click.option("--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter, for --source drafter.")
@click.option(
    "--source",
    type=click.Choice(SOURCES),
    default="target",
    show_default=True,
    help="Count the target's answers, the drafter's answers, or the raw dataset text.",
)
@click.option(
    "--data",
    default="sharegpt",
    show_default=True,
    help="Prompts: Spec-Bench/ShareGPT/prompt JSONL, ShareGPT JSON, text, `sharegpt`, or a dataset repo id.",
)
@click.option("--num-prompts", type=int, default=None, help="Prompts drawn (seeded) from --data [default: all].")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Tokens generated per prompt.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature of the answers.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling and answers.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts decoded together.")
@click.option(
    "--max-prompt-tokens",
    type=int,
    default=512,
    show_default=True,
    help="Cut longer prompts to their start (prefill is slow on CPUs).",
)
@click.option("--checkpoint-every", type=int, default=64, show_default=True, help="Prompts between checkpoints.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Vocab file to write (.json or .json.gz).")
def calibrate_command(
    model,
    draft_model,
    source,
    data,
    num_prompts,
    max_tokens,
    temp,
    seed,
    batch_size,
    max_prompt_tokens,
    checkpoint_every,
    out,
):
    """Count token frequencies into a vocab file; resumes from OUT.checkpoint after an interruption."""
    if batch_size < 1 or max_tokens < 1:
        raise VocabTrimError("--batch-size and --max-tokens must be 1 or more")
    records = sample_records(read_records(data), num_prompts, seed)
    counted = draft_model if source == "drafter" else model
    if source == "dataset":
        tokenizer, vocab_size = load_tokenizer(model)
        count = lambda batch: count_dataset(tokenizer, batch)  # noqa: E731
    else:
        target, tokenizer = load_model(model)
        generator, generator_tok = (target, tokenizer) if source == "target" else load_model(draft_model)
        if source == "drafter" and tokenizer_fingerprint(generator_tok) != tokenizer_fingerprint(tokenizer):
            raise VocabTrimError(f"{draft_model} and {model} use different tokenizers: pick a matching drafter")
        vocab_size = head_rows(target)
        count = lambda batch: count_generated(  # noqa: E731
            generator, generator_tok, batch, max_tokens, temp, max_prompt_tokens
        )
    settings = {"model": counted, "source": source, "data": data, "num_prompts": len(records),
                "max_tokens": max_tokens, "temp": temp, "seed": seed, "batch_size": batch_size,
                "max_prompt_tokens": max_prompt_tokens}  # fmt: skip
    checkpoint = out.with_name(out.name + ".checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    bar, advance = progress_bar(len(records), f"Calibrating ({source})")
    with bar:
        counts = calibrate(
            records, vocab_size, count, batch_size, seed, checkpoint, checkpoint_every, settings, advance
        )
    if mx.distributed.init().rank() != 0:
        return
    metadata = {
        **settings,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "target": model,
        "prompts_counted": len(records),
        "tokens_counted": int(counts.sum()),
        "command": command_line(),
        "tool_version": __version__,
    }
    save_vocab(out, counts, metadata)
    checkpoint.unlink(missing_ok=True)
    click.echo(f"Wrote {out}: {metadata['tokens_counted']} tokens from {len(records)} prompts")


def coverage(counts: np.ndarray, k: int) -> float:
    """Share of counted tokens whose id is among the top k."""
    total = counts.sum()
    return float(np.sort(counts)[::-1][:k].sum() / total) if total else 0.0


@cli.group()
def vocab():
    """Inspect and combine vocab files."""


@vocab.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model whose tokenizer spells the top tokens.")
@click.option("--top", type=int, default=20, show_default=True, help="Top tokens to list.")
def show(file, model, top):
    """Print coverage at several k and the most counted tokens."""
    doc = load_vocab(file)
    counts, meta = doc["counts"], doc["metadata"]
    click.echo(f"{file}: {len(counts)} ids, {int(counts.sum())} tokens counted, {int((counts > 0).sum())} distinct")
    parts = meta.get("merged_metadata", [meta])
    for n, part in enumerate(parts):
        weight = f" x{meta['weights'][n]}" if "weights" in meta else ""
        prefix = f"  [{n + 1}{weight}] " if len(parts) > 1 else "  "
        click.echo(prefix + ", ".join(f"{k}: {part[k]}" for k in ("source", "data", "prompts_counted", "tokens_counted")
                                      if k in part))  # fmt: skip
        if "command" in part:
            click.echo(f"{prefix}command: {part['command']}")
    if len(parts) > 1:
        click.echo(f"  merged by: {meta.get('command')}")
    click.echo("  k        coverage")
    for k in COVERAGE_KS:
        click.echo(f"  {k:<8} {coverage(counts, k):.2%}")
    tokenizer = load_tokenizer(model)[0] if model else None
    for i in rank_ids(counts)[:top]:
        spelled = f" {tokenizer.decode([i])!r}" if tokenizer is not None else ""
        click.echo(f"  {i:>7} {int(counts[i]):>9}{spelled}")


@vocab.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", default=None, help="Comma-separated weight per file, e.g. 4000,1 to mix a small "
              "target-generated count with a large dataset count at equal mass [default: 1 each].")  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged vocab file to write.")
def merge(files, weights, out):
    """Add the counts of vocab files made with the same tokenizer."""
    docs = [load_vocab(f) for f in files]
    prints = {d["metadata"].get("tokenizer_fingerprint") for d in docs}
    sizes = {len(d["counts"]) for d in docs}
    if len(prints) != 1 or len(sizes) != 1:
        raise VocabTrimError("these vocab files come from different tokenizers: merge only files of one tokenizer")
    scale = _int_list(weights, "--weights") if weights else [1] * len(docs)
    if len(scale) != len(docs) or min(scale) < 0:
        raise VocabTrimError(f"--weights needs {len(docs)} non-negative integers, one per file")
    counts = sum(w * d["counts"] for w, d in zip(scale, docs, strict=True))
    sources = "+".join(dict.fromkeys(str(d["metadata"].get("source")) for d in docs))
    meta = {**docs[0]["metadata"], "source": sources, "merged_from": [str(f) for f in files], "weights": scale,
            "merged_metadata": [d["metadata"] for d in docs], "tokens_counted": int(counts.sum()),
            "command": command_line(), "tool_version": __version__,
            "prompts_counted": sum(d["metadata"].get("prompts_counted", 0) for d in docs)}  # fmt: skip
    save_vocab(out, counts, meta)
    click.echo(f"Wrote {out}: {int(counts.sum())} weighted tokens")


@cli.command()
@click.option("--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter to trim.")
@click.option(
    "--vocab", "vocab_file", required=True, type=click.Path(path_type=Path), help="Vocab file to rank ids by."
)
@click.option("--k", type=int, required=True, help="Rows to keep in the drafter head (EOS and specials included).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Trimmed drafter directory to write.")
def trim(draft_model, vocab_file, k, out):
    """Write a self-contained trimmed drafter that `generate --draft-model DIR` uses as is."""
    from mlx_lm.utils import load_config

    model, tokenizer = load_model(draft_model)
    doc = load_vocab(vocab_file)
    check_vocab(doc, vocab_file, tokenizer)
    rows = head_rows(model)
    keep = select_keep_ids(rank_ids(doc["counts"]), k, rows, special_ids(tokenizer))
    trim_drafter(model, keep)
    kept_share = float(doc["counts"][keep].sum() / max(doc["counts"].sum(), 1))
    info = {"k": k, "full_rows": rows, "coverage": kept_share, "vocab": str(vocab_file),
            "source": doc["metadata"].get("source"), "data": doc["metadata"].get("data"),
            "drafter": draft_model}  # fmt: skip
    save_trimmed(model, tokenizer, load_config(Path(resolve_model(draft_model))), out, info)
    click.echo(f"Wrote {out}: head {rows} -> {k} rows, coverage {info['coverage']:.2%}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() and x.strip() != "full"]
    except ValueError:
        raise VocabTrimError(f"{flag} {text!r} is not a comma-separated list of integers") from None


@cli.command()
@click.option("--model", default=DEFAULT_TARGET, show_default=True, help="Target model.")
@click.option("--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter (untrimmed).")
@click.option(
    "--vocab", "vocab_file", default=None, help="Vocab file ranking the kept ids [default: the packaged one]."
)
@click.option(
    "--k",
    "ks",
    default="8192,16384,32768",
    show_default=True,
    help="Head sizes to compare, comma-separated ('full' is always run).",
)
@click.option(
    "--num-draft-tokens", type=int, default=3, show_default=True, help="Draft length of every speculative method."
)
@click.option(
    "--questions",
    default="../shared/data/spec_bench/question.jsonl",
    show_default=True,
    help="Spec-Bench question.jsonl.",
)
@click.option("--per-category", type=int, default=2, show_default=True, help="Questions per Spec-Bench category.")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="New tokens per answer.")
@click.option(
    "--max-prompt-tokens", type=int, default=None, help="Cut longer questions to their start [default: no cut]."
)
@click.option(
    "--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0: greedy, checked lossless)."
)
@click.option(
    "--draft-threshold", type=float, default=0.0, show_default=True,
    help="full and trim@k end a round's drafting once the drafter's confidence falls below this (0: fixed length).",
)  # fmt: skip
@click.option(
    "--auto", is_flag=True,
    help="Pick k, num-draft-tokens and draft-threshold on held-out questions, then confirm the pick.",
)  # fmt: skip
@click.option(
    "--auto-prompts", type=int, default=4, show_default=True, help="Held-out questions --auto measures to pick."
)
@click.option(
    "--out",
    default="bench-out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Directory for bench.json, bench.md and bench.png.",
)
def bench(model, draft_model, vocab_file, ks, num_draft_tokens, questions, per_category, max_tokens, max_prompt_tokens,
          temp, draft_threshold, auto, auto_prompts, out):  # fmt: skip
    """Spec-Bench: target, mlx-lm-spec, full and trim@k side by side on the same prompts."""
    from . import bench as b
    from .calibrate import chat_prompt
    from .generate import DEFAULT_VOCAB
    from .models import load_pair
    from .speculative import SpecStats, check_draft_threshold
    from .trim import trimmed_copy
    from .vocab import read_ranked_ids

    k_list = _int_list(ks, "--k")
    check_draft_threshold(draft_threshold)
    qs = b.read_questions(questions, per_category)
    target, tokenizer, drafter = load_pair(model, draft_model)
    rows = head_rows(drafter)
    ranked = read_ranked_ids(vocab_file or DEFAULT_VOCAB, tokenizer)
    trimmed = {k: trimmed_copy(drafter, select_keep_ids(ranked, k, rows, special_ids(tokenizer))) for k in k_list}
    env = b.environment(target)
    click.echo(f"BLAS: {env['blas']}; weights {env['dtype']}; {env['device']}; {env['cpu']}", err=True)
    eos = set(tokenizer.eos_token_ids)
    encode = lambda text: chat_prompt(tokenizer, text, max_prompt_tokens)  # noqa: E731
    gamma = num_draft_tokens
    spec = [b.Method(f"mlx-lm-spec@{gamma}", "mlx-lm-spec", drafter, gamma),
            b.Method("full", "ours", drafter, gamma, rows, draft_threshold)]  # fmt: skip
    sweep = [b.Method(f"trim@{k}", "ours", d, gamma, k, draft_threshold) for k, d in trimmed.items()]
    methods = [b.Method("target", "target"), *spec, *sweep]
    vocab_used = str(vocab_file or DEFAULT_VOCAB)
    report: dict = {"environment": env, "model": model, "draft_model": draft_model, "vocab": vocab_used,
                    "questions": str(questions), "max_tokens": max_tokens, "temp": temp}  # fmt: skip
    config = {"model": model, "draft_model": draft_model, "vocab": vocab_used, "k": k_list, "num_draft_tokens": gamma,
              "questions": str(questions), "per_category": per_category, "max_tokens": max_tokens,
              "max_prompt_tokens": max_prompt_tokens, "temp": temp, "draft_threshold": draft_threshold, "auto": auto,
              "auto_prompts": auto_prompts}  # fmt: skip
    entries, log = b.resume_log(out, config)
    done = {(e["run"]["question_id"], e["run"]["method"]): b.Run(**e["run"]) for e in entries if "run" in e}
    if entries:
        click.echo(f"Resuming the unfinished bench in {out}: {len(done)} runs done", err=True)
    if auto:
        tuning, qs = b.tuning_questions(questions, qs, auto_prompts)
        candidates = {rows: drafter, **trimmed}
        tuned = next((e["auto"] for e in entries if "auto" in e), None)
        if tuned is None:
            gammas = list(b.GAMMAS)
            probe = b.Method(f"full@{gammas[-1]}", "ours", drafter, gammas[-1], rows)
            rounds = []
            with progress_bar_over(len(tuning), "Auto-tuning") as advance:
                for q in tuning:
                    stats = SpecStats(confidences=[])
                    run = b.run_method(probe, target, encode(q["prompt"]), max_tokens, 0.0, eos, stats)
                    rounds += zip(b.accepted_runs(run.tokens, run.from_draft), stats.confidences, strict=False)
                    advance()
            tuned = b.auto_tune(target, candidates, rounds, gammas, encode(tuning[0]["prompt"]))
            tuned["tuning_questions"] = [q["question_id"] for q in tuning]
            log({"auto": tuned})
        pick = tuned["choice"]
        best = (pick["k"], pick["num_draft_tokens"], pick["draft_threshold"])
        same = [m for m in methods if m.kind == "ours" and (m.k, m.gamma, m.threshold) == best]
        name = f"auto: {'full' if best[0] == rows else f'trim@{best[0]}'} x{best[1]}" + (
            f" stop<{best[2]}" if best[2] else "")  # fmt: skip
        chosen = same[0] if same else b.Method(name, "ours", candidates[best[0]], best[1], best[0], best[2])
        click.echo(f"Auto choice: k={best[0]}, num-draft-tokens={best[1]}, draft-threshold={best[2]} (predicted "
                   f"{pick['predicted_tokens_per_s']:.3f} tok/s), confirmed as {chosen.name!r}", err=True)  # fmt: skip
        report["auto"] = tuned | {"method": chosen.name}
        if gamma != 3:  # the anchor the choice is judged against: mlx-lm's default draft length
            methods.insert(1, b.Method("mlx-lm-spec@3", "mlx-lm-spec", drafter, 3))
        if not same:
            methods.append(chosen)
    warm = encode("Say hi.")
    for m in methods:  # tuning times its own steps after a warm pass; the benchmark starts warm too
        b.run_method(m, target, warm, 4, temp, eos)
    with progress_bar_over(len(qs) * len(methods), "Benchmark") as advance:
        runs = b.interleave(qs, methods, target, encode, max_tokens, temp, eos, advance, done,
                            lambda run: log({"run": asdict(run)}))  # fmt: skip
    if temp == 0:
        b.check_lossless(runs)
    c_of = {m.name: b.step_bytes(m.drafter) / b.step_bytes(target) for m in methods if m.drafter is not None}
    head_of = {m.name: head_bytes(m.drafter) for m in methods if m.drafter is not None}
    summary = b.summarize(runs, methods, c_of)
    categories = b.by_category(runs, methods, c_of)
    report |= {"summary": summary, "categories": categories, "c": c_of, "head_bytes": head_of,
               "step_bytes_note": "bytes of all weights read per decode step, input embedding rows excluded",
               "runs": b.runs_as_dicts(runs)}  # fmt: skip
    table = b.markdown(summary, categories, env, head_of)
    paths = b.write_outputs(out, report, table, rows)
    click.echo(table)
    click.echo("Wrote " + ", ".join(map(str, paths)))


@contextmanager
def progress_bar_over(total: int, label: str):
    """A click progress bar on stderr; yields a callback that advances it by one."""
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True) as bar:
        yield lambda: bar.update(1)
