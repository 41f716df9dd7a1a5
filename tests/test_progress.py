"""Progress off a terminal (a log file, a pipe): lines a long run's log can be read by, not click's bare label."""

import mlx_vocabtrim.progress as progress_module
from mlx_vocabtrim.progress import duration, progress


def test_off_a_terminal_progress_is_lines_with_the_time_left(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    with progress(10, "Benchmark", show=lambda item: f"last: {item}" if item else None) as bar:
        assert capsys.readouterr().err == "Benchmark: 0/10 (0%)\n"
        clock[0] += 5
        bar.update(1)
        assert capsys.readouterr().err == "", "at most one line every LINE_EVERY seconds"
        clock[0] += 35
        bar.update(1, current_item="q81")
        assert capsys.readouterr().err == "Benchmark: 2/10 (20%), 40 s so far, about 3 min left, last: q81\n"
        clock[0] += 1
        bar.update(8)
        assert capsys.readouterr().err == "Benchmark: 10/10 (100%), 41 s so far\n", "the last step always shows"
    assert bar.pos == 10  # what convert's callback reads, as on click's bar


def test_a_resumed_run_starts_at_its_done_steps_and_times_only_the_rest(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    with progress(10, "Calibrating", done=6) as bar:
        assert capsys.readouterr().err == "Calibrating: 6/10 (60%), 6 done before\n"
        clock[0] += 40
        bar.update(2)  # 2 steps in 40 s: 2 left take about 40 s more, whatever the 6 done before took
        assert capsys.readouterr().err == "Calibrating: 8/10 (80%), 40 s so far, about 40 s left\n"
        clock[0] += 1
        bar.update(2)
        assert capsys.readouterr().err == "Calibrating: 10/10 (100%), 41 s so far\n"


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (4.2, 59, 61, 3599, 3600, 11100)] == [
        "4 s",
        "59 s",
        "1 min",
        "1 h 00 min",
        "1 h 00 min",
        "3 h 05 min",
    ]
