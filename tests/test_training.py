import json
import math

import pytest
import torch
from click.testing import CliRunner

from training import train as train_module
from training.checkpoint import load_checkpoint
from training.cli import main as train_cli
from training.data import augment
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
    assert result.metrics["best_test_acc"] > 0.3   # 1024 images, 8 steps: well above chance (0.1)
    printed = capsys.readouterr().out
    assert "amp=bfloat16" in printed                 # bf16 autocast is the CPU default
    assert "confusion" in printed and (tmp_path / "test_report.json").exists()


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


def test_interrupted_run_resumes_to_the_same_result(tmp_path, data_dir, monkeypatch):
    config = TrainConfig(quick=True, epochs=2, data_dir=data_dir)
    full = train(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "full" / "m.pt")}))

    interrupted_out = tmp_path / "interrupted" / "m.pt"
    real_save = train_module.save_atomic

    def save_then_die(obj, path):  # the process is killed right after epoch 1 was saved
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**{**config.__dict__, "out": str(interrupted_out)}))
    monkeypatch.undo()
    assert load_checkpoint(interrupted_out)["metrics"]["epoch"] == 1

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
        train_module.resolve_amp_dtype(TrainConfig(amp_dtype="fp16"), torch.device("cpu"))


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
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])   # a closed local port: no network
    with pytest.raises(DataError, match="download failed .no network.*DATA_DIR"):
        check_data(None)


def test_data_step_reads_the_local_copy(data_dir):
    from training.data import check_data

    assert check_data(data_dir) == f"MNIST ready: 60000 training and 10000 test images from {data_dir}"
