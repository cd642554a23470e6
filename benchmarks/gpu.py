"""GPU figures in one run (for a machine with a CUDA card; everything else is `make bench`).

    python -m benchmarks.gpu --data-dir ../shared/mnist --out-dir benchmarks/out

Measures, on the card it finds:
- one training step (forward, backward, AdamW) of the default model at batch 256 and 1024,
  eager against the same step replayed as a CUDA graph (training/train_step.py);
- the real `mnist-train` CLI, 10 epochs of the default recipe, with and without the graph:
  training seconds (images / images-per-second, evaluation excluded), seconds to 99.5% test
  accuracy, final test accuracy;
- the textbook pipeline (per-image PIL transforms in DataLoader workers) for one epoch.
Prints a Markdown table and writes gpu_results.json into --out-dir.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from serving.handler.artifact import CHECKPOINT_NAME, METRICS_NAME
from training.config import TrainConfig
from training.data import DATA_DIR_ENV
from training.model import NUM_CLASSES, build_model
from training.train_step import EagerStep, GraphedStep

REPO = Path(__file__).resolve().parent.parent


def step_ms(graphed: bool, batch_size: int, steps: int = 50) -> float:
    """Mean milliseconds of `steps` timed steps after warm-up, by CUDA events."""
    device = torch.device("cuda")
    model = build_model().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=graphed)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    pixels = torch.randn(batch_size, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    config = TrainConfig()
    step = (GraphedStep(model, optimizer, scaler, config, torch.bfloat16, device, pixels, labels) if graphed
            else EagerStep(model, optimizer, scaler, config, torch.bfloat16, device))
    for _ in range(5):
        step(pixels, labels, 1e-3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step(pixels, labels, 1e-3)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def train_run(data_dir: str, args: list[str]) -> dict:
    """One real `python -m training` run; its metrics.jsonl gives the figures."""
    with tempfile.TemporaryDirectory() as temp:
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "training", "--device", "cuda", "--data-dir", data_dir,
                              "--out", f"{temp}/{CHECKPOINT_NAME}", *args], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        wall_s = time.perf_counter() - started
        if run.returncode != 0:
            return {"error": (run.stdout + run.stderr)[-1500:]}
        rows = [json.loads(line) for line in Path(temp, METRICS_NAME).read_text().splitlines()]
        checkpoint_metrics = torch.load(f"{temp}/{CHECKPOINT_NAME}", weights_only=True)["metrics"]
    train_s, to_995 = 0.0, None
    for row in rows:
        train_s += row["train_images"] / row["images_per_s"]
        if to_995 is None and row.get("test_acc", 0) >= 0.995:
            to_995 = train_s
    return {"epochs": len(rows), "train_s": train_s, "wall_s": wall_s, "seconds_to_99.5": to_995,
            "test_acc": checkpoint_metrics["test_acc"], "images_per_s": [row["images_per_s"] for row in rows],
            "log": run.stdout.splitlines()[:3]}


def markdown(results: dict) -> str:
    lines = [f"GPU: {results['card']} (torch {results['torch']}), {results['date']}", "",
             "| step, batch | eager ms | CUDA graph ms | speed-up |", "|---|---:|---:|---:|"]
    for batch, row in results["step_ms"].items():
        lines.append(f"| {batch} | {row['eager']:.2f} | {row['graph']:.2f} | {row['eager'] / row['graph']:.1f}x |")
    lines += ["", "| `mnist-train --device cuda` | epochs | training s | s to 99.5% | test acc | wall s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in results["runs"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][-200:]!r} | | | | |")
            continue
        to_995 = f"{row['seconds_to_99.5']:.1f}" if row["seconds_to_99.5"] is not None else "not reached"
        lines.append(f"| {name} | {row['epochs']} | {row['train_s']:.1f} | {to_995} | {row['test_acc']:.2%} | "
                     f"{row['wall_s']:.0f} |")
    return "\n".join(lines)


RUNS = {
    "default recipe, CUDA graph (auto)": [],
    "default recipe, eager (--cuda-graph off)": ["--cuda-graph", "off"],
    "default recipe + EMA 0.999, CUDA graph": ["--ema-decay", "0.999"],
    "textbook pipeline, 8 DataLoader workers, 1 epoch": ["--pipeline", "torchvision", "--num-workers", "8",
                                                         "--epochs", "1", "--warmup-epochs", "0.3"],
}


@click.command()
@click.option("--data-dir", envvar=DATA_DIR_ENV, required=True, help=f"MNIST copy (env {DATA_DIR_ENV}).")
@click.option("--out-dir", default="benchmarks/out", show_default=True)
@click.option("--extra-run", "extra_runs", multiple=True, help="NAME=ARGS: another mnist-train run to measure.")
def main(data_dir: str, out_dir: str, extra_runs: tuple[str, ...]) -> None:
    if not torch.cuda.is_available():
        raise click.ClickException("no CUDA device: this benchmark is for a GPU machine")
    runs = dict(RUNS)
    for spec in extra_runs:
        name, _, args = spec.partition("=")
        runs[name] = args.split()
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "step_ms": {}, "runs": {}}
    for batch in (256, 1024):
        results["step_ms"][batch] = {"eager": step_ms(False, batch), "graph": step_ms(True, batch)}
        print(f"step batch {batch}: {results['step_ms'][batch]}", flush=True)
    for name, args in runs.items():
        results["runs"][name] = train_run(data_dir, args)
        print(f"{name}: {json.dumps(results['runs'][name])[:600]}", flush=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "gpu_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
