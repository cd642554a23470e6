import pytest
import torch

from training.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_atomic, unwrap


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


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"format_version": 1, "payload": object()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
