"""The `mlx-vocabtrim` command line: generate, chat, serve, bench-serve, bench, tune, calibrate, vocab, trim,
convert."""

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from . import __version__
from .chat import chat
from .checks import chat_ids, check_context, check_utf8
from .errors import VocabTrimError
from .files import check_output, command_line, input_file, output_lock
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET
from .options import (
    count_option,
    draft_options,
    draft_threshold_option,
    force_option,
    num_draft_tokens_option,
    pair_options,
    seed_option,
    temp_option,
    text_option,
    top_p_option,
)
from .serve import serve
from .serve_bench import bench_serve

COVERAGE_KS = (1024, 2048, 4096, 8192, 16384, 32768)
INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C
DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."


def read_prompt(prompt: str) -> str:
    """The prompt text, not empty; '-' reads stdin, which must be UTF-8."""
    if prompt != "-":
        text = check_utf8(prompt, "--prompt")
    else:
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise VocabTrimError(f"stdin is not UTF-8 text ({e.reason} at byte {e.start}): pipe UTF-8 text") from None
    if not text.strip():
        raise VocabTrimError("the prompt is empty: pass --prompt TEXT (or --prompt - to read stdin)")
    return text


def build_prompt(tokenizer, prompt: str, system_prompt: str | None, ignore_chat_template: bool) -> list[int]:
    """Token ids of the prompt, through the chat template unless told otherwise."""
    if ignore_chat_template or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    fix = "pass --ignore-chat-template to send the prompt as raw text"
    return chat_ids(tokenizer, messages, fix + (", or drop --system-prompt" if system_prompt else ""))


class Interrupted(Exception):
    """Ctrl-C, carried past click (which would print "Aborted!" and exit 1)."""


@contextmanager
def one_interrupt() -> Iterator[None]:
    """Let Ctrl-C interrupt once: later ones are ignored, so that a quick second Ctrl-C cuts short
    neither the cleanup of the first (locks, partial outputs) nor its one-line exit. SIGINT is left
    alone off the main thread and where it is not Python's default (ignored, or a caller's own)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def first(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is first:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class OneLineErrors:
    """Every error as one `Error:` line and a non-zero exit, click's own usage errors (an unknown
    option, a value of the wrong type, a missing option) included; Ctrl-C as one line and exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        with one_interrupt():
            try:
                super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except Interrupted:
                # on a terminal, end the line the ^C echo is on first
                click.echo("\nInterrupted" if sys.stderr.isatty() else "Interrupted", err=True)
                sys.exit(INTERRUPTED)
            except click.UsageError as e:
                click.echo(f"Error: {e.format_message()} (see --help)", err=True)
                sys.exit(e.exit_code)
            except VocabTrimError as e:
                click.echo(f"Error: {e.message}", err=True)
                sys.exit(1)
            except click.ClickException as e:
                e.show()
                sys.exit(e.exit_code)
            except click.Abort:
                click.echo("Aborted!", err=True)
                sys.exit(1)
            sys.exit(0)


class OneLineGroup(OneLineErrors, click.Group):
    pass


class OneLineCommand(OneLineErrors, click.Command):
    pass


@click.group(cls=OneLineGroup)
@click.version_option(__version__)
def cli():
    """VocabTrim speculative decoding for MLX."""


cli.add_command(chat)
cli.add_command(serve)
cli.add_command(bench_serve)


@cli.command(name="generate", cls=OneLineCommand)
@pair_options(DEFAULT_TARGET, DEFAULT_DRAFTER)
@draft_options
@click.option(
    "--prompt", "-p", default=DEFAULT_PROMPT, show_default=True, help="Message to the model; '-' reads it from stdin."
)
@text_option("--system-prompt", default=None, help="System message for the chat template.")
@count_option("--max-tokens", 256, "Most tokens to generate.")
@temp_option()
@top_p_option()
@seed_option()
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option("--verbose", is_flag=True, help="Print timing, acceptance, the drafter head and every setting's source.")
def generate(
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
    prompt,
    system_prompt,
    max_tokens,
    temp,
    top_p,
    seed,
    ignore_chat_template,
    verbose,
):
    """Generate text with VocabTrim speculative decoding (flags as mlx_lm.generate)."""

    from .resolve import context_length, load_for
    from .speculative import format_stats, stream_generate

    text = read_prompt(prompt)
    setup = load_for(click.get_current_context().params)
    ids = build_prompt(setup.tokenizer, text, system_prompt, ignore_chat_template)
    check_context(len(ids), max_tokens, context_length(setup.target))
    response = None
    for response in stream_generate(
        setup.target,
        setup.tokenizer,
        ids,
        setup.drafter,
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        seed=seed,
        **setup.generation_kwargs(),
    ):
        click.echo(response.text, nl=False)
    click.echo()
    if verbose and response is not None:
        click.echo(format_stats(response))
        for line in setup.describe():
            click.echo(line)


@cli.command()
@click.argument("gguf", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Weight dtype [default: float32 on CPU, float16 on GPU].",
)
@click.option("--quantize", is_flag=True, help="Quantize the converted weights with mlx-lm.")
@count_option("--q-bits", 4, "Bits per weight when quantizing (2, 3, 4, 5, 6 or 8).", 2, 8)
@count_option("--q-group-size", 64, "Group size when quantizing (32, 64 or 128).", 32, 128)
@force_option("an existing --out directory")
def convert(gguf, out, dtype, quantize, q_bits, q_group_size, force):
    """Convert a llama.cpp GGUF file (llama, qwen2 or gemma3) into an mlx-lm directory."""
    from .convert import QUANT_BITS, QUANT_GROUPS
    from .models import convert_with_progress

    if q_bits not in QUANT_BITS or q_group_size not in QUANT_GROUPS:
        raise VocabTrimError(
            f"--q-bits {q_bits} --q-group-size {q_group_size} is not supported: bits are one of "
            f"{', '.join(map(str, QUANT_BITS))}, group sizes one of "
            f"{', '.join(map(str, QUANT_GROUPS))}"
        )
    input_file(gguf, "GGUF file", "a .gguf file")
    check_output(out, inputs=[gguf], force=force, directory=True)
    with output_lock(out):
        convert_with_progress(
            gguf,
            out,
            f"Converting {gguf.name}",
            dtype=dtype,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            force=force,
        )
    click.echo(f"Wrote {out}")


@cli.command(name="calibrate")
@click.option(
    "--model", default=DEFAULT_TARGET, show_default=True, help="Target model (its tokenizer defines the vocab)."
)
@click.option("--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter, for --source drafter.")
@click.option(
    "--source",
    type=click.Choice(["target", "drafter", "dataset"]),
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
@count_option("--num-prompts", None, "Prompts drawn (seeded) from --data [default: all].")
@count_option("--max-tokens", 256, "Tokens generated per prompt.")
@temp_option("Sampling temperature of the answers (0: greedy).")
@seed_option(0, "Seed for prompt sampling and answers.")
@count_option("--batch-size", 8, "Prompts decoded together.")
@count_option("--max-prompt-tokens", 512, "Cut longer prompts to their start (prefill is slow on CPUs).")
@count_option("--checkpoint-every", 64, "Prompts between checkpoints.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Vocab file to write (.json or .json.gz).")
@force_option()
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
    force,
):
    """Count token frequencies into a vocab file; resumes from OUT.checkpoint after an interruption."""
    import mlx.core as mx

    from .calibrate import (
        calibrate,
        count_dataset,
        count_generated,
        progress_bar,
        read_data,
        resume_point,
        sample_records,
    )
    from .models import load_model, load_tokenizer
    from .trim import head_rows
    from .vocab import family_fingerprint, save_vocab, tokenizer_fingerprint

    check_output(out, inputs=[data], force=force)
    rank = mx.distributed.init().rank()  # under mlx.launch only rank 0 writes
    with output_lock(out, force=force) if rank == 0 else nullcontext():
        records, digest = read_data(data)
        records = sample_records(records, num_prompts, seed)
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
        settings = {
            "model": counted,
            "source": source,
            "data": data,
            "data_sha256": digest,
            "num_prompts": len(records),
            "max_tokens": max_tokens,
            "temp": temp,
            "seed": seed,
            "batch_size": batch_size,
            "max_prompt_tokens": max_prompt_tokens,
        }
        checkpoint = out.with_name(out.name + ".checkpoint")
        resume = resume_point(checkpoint, settings, -(-len(records) // batch_size), vocab_size)  # checked up front
        done = min(resume[1] * batch_size, len(records))  # prompts of the batches a checkpoint holds
        with progress_bar(len(records), f"Calibrating ({source})", done) as advance:
            counts = calibrate(
                records, vocab_size, count, batch_size, seed, checkpoint, checkpoint_every, settings, advance, resume
            )
        if not counts.any():  # the model answered none of the prompts: a vocab of nothing ranks nothing
            checkpoint.unlink(missing_ok=True)
            flag = "--draft-model" if source == "drafter" else "--model"
            raise VocabTrimError(
                f"{counted} ended all {len(records)} answers at once: 0 tokens counted, so no vocab is written; "
                f"pick another {flag} or --data, or count the prompts' text with --source dataset"
            )
        if rank != 0:
            return
        metadata = {
            **settings,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            **family_fingerprint(tokenizer),
            "target": model,
            "prompts_counted": len(records),
            "tokens_counted": int(counts.sum()),
            "command": command_line(),
            "tool_version": __version__,
        }
        save_vocab(out, counts, metadata)
        checkpoint.unlink(missing_ok=True)
    click.echo(f"Wrote {out}: {metadata['tokens_counted']} tokens from {len(records)} prompts")


def coverage(counts, k: int) -> float:
    """Share of counted tokens whose id is among the top k."""
    import numpy as np

    total = counts.sum()
    return float(np.sort(counts)[::-1][:k].sum() / total) if total else 0.0


@cli.group()
def vocab():
    """Inspect and combine vocab files."""


@vocab.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model whose tokenizer spells the top tokens.")
@count_option("--top", 20, "Top tokens to list.", 0)
def show(file, model, top):
    """Print coverage at several k and the most counted tokens."""
    from .models import load_tokenizer
    from .vocab import load_vocab, rank_ids

    doc = load_vocab(file)
    counts, meta = doc["counts"], doc["metadata"]
    click.echo(f"{file}: {len(counts)} ids, {int(counts.sum())} tokens counted, {int((counts > 0).sum())} distinct")
    parts = meta.get("merged_metadata", [meta])
    for n, part in enumerate(parts):
        weight = f" x{meta['weights'][n]}" if "weights" in meta else ""
        prefix = f"  [{n + 1}{weight}] " if len(parts) > 1 else "  "
        click.echo(
            prefix
            + ", ".join(f"{k}: {part[k]}" for k in ("source", "data", "prompts_counted", "tokens_counted") if k in part)
        )
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


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VocabTrimError(f"{flag} {text!r} is not a comma-separated list of integers") from None


@vocab.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--weights",
    default=None,
    help="Comma-separated weight per file, e.g. 4000,1 to mix a small "
    "target-generated count with a large dataset count at equal mass [default: 1 each].",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged vocab file to write.")
@force_option()
def merge(files, weights, out, force):
    """Add the counts of vocab files made with the same tokenizer."""
    from .vocab import MAX_COUNT, load_vocab, save_vocab

    check_output(out, inputs=files, force=force)
    docs = [load_vocab(f) for f in files]
    prints = {d["metadata"]["tokenizer_fingerprint"] for d in docs}
    sizes = {len(d["counts"]) for d in docs}
    if len(prints) != 1 or len(sizes) != 1:
        raise VocabTrimError("these vocab files come from different tokenizers: merge only files of one tokenizer")
    scale = _int_list(weights, "--weights") if weights else [1] * len(docs)
    if len(scale) != len(docs) or min(scale) < 0 or not any(scale):
        raise VocabTrimError(f"--weights needs {len(docs)} non-negative integers, one per file, not all 0")
    if sum(w * int(d["counts"].max()) for w, d in zip(scale, docs, strict=True)) > MAX_COUNT:
        raise VocabTrimError("--weights are too large: the weighted counts would not fit in 64 bits; use smaller ones")
    counts = sum(w * d["counts"] for w, d in zip(scale, docs, strict=True))
    sources = "+".join(dict.fromkeys(str(d["metadata"].get("source")) for d in docs))
    meta = {
        **docs[0]["metadata"],
        "source": sources,
        "merged_from": [str(f) for f in files],
        "weights": scale,
        "merged_metadata": [d["metadata"] for d in docs],
        "tokens_counted": int(counts.sum()),
        "command": command_line(),
        "tool_version": __version__,
        "prompts_counted": sum(int(d["metadata"].get("prompts_counted", 0) or 0) for d in docs),
    }
    with output_lock(out, force=force):
        save_vocab(out, counts, meta)
    click.echo(f"Wrote {out}: {int(counts.sum())} weighted tokens")


@cli.command()
@click.option("--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter to trim.")
@click.option(
    "--model",
    default=DEFAULT_TARGET,
    show_default=True,
    help="Target the drafter will serve: its profile (if any) is carried into the directory.",
)
@click.option(
    "--vocab",
    "vocab_file",
    default=None,
    type=click.Path(path_type=Path),
    help="Vocab file ranking ids [default: a packaged vocab matching the drafter's tokenizer].",
)
@count_option("--k", None, "Rows to keep in the drafter head (EOS and specials included).", required=True)
@click.option(
    "--context-head/--no-context-head",
    default=True,
    show_default=True,
    help="Also save the full head, so generation can add the rows of each request's own ids.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Trimmed drafter directory to write.")
@force_option("an existing --out directory")
def trim(draft_model, model, vocab_file, k, context_head, out, force):
    """Write a self-contained trimmed drafter that `generate --draft-model DIR` uses as is."""
    from dataclasses import asdict, replace

    from mlx_lm.utils import load_config

    from .models import load_model, resolve_model
    from .profiles import find_profile, model_key
    from .resolve import vocab_for
    from .trim import head_rows, save_trimmed, trim_drafter
    from .vocab import keep_ids, load_vocab, ranked_for

    drafter_path = resolve_model(draft_model)
    check_output(out, inputs=[drafter_path, vocab_file], force=force, directory=True)
    profile, where = find_profile(model_key(model), model_key(draft_model, drafter_path))  # the target is not loaded
    drafter, tokenizer = load_model(drafter_path)
    path, how = vocab_for(tokenizer, None if vocab_file is None else str(vocab_file))
    if path is None:
        raise VocabTrimError(
            f"no vocab matches {draft_model}'s tokenizer: pass --vocab FILE (`mlx-vocabtrim calibrate` makes one)"
        )
    doc = load_vocab(path)
    rows = head_rows(drafter)
    keep = keep_ids(ranked_for(doc, path, tokenizer), k, rows, tokenizer)
    trim_drafter(drafter, keep, keep_full_head=context_head)
    kept_share = float(doc["counts"][[i for i in keep if i < len(doc["counts"])]].sum() / max(doc["counts"].sum(), 1))
    info = {
        "k": k,
        "full_rows": rows,
        "coverage": kept_share,
        "vocab": f"{path} ({how})",
        "source": doc["metadata"].get("source"),
        "data": doc["metadata"].get("data"),
        "drafter": draft_model,
    }
    if profile is not None:
        info["profile"] = asdict(replace(profile, k=k, context_head=profile.context_head and context_head))
        info["profile_from"] = where
    with output_lock(out):
        save_trimmed(drafter, tokenizer, load_config(Path(drafter_path)), out, info, force=force)
    carried = f"; carries {where}" if profile is not None else ""
    click.echo(f"Wrote {out}: head {rows} -> {k} rows, coverage {info['coverage']:.2%}{carried}")


@cli.command()
@click.option("--model", default=DEFAULT_TARGET, show_default=True, help="Target model.")
@click.option("--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter (untrimmed).")
@click.option("--vocab", default=None, help="Vocab file ranking the kept ids [default: one matching the tokenizer].")
@click.option(
    "--k",
    "ks",
    default="8192,16384,32768",
    show_default=True,
    help="Head sizes to weigh, comma-separated (the full head is always weighed).",
)
@click.option("--questions", default=None, help="Spec-Bench JSONL to tune on [default: the packaged Spec-Bench].")
@count_option("--prompts", 13, "Questions to tune on: one per Spec-Bench category (fewer: categories spread).")
@count_option("--max-tokens", 128, "Tokens decoded per question.")
@count_option("--max-prompt-tokens", None, "Cut longer questions to their start [default: no cut].")
@click.option(
    "--out",
    default=None,
    type=click.Path(path_type=Path),
    help="Profile file to write [default: this machine's store, used by generate/chat/serve].",
)
@force_option("an existing --out file")
def tune(model, draft_model, vocab, ks, questions, prompts, max_tokens, max_prompt_tokens, out, force):
    """Pick k, draft length, draft threshold, context head and prompt lookup for this machine and pair;
    save them as the pair's profile."""
    from .bench import tune_pair

    tune_pair(
        model,
        draft_model,
        vocab,
        _int_list(ks, "--k"),
        questions,
        prompts,
        max_tokens,
        max_prompt_tokens,
        out,
        force,
        echo=click.echo,
    )


@cli.command()
@click.option("--model", default=DEFAULT_TARGET, show_default=True, help="Target model.")
@click.option("--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter (untrimmed).")
@click.option("--vocab", default=None, help="Vocab file ranking the kept ids [default: one matching the tokenizer].")
@click.option(
    "--methods",
    default="full,trim@16384,trim@32768",
    show_default=True,
    help="Our settings to run, comma-separated: full or trim@K, optionally +ctx (context head), "
    "+lookup (prompt lookup; +lookupN/C: its n and most copied tokens) and +adaptive, then ' xG' (draft "
    "length) and ' stop<T' (threshold), as bench names its methods; profile: the pair's profile (what "
    "generate uses with no flags); '' for none.",
)
@num_draft_tokens_option(3, "Draft length of --methods that name none.")
@draft_threshold_option(0.0, "Draft threshold of --methods that name none (0: fixed length).")
@count_option("--lookup-ngram", 3, "Prompt lookup's n for +lookup methods that name none.", 1, 16)
@count_option("--lookup-tokens", 8, "Most tokens +lookup methods copy per target call, where they name none.", 1, 64)
@click.option(
    "--k",
    "ks",
    default="8192,16384,32768",
    show_default=True,
    help="Head sizes --auto weighs, comma-separated (the full head is always weighed).",
)
@click.option(
    "--baseline",
    default="auto",
    show_default=True,
    help="mlx-lm's draft length for the baseline `mlx-lm-spec@N`: a number, or auto (its best on this "
    "machine, tuned like ours). mlx-lm's default (3) is always run too.",
)
@click.option("--auto", is_flag=True, help="Tune our settings on held-out questions, run the choice, save the profile.")
@count_option("--auto-prompts", 13, "Held-out questions tuning decodes (one per category).")
@click.option("--questions", default=None, help="Spec-Bench question.jsonl [default: the packaged Spec-Bench].")
@count_option("--per-category", 2, "Questions per Spec-Bench category.")
@count_option("--max-tokens", 128, "New tokens per answer.")
@count_option("--max-prompt-tokens", None, "Cut longer questions to their start [default: no cut].")
@temp_option("Sampling temperature (0: greedy, checked lossless).")
@top_p_option()
@count_option("--repeats", 1, "Runs of each method per question, in a seeded random order.")
@seed_option(0, "Seed of the run order (and of sampling).")
@click.option(
    "--out",
    default="bench-out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Directory for bench.json, bench.md and bench.png.",
)
@force_option("a finished bench in --out")
@click.option(
    "--save-profile/--no-save-profile",
    default=True,
    show_default=True,
    help="With --auto, save the choice as the pair's profile on this machine.",
)
def bench(
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
    per_category,
    max_tokens,
    max_prompt_tokens,
    temp,
    top_p,
    repeats,
    seed,
    out,
    force,
    save_profile,
):
    """Spec-Bench: the target, mlx-lm's speculative decoding and our settings side by side."""
    from .bench import run_bench

    if baseline != "auto":
        baseline = _int_list(baseline, "--baseline")
        if len(baseline) != 1 or not 1 <= baseline[0] <= 64:
            raise VocabTrimError("--baseline takes a draft length from 1 to 64, or auto")
        baseline = baseline[0]
    run_bench(
        model=model,
        draft_model=draft_model,
        vocab=vocab,
        methods=methods,
        num_draft_tokens=num_draft_tokens,
        draft_threshold=draft_threshold,
        lookup_ngram=lookup_ngram,
        lookup_tokens=lookup_tokens,
        ks=_int_list(ks, "--k"),
        baseline=baseline,
        auto=auto,
        auto_prompts=auto_prompts,
        questions=questions,
        per_category=per_category,
        max_tokens=max_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temp=temp,
        top_p=top_p,
        repeats=repeats,
        seed=seed,
        out=out,
        force=force,
        save_profile=save_profile,
        echo=click.echo,
    )
