import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from export.artifacts import build_metadata, export_onnx, export_torchscript, load_model, weights_version
from export.cli import main as export_cli
from export.parity import check_parity
from export.run import (AccuracyFloorError, ExportConfig, ExportError, check_same_weights, normalized_images,
                        run_export)
from serving.handler.artifact import (INPUT_NAME, INT8_NAME, LOCAL_PATH_KEYS, ONNX_NAME, PARITY_REPORT_NAME,
                                      SERVE_ACCURACY_FLOOR, TORCHSCRIPT_NAME, load_torchscript_module, onnx_runner, onnx_session, read_metadata,
                                      torch_runner)
from training.checkpoint import load_checkpoint
from training.data import preprocess_metadata


@pytest.fixture(scope="module")
def quick_export(tmp_path_factory, quick_checkpoint, data_dir):
    out_dir = tmp_path_factory.mktemp("quick_export")
    # Forced: a quick run's model is far below the serving floor (test_cli_refuses_a_model_below_the_floor).
    report = run_export(ExportConfig(checkpoint=str(quick_checkpoint), out_dir=str(out_dir), data_dir=data_dir,
                                     force=True))
    return out_dir, report


@pytest.fixture(scope="module")
def test_inputs(mnist_digits):
    images, labels = mnist_digits
    return normalized_images(images[:600], preprocess_metadata()), labels[:600]


def test_export_writes_both_artifacts_and_a_passing_report(quick_export):
    out_dir, report = quick_export
    assert (out_dir / TORCHSCRIPT_NAME).is_file() and (out_dir / ONNX_NAME).is_file()
    saved = json.loads((out_dir / PARITY_REPORT_NAME).read_text())
    assert saved["passed"] and report["passed"]
    assert saved["images"] == 10_000
    sizes = {entry["batch_size"]: entry for entry in saved["batches"]}
    assert set(sizes) == {1, 7, 256}
    assert sizes[256]["images"] == 10_000
    for entry in saved["batches"]:
        for backend in ("torchscript", "onnxruntime"):
            assert entry["max_abs_diff"][backend] <= 1e-4
            assert entry["disagreements"][backend] == 0
    accuracy = saved["accuracy"]
    assert accuracy["eager"] == accuracy["torchscript"] == accuracy["onnxruntime"]
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_metadata_in_both_artifacts_equals_the_checkpoint(quick_export, quick_checkpoint):
    out_dir, report = quick_export
    checkpoint = load_checkpoint(quick_checkpoint)
    _, ts_meta = load_torchscript_module(out_dir / TORCHSCRIPT_NAME)
    onnx_meta = read_metadata(out_dir / ONNX_NAME)
    assert ts_meta == onnx_meta
    assert ts_meta["mean"] == checkpoint["preprocess"]["mean"]
    assert ts_meta["std"] == checkpoint["preprocess"]["std"]
    assert ts_meta["labels"] == [str(d) for d in range(10)]
    assert ts_meta["model_config"] == checkpoint["model_config"]
    assert ts_meta["train_config"] == {key: value for key, value in checkpoint["train_config"].items()
                                       if key not in LOCAL_PATH_KEYS}   # this machine's paths stay here
    assert ts_meta["checkpoint_test_acc"] == checkpoint["metrics"]["test_acc"]
    assert ts_meta["test_acc"] == report["accuracy"]["onnxruntime"] and ts_meta["test_images"] == 10_000
    assert ts_meta["model_version"] == weights_version(ts_meta["weights_sha256"])
    assert ts_meta["kernels"] == checkpoint["kernels"]


def test_onnx_graph_passes_full_checker_with_explicit_opset(quick_export):
    out_dir, _ = quick_export
    model = onnx.load(str(out_dir / ONNX_NAME))
    onnx.checker.check_model(model, full_check=True)
    assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [17]
    assert model.graph.input[0].name == "image" and model.graph.output[0].name == "logits"


def test_onnx_batch_dimension_is_dynamic(quick_export, test_inputs):
    out_dir, _ = quick_export
    session = onnx_session(out_dir / ONNX_NAME)
    images, _ = test_inputs
    for batch in (1, 3, 50, 513):
        logits = session.run(None, {INPUT_NAME: np.resize(images, (batch, 1, 28, 28))})[0]
        assert logits.shape == (batch, 10)


def test_parity_on_a_seeded_random_model(tmp_path, quick_checkpoint, test_inputs):
    torch.manual_seed(123)
    model, checkpoint = load_model(quick_checkpoint)
    model.reset_parameters()   # random weights: parity must not depend on training
    metadata = build_metadata(checkpoint, "test")
    export_onnx(model, metadata, tmp_path / "random.onnx")
    scripted, _ = load_torchscript_module(export_torchscript(model, metadata, tmp_path / "random.pt"))
    images, labels = test_inputs
    report = check_parity({"eager": torch_runner(model), "torchscript": torch_runner(scripted),
                           "onnxruntime": onnx_runner(onnx_session(tmp_path / "random.onnx"))},
                          images, labels, batch_sizes=(1, 7, 256))
    assert report["passed"], report["failures"]


def test_a_perturbed_onnx_model_fails_parity(tmp_path, quick_checkpoint, test_inputs):
    model, checkpoint = load_model(quick_checkpoint)
    path = export_onnx(model, build_metadata(checkpoint, "test"), tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    weights = max(proto.graph.initializer, key=lambda t: len(t.raw_data))   # the 3136x256 layer
    values = onnx.numpy_helper.to_array(weights).copy()
    values[0, :] += 0.05
    weights.CopyFrom(onnx.numpy_helper.from_array(values, weights.name))
    onnx.save(proto, str(path))
    images, labels = test_inputs
    report = check_parity({"eager": torch_runner(model), "onnxruntime": onnx_runner(onnx_session(path))},
                          images, labels, batch_sizes=(7,))
    assert not report["passed"]
    assert any("onnxruntime at batch 7" in failure for failure in report["failures"])


def test_cli_fails_clearly_and_leaves_nothing_when_parity_fails(tmp_path, quick_checkpoint, data_dir):
    result = CliRunner().invoke(export_cli, ["--checkpoint", str(quick_checkpoint), "--out-dir", str(tmp_path),
                                             "--data-dir", data_dir, "--tolerance", "0", "--force",
                                             "--parity-images", "256"])
    # A zero tolerance cannot hold for ONNX Runtime's kernels: the check must refuse.
    assert result.exit_code == 1
    assert "parity check failed" in result.output and "Traceback" not in result.output
    assert not (tmp_path / ONNX_NAME).exists() and not (tmp_path / TORCHSCRIPT_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [PARITY_REPORT_NAME]


@pytest.mark.parametrize("make_bad,message", [
    (lambda p, good: None, "checkpoint not found"),
    (lambda p, good: p.write_bytes(b"garbage"), "cannot read checkpoint"),
    (lambda p, good: torch.save({**load_checkpoint(good), "format_version": 7}, p), "format_version 7"),
])
def test_cli_rejects_bad_checkpoints(tmp_path, quick_checkpoint, data_dir, make_bad, message):
    bad = tmp_path / "bad.pt"
    make_bad(bad, quick_checkpoint)
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(export_cli, ["--checkpoint", str(bad), "--out-dir", str(out_dir),
                                             "--data-dir", data_dir])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not out_dir.exists()


def test_cli_rejects_an_unwritable_output_dir(tmp_path, quick_checkpoint, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = CliRunner().invoke(export_cli, ["--checkpoint", str(quick_checkpoint), "--out-dir",
                                             str(blocker / "sub"), "--data-dir", data_dir, "--force"])
    assert result.exit_code == 1
    assert "cannot write to" in result.output and "Traceback" not in result.output


def test_int8_model_is_as_accurate_and_records_its_speed(exported):
    """The quantized model of the trained network: metadata, accuracy, and its measured speed
    recorded (whether it is faster is for `make bench` to show, not for a test to enforce)."""
    report = json.loads((exported / PARITY_REPORT_NAME).read_text())["int8"]
    assert report["accuracy_drop_points"] <= 0.3
    assert report["int8"]["images_per_s_batch256"] > 0 and report["speedup_batch256"] > 0
    metadata = read_metadata(exported / INT8_NAME)
    assert "int8" in metadata["quantization"] and metadata["test_acc"] == report["int8"]["test_acc"]
    # One export, one version: TorchScript, ONNX and int8 ONNX name the same weights.
    versions = {load_torchscript_module(exported / TORCHSCRIPT_NAME)[1]["model_version"],
                read_metadata(exported / ONNX_NAME)["model_version"], metadata["model_version"]}
    assert versions == {weights_version(metadata["weights_sha256"])}
    onnx.checker.check_model(onnx.load(str(exported / INT8_NAME)), full_check=True)


# --- a model below the serving floor is not exported by accident; versions name the weights -------

def test_cli_refuses_a_model_below_the_floor_in_one_line_unless_forced(tmp_path, quick_checkpoint, data_dir):
    accuracy = load_checkpoint(quick_checkpoint)["metrics"]["test_acc"]
    assert accuracy < SERVE_ACCURACY_FLOOR      # a 1,024-image smoke run
    args = ["--checkpoint", str(quick_checkpoint), "--out-dir", str(tmp_path / "out"), "--data-dir", data_dir,
            "--parity-images", "256"]
    refused = CliRunner().invoke(export_cli, args)
    assert refused.exit_code == 1
    assert refused.output == (f"Error: {quick_checkpoint} reaches {accuracy:.2%} test accuracy, below the 99% "
                              f"floor for serving: train longer (make train) or pass --force\n")
    assert not (tmp_path / "out").exists()
    forced = CliRunner().invoke(export_cli, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "out" / ONNX_NAME).is_file() and (tmp_path / "out" / TORCHSCRIPT_NAME).is_file()
    # --parity-images: the bounded check says how much it covered, in the report and the card
    assert json.loads((tmp_path / "out" / PARITY_REPORT_NAME).read_text())["images"] == 256
    assert read_metadata(tmp_path / "out" / ONNX_NAME)["test_images"] == 256


def test_a_checkpoint_without_test_accuracy_is_refused(tmp_path, quick_checkpoint, data_dir):
    checkpoint = load_checkpoint(quick_checkpoint)
    del checkpoint["metrics"]["test_acc"]
    torch.save(checkpoint, tmp_path / "unfinished.pt")
    with pytest.raises(AccuracyFloorError, match="records no test accuracy"):
        run_export(ExportConfig(checkpoint=str(tmp_path / "unfinished.pt"), out_dir=str(tmp_path / "out"),
                                data_dir=data_dir))


def test_model_version_names_the_weights(tmp_path, quick_checkpoint):
    checkpoint = load_checkpoint(quick_checkpoint)
    version = build_metadata(checkpoint)["model_version"]
    assert version == build_metadata(load_checkpoint(quick_checkpoint))["model_version"]   # same weights
    assert version.startswith("w-") and len(version) == 2 + 12
    other = {**checkpoint, "model": {name: tensor + 1 if tensor.is_floating_point() else tensor
                                     for name, tensor in checkpoint["model"].items()}}
    assert build_metadata(other)["model_version"] != version                           # other weights
    assert build_metadata(checkpoint, "2.1")["model_version"] == "2.1"                 # explicit wins


def test_the_exported_card_carries_no_local_paths(quick_checkpoint):
    checkpoint = load_checkpoint(quick_checkpoint)
    assert checkpoint["train_config"]["out"], "the checkpoint records where it was written"
    train_config = build_metadata(checkpoint)["train_config"]
    assert not set(LOCAL_PATH_KEYS) & set(train_config), train_config
    assert train_config["epochs"] == checkpoint["train_config"]["epochs"]   # the recipe stays


# --- a directory never holds artifacts of two different exports -----------------------------

def other_weights_checkpoint(tmp_path, quick_checkpoint) -> tuple:
    checkpoint = load_checkpoint(quick_checkpoint)
    checkpoint["model"] = {name: tensor * 1.01 if tensor.is_floating_point() else tensor
                           for name, tensor in checkpoint["model"].items()}
    path = tmp_path / "other.pt"
    torch.save(checkpoint, path)
    return path, checkpoint


def test_a_failed_rename_leaves_the_previous_pair_whole(tmp_path, quick_export, quick_checkpoint, data_dir,
                                                        monkeypatch):
    previous_dir, _ = quick_export
    out_dir = tmp_path / "out"
    shutil.copytree(previous_dir, out_dir)
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    other, _ = other_weights_checkpoint(tmp_path, quick_checkpoint)
    real_replace, failed = os.replace, []

    def replace(source, target):   # the ONNX rename fails once, after the TorchScript one succeeded
        if Path(target).name == ONNX_NAME and not failed:
            failed.append(target)
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        run_export(ExportConfig(checkpoint=str(other), out_dir=str(out_dir), data_dir=data_dir, force=True,
                                batch_sizes=(256,), parity_images=256))
    assert failed
    after = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    assert after.keys() == before.keys()           # no temp file, no backup left
    assert after == before                         # the previous export, whole, report included
    shas = {read_metadata(out_dir / name)["weights_sha256"] for name in (TORCHSCRIPT_NAME, ONNX_NAME)}
    assert len(shas) == 1


def test_artifacts_of_two_exports_are_refused(tmp_path, quick_export, quick_checkpoint):
    out_dir, _ = quick_export
    _, other = other_weights_checkpoint(tmp_path, quick_checkpoint)
    model, _ = load_model(quick_checkpoint)
    model.load_state_dict(other["model"])
    foreign = export_onnx(model, build_metadata(other), tmp_path / ONNX_NAME)
    own = read_metadata(out_dir / ONNX_NAME)["weights_sha256"]
    check_same_weights([out_dir / TORCHSCRIPT_NAME, out_dir / ONNX_NAME], own)
    with pytest.raises(ExportError, match="another export"):
        check_same_weights([out_dir / TORCHSCRIPT_NAME, foreign], own)
