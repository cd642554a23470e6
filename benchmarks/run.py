"""`make bench`: every speed figure of the project, measured in one run, with its baseline.

    python -m benchmarks.run --data-dir ../shared/mnist

writes benchmarks/results.json, benchmarks/RESULTS.md and PNG plots in benchmarks/. Needs the
artifacts of `make train` and `make export` (the int8 model too: `mnist-export --quantize`)
and wrk for the serving part. Bounded: about 10 minutes on the 2-core CPUs it was written on.
"""
from __future__ import annotations

import json
import os
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
from training.data import DATA_DIR_ENV, load_mnist, preprocess_metadata

from .host import cpu_name
from .front_door import measure_front_door
from .serve_load import SERVING_ERRORS, ServeSettings, measure as measure_serving, measure_engines
from .report import BenchError, markdown, plot, update_readme
from .workloads import (BATCH_SIZES, DEFAULT, MANY_CLIENTS, OURS_TRAIN_IMAGES, SERVE_CLIENTS, TEXTBOOK,
                        TEXTBOOK_BATCH, TEXTBOOK_TRAIN_IMAGES, TEXTBOOK_WORKERS, MNIST_TRAIN_IMAGES)
from .trust import measure as measure_trust, train_before, write as write_trust

HERE = Path(__file__).resolve().parent
DEFAULT_REPEATS, DEFAULT_SERVE_SECONDS = 3, 10.0   # make bench's: runs per training/inference figure, seconds per load


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": len(values)}


def machine() -> dict:
    model = cpu_name()
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
    """`make fleet`'s front door (nginx, HTTP and TLS) against the same replicas called directly."""
    runs = measure_front_door(str(artifacts / TORCHSCRIPT_NAME), MANY_CLIENTS, min(serve_seconds, FRONT_DOOR_SECONDS),
                              data_dir)
    return {name: row.as_json() for name, row in runs.items()}


def engines(artifacts: Path, data_dir: str, serve_seconds: float) -> dict:
    """TorchServe and the KServe engine on the same TorchScript file, at MANY_CLIENTS clients (docs/engines.md)."""
    runs = measure_engines(str(artifacts / TORCHSCRIPT_NAME), MANY_CLIENTS, serve_seconds, data_dir)
    return {row: run.__dict__ for row, run in runs.items()}


@click.command()
@click.option("--data-dir", envvar=DATA_DIR_ENV, required=True, help=f"MNIST copy (env {DATA_DIR_ENV}).")
@click.option("--artifacts", default=ARTIFACTS_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--repeats", type=click.IntRange(min=1), default=DEFAULT_REPEATS, show_default=True)
@click.option("--serve-seconds", type=float, default=DEFAULT_SERVE_SECONDS, show_default=True)
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
    block; returns RESULTS.md's text. TRUST.md and trust.json are written only by a measuring run
    (`python -m benchmarks.trust` writes them too): a report from an older results.json must not
    replace a newer trust measurement."""
    if report_only:
        if not (out_dir / "results.json").is_file():
            raise BenchError(f"{out_dir / 'results.json'} missing: run `make bench` first")
        results = json.loads((out_dir / "results.json").read_text())
    else:
        results = measure_all(data_dir, artifacts, repeats, serve_seconds)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        write_trust(results["trust"], out_dir, results["command"])
    plot(results, out_dir)
    report = markdown(results)
    (out_dir / "RESULTS.md").write_text(report)
    update_readme(results)
    return report


def bench_command(data_dir: str, repeats: int, serve_seconds: float) -> str:
    """The command that reproduces these figures: `make bench`, or the module with what differed."""
    if (repeats, serve_seconds) == (DEFAULT_REPEATS, DEFAULT_SERVE_SECONDS):
        return f"make bench DATA_DIR={data_dir}"
    return (f"python -m benchmarks.run --data-dir {data_dir} --repeats {repeats} "
            f"--serve-seconds {serve_seconds:g}")


def measure_all(data_dir: str, artifacts: Path, repeats: int, serve_seconds: float) -> dict:
    for needed in (CHECKPOINT_NAME, TORCHSCRIPT_NAME, ONNX_NAME):
        if not (artifacts / needed).is_file():
            raise BenchError(f"{artifacts / needed} missing: run `make train export` first")
    images, _ = load_mnist(data_dir, train=False)
    inputs = normalized_images(images[:4096], preprocess_metadata())
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeats": repeats,
               "command": bench_command(data_dir, repeats, serve_seconds)}
    steps = [("machine", machine), ("inference", lambda: inference(artifacts, inputs, repeats)),
             ("training", lambda: training(data_dir, repeats)),
             ("training_curve", lambda: training_curve(artifacts / METRICS_NAME)),
             ("kernel_probe", lambda: kernel_probe(artifacts / CHECKPOINT_NAME)),
             ("serving", lambda: serving(data_dir, serve_seconds)),
             ("front_door", lambda: front_door(artifacts, data_dir, serve_seconds)),
             ("engines", lambda: engines(artifacts, data_dir, serve_seconds)),
             ("trust", lambda: measure_trust(data_dir, str(artifacts / CHECKPOINT_NAME), train_before(data_dir)))]
    for name, step in steps:
        started = time.perf_counter()
        results[name] = step()
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    main()
