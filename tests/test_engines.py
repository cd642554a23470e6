"""The second engine (docs/engines.md): KServe's Python model server, started once from the same
exported TorchScript file the session's TorchServe archives, answers as TorchServe does.

Parity on real servers: real MNIST test PNGs and the hostile corpus (tests/imaging.py's, and
test_hostile.py's attacks) get the same status, error code, digit, is_digit and probabilities
within 1e-6 from both engines (same file, same backend: TorchScript on CPU).
"""
from __future__ import annotations

import base64
import json
import socket
import urllib.request

import pytest

from http_client import request
from imaging import NOT_DIGITS, drawn_strokes, hostile_corpus
from servers import predictions_url
from serving.handler.artifact import MODEL_NAME, TORCHSCRIPT_NAME
from serving.handler.parsing import MAX_IMAGES_PER_REQUEST
from test_hostile import attacks

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.trained]

# As the issue asks: the 1,000 images take ~5 s of requests on both engines together.
PARITY_IMAGES = 1000
TOLERANCE = 1e-6
JSON = {"Content-Type": "application/json"}
OCTET = {"Content-Type": "application/octet-stream"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def kserve_engine(tmp_path_factory, exported):
    from serving.kserve.launcher import start, stop
    run_dir = tmp_path_factory.mktemp("kserve")
    engine = start(exported / TORCHSCRIPT_NAME, run_dir, port=free_port())
    yield engine.address
    stop(run_dir)


def both(running_server, kserve_engine, path: str, body: bytes, headers: dict) -> list[tuple[int, dict]]:
    """The status and JSON answer of each engine (TorchServe, KServe) to one request."""
    answers = []
    for base in (running_server[0], kserve_engine):
        status, text = request(f"{base}{path}", body, headers=headers)
        answers.append((status, json.loads(text)))
    return answers


def assert_same(ours: object, theirs: object, where: str = "") -> None:
    """Equal JSON, numbers within TOLERANCE."""
    if isinstance(ours, float) or isinstance(theirs, float):
        assert ours == pytest.approx(theirs, abs=TOLERANCE), where
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for index, (mine, other) in enumerate(zip(ours, theirs)):
            assert_same(mine, other, f"{where}[{index}]")
    else:
        assert ours == theirs, where


def test_real_digits_get_the_same_answers(running_server, kserve_engine, mnist_digits):
    pngs = [base64.b64encode(mnist_digits.png(index)).decode() for index in range(PARITY_IMAGES)]
    digits = []
    for first in range(0, PARITY_IMAGES, MAX_IMAGES_PER_REQUEST):
        body = json.dumps({"images": pngs[first:first + MAX_IMAGES_PER_REQUEST]}).encode()
        (status, torchserve), (kserve_status, kserve) = both(running_server, kserve_engine, f"/predictions/{MODEL_NAME}",
                                                             body, JSON)
        assert status == kserve_status == 200
        assert_same(kserve, torchserve, f"images {first}+")
        digits += [answer["digit"] for answer in kserve["predictions"]]
    right = sum(digit == mnist_digits.label(index) for index, digit in enumerate(digits))
    assert right >= 0.95 * PARITY_IMAGES, "both engines agree, and on a model that reads digits"


def test_v2_answers_are_the_same(running_server, kserve_engine, mnist_digits):
    data = [base64.b64encode(mnist_digits.png(index)).decode() for index in range(3)]
    data.append(base64.b64encode(drawn_strokes(NOT_DIGITS["K"])).decode())
    body = json.dumps({"id": "parity", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [4],
                                                   "data": data}]}).encode()
    (status, torchserve), (kserve_status, kserve) = both(running_server, kserve_engine,
                                                         f"/v2/models/{MODEL_NAME}/infer", body, JSON)
    assert status == kserve_status == 200
    assert_same(kserve, torchserve)
    assert kserve["outputs"][2]["data"][-1] is False, "the drawn K is no digit on either engine"


def hostile(mnist_digits) -> list[tuple[str, bytes, dict]]:
    corpus = [(case.name, case.body, case.headers)
              for case in hostile_corpus(mnist_digits.images[0], mnist_digits.images[1])]
    return corpus + [(attack.name, attack.body, attack.headers) for attack in attacks(mnist_digits.images[0])
                     if "describe" not in attack.headers]   # the describe card is TorchServe's own (docs/engines.md)


def test_hostile_requests_get_the_same_answers(running_server, kserve_engine, mnist_digits):
    for name, body, headers in hostile(mnist_digits):
        (status, torchserve), (kserve_status, kserve) = both(running_server, kserve_engine,
                                                             f"/predictions/{MODEL_NAME}", body, headers)
        assert kserve_status == status, name
        assert_same(kserve, torchserve, name)


def test_refusals_and_digits_are_counted_and_the_engine_is_ready(kserve_engine, mnist_digits):
    def scraped() -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(f"{kserve_engine}/metrics", timeout=10) as response:
            families = text_string_to_metric_families(response.read().decode())
            return {f"{sample.name}{sorted(sample.labels.items())}": sample.value
                    for family in families for sample in family.samples}

    before = scraped()
    digit = mnist_digits.label(0)
    assert request(predictions_url(kserve_engine), mnist_digits.png(0), headers=OCTET)[0] == 200
    assert request(predictions_url(kserve_engine), b"", headers=OCTET)[0] == 400
    after = scraped()
    grown = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    assert grown.get(f"digitserve_digit_predictions_total{[('digit', str(digit))]}") == 1.0, grown
    assert grown.get(f"digitserve_requests_rejected_total{[('code', 'empty')]}") == 1.0, grown
    for path in ("/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"):
        with urllib.request.urlopen(f"{kserve_engine}{path}", timeout=10) as response:
            assert json.loads(response.read())["ready"] is True, path
