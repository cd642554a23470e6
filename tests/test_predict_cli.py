import json

import pytest
from click.testing import CliRunner
from PIL import Image

from serving.handler.artifact import ONNX_NAME, TORCHSCRIPT_NAME, read_metadata
from imaging import as_paper_photo
from serving.clients.predict import main as predict_cli


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, mnist_digits):
    images, labels = mnist_digits
    folder = tmp_path_factory.mktemp("images")
    expected = {}
    for index in range(20):
        path = folder / f"{index:02d}.png"
        Image.fromarray(images[index]).save(path)
        expected[str(path)] = int(labels[index])
    photo = folder / "photo.jpg"
    as_paper_photo(images[20]).save(photo)
    expected[str(photo)] = int(labels[20])
    return folder, expected


def run(args):
    result = CliRunner().invoke(predict_cli, args)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, lines


@pytest.mark.parametrize("model_name,backend", [(ONNX_NAME, "auto"), (TORCHSCRIPT_NAME, "torchscript")])
def test_folder_prediction_is_correct_and_batched(exported, image_folder, model_name, backend):
    folder, expected = image_folder
    result, lines = run(["--model", str(exported / model_name), "--backend", backend, "--batch-size", "8",
                         str(folder)])
    assert result.exit_code == 0, result.output
    assert [line["file"] for line in lines] == sorted(expected)
    correct = sum(line["digit"] == expected[line["file"]] for line in lines)
    assert correct >= len(expected) - 1
    assert all(abs(sum(line["probabilities"]) - 1) < 1e-6 for line in lines)
    assert {line["model_version"] for line in lines} == {read_metadata(exported / model_name)["model_version"]}


def test_onnx_and_torchscript_agree(exported, image_folder):
    folder, _ = image_folder
    _, onnx_lines = run(["--model", str(exported / ONNX_NAME), str(folder)])
    _, ts_lines = run(["--model", str(exported / TORCHSCRIPT_NAME), str(folder)])
    assert [line["digit"] for line in onnx_lines] == [line["digit"] for line in ts_lines]
    for a, b in zip(onnx_lines, ts_lines):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_bad_files_are_reported_without_stopping_the_rest(exported, image_folder, tmp_path):
    folder, expected = image_folder
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    missing = tmp_path / "missing.png"
    good = sorted(expected)[:2]
    result, lines = run(["--model", str(exported / ONNX_NAME), good[0], str(bad), str(missing), good[1]])
    assert result.exit_code == 1
    assert [line.get("code") for line in lines] == [None, "not_an_image", "unreadable", None]
    assert lines[0]["digit"] == expected[good[0]] and lines[3]["digit"] == expected[good[1]]
    assert "2 of 4 file(s) failed" in result.stderr and "Traceback" not in result.output


def test_missing_model_and_backend_mismatch(exported, image_folder, tmp_path):
    folder, _ = image_folder
    result, _ = run(["--model", str(tmp_path / "none.onnx"), str(folder)])
    assert result.exit_code == 1 and "model not found" in result.output
    result, _ = run(["--model", str(exported / ONNX_NAME), "--backend", "torchscript", str(folder)])
    assert result.exit_code == 2 and "does not match" in result.output


def test_a_training_checkpoint_gets_a_one_line_hint(quick_checkpoint, image_folder, tmp_path):
    """The checkpoint, like the exports, ends in .pt: say which file to use instead of torch's
    "internal miniz error" about a likely corrupt file."""
    folder, _ = image_folder
    result, lines = run(["--model", str(quick_checkpoint), str(folder)])
    assert result.exit_code == 1 and lines == []
    message = result.output.strip()
    assert message == (f"Error: {quick_checkpoint} is a training checkpoint, not an exported model: run `make export` "
                       f"(mnist-export) and use {quick_checkpoint.parent / TORCHSCRIPT_NAME} or "
                       f"{quick_checkpoint.parent / ONNX_NAME}")
    # Any other file that is not TorchScript keeps torch's own first line.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    result, _ = run(["--model", str(junk), str(folder)])
    assert result.exit_code == 1 and f"cannot load model {junk}" in result.output
    assert "training checkpoint" not in result.output


# --- the gRPC key: from a file or the environment, never argv ---------------------------------
def test_a_key_on_the_command_line_is_refused(tmp_path):
    result = CliRunner().invoke(predict_cli, ["--grpc", "127.0.0.1:7070", "--key", "secret", str(tmp_path)])
    assert result.exit_code == 2
    assert "--key was removed" in result.output and "--key-file" in result.output
    assert "DIGITSERVE_INFERENCE_KEY" in result.output


@pytest.mark.parametrize("content,why", [
    (None, "no such file"),
    ('{"management": {"key": "m"}}', "no inference key in it"),
])
def test_a_key_file_without_a_key_fails_in_one_line(tmp_path, content, why):
    key_file = tmp_path / "key_file.json"
    if content is not None:
        key_file.write_text(content)
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    result = CliRunner().invoke(predict_cli, ["--grpc", "127.0.0.1:7070", "--key-file", str(key_file), str(image)])
    assert result.exit_code == 1
    assert result.output == f"Error: key file {key_file}: {why} (TorchServe writes key_file.json in the " \
                            f"directory it was started from)\n"


def test_a_key_file_needs_grpc(tmp_path):
    result = CliRunner().invoke(predict_cli, ["--key-file", str(tmp_path / "key_file.json"), str(tmp_path)])
    assert result.exit_code == 2 and "--key-file goes with --grpc" in result.output
