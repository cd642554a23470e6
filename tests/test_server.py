"""End to end: build the archive, start a real TorchServe from config.properties on free
ports, send real MNIST digits the way curl does, check answers and error statuses, stop it."""
import base64
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from http_client import request
from imaging import as_paper_photo, hostile_corpus
from serving.handler.artifact import MODEL_NAME
from servers import predictions_url

pytestmark = [pytest.mark.server, pytest.mark.slow]


def curl(*args):
    run = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
    body, _, status = run.stdout.rpartition("\n")
    return int(status), json.loads(body)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, mnist_digits):
    images, labels = mnist_digits
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for index in range(300):
        path = folder / f"{index}.png"
        Image.fromarray(images[index]).save(path)
        paths.append((path, int(labels[index])))
    return paths


def test_accuracy_on_300_real_test_digits_with_concurrent_clients(running_server, digit_files,
                                                                  trained_min_accuracy):
    inference, _, _ = running_server

    def predict(item):
        path, label = item
        status, body = request(predictions_url(inference), path.read_bytes())
        return status, json.loads(body), label

    with ThreadPoolExecutor(8) as pool:    # concurrent clients exercise server-side batching
        results = list(pool.map(predict, digit_files))
    assert all(status == 200 for status, _, _ in results)
    correct = sum(body["digit"] == label for _, body, label in results)
    assert correct / len(results) >= trained_min_accuracy, correct
    for _, body, _ in results:
        assert abs(sum(body["probabilities"]) - 1) < 1e-6


def test_curl_upload_styles(running_server, digit_files):
    inference, _, _ = running_server
    path, label = digit_files[0]
    url = predictions_url(inference)
    b64 = base64.b64encode(path.read_bytes()).decode()
    for args in (["-T", str(path), url],
                 ["--data-binary", f"@{path}", "-H", "Content-Type: image/png", url],
                 ["-F", f"data=@{path}", url],
                 ["-H", "Content-Type: application/json", "-d", json.dumps({"image": b64}), url]):
        status, body = curl(*args)
        assert status == 200 and body["digit"] == label, (args[0], body)


def test_form_encoded_binary_gets_a_hint_not_empty(running_server, digit_files):
    inference, _, _ = running_server
    status, body = curl("--data-binary", f"@{digit_files[0][0]}", predictions_url(inference))
    assert status == 415 and body["code"] == "form_encoded" and "curl -T" in body["error"]


def test_paper_photo_jpeg(running_server, mnist_digits, tmp_path):
    inference, _, _ = running_server
    images, labels = mnist_digits
    photo = tmp_path / "photo.jpg"
    as_paper_photo(images[3], size=(640, 480), scale=12, offset=(300, 60)).save(photo, quality=90)
    status, body = curl("-T", str(photo), predictions_url(inference))
    assert status == 200 and body["digit"] == int(labels[3])


@pytest.mark.reliability
def test_hostile_corpus_gets_4xx_json_and_the_next_good_request_succeeds(running_server, mnist_digits,
                                                                       digit_files, reliability_log):
    inference, _, _ = running_server
    images, labels = mnist_digits
    url = predictions_url(inference)
    good_path, good_label = digit_files[1]
    failures, requests_sent, server_errors = [], 0, 0
    for name, body, headers, status, code in hostile_corpus(images[0], images[1]):
        got_status, got_body = request(url, body, headers=headers)
        ok_status, ok_body = request(url, good_path.read_bytes())
        requests_sent += 2
        server_errors += (got_status >= 500) + (ok_status >= 500)
        answer = json.loads(got_body)
        expected = {"digit": int(labels[0])} if code is None else {"code": code}
        if got_status != status or any(answer.get(k) != v for k, v in expected.items()):
            failures.append((name, got_status, answer))
        if code is not None and not answer.get("error"):
            failures.append((name, "error message missing", answer))
        if ok_status != 200 or json.loads(ok_body)["digit"] != good_label:
            failures.append((name, "next good request failed", ok_status))
    cases = len(hostile_corpus(images[0], images[1]))
    reliability_log.append({"check": "hostile input corpus (real server)", "cases": cases,
                            "passed": cases - len({f[0] for f in failures}), "requests": requests_sent,
                            "5xx": server_errors, "worker restarts": "", "lost": 0})
    assert not failures, failures
    assert server_errors == 0


def test_body_over_the_size_limit_is_refused(running_server, digit_files, tmp_path):
    inference, _, _ = running_server
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * (5 * 1024 * 1024))   # over max_request_size (4 MiB)
    run = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(big),
                          predictions_url(inference)], capture_output=True, text=True, timeout=60)
    assert run.stdout == "413"
    path, label = digit_files[2]
    ok_status, ok_body = request(predictions_url(inference), path.read_bytes())
    assert ok_status == 200 and json.loads(ok_body)["digit"] == label


def test_model_card_via_management_api(running_server, trained_min_accuracy):
    _, management, _ = running_server
    status, body = request(f"{management}/models/{MODEL_NAME}?customized=true", method="GET")
    assert status == 200
    description = json.loads(body)[0]
    card = description["customizedMetadata"]   # TorchServe inlines the handler's JSON text
    card = json.loads(card) if isinstance(card, str) else card
    assert card["model_version"] == f"w-{card['weights_sha256'][:12]}" and card["labels"][3] == "3"
    assert card["mean"] == pytest.approx(0.1307) and card["std"] == pytest.approx(0.3081)
    assert card["test_acc"] >= trained_min_accuracy and card["train_config"]["epochs"] == 2
    assert not {"data_dir", "out", "tensorboard"} & set(card["train_config"])   # no paths of the training host

