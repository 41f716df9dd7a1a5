"""The Spec-Bench harness on tiny models: every method lossless, figures consistent, auto-tuning runs."""

import json

import pytest
from click.testing import CliRunner
from conftest import make_model

from mlx_vocabtrim import VocabTrimError
from mlx_vocabtrim.bench import (
    GAMMAS,
    THRESHOLDS,
    Run,
    accepted_runs,
    check_lossless,
    draft_length,
    predict,
    read_questions,
    step_bytes,
    tuning_questions,
)
from mlx_vocabtrim.cli import cli
from mlx_vocabtrim.trim import trimmed_copy

CATEGORIES = ["coding", "writing", "math"]


@pytest.fixture(scope="module")
def bench_inputs(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    lines = [
        json.dumps(
            {"question_id": i, "category": CATEGORIES[i % 3], "turns": [f"Question {i}: add {i} and x.", "more"]}
        )
        for i in range(9)
    ]
    (root / "question.jsonl").write_text("\n".join(lines))
    text = root / "calib.txt"
    text.write_text("Question add and x. def add(a, b): return a + b")
    result = CliRunner().invoke(cli, ["calibrate", "--model", str(model_dirs["target"]), "--source", "dataset",
                                      "--data", str(text), "--out", str(root / "v.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def bench_args(model_dirs, root, out, *extra):
    return ["bench", "--model", str(model_dirs["target"]), "--draft-model", str(model_dirs["drafter"]),
            "--vocab", str(root / "v.json"), "--questions", str(root / "question.jsonl"), "--max-tokens", "16",
            "--out", str(out), *extra]  # fmt: skip


def test_sweep_writes_consistent_figures(model_dirs, bench_inputs, tmp_path):
    result = CliRunner().invoke(
        cli, bench_args(model_dirs, bench_inputs, tmp_path, "--k", "40,100", "--per-category", "2")
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    methods = ["target", "mlx-lm-spec@3", "full", "trim@40", "trim@100"]
    assert list(report["summary"]) == methods
    assert len(report["runs"]) == 6 * len(methods)
    # interleaved prompt by prompt: methods alternate within each question
    assert [r["method"] for r in report["runs"][:5]] == methods
    assert set(report["categories"]) == set(CATEGORIES)
    target = report["summary"]["target"]
    assert target["tau"] == 1.0 and target["speedup_vs_target"] == 1.0 == target["e2e_speedup_vs_target"]
    for run in report["runs"]:  # decode excludes prefill and the first round, never counts more than it times
        assert 0 < run["decode_tokens"] < run["new_tokens"] and 0 < run["decode_seconds"] < run["seconds"]
    for name in methods[1:]:
        s = report["summary"][name]
        assert s["speedup_vs_mlx_lm_spec"] == pytest.approx(
            s["decode_tokens_per_s"] / report["summary"]["mlx-lm-spec@3"]["decode_tokens_per_s"]
        )
        assert s["tokens"] == target["tokens"], "same greedy output, same length"
        assert 1.0 <= s["tau"] <= 4.0 and 0 <= s["acceptance"] <= 1
        assert s["mbsu"] == pytest.approx(s["tau"] / (s["c"] * s["drafts_per_call"] + 1))
    assert report["c"]["trim@40"] < report["c"]["trim@100"] < report["c"]["full"]
    assert report["head_bytes"]["trim@40"] == 40 * 64 * 4
    env = report["environment"]
    assert {"mlx", "device", "dtype", "blas", "cpu", "cores"} <= set(env) and env["dtype"] == "float32"
    table = (tmp_path / "bench.md").read_text()
    assert "| trim@40 | 40 | 3 |" in table and "by category" in table
    assert "BLAS:" in result.output


def test_auto_picks_and_confirms(model_dirs, bench_inputs, tmp_path):
    args = bench_args(
        model_dirs, bench_inputs, tmp_path, "--k", "40", "--per-category", "3", "--auto", "--auto-prompts", "2",
        "--num-draft-tokens", "2",
    )  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    auto = report["auto"]
    choice = auto["choice"]
    assert choice["k"] in (40, 320) and choice["num_draft_tokens"] in GAMMAS
    assert len(auto["table"]) == 2 * len(GAMMAS) * len(THRESHOLDS) and auto["rounds"] > 0
    best = max(row["predicted_tokens_per_s"] for row in auto["table"])
    assert choice["predicted_tokens_per_s"] == best
    for row in auto["table"]:  # the speed model (`predict`, tested below) from the measured step times
        assert 1 <= row["expected_tau"] <= row["num_draft_tokens"] + 1 and row["predicted_tokens_per_s"] > 0
    names = list(report["summary"])
    assert names[:3] == ["target", "mlx-lm-spec@3", "mlx-lm-spec@2"], "the anchor at mlx-lm's default comes first"
    assert auto["method"] in names and names[3:5] == ["full", "trim@40"]
    assert auto["method"] in ("full", "trim@40") or auto["method"].startswith(("auto: trim@40 x", "auto: full x"))
    assert report["summary"]["target"]["speedup_vs_mlx_lm_spec"] == pytest.approx(
        report["summary"]["target"]["decode_tokens_per_s"] / report["summary"]["mlx-lm-spec@3"]["decode_tokens_per_s"]
    )
    assert len(report["runs"]) == 7 * len(names), "the 2 tuning prompts are not in the confirmation"
    assert not set(auto["tuning_questions"]) & {r["question_id"] for r in report["runs"]}


def test_tuning_prompts_come_from_outside_the_benchmark(bench_inputs):
    chosen = read_questions(bench_inputs / "question.jsonl", 1)
    tuning, benched = tuning_questions(bench_inputs / "question.jsonl", chosen, 3)
    assert benched == chosen and len(tuning) == 3
    assert not {q["question_id"] for q in tuning} & {q["question_id"] for q in chosen}


def test_tau_of_every_k_and_gamma_from_one_long_draft_run():
    # rounds at gamma 4: accepted [5, 6, 7, 8] (all), [5, 9] then a rejection, [] (first draft rejected)
    tokens = [5, 6, 7, 8, 1, 5, 9, 2, 3]
    from_draft = [True, True, True, True, False, True, True, False, False]
    accepted = accepted_runs(tokens + [4], from_draft + [True])  # an unfinished last round is dropped
    assert accepted == [[5, 6, 7, 8], [5, 9], []]
    rounds = list(zip(accepted, [[0.9, 0.8, 0.7, 0.6], [0.9, 0.5, 0.2, 0.1], [0.3, 0.1, 0.05, 0.01]], strict=True))
    t_verify = {n: 1.0 for n in range(1, 6)}

    def tau(kept, gamma, threshold=0.0):
        return predict(rounds, kept, gamma, threshold, 0.1, t_verify)[0]

    assert tau(None, 4) == pytest.approx(1 + (4 + 2 + 0) / 3)
    assert tau(None, 1) == pytest.approx(1 + (1 + 1 + 0) / 3)
    # a head without 7: the first round stops before 7; without 5 every round stops at once
    assert tau({5, 6, 8, 9}, 4) == pytest.approx(1 + (2 + 2 + 0) / 3)
    assert tau({6, 7, 8, 9}, 4) == 1.0
    # threshold 0.4: drafting stops at the first running confidence below it (that draft counts)
    assert [draft_length(c, 4, 0.4) for _, c in rounds] == [4, 3, 1]
    assert tau(None, 4, 0.4) == pytest.approx(1 + (4 + 2 + 0) / 3)
    _, speed = predict(rounds, None, 4, 0.4, 0.1, t_verify)
    assert speed == pytest.approx((5 + 3 + 1) / (4 * 0.1 + 3 * 0.1 + 1 * 0.1 + 3 * 1.0))


def test_a_mismatch_fails_loudly():
    runs = [Run("target", "c", 1, 5, 3, 1.0, 3, 0, 0, [1, 2, 3]), Run("trim@8", "c", 1, 5, 3, 1.0, 2, 3, 1, [1, 2, 4])]
    with pytest.raises(VocabTrimError, match="trim@8 differs from the target on question 1 at token 2"):
        check_lossless(runs)


def test_model_of_speed_and_bytes():
    # fixed length: tau over one round's time, gamma drafter steps plus a pass over gamma + 1 tokens
    rounds = [([7, 7, 7], [1.0] * 3), ([], [1.0] * 3)]
    assert predict(rounds, None, 3, 0.0, 0.1, {4: 1.0}) == pytest.approx((2.5, 2.5 / 1.3))
    model = make_model("qwen2", seed=51)
    full = step_bytes(model)
    # the input embedding (320 x 64 floats) is not read whole, so it is not counted
    assert full == sum(v.nbytes for k, v in _flat(model) if not k.startswith("model.embed_tokens"))
    assert full - step_bytes(trimmed_copy(model, list(range(20)))) == (320 - 20) * 64 * 4


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_bad_questions(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"category": "x"}\n')
    with pytest.raises(VocabTrimError, match="line 1 is not a Spec-Bench question"):
        read_questions(tmp_path / "q.jsonl", 2)
    with pytest.raises(VocabTrimError, match="does not exist"):
        read_questions(tmp_path / "none.jsonl", 2)


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
    args = bench_args(model_dirs, bench_inputs, tmp_path, "--k", "40", "--per-category", "2")
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
    assert "6 runs done" in result.output and len(calls) == 4 + 24 - 6
    report = json.loads((tmp_path / "bench.json").read_text())
    assert len(report["runs"]) == 24 and not log.exists()
    logged = [json.loads(line)["run"] for line in lines[1:]]
    assert [r["seconds"] for r in report["runs"][:6]] == [r["seconds"] for r in logged]


def test_an_interrupted_auto_bench_keeps_its_choice(model_dirs, bench_inputs, tmp_path, monkeypatch):
    args = bench_args(model_dirs, bench_inputs, tmp_path, "--k", "40", "--per-category", "2", "--auto")
    with monkeypatch.context() as m:  # killed at the second benchmarked question, after tuning
        _interrupt_on(m, lambda calls: calls.count("target") == 3)
        assert CliRunner().invoke(cli, args).exit_code != 0
    tuned = json.loads((tmp_path / "bench.partial.jsonl").read_text().splitlines()[1])["auto"]
    calls = _interrupt_on(monkeypatch, lambda calls: False)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "full@6" not in calls, "the tuning is not run again"
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["auto"]["choice"] == tuned["choice"]


def test_a_leftover_bench_with_other_settings_is_refused(model_dirs, bench_inputs, tmp_path):
    (tmp_path / "bench.partial.jsonl").write_text('{"config": {"max_tokens": 5}}\n')
    result = CliRunner().invoke(cli, bench_args(model_dirs, bench_inputs, tmp_path, "--k", "40"))
    assert result.exit_code == 1 and "unfinished bench with other settings" in result.output
    assert "Traceback" not in result.output


def test_adaptive_drafting_in_the_sweep(model_dirs, bench_inputs, tmp_path):
    args = bench_args(model_dirs, bench_inputs, tmp_path, "--k", "40", "--per-category", "1",
                      "--num-draft-tokens", "5", "--draft-threshold", "0.01")  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output  # greedy outputs checked against the target
    report = json.loads((tmp_path / "bench.json").read_text())
    full, spec = report["summary"]["full"], report["summary"]["mlx-lm-spec@5"]
    assert full["draft_threshold"] == 0.01 and spec["draft_threshold"] == 0.0
    assert full["drafts_per_call"] < 5 == spec["drafts_per_call"], "the threshold cut some rounds short"
    assert f"| full | 320 | <= 5, {full['drafts_per_call']:.2f} mean |" in (tmp_path / "bench.md").read_text()


def test_draft_threshold_out_of_range_is_refused(model_dirs, bench_inputs, tmp_path):
    result = CliRunner().invoke(cli, bench_args(model_dirs, bench_inputs, tmp_path, "--draft-threshold", "-0.1"))
    assert result.exit_code == 1 and "--draft-threshold -0.1 is out of range" in result.output
    assert "Traceback" not in result.output
