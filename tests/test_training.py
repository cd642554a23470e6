import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from training import train as train_module
from training.checkpoint import load_checkpoint
from training.cli import main as train_cli
from training.data import DATA_DIR_ENV, augment, normalize
from training.train import ConfigError, TrainConfig, train


def read_metrics(path):
    return [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_real_training_run_loss_falls(tmp_path, data_dir, capsys):
    out = tmp_path / "m.pt"
    result = train(TrainConfig(quick=True, epochs=2, data_dir=data_dir, out=str(out)))
    epochs = read_metrics(out)
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert all(math.isfinite(row["train_loss"]) for row in epochs)
    assert result.metrics["test_acc"] > 0.3   # 1024 images, 8 steps: well above chance (0.1)
    printed = capsys.readouterr().out
    assert "kernels: channels_last+bf16 (not measured: 8 steps are too few" in printed
    assert "confusion" in printed and (tmp_path / "test_report.json").exists()


@pytest.mark.slow  # trains
def test_fp32_and_bf16_paths_give_finite_loss(tmp_path, data_dir):
    for amp in (True, False):
        out = tmp_path / f"amp_{amp}" / "m.pt"
        train(TrainConfig(quick=True, epochs=1, amp=amp, data_dir=data_dir, out=str(out)))
        assert math.isfinite(read_metrics(out)[0]["train_loss"])


def test_bf16_autocast_really_runs_in_bf16():
    from training.model import build_model
    model = build_model().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last))
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


def test_augmentation_moves_pixels_but_keeps_ink():
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 1.0
    moved = augment(images, max_rotation_deg=10, max_shift_px=2, generator=generator)
    assert moved.shape == images.shape
    assert not torch.allclose(moved, images)
    assert moved.sum().item() == pytest.approx(images.sum().item(), rel=0.1)  # ink is moved, not lost
    still = augment(images, max_rotation_deg=0, max_shift_px=0, generator=generator)
    assert torch.allclose(still, images, atol=1e-5)


def interrupt_after_first_save(config: TrainConfig, monkeypatch) -> None:
    """Run `config` as if the process were killed right after epoch 1 was saved."""
    real_save = train_module.save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    assert load_checkpoint(config.out_path)["metrics"]["epoch"] == 1


@pytest.mark.slow  # trains
def test_interrupted_run_resumes_to_the_same_result(tmp_path, data_dir, monkeypatch):
    # Kernels pinned: measured choices may differ between the two runs, and so would the numerics.
    config = TrainConfig(quick=True, epochs=2, memory_format="channels_last", amp_dtype="bf16", data_dir=data_dir)
    full = train(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "full" / "m.pt")}))

    interrupted_out = tmp_path / "interrupted" / "m.pt"
    interrupt_after_first_save(TrainConfig(**{**config.__dict__, "out": str(interrupted_out)}), monkeypatch)

    resumed = train(TrainConfig(**{**config.__dict__, "out": str(interrupted_out), "resume": True}))
    assert resumed.metrics["epoch"] == 2
    assert [row["epoch"] for row in read_metrics(interrupted_out)] == [1, 2]
    final = load_checkpoint(interrupted_out)
    for name, tensor in load_checkpoint(full.checkpoint_path)["last_model"].items():
        torch.testing.assert_close(final["last_model"][name], tensor, rtol=1e-4, atol=1e-5)


def test_invalid_config_is_rejected():
    with pytest.raises(ConfigError, match="warmup"):
        train(TrainConfig(epochs=1, warmup_epochs=2))
    with pytest.raises(ConfigError, match="fp16"):
        train(TrainConfig(amp_dtype="fp16", device="cpu"))


# --- the Click CLI -------------------------------------------------------------------------------

def test_cli_help_explains_every_option():
    result = CliRunner().invoke(train_cli, ["--help"])
    assert result.exit_code == 0
    for option in ("--epochs", "--batch-size", "--lr", "--weight-decay", "--warmup-epochs", "--amp",
                   "--amp-dtype", "--seed", "--data-dir", "--out", "--num-workers", "--quick", "--resume"):
        assert option in result.output, option


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--amp-dtype", "fp8"], "--amp-dtype"),
    (["--epochs", "2", "--warmup-epochs", "5"], "warmup epochs cannot exceed epochs"),
])
def test_cli_rejects_nonsense_with_one_clear_line(args, message, tmp_path):
    result = CliRunner().invoke(train_cli, args + ["--out", str(tmp_path / "m.pt")])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.pt").exists()


def test_cli_missing_data_dir(tmp_path):
    result = CliRunner().invoke(train_cli, ["--quick", "--data-dir", str(tmp_path / "nowhere"),
                                            "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 1
    assert "no MNIST copy" in result.output and "Traceback" not in result.output


def test_cli_resume_from_corrupt_checkpoint(tmp_path, data_dir):
    out = tmp_path / "m.pt"
    out.write_bytes(b"\x00garbage")
    result = CliRunner().invoke(train_cli, ["--quick", "--resume", "--data-dir", data_dir, "--out", str(out)])
    assert result.exit_code == 1
    assert "cannot resume" in result.output and "Traceback" not in result.output


def test_data_step_without_copy_or_network_says_so(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    from training.data import DataError, check_data

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])   # a closed local port: no network
    with pytest.raises(DataError, match="download failed .no network.*DATA_DIR"):
        check_data(None)


def test_data_step_reads_the_local_copy(data_dir):
    from training.data import check_data

    assert check_data(data_dir) == f"MNIST ready: 60000 training and 10000 test images from {data_dir}"


# --- model selection, kernels, progress and logs -------------------------------------------------

@pytest.mark.slow  # trains
def test_validation_selection_never_looks_at_the_test_set(tmp_path, data_dir):
    out = tmp_path / "m.pt"
    result = train(TrainConfig(quick=True, epochs=2, val_images=512, select_by="val_acc", data_dir=data_dir,
                               out=str(out)))
    rows = read_metrics(out)
    assert all("val_acc" in row and "test_acc" not in row for row in rows)   # test is not watched per epoch
    checkpoint = load_checkpoint(out)
    metrics = checkpoint["metrics"]
    assert metrics["selected_by"] == "val_acc"
    best = max(rows, key=lambda row: row["val_acc"])
    assert metrics["selected_epoch"] == best["epoch"] and metrics["val_acc"] == best["val_acc"]
    assert 0 < metrics["test_acc"] <= 1 and result.metrics["test_acc"] == metrics["test_acc"]


@pytest.mark.slow  # trains
def test_forced_kernels_are_not_measured_and_are_recorded(tmp_path, data_dir, capsys):
    out = tmp_path / "m.pt"
    train(TrainConfig(quick=True, epochs=1, memory_format="contiguous", amp=False, data_dir=data_dir, out=str(out)))
    checkpoint = load_checkpoint(out)
    assert checkpoint["kernels"] == {"memory_format": "contiguous", "amp_dtype": None, "probe": {
        "chosen": "contiguous+fp32", "ms_per_step": {}, "probe_s": 0.0, "why": "as asked"}}
    config = checkpoint["train_config"]
    assert config["memory_format"] == "contiguous" and config["amp"] is False and "kernel_probe" not in config
    assert "kernels: contiguous+fp32 (as asked)" in capsys.readouterr().out


@pytest.mark.slow  # trains
def test_the_users_config_is_kept_as_asked_and_the_kernels_are_their_own_record(tmp_path, data_dir):
    config = TrainConfig(quick=True, epochs=1, data_dir=data_dir, out=str(tmp_path / "m.pt"))
    train(config)
    assert config == TrainConfig(quick=True, epochs=1, data_dir=data_dir, out=str(tmp_path / "m.pt"))
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    saved = checkpoint["train_config"]
    assert (saved["memory_format"], saved["amp_dtype"], saved["amp"]) == ("auto", "auto", True)   # as asked
    kernels = checkpoint["kernels"]
    assert (kernels["memory_format"], kernels["amp_dtype"]) == ("channels_last", "bf16")        # as chosen
    assert kernels["probe"]["chosen"] == "channels_last+bf16"


@pytest.mark.slow  # trains
def test_a_resumed_run_takes_its_kernels_from_the_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "m.pt"
    config = TrainConfig(quick=True, epochs=2, data_dir=data_dir, out=str(out))
    interrupt_after_first_save(config, monkeypatch)
    # The kernels record is what the run measured at its start: a resumed run must use it, not
    # measure (or assume) again. Another choice than a fresh run's shows where it came from.
    checkpoint = load_checkpoint(out)
    checkpoint["kernels"] = {"memory_format": "contiguous", "amp_dtype": None, "probe": {"chosen": "contiguous+fp32"}}
    torch.save(checkpoint, out)
    capsys.readouterr()
    train(TrainConfig(quick=True, epochs=2, data_dir=data_dir, out=str(out), resume=True))
    assert "kernels: contiguous+fp32 (from the checkpoint)" in capsys.readouterr().out
    resumed = load_checkpoint(out)
    assert resumed["metrics"]["epoch"] == 2
    assert resumed["kernels"]["memory_format"] == "contiguous" and resumed["kernels"]["amp_dtype"] is None
    assert resumed["train_config"]["memory_format"] == "auto" and resumed["train_config"]["amp_dtype"] == "auto"


def test_probe_times_every_candidate_and_keeps_the_fastest(mnist_digits):
    from training.model import ModelConfig
    from training.tuning import choose_kernels, format_probe
    images, labels = (torch.from_numpy(array[:64].copy()) for array in mnist_digits)
    pixels = normalize(images)
    kernels = choose_kernels(TrainConfig(), pixels, labels, ModelConfig(), run_steps=1000)
    record = kernels.probe
    timings = record["ms_per_step"]
    assert len(timings) == 4 and all(ms > 0 for ms in timings.values())
    assert kernels.name == record["chosen"] == min(timings, key=timings.get)
    assert record["probe_s"] > 0 and "(chosen)" in format_probe(kernels, 64)


def test_kernel_candidates_follow_the_options():
    from training.tuning import candidates
    cpu = torch.device("cpu")
    assert [k.name for k in candidates(TrainConfig(), cpu)] == [
        "channels_last+bf16", "channels_last+fp32", "contiguous+bf16", "contiguous+fp32"]
    assert [k.name for k in candidates(TrainConfig(amp_dtype="bf16", memory_format="contiguous"), cpu)] == [
        "contiguous+bf16"]
    # One spelling: the kernels name their autocast dtype as TrainConfig's --amp-dtype does.
    assert {k.amp_dtype for k in candidates(TrainConfig(), cpu)} == {"bf16", None}


def test_kernels_record_round_trips_through_its_checkpoint_dict():
    from training.tuning import Kernels
    kernels = Kernels("channels_last", "bf16", {"chosen": "channels_last+bf16", "probe_s": 1.5})
    assert Kernels.from_dict(kernels.to_dict()) == kernels
    assert Kernels.from_dict(kernels.to_dict()).probe == kernels.probe
    assert kernels.torch_amp_dtype is torch.bfloat16 and Kernels("contiguous", None).torch_amp_dtype is None


@pytest.mark.slow  # trains
def test_ema_weights_are_the_ones_kept(tmp_path, data_dir):
    out = tmp_path / "m.pt"
    train(TrainConfig(quick=True, epochs=2, ema_decay=0.9, data_dir=data_dir, out=str(out)))
    checkpoint = load_checkpoint(out)
    assert checkpoint["model"].keys() == checkpoint["last_model"].keys()
    torch.testing.assert_close(checkpoint["model"], checkpoint["ema_model"])
    assert any(not torch.equal(checkpoint["model"][k], checkpoint["last_model"][k])
               for k in checkpoint["model"] if checkpoint["model"][k].is_floating_point())


@pytest.mark.slow  # trains
def test_tensorboard_events_hold_the_metrics_jsonl_values(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, logs = tmp_path / "m.pt", tmp_path / "tb"
    train(TrainConfig(quick=True, epochs=2, data_dir=data_dir, out=str(out), tensorboard=str(logs)))
    events = EventAccumulator(str(logs))
    events.Reload()
    rows = read_metrics(out)
    for key, tag in (("train_loss", "loss/train"), ("test_acc", "accuracy/test"), ("lr", "lr"),
                     ("images_per_s", "images_per_s")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6), key


def test_progress_bar_counts_images_only_when_enabled(capsys):
    from training.progress import EpochProgress
    with EpochProgress(1000, 0, 3, enabled=True) as bar:
        bar.advance(600)
        bar.advance(400)
        assert bar.bar.n == 1000
    with EpochProgress(1000, 0, 3, enabled=False) as quiet:
        quiet.advance(1000)
    assert quiet.bar is None


# --- CUDA rules that can be checked without a GPU --------------------------------------------------

def test_more_local_ranks_than_gpus_names_the_fix(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--nproc-per-node=1.*--device cpu"):
        train_module.check_local_ranks_fit_gpus("cuda")
    train_module.check_local_ranks_fit_gpus("cpu")   # CPU ranks are not bounded by GPUs


def test_cuda_graph_only_where_it_can_work():
    from training.train_step import graph_allowed, use_cuda_graph
    from training.tuning import Kernels
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    bf16, fp16 = Kernels("channels_last", "bf16"), Kernels("channels_last", "fp16")
    config = TrainConfig()
    assert graph_allowed(config, cuda, 1, bf16) == (True, "")
    assert graph_allowed(config, cuda, 1, Kernels("contiguous", None)) == (True, "")   # fp32
    assert not graph_allowed(config, cuda, 2, bf16)[0]        # DDP runs eagerly
    assert not graph_allowed(config, cuda, 1, fp16)[0]        # GradScaler syncs with the host
    assert not graph_allowed(config, cpu, 1, bf16)[0]
    assert use_cuda_graph(config, cuda, 1, bf16)
    assert not use_cuda_graph(TrainConfig(cuda_graph="off"), cuda, 1, bf16)
    with pytest.raises(ConfigError, match="fp16"):
        use_cuda_graph(TrainConfig(cuda_graph="on"), cuda, 1, fp16)


def test_batches_and_augmentation_follow_the_device_generator():
    """The tensor pipeline draws its randomness from a generator on the data's device: the same
    seed gives the same batches, another epoch other ones."""
    from training.data import TensorBatches
    from training.dist import DistContext
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    batches = TensorBatches(images, labels, TrainConfig(batch_size=16), DistContext())
    batches.set_epoch(3)
    first = [pixels for pixels, _ in batches]
    batches.set_epoch(3)
    again = [pixels for pixels, _ in batches]
    batches.set_epoch(4)
    other = [pixels for pixels, _ in batches]
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


# --- normalization: one function for training, export and serving -------------------------------

def test_one_normalization_for_numpy_and_torch_in_place_keeping_float32():
    from serving.handler.preprocess import normalize_in_place
    pixels = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    expected = (pixels - np.float32(0.1307)) / np.float32(0.3081)   # what export and serving computed before
    array = pixels.copy()
    assert normalize_in_place(array, 0.1307, 0.3081) is array and array.dtype == np.float32
    np.testing.assert_array_equal(array, expected)
    tensor = torch.from_numpy(pixels.copy())
    before = tensor.data_ptr()
    result = normalize_in_place(tensor, 0.1307, 0.3081)
    assert result is tensor and result.data_ptr() == before and result.dtype == torch.float32   # no copy
    torch.testing.assert_close(result, torch.from_numpy(pixels).sub_(0.1307).div_(0.3081), rtol=0, atol=0)
    torch.testing.assert_close(result.numpy(), expected, rtol=0, atol=1e-6)


# --- a trained model is never replaced by accident -----------------------------------------------

def as_full_run(quick_checkpoint: Path, out: Path) -> Path:
    """A copy of the smoke checkpoint that says it came from a full (not --quick) run."""
    checkpoint = load_checkpoint(quick_checkpoint)
    checkpoint["train_config"]["quick"] = False
    torch.save(checkpoint, out)
    return out


@pytest.mark.slow  # trains
def test_a_quick_run_after_a_real_one_leaves_the_trained_checkpoint_untouched(tmp_path, data_dir,
                                                                             quick_checkpoint, monkeypatch):
    from serving.handler.artifact import CHECKPOINT_NAME
    from training.config import QUICK
    monkeypatch.chdir(tmp_path)
    trained = tmp_path / "artifacts" / CHECKPOINT_NAME          # where `make train` writes the real model
    trained.parent.mkdir()
    as_full_run(quick_checkpoint, trained)
    before = trained.read_bytes()
    result = CliRunner().invoke(train_cli, ["--quick", "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    assert trained.read_bytes() == before
    assert load_checkpoint(tmp_path / QUICK.out)["metrics"]["epoch"] == QUICK.max_epochs


@pytest.mark.slow  # trains
def test_a_fresh_run_refuses_to_replace_a_finished_one_unless_forced(tmp_path, data_dir, quick_checkpoint):
    out = as_full_run(quick_checkpoint, tmp_path / "m.pt")
    before = out.read_bytes()
    accuracy = load_checkpoint(out)["metrics"]["test_acc"]
    args = ["--quick", "--epochs", "1", "--data-dir", data_dir, "--out", str(out)]
    refused = CliRunner().invoke(train_cli, args)
    assert refused.exit_code == 1
    assert refused.output == (f"Error: {out} holds a finished run (test accuracy {accuracy:.2%}): pass --force "
                              f"to replace it, or choose another --out\n")
    assert out.read_bytes() == before
    forced = CliRunner().invoke(train_cli, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    assert load_checkpoint(out)["metrics"]["epoch"] == 1 and out.read_bytes() != before


@pytest.mark.slow  # trains
def test_a_smoke_run_may_replace_a_smoke_run(tmp_path, data_dir, quick_checkpoint):
    out = tmp_path / "m.pt"
    out.write_bytes(quick_checkpoint.read_bytes())
    again = CliRunner().invoke(train_cli, ["--quick", "--epochs", "1", "--data-dir", data_dir, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert load_checkpoint(out)["metrics"]["epoch"] == 1


def test_only_a_finished_run_counts_as_one(tmp_path, quick_checkpoint):
    from training.resume import finished_run
    assert finished_run(quick_checkpoint).test_acc == load_checkpoint(quick_checkpoint)["metrics"]["test_acc"]
    assert finished_run(quick_checkpoint).quick
    assert not finished_run(as_full_run(quick_checkpoint, tmp_path / "full.pt")).quick
    interrupted = load_checkpoint(quick_checkpoint)
    del interrupted["metrics"]["confusion_matrix"]       # an epoch's save, before the run's end
    torch.save(interrupted, tmp_path / "interrupted.pt")
    assert finished_run(tmp_path / "interrupted.pt") is None
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert finished_run(tmp_path / "garbage.pt") is None
    assert finished_run(tmp_path / "missing.pt") is None


def test_quick_numbers_live_in_one_recipe_that_the_help_quotes():
    from training.config import QUICK
    assert TrainConfig(quick=True, epochs=10).epochs_to_run == QUICK.max_epochs
    assert TrainConfig(quick=True).out_path.as_posix() == QUICK.out != TrainConfig().out_path.as_posix()
    assert TrainConfig(quick=True, out="x.pt").out_path.as_posix() == "x.pt"
    assert TrainConfig(quick=True).held_out_images == QUICK.val_images < TrainConfig().held_out_images
    assert TrainConfig(quick=True, val_images=100).held_out_images == 100
    help_text = " ".join(CliRunner().invoke(train_cli, ["--help"]).output.split())
    assert (f"{QUICK.train_images} training, {QUICK.val_images} validation and {QUICK.test_images} test images, "
            f"no outlier exposure or generated digits, at most {QUICK.max_epochs} epochs; writes {QUICK.out} unless --out") in help_text
