"""`make bench`'s writing: RESULTS.md, the plots and the README's bench block, from results.json
(benchmarks/run.py measures; `python -m benchmarks.run --report-only` rewrites from the file)."""
from __future__ import annotations

import re
from pathlib import Path

from .front_door import FRONT_DOOR_ROWS, cost_text, cpu_text
from .serve_load import ENGINE_ROWS
from .trust import readme_lines as trust_readme_lines
from .workloads import (BATCH_SIZES, DEFAULT, FORWARD_MFLOP, MANY_CLIENTS, MNIST_TRAIN_IMAGES, OURS_TRAIN_IMAGES,
                        TEXTBOOK, TEXTBOOK_TRAIN_IMAGES, TRAIN_MFLOP)

HERE = Path(__file__).resolve().parent


def load_table(heading: str, first_column: str, rows: dict, closing: str) -> list[str]:
    """A wrk load step's rows (front door, engines) as a markdown table under heading."""
    lines = [heading, "", f"| {first_column} | requests/s | p50 ms | p99 ms | non-2xx | socket errors |",
             "|---|---:|---:|---:|---:|---:|"]
    for row, run in rows.items():   # a results.json of an older make bench may name other rows
        lines.append(f"| {row} | {run['requests_per_s']:.0f} | {run['latency_ms'].get('p50', 0):.1f} | "
                     f"{run['latency_ms'].get('p99', 0):.1f} | {run['non_2xx']} | {run['socket_errors']} |")
    return lines + ["", closing, ""] if closing else lines + [""]


def load_summary(label: str, rows: dict, closing: str) -> list[str]:
    """The same rows as one README line: requests/s, p50 and p99 per row."""
    return [f"| {label}: " + " / ".join(rows) + " | " +
            " / ".join(f"{run['requests_per_s']:.0f} req/s (p50 {run['latency_ms'].get('p50', 0):.1f} ms, "
                       f"p99 {run['latency_ms'].get('p99', 0):.1f} ms)" for run in rows.values()) +
            (f"; {closing}" if closing else "") + " |"]


FRONT_DOOR_HEADING = f"## Front door (`make fleet`: nginx in front of 2 replicas; wrk, {MANY_CLIENTS} keep-alive clients)"
ENGINES_HEADING = (f"## Engines (docs/engines.md: the same TorchScript file; wrk, {MANY_CLIENTS} keep-alive clients, "
                   "one engine after the other)")


def front_door_table(results: dict) -> list[str]:
    rows = results.get("front_door")
    return load_table(FRONT_DOOR_HEADING, "path", rows, front_door_cost(rows)) if rows else []


def front_door_cost(rows: dict) -> str:
    """The proxy's cost at equal serving capacity (issue 27's target: <= 15% of throughput and
    <= 5 ms of p99 at 16 clients, HTTP and TLS)."""
    direct = rows.get(FRONT_DOOR_ROWS[2])
    if direct is None or any(row not in rows for row in FRONT_DOOR_ROWS[:2]):   # an older make bench's rows
        return "Direct: one replica of the same fleet, its other replica idle."
    paired = all(rows[row].get("round_rates") for row in FRONT_DOOR_ROWS)   # older rows: the means' ratio
    how = ("the median of the rounds' own costs (each round measures the three rows within seconds of one "
           "another)" if paired else "from the rows' requests/s")
    return "Direct: the same replicas called without nginx, the clients spread evenly over them (one wrk each; " \
           "p50/p99: the higher replica's). Each row: rounds in turn, forwards and backwards; requests/s their " \
           f"mean, p50/p99 their median. The front door's cost, {how}: " + "; ".join(
        f"{row.split(', ')[1]} {row_cost(rows[row], direct, paired)} of requests/s, "
        f"{rows[row]['latency_ms'].get('p99', 0) - direct['latency_ms'].get('p99', 0):+.1f} ms p99"
        for row in FRONT_DOOR_ROWS[:2]) + "." + front_door_cpu(rows)


def front_door_cpu(rows: dict) -> str:
    """Where each row's CPU went (rows of an older make bench have no CPU: nothing said)."""
    if not all("cpu" in rows[row] for row in FRONT_DOOR_ROWS):
        return ""
    return (" CPU time per request by process (from each process's CPU time around the runs) and the share of "
            "the machine's core time left idle: " + "; ".join(f"{row}: {cpu_text(rows[row]['cpu'])}"
                                                               for row in FRONT_DOOR_ROWS) + ".")


def row_cost(row: dict, direct: dict, paired: bool) -> str:
    if paired:
        return cost_text(row["round_rates"], direct["round_rates"])
    return f"{1 - row['requests_per_s'] / direct['requests_per_s']:.0%}"


def front_door_summary(results: dict) -> list[str]:
    rows = results.get("front_door")
    return load_summary(f"{MANY_CLIENTS} clients", rows, "") if rows else []


def engines_table(results: dict) -> list[str]:
    rows = results.get("engines")
    return load_table(ENGINES_HEADING, "engine", rows, engines_comparison(rows)) if rows else []


def engines_comparison(rows: dict) -> str:
    """The KServe engine's requests/s against TorchServe's, as a ratio: faster or slower, by how much."""
    if any(row not in rows for row in ENGINE_ROWS):
        return ""
    torchserve, kserve = (rows[row]["requests_per_s"] for row in ENGINE_ROWS)
    if not torchserve:
        return ""
    return (f"The KServe engine answers {kserve / torchserve:.2f}x TorchServe's requests/s "
            f"({'faster' if kserve > torchserve else 'slower'}; why: docs/engines.md).")


def engines_summary(results: dict) -> list[str]:
    rows = results.get("engines")
    return load_summary(f"{MANY_CLIENTS} clients, same TorchScript file", rows, engines_comparison(rows)) if rows else []


def plot(results: dict, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, by_batch in results["inference"].items():
        sizes = [int(b) for b in by_batch]
        axis.plot(sizes, [by_batch[str(b)]["median"] for b in sizes], marker="o", label=name)
    axis.set(xscale="log", xlabel="batch size", ylabel="images/s (median)", title=f"Inference throughput, {results['machine']['cores']} CPU cores")
    axis.set_xticks(list(BATCH_SIZES), [str(b) for b in BATCH_SIZES])
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "inference_throughput.png", dpi=120)
    written.append("inference_throughput.png")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, entry in results["serving"].items():
        run = next(r for r in entry["runs"] if r["connections"] == MANY_CLIENTS)
        points = sorted((float(p[1:]), v) for p, v in run["latency_ms"].items())
        axis.plot([p for p, _ in points], [v for _, v in points], marker="o",
                  label=f"{name.split(':')[0]} ({run['requests_per_s']:.0f} req/s)")
    axis.set(xlabel="percentile", ylabel="latency ms", yscale="log",
             title=f"TorchServe latency under load ({MANY_CLIENTS} keep-alive clients)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "serving_latency.png", dpi=120)
    written.append("serving_latency.png")

    curve = results.get("training_curve")
    if curve:
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        wall = [p["wall_s"] for p in curve["curve"]]
        left.plot(wall, [100 * p["test_acc"] for p in curve["curve"]], marker="o")
        left.set(xlabel="wall time s", ylabel="test accuracy %", title="make train: test accuracy")
        left.axhline(99.5, color="grey", linestyle=":")
        right.plot(wall, [p["train_loss"] for p in curve["curve"]], marker="o", label="train")
        right.plot(wall, [p["test_loss"] for p in curve["curve"]], marker="o", label="test")
        right.set(xlabel="wall time s", ylabel="cross-entropy", yscale="log", title="loss")
        right.legend()
        for axis in (left, right):
            axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out_dir / "training_curves.png", dpi=120)
        written.append("training_curves.png")
    return written


def markdown(results: dict) -> str:
    m = results["machine"]
    fp32_peak = m["gemm_gflops"]["float32"]["median"]
    bf16_peak = m["gemm_gflops"]["bfloat16"]["median"]
    lines = [f"# Benchmark results ({results['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (flags: {' '.join(m.get('cpu_flags', [])) or 'n/a'}), "
             f"torch {m['torch']}. Measured GEMM (1024^2, "
             f"{m['cores']} threads): fp32 {fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s.",
             f"Reproduce: `{results['command']}`. Figures are min / median / max over "
             f"{results['repeats']} runs unless noted.", "", f"## Training (one epoch = {MNIST_TRAIN_IMAGES:,} images)", "",
             "| pipeline | images/s (min / median / max) | s per epoch | vs textbook | share of compute limit |",
             "|---|---|---:|---:|---:|"]
    training = results["training"]
    baseline = training[TEXTBOOK]["images_per_s"]["median"] if TEXTBOOK in training else \
        next(iter(training.values()))["images_per_s"]["median"]
    for name, entry in training.items():
        s = entry["images_per_s"]
        peak = fp32_peak if "fp32" in name.split(",")[-1] else bf16_peak
        lines.append(f"| {name} | {s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f} | {entry['epoch_s']:.1f} | "
                     f"{s['median'] / baseline:.1f}x | {s['median'] * TRAIN_MFLOP / 1e3 / peak:.0%} |")
    lines += ["", f"Images/s counts training steps only (one epoch on a subset: {TEXTBOOK_TRAIN_IMAGES:,} images for "
              f"the textbook pipeline, {OURS_TRAIN_IMAGES:,} for ours), read from the real `mnist-train` run's "
              f"metrics.jsonl; s per epoch = {MNIST_TRAIN_IMAGES:,} / median. Compute limit: {TRAIN_MFLOP:.1f} MFLOP "
              "per training image against the measured GEMM rate of the run's dtype (bf16 for the measured rows)."]
    probe = results.get("kernel_probe")
    if probe and probe.get("ms_per_step"):
        rates = ", ".join(f"{name} {ms:.0f} ms" for name, ms in sorted(probe["ms_per_step"].items(),
                                                                      key=lambda item: item[1]))
        lines += ["", f"`make train` measured its kernels at start in {probe['probe_s']:.1f} s (ms per step of "
                      f"{probe.get('batch_size', 'its batch of')} images: {rates}) and chose **{probe['chosen']}**."]
    curve = results.get("training_curve")
    if curve:
        lines += ["", f"`make train` (artifacts/metrics.jsonl): {curve['final_test_acc']:.2%} final test accuracy; "
                      f"99.0% after {curve['seconds_to_99.0']:.0f} s, 99.5% after {curve['seconds_to_99.5']:.0f} s "
                      "of wall time (training and per-epoch evaluation). ![training curves](training_curves.png)"]
    lines += ["", f"## Inference (images/s, median; {m['cores']} threads)", "",
              "| backend | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " | batch-1 latency ms | "
              f"share of fp32 limit @{BATCH_SIZES[-1]} |", "|---|" + "---:|" * (len(BATCH_SIZES) + 2)]
    for name, by_batch in results["inference"].items():
        rates = [by_batch[str(b)]["median"] for b in BATCH_SIZES]
        share = rates[-1] * FORWARD_MFLOP / 1e3 / fp32_peak
        lines.append(f"| {name} | " + " | ".join(f"{r:.0f}" for r in rates) +
                     f" | {1000 / rates[0]:.3f} | {share:.0%} |")
    lines += ["", f"Share of the limit = images/s x {FORWARD_MFLOP} MFLOP / the fp32 GEMM rate measured above. Above 100% "
              "means ONNX Runtime's convolution kernels beat that torch.mm rate (and int8 runs on VNNI "
              "integer units, which the fp32 figure does not bound): the 1024^2 GEMM is a yardstick, not "
              "the true peak.", "", "![inference throughput](inference_throughput.png)", "",
              "## Serving (TorchServe, wrk, keep-alive, one run each)", "",
              "| configuration | clients | requests/s | p50 ms | p99 ms | non-2xx |", "|---|---:|---:|---:|---:|---:|"]
    for name, entry in results["serving"].items():
        for run in entry["runs"]:
            lines.append(f"| {name} | {run['connections']} | {run['requests_per_s']:.0f} | "
                         f"{run['latency_ms'].get('p50', 0):.1f} | {run['latency_ms'].get('p99', 0):.1f} | "
                         f"{run['non_2xx']} |")
    lines += ["", "![serving latency](serving_latency.png)", ""]
    lines += front_door_table(results)
    lines += engines_table(results)
    if results.get("trust"):
        lines += ["## Trust (not a digit, calibration, real-world digits)", "",
                  "Refusal per category, acceptance, AUROC per score, ECE before/after the temperature, per-digit "
                  "errors and the reliability diagram: [TRUST.md](TRUST.md) (also alone: "
                  "`python -m benchmarks.trust --data-dir DATA`, about a minute).", ""]
    return "\n".join(lines)


def replace_block(page: Path, begin: str, end: str, block: str) -> None:
    """page's text from the begin marker to the end marker (both kept in block) replaced by block."""
    text = page.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise BenchError(f"{page} has no {begin} ... {end} block to fill")
    page.write_text(pattern.sub(lambda _: block, text))


README = HERE.parent / "README.md"
README_BEGIN, README_END = "<!-- bench:begin (written by make bench) -->", "<!-- bench:end -->"


def readme_summary(results: dict) -> str:
    """The README's performance block: a few headline figures from results.json, never typed by hand."""
    m, training = results["machine"], results["training"]
    textbook = training[TEXTBOOK]["images_per_s"]["median"]
    ours = training[DEFAULT]["images_per_s"]["median"]
    lines = [README_BEGIN, f"Measured {results['date']} by `{results['command']}` on {m['cpu']} "
             f"({m['cores']} cores; flags {' '.join(m.get('cpu_flags', [])) or 'n/a'}); "
             "full tables and plots: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).", "",
             "| what | figure |", "|---|---|",
             f"| training images/s, ours (kernels measured) vs textbook DataLoader | {ours:.0f} vs {textbook:.0f} "
             f"({ours / textbook:.1f}x) |"]
    probe = results.get("kernel_probe")
    if probe and probe.get("chosen"):
        lines.append(f"| kernels `make train` chose at start | {probe['chosen']} (probe {probe['probe_s']:.1f} s) |")
    curve = results.get("training_curve")
    if curve:
        to = lambda key: f"{curve[key]:.0f} s" if curve.get(key) is not None else "not reached"
        lines.append(f"| `make train`: time to 99.0% / 99.5% test accuracy; final | {to('seconds_to_99.0')} / "
                     f"{to('seconds_to_99.5')}; {curve['final_test_acc']:.2%} |")
    inference = results["inference"]
    largest = str(BATCH_SIZES[-1])
    lines.append(f"| inference images/s at batch {largest}: " + ", ".join(inference) + " | " +
                 " / ".join(f"{by_batch[largest]['median']:.0f}" for by_batch in inference.values()) + " |")
    for name, entry in results["serving"].items():
        run = next(r for r in entry["runs"] if r["connections"] == MANY_CLIENTS)
        lines.append(f"| TorchServe, {MANY_CLIENTS} clients, {name} | {run['requests_per_s']:.0f} req/s, "
                     f"p99 {run['latency_ms'].get('p99', 0):.1f} ms |")
    lines += front_door_summary(results)
    lines += engines_summary(results)
    if results.get("trust"):
        lines += trust_readme_lines(results["trust"])
    return "\n".join(lines + [README_END])


class BenchError(Exception):
    """The bench cannot run or report: what is missing, in one line."""


def update_readme(results: dict, readme: Path = README) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise BenchError(f"{readme} has no {README_BEGIN} ... {README_END} block to fill")
    head, rest = text.split(README_BEGIN, 1)
    readme.write_text(head + readme_summary(results) + rest.split(README_END, 1)[1])
