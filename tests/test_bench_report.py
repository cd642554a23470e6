"""The bench's report step (benchmarks/run.py run_bench with report_only): it re-renders RESULTS.md,
the plots and the README block from results.json and leaves the trust measurement alone."""
import shutil
from pathlib import Path

from benchmarks import report, run, serve_load

REPO = Path(__file__).resolve().parents[1]


def test_a_report_only_run_keeps_the_trust_files_of_a_later_measurement(tmp_path, monkeypatch):
    shutil.copy(REPO / "benchmarks" / "results.json", tmp_path / "results.json")
    later = {"TRUST.md": "# a later `python -m benchmarks.trust` run\n", "trust.json": '{"later": true}\n'}
    for name, text in later.items():
        (tmp_path / name).write_text(text)
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    monkeypatch.setattr(run, "update_readme", lambda results: report.update_readme(results, readme))

    text = run.run_bench("unused", tmp_path, 1, 1.0, tmp_path, report_only=True)

    assert (tmp_path / "RESULTS.md").read_text() == text and "| " in text
    assert {name: (tmp_path / name).read_text() for name in later} == later


def test_the_figures_name_the_command_that_reproduces_them():
    assert run.bench_command("../shared/mnist", run.DEFAULT_REPEATS, run.DEFAULT_SERVE_SECONDS) == \
        "make bench DATA_DIR=../shared/mnist"
    assert run.bench_command("d", 1, 5.0) == "python -m benchmarks.run --data-dir d --repeats 1 --serve-seconds 5"


def test_the_front_door_rows_are_measured_forwards_then_backwards():
    """A machine that drifts (Java still getting faster) favoured the row measured last in each round:
    direct, always. Forwards then backwards, every row's mean position in time is the same."""
    rows = list(serve_load.FRONT_DOOR_ROWS)
    order = [row for index in range(serve_load.FRONT_DOOR_ROUNDS) for row in serve_load.round_order(rows, index)]
    assert order[:3] == rows and order[3:6] == rows[::-1]
    positions = {row: [i for i, measured in enumerate(order) if measured == row] for row in rows}
    assert len({sum(p) / len(p) for p in positions.values()}) == 1, positions


def test_a_front_door_row_reports_its_rounds_median_latency_not_one_pause():
    """One stall of the machine lifts one 5 s run's p99 by tens of ms; the highest of the rounds
    (what a row reported before) was that stall. Rates are the rounds' mean, requests their sum."""
    rounds = [serve_load.LoadResult(16, 5.0, requests, rate, {"p50": 13.0 + i, "p99": p99}, 0, 0)
              for i, (requests, rate, p99) in enumerate([(5000, 1000.0, 30.0), (6000, 1200.0, 90.0),
                                                         (5500, 1100.0, 31.0), (5400, 1080.0, 29.0)])]
    row = serve_load.merged(rounds)
    assert row.latency_ms == {"p50": 14.5, "p99": 30.5}
    assert (row.requests, row.requests_per_s, row.duration_s) == (21900, 1095.0, 20.0)
