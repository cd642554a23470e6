"""`make bench`: every speed figure of the project, measured in one run, with its baseline.

    python -m benchmarks.run --data-dir ../shared/mnist

writes benchmarks/results.json, benchmarks/RESULTS.md and PNG plots in benchmarks/. Needs the
artifacts of `make train` and `make export` (the int8 model too: `mnist-export --quantize`)
and wrk for the serving part. Bounded: about 10 minutes on the 2-core CPUs it was written on.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from export.run import normalized_images
from serving.handler.artifact import (ARTIFACTS_DIR, CHECKPOINT_NAME, INT8_NAME, METRICS_NAME, ONNX_NAME, TORCHSCRIPT_NAME,
                                      load, time_batched, torch_runner)
from training.data import load_mnist, preprocess_metadata

from .serve_load import FRONT_DOOR_ROWS, SERVING_ERRORS, ServeSettings, measure as measure_serving, measure_front_door
from .trust import measure as measure_trust, readme_lines as trust_readme_lines, train_before, write as write_trust

HERE = Path(__file__).resolve().parent
FORWARD_MFLOP = 38.2        # per image: convs 36.5 + linears 1.6 (multiply-adds x 2)
TRAIN_MFLOP = 3 * FORWARD_MFLOP   # forward + backward (about twice the forward)
BATCH_SIZES = (1, 8, 32, 128, 256)
# Training runs: one epoch on a subset of the training set (ours needs >= 100 steps of the default
# batch so that its kernel probe runs; the textbook pipeline is slow, so it gets fewer images).
OURS_TRAIN_IMAGES = 25600
TEXTBOOK_TRAIN_IMAGES = 6400
TEXTBOOK_WORKERS, TEXTBOOK_BATCH = 2, 128
MNIST_TRAIN_IMAGES = 60000
SERVE_CLIENTS = (1, 16)            # wrk keep-alive connections: one client, and many
MANY_CLIENTS = max(SERVE_CLIENTS)


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": len(values)}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    gemm = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        torch.mm(a, b)
        rates = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b)
            rates.append(10 * 2 * 1024 ** 3 / (time.perf_counter() - started) / 1e9)
        gemm[str(dtype).removeprefix("torch.")] = spread(rates)
    return {"cpu": model, "cpu_flags": cpu_flags(), "cores": cores, "torch": torch.__version__, "gemm_gflops": gemm}


# The flags that decide which kernels a CPU can run fast (vector width, bf16/int8 units).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                "amx_tile")


def cpu_flags() -> list[str]:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def train_images_per_s(args: list[str], data_dir: str, torchrun: bool = False) -> float:
    """Run the real training CLI on a subset for one epoch; its metrics.jsonl says images/s."""
    with tempfile.TemporaryDirectory() as temp:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] \
            if torchrun else [sys.executable]
        subprocess.run(launcher + ["-m", "training", "--epochs", "1", "--warmup-epochs", "0", "--data-dir",
                                   data_dir, "--out", f"{temp}/m.pt", *args],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        return json.loads(Path(temp, "metrics.jsonl").read_text().splitlines()[-1])["images_per_s"]


TEXTBOOK = (f"textbook: per-image PIL transforms, DataLoader {TEXTBOOK_WORKERS} workers, "
            f"batch {TEXTBOOK_BATCH}, fp32")
DEFAULT = "ours, default: kernels measured at start"


def training(data_dir: str, repeats: int) -> dict:
    """Our pipeline with each kernel candidate forced, with the measured choice, and in DDP,
    against the textbook pipeline, each one epoch on a subset (OURS_TRAIN_IMAGES, TEXTBOOK_TRAIN_IMAGES)."""
    ours = ["--train-subset", str(OURS_TRAIN_IMAGES)]
    configs = {
        TEXTBOOK: (["--pipeline", "torchvision", "--num-workers", str(TEXTBOOK_WORKERS), "--batch-size",
                    str(TEXTBOOK_BATCH), "--no-amp", "--train-subset", str(TEXTBOOK_TRAIN_IMAGES),
                    "--outlier-weight", "0", "--synthetic-digits", "0"], False),   # the textbook recipe: MNIST alone
        **{f"ours, forced {fmt}+{dtype}": (ours + ["--memory-format", fmt] +
                                           (["--amp-dtype", "bf16"] if dtype == "bf16" else ["--no-amp"]), False)
           for fmt in ("channels_last", "contiguous") for dtype in ("bf16", "fp32")},
        DEFAULT: (ours, False),
        "ours, DDP 2 processes x 1 thread (gloo), kernels measured": (ours, True),
    }
    results = {}
    for name, (args, torchrun) in configs.items():
        rates = [train_images_per_s(args, data_dir, torchrun) for _ in range(repeats)]
        results[name] = {"images_per_s": spread(rates), "epoch_s": MNIST_TRAIN_IMAGES / statistics.median(rates)}
    return results


def kernel_probe(checkpoint_path: Path) -> dict | None:
    """What `make train` measured at its start and chose (the checkpoint's kernels record)."""
    if not checkpoint_path.is_file():
        return None
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    kernels = checkpoint.get("kernels")
    # The probe timed steps of the run's own batch: keep that size with the record for the prose.
    return {**kernels["probe"], "batch_size": checkpoint["train_config"]["batch_size"]} if kernels else None


def training_curve(metrics_path: Path) -> dict | None:
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    elapsed, curve = 0.0, []
    for row in rows:
        elapsed += row["epoch_s"]
        curve.append({"epoch": row["epoch"], "wall_s": elapsed, "test_acc": row["test_acc"],
                      "train_loss": row["train_loss"], "test_loss": row["test_loss"]})
    first = lambda target: next((p["wall_s"] for p in curve if p["test_acc"] >= target), None)
    return {"curve": curve, "seconds_to_99.0": first(0.990), "seconds_to_99.5": first(0.995),
            "final_test_acc": curve[-1]["test_acc"]}


def inference(artifacts: Path, images: np.ndarray, repeats: int) -> dict:
    from export.artifacts import load_model

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    eager, _ = load_model(artifacts / CHECKPOINT_NAME)
    backends = {"eager fp32": torch_runner(eager), "TorchScript fp32": load(artifacts / TORCHSCRIPT_NAME)[0],
                "ONNX Runtime fp32": load(artifacts / ONNX_NAME)[0]}
    if (artifacts / INT8_NAME).is_file():
        backends["ONNX Runtime int8"] = load(artifacts / INT8_NAME)[0]
    # Batch 1 on 256 images, larger batches on 4,096.
    return {name: {str(b): spread(time_batched(run, images[:256 if b == 1 else 4096], b, repeats))
                   for b in BATCH_SIZES} for name, run in backends.items()}


def serving(data_dir: str, duration_s: float) -> dict:
    tuned = ServeSettings.shipped()
    baseline = ServeSettings(workers=2, threads_per_worker=2, batch_size=1, max_batch_delay_ms=0)
    results = {}
    # The same layout with TorchServe's metrics in log mode prices config.properties' Prometheus mode.
    for name, settings, overrides in (
            (f"baseline: TorchServe defaults ({baseline.workers} workers x {baseline.threads_per_worker} threads, "
             "no batching)", baseline, {}),
            ("ours: serving/handler/model-config.yaml, Prometheus metrics on", tuned, {}),
            ("ours, metrics in log mode (metrics_mode=log)", tuned, {"metrics_mode": "log"})):
        runs = measure_serving(settings, SERVE_CLIENTS, duration_s, data_dir, **overrides)
        results[name] = {"settings": settings.__dict__, "config_overrides": overrides,
                         "runs": [run.__dict__ for run in runs]}
    return results


FRONT_DOOR_SECONDS = 5.0   # per row: a few seconds each, the three rows in one fleet's life


def front_door(artifacts: Path, data_dir: str, serve_seconds: float) -> dict:
    """`make fleet`'s front door (nginx, HTTP and TLS) against one of its replicas called directly."""
    runs = measure_front_door(str(artifacts / TORCHSCRIPT_NAME), MANY_CLIENTS, min(serve_seconds, FRONT_DOOR_SECONDS),
                              data_dir)
    return {row: run.__dict__ for row, run in runs.items()}


def front_door_table(results: dict) -> list[str]:
    rows = results.get("front_door")
    if not rows:
        return []
    lines = [f"## Front door (`make fleet`: nginx in front of 2 replicas; wrk, {MANY_CLIENTS} keep-alive clients)", "",
             "| path | requests/s | p50 ms | p99 ms | non-2xx | socket errors |", "|---|---:|---:|---:|---:|---:|"]
    for row in FRONT_DOOR_ROWS:
        run = rows[row]
        lines.append(f"| {row} | {run['requests_per_s']:.0f} | {run['latency_ms'].get('p50', 0):.1f} | "
                     f"{run['latency_ms'].get('p99', 0):.1f} | {run['non_2xx']} | {run['socket_errors']} |")
    return lines + ["", "Direct: one replica of the same fleet, its other replica idle; the front door spreads "
                    "the load over both replicas on the same cores.", ""]


def front_door_summary(results: dict) -> list[str]:
    rows = results.get("front_door")
    if not rows:
        return []
    return [f"| {MANY_CLIENTS} clients: front door HTTP / TLS / direct to one replica | " +
            " / ".join(f"{rows[row]['requests_per_s']:.0f} req/s (p99 {rows[row]['latency_ms'].get('p99', 0):.1f} ms)"
                       for row in FRONT_DOOR_ROWS) + " |"]


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
    if results.get("trust"):
        lines += ["## Trust (not a digit, calibration, real-world digits)", "",
                  "Refusal per category, acceptance, AUROC per score, ECE before/after the temperature, per-digit "
                  "errors and the reliability diagram: [TRUST.md](TRUST.md) (also alone: "
                  "`python -m benchmarks.trust --data-dir DATA`, about a minute).", ""]
    return "\n".join(lines)


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


@click.command()
@click.option("--data-dir", envvar="MNIST_DATA_DIR", required=True, help="MNIST copy (env MNIST_DATA_DIR).")
@click.option("--artifacts", default=ARTIFACTS_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--serve-seconds", type=float, default=10.0, show_default=True)
@click.option("--out-dir", default=str(HERE), show_default=True)
@click.option("--report-only", is_flag=True, help="Rewrite RESULTS.md and the plots from results.json.")
def main(data_dir, artifacts, repeats, serve_seconds, out_dir, report_only) -> None:
    """Measure training, inference and serving speed against their baselines."""
    try:
        report = run_bench(data_dir, Path(artifacts), repeats, serve_seconds, Path(out_dir), report_only)
    except (BenchError, *SERVING_ERRORS) as error:
        raise click.ClickException(str(error)) from None
    click.echo(report)


def run_bench(data_dir: str, artifacts: Path, repeats: int, serve_seconds: float, out_dir: Path,
              report_only: bool) -> str:
    """Measure (or, report_only, re-read results.json), write RESULTS.md, the plots and the README
    block; returns RESULTS.md's text."""
    if report_only:
        if not (out_dir / "results.json").is_file():
            raise BenchError(f"{out_dir / 'results.json'} missing: run `make bench` first")
        results = json.loads((out_dir / "results.json").read_text())
    else:
        results = measure_all(data_dir, artifacts, repeats, serve_seconds)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_dir)
    if results.get("trust"):
        write_trust(results["trust"], out_dir, results["command"])
    report = markdown(results)
    (out_dir / "RESULTS.md").write_text(report)
    update_readme(results)
    return report


def measure_all(data_dir: str, artifacts: Path, repeats: int, serve_seconds: float) -> dict:
    for needed in (CHECKPOINT_NAME, TORCHSCRIPT_NAME, ONNX_NAME):
        if not (artifacts / needed).is_file():
            raise BenchError(f"{artifacts / needed} missing: run `make train export` first")
    images, _ = load_mnist(data_dir, train=False)
    inputs = normalized_images(images[:4096], preprocess_metadata())
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeats": repeats,
               "command": f"make bench DATA_DIR={data_dir}"}
    steps = [("machine", machine), ("inference", lambda: inference(artifacts, inputs, repeats)),
             ("training", lambda: training(data_dir, repeats)),
             ("training_curve", lambda: training_curve(artifacts / METRICS_NAME)),
             ("kernel_probe", lambda: kernel_probe(artifacts / CHECKPOINT_NAME)),
             ("serving", lambda: serving(data_dir, serve_seconds)),
             ("front_door", lambda: front_door(artifacts, data_dir, serve_seconds)),
             ("trust", lambda: measure_trust(data_dir, str(artifacts / CHECKPOINT_NAME), train_before(data_dir)))]
    for name, step in steps:
        started = time.perf_counter()
        results[name] = step()
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    main()
