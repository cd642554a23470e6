import os
import stat

import pytest
import torch

from training.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, unwrap
from training.durable import save_atomic, sweep_stale_temps, write_text_atomic


def test_quick_checkpoint_has_documented_keys_and_loads_weights_only(quick_checkpoint):
    checkpoint = torch.load(quick_checkpoint, map_location="cpu", weights_only=True)
    for key in ("format_version", "model", "model_config", "train_config", "preprocess", "metrics",
                "optimizer", "scaler", "scheduler", "last_model"):
        assert key in checkpoint, key
    assert checkpoint["format_version"] == FORMAT_VERSION
    assert checkpoint["preprocess"]["mean"] == pytest.approx(0.1307)
    assert checkpoint["preprocess"]["std"] == pytest.approx(0.3081)
    assert checkpoint["preprocess"]["input_shape"] == [1, 28, 28]
    metrics = checkpoint["metrics"]
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert metrics["epoch"] == 2
    # Weights are never chosen on the test set: by default the final ones are kept (their EMA).
    assert metrics["selected_by"] == "final" and metrics["selected_epoch"] == 2
    torch.testing.assert_close(checkpoint["model"], checkpoint["ema_model"])
    # The kernel choice is its own record beside the settings as asked (a run this short is not measured).
    config = checkpoint["train_config"]
    assert (config["memory_format"], config["amp_dtype"]) == ("auto", "auto")
    kernels = checkpoint["kernels"]
    assert (kernels["memory_format"], kernels["amp_dtype"]) == ("channels_last", "bf16")
    assert kernels["probe"]["chosen"] == "channels_last+bf16" and "too few" in kernels["probe"]["why"]


def test_state_dict_keys_have_no_wrapper_prefixes(quick_checkpoint):
    from training.model import build_model

    checkpoint = load_checkpoint(quick_checkpoint)
    for name in checkpoint["model"]:
        assert not name.startswith(("module.", "_orig_mod.")), name
    model = build_model(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])  # strict: every key matches the plain module


def test_unwrap_removes_ddp_and_compile_wrappers():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(Wrapper(inner))) is inner


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    save_atomic({"value": torch.ones(3)}, target)

    def broken_save(obj, handle):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_atomic({"value": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["value"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint at all", "cannot read checkpoint"),
    (None, "not found"),
])
def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint_is_rejected(tmp_path, quick_checkpoint):
    path = tmp_path / "truncated.pt"
    path.write_bytes(quick_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


def test_unknown_format_version_is_rejected(tmp_path, quick_checkpoint):
    checkpoint = load_checkpoint(quick_checkpoint)
    checkpoint["format_version"] = 99
    path = tmp_path / "future.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)


class LeavesATrace:
    """Unpickling this creates `marker`: the visible trace of code run by torch.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_objects_are_refused(tmp_path, quick_checkpoint):
    # A complete checkpoint, so that only weights_only=True stands between the file and the
    # unpickler (weights_only=False would load it, and the marker would appear).
    checkpoint = load_checkpoint(quick_checkpoint)
    marker = tmp_path / "unpickled"
    checkpoint["payload"] = LeavesATrace(marker)
    path = tmp_path / "pickle.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_save_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(handle):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(handle).st_mode) else "fsync file")
        real_fsync(handle)

    def replace(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_atomic({"value": torch.ones(3)}, tmp_path / "ckpt.pt")
    assert events == ["fsync file", "rename", "fsync dir"]


def test_reports_are_written_atomically(tmp_path, monkeypatch):
    """test_report.json (and metrics.jsonl, parity_report.json: the same helper) is never
    half-written: a write that fails leaves the previous file whole and no temp file."""
    from training.report import write_test_report

    report = tmp_path / "test_report.json"
    metrics = {"selected_by": "final", "selected_epoch": 1, "test_acc": 0.5, "per_class_acc": [0.5] * 10,
               "confusion_matrix": [[1] * 10] * 10}
    write_test_report(report, metrics)
    before = report.read_text()

    def full_disk(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_test_report(report, {**metrics, "test_acc": 0.9})
    assert report.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["test_report.json"]


def test_write_text_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_sweep_removes_only_the_targets_stale_temps(tmp_path):
    target = tmp_path / "m.pt"
    stale = [tmp_path / ".m.pt.k2j4h1.tmp", tmp_path / ".metrics.jsonl.abc.tmp"]
    kept = [tmp_path / "m.pt", tmp_path / ".other.pt.abc.tmp", tmp_path / ".m.pt.abc.onnx"]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = sweep_stale_temps([target, tmp_path / "metrics.jsonl", tmp_path / "absent" / "m.pt"])
    assert sorted(removed) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
