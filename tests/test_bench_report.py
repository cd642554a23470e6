"""The bench's report step (benchmarks/run.py run_bench with report_only): it re-renders RESULTS.md,
the plots and the README block from results.json and leaves the trust measurement alone."""
import shutil
from pathlib import Path

import pytest

from benchmarks import front_door, report, run, serve_load

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
    rows = list(front_door.FRONT_DOOR_ROWS)
    order = [row for index in range(front_door.FRONT_DOOR_ROUNDS) for row in front_door.round_order(rows, index)]
    assert order[:3] == rows and order[3:6] == rows[::-1]
    positions = {row: [i for i, measured in enumerate(order) if measured == row] for row in rows}
    assert len({sum(p) / len(p) for p in positions.values()}) == 1, positions


def test_a_front_door_row_reports_its_rounds_median_latency_not_one_pause():
    """One stall of the machine lifts one 5 s run's p99 by tens of ms; the highest of the rounds
    (what a row reported before) was that stall. Rates are the rounds' mean, requests their sum."""
    rounds = [serve_load.LoadResult(16, 5.0, requests, rate, {"p50": 13.0 + i, "p99": p99}, 0, 0)
              for i, (requests, rate, p99) in enumerate([(5000, 1000.0, 30.0), (6000, 1200.0, 90.0),
                                                         (5500, 1100.0, 31.0), (5400, 1080.0, 29.0)])]
    row = front_door.merged(rounds)
    assert row.latency_ms == {"p50": 14.5, "p99": 30.5}
    assert (row.requests, row.requests_per_s, row.duration_s) == (21900, 1095.0, 20.0)


def test_the_front_doors_cost_pairs_each_round_so_one_stalled_run_moves_one_round_not_the_figure():
    """Each round measures the three rows within seconds of one another: its own cost compares them on
    one state of the machine. A stall in one front-door run (700 req/s below) lifted the ratio of
    the rows' means from ~8% to ~14%; the rounds' median cost stays at what the other rounds show."""
    direct = [1400.0, 1400.0, 1300.0, 1300.0, 1450.0, 1450.0]
    http = [1300.0, 1290.0, 1200.0, 700.0, 1340.0, 1330.0]
    tls = [1280.0, 1270.0, 1190.0, 1180.0, 1330.0, 1320.0]
    assert round(front_door.paired_cost(http, direct), 3) == 0.078
    rows = {name: {"requests_per_s": sum(rates) / len(rates), "round_rates": rates,
                   "latency_ms": {"p50": 12.0, "p99": 25.0}, "non_2xx": 0, "socket_errors": 0}
            for name, rates in zip(front_door.FRONT_DOOR_ROWS, (http, tls, direct))}
    text = report.front_door_cost(rows)
    assert "HTTP 8% (rounds: 7% 8% 8% 46% 8% 8%) of requests/s" in text, text
    assert "TLS 9% (rounds: " in text, text
    # Rows of an older make bench (no rounds kept): the ratio of the rows' means, said so.
    older = {name: {key: value for key, value in row.items() if key != "round_rates"} for name, row in rows.items()}
    assert "HTTP 14% of requests/s" in report.front_door_cost(older)
    with pytest.raises(ValueError):
        front_door.paired_cost(http, direct[:4])


def test_a_front_door_row_charges_its_cpu_per_request_and_keeps_the_machines_idle_share():
    """Where the proxy's cost goes (issue 27: find it by measurement): each row's CPU time per
    request by process kind and the share of the machine's core time left idle, summed over its
    rounds, written into results.json and RESULTS.md beside the cost."""
    kinds = front_door.PROCESS_KINDS
    runs = [serve_load.LoadResult(16, 5.0, 5000, 1000.0, {"p50": 12.0, "p99": 25.0}, 0, 0),
            serve_load.LoadResult(16, 5.0, 7000, 1400.0, {"p50": 11.0, "p99": 24.0}, 0, 0)]
    samples = [front_door.CpuSample(dict(zip(kinds, (0.4, 1.0, 5.0, 0.1))), idle_s=0.5, machine_s=10.0),
               front_door.CpuSample(dict(zip(kinds, (0.56, 1.4, 7.0, 0.1))), idle_s=0.7, machine_s=10.0)]
    row = front_door.measured_row(runs, samples)
    assert row.round_rates == (1000.0, 1400.0)
    assert {kind: round(ms, 3) for kind, ms in row.cpu.ms_per_request.items()} == \
        {"nginx": 0.08, "TorchServe Java": 0.2, "TorchServe workers": 1.0, "wrk": 0.017}
    assert round(row.cpu.idle_share, 3) == 0.06
    saved = row.as_json()
    assert saved["requests"] == 12000 and saved["round_rates"] == [1000.0, 1400.0]
    rows = {name: saved for name in front_door.FRONT_DOOR_ROWS}
    text = report.front_door_cost(rows)
    assert "front door, HTTP: nginx 0.08, TorchServe Java 0.20, TorchServe workers 1.00, wrk 0.02 ms a request; " \
           "machine idle 6.0%" in text, text
