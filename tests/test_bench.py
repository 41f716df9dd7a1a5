"""The Spec-Bench harness and the tuner on tiny models: counts observed in the KV caches and the
same for every method, repeats in a seeded order, intervals, a tuned mlx-lm baseline, resume,
and the tuner's replay matching real runs exactly."""

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import VOCAB, make_model, noisy_copy
from mlx_lm import load
from mlx_lm.generate import generate_step

from mlx_vocabtrim import VocabTrimError
from mlx_vocabtrim.bench import Method, Run, check_lossless, count_passes, parse_methods, run_method, step_bytes
from mlx_vocabtrim.calibrate import chat_prompt
from mlx_vocabtrim.cli import cli
from mlx_vocabtrim.profiles import Setting, model_key, save_profile
from mlx_vocabtrim.questions import PACKAGED_QUESTIONS, read_questions, tuning_questions
from mlx_vocabtrim.resolve import load as resolve_load
from mlx_vocabtrim.speculative import SpecStats, speculative_generate_step
from mlx_vocabtrim.trim import head_rows, trimmed_copy
from mlx_vocabtrim.tune import Costs, _lookups, replay, settings_grid, trace
from mlx_vocabtrim.vocab import keep_ids, read_ranked_ids

CATEGORIES = ["coding", "writing", "math"]


@pytest.fixture(scope="module")
def bench_inputs(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    lines = [
        json.dumps(
            {
                "question_id": i,
                "category": CATEGORIES[i % 3],
                "turns": [f"Question {i}: add {i} and x. Question {i}: add", "more"],
            }
        )
        for i in range(9)
    ]
    (root / "question.jsonl").write_text("\n".join(lines))
    text = root / "calib.txt"
    text.write_text("Question add and x. def add(a, b): return a + b")
    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            "--model",
            str(model_dirs["target"]),
            "--source",
            "dataset",
            "--data",
            str(text),
            "--out",
            str(root / "v.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def bench_args(model_dirs, root, out, *extra):
    return [
        "bench",
        "--model",
        str(model_dirs["target"]),
        "--draft-model",
        str(model_dirs["drafter"]),
        "--vocab",
        str(root / "v.json"),
        "--questions",
        str(root / "question.jsonl"),
        "--max-tokens",
        "16",
        "--out",
        str(out),
        *extra,
    ]


def logged(passes: list[tuple[int, int]], known: list[int] | None = None) -> list[tuple[int, int, int]]:
    """Passes as the counting cache logs them; a caller that knew nothing more than each pass's offset + 1."""
    return [(o, n, k) for (o, n), k in zip(passes, known or [o + 1 for o, _ in passes], strict=True)]


def test_count_passes_stops_at_the_same_place_for_everyone():
    # prompt of 5 tokens (positions 0-4); 10 tokens emitted, the last at position 14
    ours = logged([(0, 4), (4, 4), (8, 4), (12, 2)])  # prefill, then rounds of 3 drafts, a last round of 1
    mlx_lm = logged([(0, 4), (4, 4), (8, 4), (12, 3)])  # mlx-lm drafts up to what is left (2), its bonus is dropped
    assert count_passes(ours, [], 5, 10) == (3, 7, 0)
    assert count_passes(mlx_lm, [], 5, 10) == (3, 8, 0)
    # target alone: a pass queued ahead of the last token (offset 14) is not counted
    alone = logged([(0, 4)] + [(4 + i, 1) for i in range(11)])
    assert count_passes(alone, [], 5, 10) == (10, 0, 0)
    # EOS as the 2nd token of a round of 3 accepted drafts: the drafts after it are not counted
    assert count_passes(logged([(0, 4), (4, 4)]), [], 5, 2) == (1, 2, 0)
    # drafter passes: prefill (ends before position 4) excluded; each later pass proposes offset + n
    drafter = logged([(0, 4), (4, 1), (5, 1), (6, 1), (7, 2)])
    assert count_passes(logged([(0, 4), (4, 4)]), drafter, 5, 4) == (1, 3, 3)
    # a recurrent target: 1 of 3 drafts kept, so the next pass starts again at offset 4 and feeds the 2
    # kept tokens and the correction (positions 4-6, known: 7 tokens) before its 3 drafts; 2 of them kept, so
    # again from offset 4: positions 4-9 and the 1 draft the budget leaves
    recurrent = logged([(0, 4), (4, 4), (4, 6), (4, 7)], [5, 5, 7, 10])
    assert count_passes(recurrent, [], 5, 7) == (3, 3 + 3 + 1, 0)
    # a caller that reads one token ahead (known lags): counted as a pass fed its last token only
    assert count_passes(logged([(0, 4), (4, 4), (8, 4)], [5, 4, 8]), [], 5, 8) == (2, 6, 0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_drafter_equal_to_target_accepts_everything_in_every_method(arch):
    """Observed counts: 100% acceptance and the same tau for ours and mlx-lm's, whatever the draft length."""
    target = make_model(arch, seed=81)
    prompt = [5, 17, 33, 90, 200, 11]
    reference = [t for t, _ in generate_step(mx.array(prompt), target, max_tokens=10)]
    methods = [Method(f"mlx-lm-spec@{g}", "mlx-lm-spec", target, Setting(None, g)) for g in (2, 3, 4)]
    methods += [Method(f"ours@{g}", "ours", target, Setting(None, g, 0.0, False, 0)) for g in (2, 3, 4)]
    taus = {}
    for m in methods:
        run = run_method(m, target, prompt, 10, 0.0, 1.0, eos=set())
        assert run.tokens == reference and run.emitted == 10
        assert run.accepted == run.drafted > 0, m.name
        taus.setdefault(m.setting.num_draft_tokens, set()).add(run.emitted / run.target_calls)
    assert all(len(t) == 1 for t in taus.values()), taus
    assert taus[3] == {10 / 3}


def test_target_alone_is_one_pass_per_token_and_lossless():
    target = make_model("qwen2", seed=82)
    run = run_method(Method("target", "target"), target, [3, 4, 5], 12, 0.0, 1.0, eos=set())
    assert run.target_calls == 12 and run.drafted == run.accepted == 0
    assert run.tokens == [t for t, _ in generate_step(mx.array([3, 4, 5]), target, max_tokens=12)]


def test_parse_methods():
    methods = parse_methods("full, trim@40+ctx,trim@40+lookup+ctx,full+lookup", 3, 0.5, 2, 6)
    assert [n for n, _ in methods] == ["full", "trim@40+ctx", "trim@40+lookup+ctx", "full+lookup"]
    assert methods[2][1] == Setting(40, 3, 0.5, True, 2, 6)
    assert methods[3][1] == Setting(None, 3, 0.5, False, 2, 6)
    for bad in (
        "trim@x",
        "full+ctx",
        "trim@40+ctx+ctx",
        "half",
        "trim@40 x",
        "trim@40+lookup3",
        "full stop<a",
        "trim@²",
        "full x²",
        "+",
        "full+lookup/8",
    ):
        with pytest.raises(VocabTrimError, match="--methods"):
            parse_methods(bad, 3, 0.0, 2, 6)
    for bad in (
        "full x99",
        "full stop<1",
        "full+lookup99/8",
        "full+lookup3/0",
        "full+lookup0/8",
    ):  # values out of range, named
        with pytest.raises(VocabTrimError, match=f"--methods: {re.escape(repr(bad))}: .* out of range"):
            parse_methods(bad, 3, 0.0, 2, 6)


@pytest.mark.parametrize(
    "setting",
    [
        Setting(16384, 5, 0.6, True, 4, 16),
        Setting(None, 12, 0.95, False, 5, 32),
        Setting(8192, 7, 0.0, True, 0, 8, True),
        Setting(None, 0, 0.0, False, 3, 8),
        Setting(40, 2, 0.3, False, 0, 8, True),
    ],
)
def test_a_reported_method_name_runs_as_named(setting):
    """--methods takes the names bench reports its methods under (the auto choice's included), each
    part overriding the flags' defaults, so a reported setting can be run again exactly."""
    name = setting.name(full_rows=320)
    ((parsed_name, parsed),) = parse_methods(name, 9, 0.1, 7, 40)
    if not setting.lookup_ngram:  # how many tokens a lookup that is off would copy does not matter
        parsed = replace(parsed, lookup_tokens=setting.lookup_tokens)
    assert (parsed_name, parsed) == (name, setting)
    assert parse_methods(f"  {name.replace(' ', '   ')} ", 9, 0.1, 7, 40)[0][0] == name
    assert parse_methods("profile", 3, 0.0, 2, 6) == [("profile", None)]
    for label in ("auto: ", "auto, best static: ", "auto, best adaptive: ", "profile: "):  # copied from a report
        assert parse_methods(f"{label}{name},full x2", 9, 0.1, 7, 40)[0] == parse_methods(name, 9, 0.1, 7, 40)[0]


def test_the_profile_method_runs_the_pairs_profile(model_dirs, bench_inputs, tmp_path, monkeypatch):
    """`--methods profile` runs what generate uses with no flags (the pair's saved profile here),
    beside a setting named in full: each run drafts as its name says."""
    monkeypatch.setenv("MLX_VOCABTRIM_CACHE", str(tmp_path / "cache"))
    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    save_profile(model_key(target, target), model_key(drafter, drafter), Setting(40, 1, 0.0, True, 0, 8), {})
    methods = "profile,trim@40+lookup2/12 x4"
    args = bench_args(model_dirs, bench_inputs, tmp_path / "out", "--methods", methods, "--baseline", "2")
    result = CliRunner().invoke(cli, [*args, "--per-category", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    summary = report["summary"]
    assert list(summary)[-2:] == ["profile: trim@40+ctx x1", "trim@40+lookup2/12 x4"]
    assert report["head_rows"] == {"mlx-lm-spec@3": 320, "mlx-lm-spec@2": 320} | dict.fromkeys(list(summary)[-2:], 40)
    profile, named = summary["profile: trim@40+ctx x1"], summary["trim@40+lookup2/12 x4"]
    assert profile["drafts_per_call"] <= 1 < named["drafts_per_call"]
    assert profile["context_rows"] > 0 == named["context_rows"]


def test_provenance_outside_a_command_is_the_interpreters_command_line(monkeypatch):
    """Profiles and reports record the command that made them; called from Python, the script's."""
    import shlex
    import sys

    from mlx_vocabtrim.files import command_line

    monkeypatch.setattr(sys, "argv", ["job.py", "--name", "a b"])
    assert command_line() == shlex.join([Path(sys.executable).name, "job.py", "--name", "a b"])


def test_the_profile_method_without_a_vocab_runs_the_full_head(model_dirs, bench_inputs, tmp_path, monkeypatch):
    """With no vocab for the pair, `profile` runs what generate then runs: the profile on the full head."""
    monkeypatch.setenv("MLX_VOCABTRIM_CACHE", str(tmp_path / "cache"))
    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    save_profile(model_key(target, target), model_key(drafter, drafter), Setting(40, 2, 0.0, True, 0, 8), {})
    args = bench_args(model_dirs, bench_inputs, tmp_path / "out", "--methods", "profile", "--baseline", "2")
    at = args.index("--vocab")
    result = CliRunner().invoke(cli, [*args[:at], *args[at + 2 :], "--per-category", "1"])
    assert result.exit_code == 0, result.output
    assert "profile: full x2 (from the " in result.output and "the full head: no vocab matches" in result.output
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["head_rows"]["profile: full x2"] == 320


def test_sweep_with_repeats_writes_consistent_figures(model_dirs, bench_inputs, tmp_path):
    args = bench_args(
        model_dirs,
        bench_inputs,
        tmp_path,
        "--methods",
        "full,trim@40,trim@40+ctx,full+lookup",
        "--per-category",
        "2",
        "--repeats",
        "2",
        "--baseline",
        "2",
    )
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    names = ["target", "mlx-lm-spec@3", "mlx-lm-spec@2", "full", "trim@40", "trim@40+ctx", "full+lookup"]
    assert list(report["summary"]) == names
    rates = {n: report["summary"][n]["decode_tokens_per_s"] for n in ("mlx-lm-spec@3", "mlx-lm-spec@2")}
    assert report["baseline"] == max(rates, key=rates.get), "the faster of mlx-lm's default and the asked length"
    runs = report["runs"]
    assert len(runs) == 6 * len(names) * 2
    total = len(runs)  # off a terminal, progress is lines a log can be read by
    assert f"Benchmark: 0/{total} (0%)\n" in result.output and f"Benchmark: {total}/{total} (100%), " in result.output
    orders = {}
    for r in runs:
        orders.setdefault(r["question_id"], []).append((r["method"], r["repeat"]))
    assert all(sorted(o) == sorted((n, i) for n in names for i in range(2)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1, "the order is shuffled per question"
    for name in names:
        s = report["summary"][name]
        assert s["runs"] == 12 and s["emitted"] == report["summary"]["target"]["emitted"]
        for key in ("decode_vs_target", "decode_vs_baseline", "e2e_vs_baseline"):
            assert s[key]["low"] <= s[key]["ratio"] <= s[key]["high"], (name, key, s[key])
        assert s["mbsu"] == pytest.approx(s["tau"] / (s["c"] * s["drafter_steps_per_call"] + 1))
    base = report["summary"][report["baseline"]]
    assert base["decode_vs_baseline"]["ratio"] == pytest.approx(1.0)
    assert report["summary"]["target"]["tau"] == 1.0 and report["summary"]["target"]["drafted"] == 0
    assert report["summary"]["full+lookup"]["drafts_per_call"] > report["summary"]["full"]["drafts_per_call"]
    assert report["summary"]["trim@40+ctx"]["context_rows"] > 0
    assert report["c"]["trim@40"] < report["c"]["trim@40+ctx"] < report["c"]["full"]
    env = report["environment"]
    assert {"mlx", "mlx_lm", "device", "dtype", "blas", "cpu", "cores"} <= set(env) and env["dtype"] == "float32"
    table = (tmp_path / "bench.md").read_text()
    assert "| trim@40+ctx | 40 +" in table and "by category" in table and "bootstrap" in table
    assert "BLAS:" in result.output


def test_auto_tunes_ours_and_the_baseline_then_saves_a_profile(model_dirs, bench_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_VOCABTRIM_CACHE", str(tmp_path / "cache"))  # the profile stays with this test
    args = bench_args(
        model_dirs,
        bench_inputs,
        tmp_path,
        "--methods",
        "",
        "--k",
        "40",
        "--per-category",
        "3",
        "--auto",
        "--auto-prompts",
        "2",
    )
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    tuned = report["tune"]
    choice = Setting.of(tuned["choice"])
    assert len(settings_grid([40])) > tuned["settings_weighed"] > 300
    spec = {int(g): row["predicted_tokens_per_s"] for g, row in tuned["mlx_lm_spec"].items()}
    assert sorted(spec) == list(range(1, 13)) and tuned["mlx_lm_spec_best"] == max(spec, key=spec.get)
    # the prediction is about the choice: real runs of it on the tuning questions make the predicted rounds
    questions = {q["question_id"]: q for q in read_questions(bench_inputs / "question.jsonl", None)}
    target, tokenizer = load(str(model_dirs["target"]))
    drafter, _ = load(str(model_dirs["drafter"]))
    ranked = read_ranked_ids(bench_inputs / "v.json", tokenizer)
    if choice.k is not None:
        drafter = trimmed_copy(drafter, keep_ids(ranked, choice.k, head_rows(drafter), tokenizer))
    tokens = calls = 0
    for qid in tuned["tuning_questions"]:
        stats = SpecStats()
        prompt = chat_prompt(tokenizer, questions[qid]["prompt"], 1024)
        for token, _, _ in speculative_generate_step(
            prompt, target, drafter, max_tokens=16, stats=stats, **choice.generation_kwargs()
        ):
            tokens += 1
            if token in tokenizer.eos_token_ids:
                break
        calls += stats.target_calls
    tau = tokens / calls
    assert tau == pytest.approx(tuned["choice"]["expected_tau"], rel=0 if not choice.draft_threshold else 0.25)
    # the limits: replayed on the benchmarked questions, the choice's tau is the one the bench measured
    limits = report["limits"]
    auto = next(s for name, s in report["summary"].items() if name.startswith("auto: "))
    measured = limits["choice_tau"]["these_questions"]
    assert measured == pytest.approx(auto["tau"], rel=0 if not choice.draft_threshold else 0.25)
    assert set(limits["categories"]) == {"overall", *CATEGORIES}
    overall = limits["categories"]["overall"]
    assert overall["mlx_lm"]["vs_mlx_lm"] == 1.0 and overall["always_right"]["vs_mlx_lm"] > 1.0
    assert "Limits on these questions" in (tmp_path / "bench.md").read_text()
    names = list(report["summary"])
    assert names[:2] == ["target", "mlx-lm-spec@3"] and f"mlx-lm-spec@{max(spec, key=spec.get)}" in names
    assert report["baseline"] in ("mlx-lm-spec@3", f"mlx-lm-spec@{max(spec, key=spec.get)}")
    assert any(n.startswith("auto: ") for n in names)
    assert len(report["runs"]) == 7 * len(names), "the 2 tuning questions are not benchmarked"
    assert not set(tuned["tuning_questions"]) & {r["question_id"] for r in report["runs"]}
    assert "Saved the choice as this pair's profile" in result.output
    path = result.output.split("Saved the choice as this pair's profile: ")[-1].strip()
    profile = json.loads(open(path).read())
    assert profile["settings"]["num_draft_tokens"] == tuned["choice"]["num_draft_tokens"]
    assert profile["measured"]["environment"]["dtype"] == "float32"
    assert profile["measured"]["mlx_lm_spec_best"] == tuned["mlx_lm_spec_best"]
    assert Path(path).parent == tmp_path / "cache" / "profiles"
    # batches: passes timed per size, a choice per size 2..8 in the profile, read back by resolve
    batch = tuned["batch"]
    assert sorted(int(b) for b in batch["plain"]) == [2, 3, 4, 6, 8] and sorted(map(int, batch["taus"])) == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert sorted(int(b) for b in profile["batch_schedule"]) == list(range(2, 9))
    speculating = {int(b): tuple(e) for b, e in profile["batch_schedule"].items() if e}
    monkeypatch.setenv("MLX_VOCABTRIM_OPENBLAS", "0")
    setup = resolve_load(str(model_dirs["target"]), str(model_dirs["drafter"]))
    assert setup.schedule == speculating


def test_tuning_prompts_come_from_outside_the_benchmark(bench_inputs):
    chosen = read_questions(bench_inputs / "question.jsonl", 1)
    tuning, benched = tuning_questions(bench_inputs / "question.jsonl", chosen, 3)
    assert benched == chosen and len(tuning) == 3
    assert not {q["question_id"] for q in tuning} & {q["question_id"] for q in chosen}


def test_tuning_takes_a_question_of_every_category():
    chosen = read_questions(PACKAGED_QUESTIONS, 2)
    every, _ = tuning_questions(PACKAGED_QUESTIONS, chosen, 13)
    assert sorted(q["category"] for q in every) == sorted({q["category"] for q in chosen})
    four, _ = tuning_questions(PACKAGED_QUESTIONS, chosen, 4)
    assert len({q["category"] for q in four}) == 4 and {"writing", "summarization"} <= {q["category"] for q in four}


def test_packaged_spec_bench():
    questions = read_questions(PACKAGED_QUESTIONS, None)
    assert len(questions) == 480 and len({q["category"] for q in questions}) == 13
    assert "Apache License" in (PACKAGED_QUESTIONS.parent / "LICENSE").read_text()


@pytest.fixture(scope="module")
def replay_pair():
    target = make_model("qwen2", seed=91)
    drafter = noisy_copy(target, "qwen2", 0.03, seed=92)
    keep = list(range(0, VOCAB, 3))
    prompts = [[5, 17, 33, 90, 200, 11, 5, 17, 33], list(range(60, 80)) * 2, [7, 8, 9, 7, 8, 9, 7, 8]]
    traces = [trace(target, drafter, p, 40, set(), {len(keep): keep}) for p in prompts]
    return target, drafter, keep, prompts, traces


@pytest.mark.parametrize("seed", range(3))
def test_replay_matches_real_runs_exactly(replay_pair, seed):
    """For greedy decoding the tuner's replay gives exactly the target calls and the tokens verified of a real
    run (and the drafter steps, without a threshold), for heads with and without context rows, lookup,
    thresholds, static and adaptive lengths; its seconds are the costs of exactly those passes."""
    target, drafter, keep, prompts, traces = replay_pair
    trimmed = trimmed_copy(drafter, keep)
    verify = {n: 1.0 + 0.1 * n for n in range(1, 50)}
    costs = Costs(verify, {(None, False): 0.01, (len(keep), False): 0.01, (len(keep), True): 0.01}, {1: 0.0})
    grid = random.Random(seed).sample(settings_grid([len(keep)], costs), 40)
    assert any(s.adaptive for s in grid) and any(s.lookup_ngram for s in grid)
    for setting in grid:
        model = drafter if setting.k is None else trimmed
        for prompt, tr in zip(prompts, traces, strict=True):
            lookups = _lookups(tr, setting.lookup_ngram, 32) if setting.lookup_ngram else []
            tokens, calls, steps, seconds = replay(tr, setting, costs, {setting.lookup_ngram: lookups})
            stats = SpecStats()
            out = [
                t
                for t, _, _ in speculative_generate_step(
                    prompt, target, model, max_tokens=40, stats=stats, **setting.generation_kwargs()
                )
            ]
            assert out == tr.answer and tokens == len(out)
            assert calls == stats.target_calls, setting
            if not setting.draft_threshold:
                assert steps == stats.draft_tokens - stats.lookup_tokens, setting
                # each call verifies 1 + its drafts: 1 + 0.1 n seconds per pass over n tokens, 0.01 a step
                expected = calls * 1.1 + 0.1 * stats.draft_tokens + 0.01 * steps
                assert seconds == pytest.approx(expected), setting


@pytest.mark.parametrize("arch", ["qwen3_5", "gemma3_text"])
def test_replay_matches_real_runs_on_recurrent_and_sliding_targets(arch):
    """The replay prices a recurrent target's kept tokens fed again: its seconds are those of the passes a
    real run makes (recorded in an attention layer), with sliding windows and recurrent layers alike."""
    from archs import make_arch, noisy

    from mlx_vocabtrim.bench import _passes, counting_cache
    from mlx_vocabtrim.rollback import needs_restore

    target = make_arch(arch, seed=3, window=8)
    drafter = noisy(target, arch, 0.05, seed=4)
    prompt = [5, 17, 33, 90, 200, 11, 5, 17, 33, 7]
    tr = trace(target, drafter, prompt, 40, set(), {})
    verify = {n: float(n) for n in range(1, 50)}
    costs = Costs(verify, {(None, False): 0.0}, {1: 0.0})
    restores = (needs_restore(counting_cache(target)), needs_restore(counting_cache(drafter)))
    assert restores[0] == (arch == "qwen3_5")
    for gamma in (2, 5):
        setting = Setting(None, gamma, 0.0, False)
        _, calls, _, seconds = replay(tr, setting, costs, {}, restores)
        stats = SpecStats()
        cache = counting_cache(target) + counting_cache(drafter)
        split = len(counting_cache(target))
        out = list(
            speculative_generate_step(
                prompt, target, drafter, max_tokens=40, prompt_cache=cache, num_draft_tokens=gamma, stats=stats
            )
        )
        rounds = [n for offset, n, _ in _passes(cache[:split]) if offset + n > len(prompt) - 1]
        assert [t for t, _, _ in out] == tr.answer
        assert calls == len(rounds) and seconds == pytest.approx(sum(rounds)), (gamma, rounds)
        # the bench's counts, observed in the caches, are the generator's own
        run = run_method(Method("ours", "ours", drafter, setting), target, prompt, 40, 0.0, 1.0, set())
        assert run.tokens == tr.answer
        assert (run.target_calls, run.drafted, run.drafter_steps) == (calls, stats.draft_tokens, stats.draft_tokens)
        assert arch != "qwen3_5" or sum(rounds) > calls + sum(1 for _, _, d in out if d), "kept tokens fed again"


def test_costs_disturbed_by_load_are_refused(monkeypatch):
    """Repeats that disagree are measured again, then refused; so is a verify curve that falls."""
    from mlx_vocabtrim import tune

    durations = [1.0, 2.0, 2.0, 2.0, 2.0] * 2  # each try: the fastest 1 s, the median 2 s
    times = iter([t for d in durations for t in (0.0, d)])  # perf_counter before and after each call
    monkeypatch.setattr(tune.time, "perf_counter", lambda: next(times))
    with pytest.raises(VocabTrimError, match="disturbed by other work"):
        tune._timed(lambda: mx.array(0), "a drafter step", repeats=5, tries=2)
    steady = iter([0.0, 1.2, 0.0, 1.0] + [0.0, 1.1] * 3)  # within the spread: the fastest is taken
    monkeypatch.setattr(tune.time, "perf_counter", lambda: next(steady))
    assert tune._timed(lambda: mx.array(0), "a drafter step", repeats=5, tries=1) == 1.0
    tune.check_verify_curve({1: 0.3, 2: 0.31, 4: 0.5})
    with pytest.raises(VocabTrimError, match="over 4 tokens timed 200.0 ms"):
        tune.check_verify_curve({1: 0.3, 2: 0.31, 4: 0.2})


def test_a_verify_curve_disturbed_once_is_measured_again(monkeypatch):
    """A slow spell during one point (3 tokens timed above 4): the curve is measured again and each point's
    fastest kept; a point slow every time is refused."""
    import re

    from mlx_vocabtrim import tune

    target = make_model("qwen2", seed=91)
    tries: dict[int, int] = {}

    def timed(spell: int | None):
        def fake(fn, what, repeats=5, tries_=3):
            found = re.search(r"target pass over (\d+) tokens$", what)
            if not found:
                return 0.01
            n = int(found[1])
            tries[n] = tries.get(n, 0) + 1
            slow = n == 3 and (spell is None or tries[n] <= spell)
            return 1.0 if slow else 0.1 * n + 0.01 * (tries[n] - 1)

        return fake

    monkeypatch.setattr(tune, "_timed", timed(1))
    costs = tune.measure_costs(target, {None: target}, list(range(40)), 6)
    assert tries[3] == 2 and costs.verify[3] == pytest.approx(0.31) and costs.verify[4] == pytest.approx(0.4)
    tries.clear()
    monkeypatch.setattr(tune, "_timed", timed(None))
    with pytest.raises(VocabTrimError, match="over 4 tokens timed 400.0 ms, below 1000.0 ms"):
        tune.measure_costs(target, {None: target}, list(range(40)), 6)
    assert tries[3] == tune.CURVE_TRIES


def test_measured_costs_are_a_curve_the_replay_can_use():
    """On a real tiny pair: a target pass over more tokens costs at least as much, every head has its
    step, and the relative costs adaptive lengths weigh come out of them."""
    from mlx_vocabtrim.tune import measure_costs

    target = make_model("qwen2", seed=91)
    drafter = noisy_copy(target, "qwen2", 0.03, seed=92)
    keep = list(range(0, VOCAB, 3))
    costs = measure_costs(target, {None: drafter, len(keep): trimmed_copy(drafter, keep)}, list(range(40)), 12)
    points = sorted(costs.verify)
    assert points[0] == 1 and points[-1] == 12
    assert all(costs.verify[a] <= costs.verify[b] for a, b in zip(points, points[1:], strict=False))
    assert set(costs.draft) == {(None, False), (len(keep), False), (len(keep), True)}
    assert all(t > 0 for t in costs.draft.values()) and set(costs.feed) == {1, 4, 16}
    step, token = costs.relative(len(keep), False)
    assert step == pytest.approx(costs.draft[(len(keep), False)] / costs.verify[1], abs=1e-3) and token >= 0


def _interrupt_on(monkeypatch, when):
    """Make bench.run_method raise when `when(calls)` is true; returns the list of method names called."""
    import mlx_vocabtrim.bench as b

    real, calls = b.run_method, []

    def run_method(method, *args, **kwargs):
        calls.append(method.name)
        if when(calls):
            raise RuntimeError("killed")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(b, "run_method", run_method)
    return calls


def test_an_interrupted_bench_resumes_where_it_stopped(model_dirs, bench_inputs, tmp_path, monkeypatch):
    args = bench_args(
        model_dirs,
        bench_inputs,
        tmp_path,
        "--methods",
        "trim@40",
        "--per-category",
        "2",
        "--baseline",
        "2",
        "--repeats",
        "2",
    )
    with monkeypatch.context() as m:  # 4 warm-ups, then killed at the 7th run: 6 runs are logged
        _interrupt_on(m, lambda calls: len(calls) == 4 + 7)
        assert CliRunner().invoke(cli, args).exit_code != 0
    log = tmp_path / "bench.partial.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 6 and not (tmp_path / "bench.json").exists()
    log.write_text("\n".join(lines) + '\n{"run": {"method": "tar')  # a line torn by the kill
    calls = _interrupt_on(monkeypatch, lambda calls: False)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "6 runs done" in result.output and len(calls) == 4 + 48 - 6
    progress = [line for line in result.output.splitlines() if line.startswith("Benchmark: ")]
    assert progress[0] == "Benchmark: 6/48 (12%), 6 done before" and progress[-1].startswith("Benchmark: 48/48 (100%)")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert len(report["runs"]) == 48 and not log.exists()
    logged = {
        (r["question_id"], r["method"], r["repeat"]): r["seconds"]
        for r in (json.loads(line)["run"] for line in lines[1:])
    }
    assert all(
        r["seconds"] == logged[(r["question_id"], r["method"], r["repeat"])]
        for r in report["runs"]
        if (r["question_id"], r["method"], r["repeat"]) in logged
    )
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "holds a finished bench: pass --force" in again.output


def test_an_interrupted_auto_bench_keeps_its_tuning(model_dirs, bench_inputs, tmp_path, monkeypatch):
    args = bench_args(
        model_dirs,
        bench_inputs,
        tmp_path,
        "--methods",
        "",
        "--k",
        "40",
        "--per-category",
        "2",
        "--auto",
        "--auto-prompts",
        "2",
        "--no-save-profile",
    )
    with monkeypatch.context() as m:  # killed at the second benchmarked question, after tuning
        _interrupt_on(m, lambda calls: calls.count("target") == 3)
        assert CliRunner().invoke(cli, args).exit_code != 0
    tuned = json.loads((tmp_path / "bench.partial.jsonl").read_text().splitlines()[1])["tune"]
    import mlx_vocabtrim.bench as b

    monkeypatch.setattr(b, "_tune", lambda *a, **k: pytest.fail("tuning ran again"))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bench.json").read_text())["tune"]["choice"] == tuned["choice"]


def test_a_leftover_bench_with_other_settings_is_refused(model_dirs, bench_inputs, tmp_path):
    (tmp_path / "bench.partial.jsonl").write_text('{"config": {"max_tokens": 5}}\n')
    result = CliRunner().invoke(cli, bench_args(model_dirs, bench_inputs, tmp_path, "--baseline", "2"))
    assert result.exit_code == 1 and "unfinished bench with other settings" in result.output
    assert "Traceback" not in result.output


def test_a_mismatch_fails_loudly():
    def run(method, tokens):
        return Run(method, "c", 1, 0, 5, len(tokens), 1.0, 2, 0.5, 2, 0, 0, 0, 0, tokens)

    mismatch = check_lossless([run("target", [1, 2, 3]), run("trim@8", [1, 2, 4])])
    assert "trim@8 (repeat 0) differs from the target on question 1 at token 2" in mismatch
    assert check_lossless([run("target", [1, 2, 3]), run("trim@8", [1, 2, 3])]) is None


def test_step_bytes_leave_out_the_input_embedding_and_the_kept_full_head():
    model = make_model("qwen2", seed=51)
    full = step_bytes(model)
    assert full == sum(v.nbytes for k, v in _flat(model) if not k.startswith("model.embed_tokens"))
    assert full - step_bytes(trimmed_copy(model, list(range(20)))) == (320 - 20) * 64 * 4


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


@pytest.mark.parametrize("arch", ["qwen3_5", "gemma3_text"])
def test_tune_on_hybrid_and_sliding_targets_predicts_the_rounds_it_chose(arch):
    """`tune` on a recurrent target (kept tokens fed again, priced) and a sliding-window one: it times
    the steps with exact rollback, and its choice, run for real, makes the rounds it predicted."""
    from archs import make_arch, noisy

    from mlx_vocabtrim.tune import tune

    target = make_arch(arch, seed=3, window=8)
    drafter = noisy(target, arch, 0.05, seed=4)
    prompts = [[5, 17, 33, 90, 200, 11, 5, 17, 33, 7], [7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8, 9]]
    keep = list(range(0, VOCAB, 2))
    result = tune(target, drafter, prompts, 24, set(), {len(keep): keep})
    assert result["restores"][0] == (arch == "qwen3_5")
    choice = Setting.of(result["choice"])
    model = drafter if choice.k is None else trimmed_copy(drafter, keep)
    tokens = calls = 0
    for prompt in prompts:
        stats = SpecStats()
        tokens += len(
            list(
                speculative_generate_step(
                    prompt, target, model, max_tokens=24, stats=stats, **choice.generation_kwargs()
                )
            )
        )
        calls += stats.target_calls
    expected = result["choice"]["expected_tau"]
    assert tokens / calls == pytest.approx(expected, rel=0 if not choice.draft_threshold else 0.25)
