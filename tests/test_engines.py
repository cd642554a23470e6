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
GRPC_IMAGES = 40   # real digits sent one RPC each to both engines
JSON = {"Content-Type": "application/json"}
OCTET = {"Content-Type": "application/octet-stream"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def kserve(tmp_path_factory, exported):
    from serving.kserve.launcher import start, stop
    run_dir = tmp_path_factory.mktemp("kserve")
    engine = start(exported / TORCHSCRIPT_NAME, run_dir, port=free_port(), grpc_port=free_port())
    yield engine
    stop(run_dir)


@pytest.fixture(scope="module")
def kserve_engine(kserve):
    return kserve.address


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


# --- gRPC: TorchServe's own Predictions RPC and KServe's Open Inference Protocol ModelInfer ------
def grpc_files(tmp_path, mnist_digits) -> list:
    """Image files for mnist-predict --grpc: real digits, a drawn K and the corpus's raw bodies.
    JSON bodies are left out: TorchServe's Predictions RPC reads them as JSON requests, while a
    v2 BYTES tensor holds image bytes only (docs/engines.md)."""
    bodies = {f"digit_{index}.png": mnist_digits.png(index) for index in range(GRPC_IMAGES)}
    bodies["letter_k.png"] = drawn_strokes(NOT_DIGITS["K"])
    for number, case in enumerate(hostile_corpus(mnist_digits.images[0], mnist_digits.images[1])):
        if case.body and case.body[:1] not in (b"{", b"["):
            bodies[f"hostile_{number:02d}.bin"] = case.body
    for name, body in bodies.items():
        (tmp_path / name).write_bytes(body)
    return [tmp_path / name for name in bodies]


def test_mnist_predict_over_grpc_answers_the_same_on_both_engines(running_server, kserve, mnist_digits, tmp_path):
    from servers import grpc_target
    from serving.clients.grpc_client import KeySource
    from serving.clients.predict import predict_over_grpc

    files = grpc_files(tmp_path, mnist_digits)
    torchserve = list(predict_over_grpc(files, grpc_target(running_server[2]), KeySource(), api="torchserve"))
    v2 = list(predict_over_grpc(files, kserve.grpc_target, KeySource(), api="v2"))
    assert len(torchserve) == len(v2) == len(files)
    for ours, theirs in zip(torchserve, v2):
        name = ours["file"]
        assert theirs["file"] == name
        assert ("error" in ours) == ("error" in theirs), (name, ours, theirs)
        if "error" in ours:
            assert theirs["code"] == ours["code"], name
            continue
        assert (theirs["digit"], theirs["is_digit"]) == (ours["digit"], ours["is_digit"]), name
        assert theirs["model_version"] == ours["model_version"], name
        assert theirs["probabilities"] == pytest.approx(ours["probabilities"], abs=TOLERANCE), name
    codes = {result.get("code") for result in v2}
    assert {None, "not_an_image", "corrupt_image", "no_digit", "too_large"} <= codes, codes
    assert any(result.get("is_digit") is False for result in v2), "the drawn K is no digit over gRPC v2"


def test_a_refused_image_over_grpc_v2_gets_a_status_and_the_json_code(kserve):
    import grpc

    from serving.clients.v2_grpc import V2_SERVICE, connect_v2
    from serving.handler.parsing import HTTP_STATUS

    with connect_v2(kserve.grpc_target) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.infer_raw([b"hello, I am not an image"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = json.loads(refused.value.details())
    assert details["code"] == "not_an_image" and details["error"], details
    assert HTTP_STATUS["not_an_image"] == 415 and V2_SERVICE == "inference.GRPCInferenceService"


def test_the_draw_a_digit_page_can_post_to_kserve(kserve_engine, mnist_digits):
    """As the page posts (multipart field "data", from the origin config.properties allows):
    the browser shows the answer only with Access-Control-Allow-Origin naming the page's origin."""
    from serving.server.properties import read_properties

    origin = read_properties("config.properties")["cors_allowed_origin"]
    boundary = "pageboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"drawing\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + mnist_digits.png(0) + f"\r\n--{boundary}--\r\n".encode()
    form = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    for sender, allowed in ((origin, True), ("http://evil.example", False)):
        call = urllib.request.Request(predictions_url(kserve_engine), body, {**form, "Origin": sender}, method="POST")
        with urllib.request.urlopen(call, timeout=30) as response:
            assert response.status == 200
            assert json.loads(response.read())["digit"] == mnist_digits.label(0)
            assert (response.headers.get("access-control-allow-origin") == origin) is allowed, sender


def test_the_clients_v2_messages_are_kserves_field_for_field():
    """The client's messages come from TorchServe's open_inference_grpc.proto, KServe's from its
    grpc_predict_v2.proto: the same wire format, or ModelInfer would decode garbage."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as kserve_pb

    from serving.clients.grpc_client import load_stubs

    def fields(message) -> dict:
        found = {message.full_name[len(message.file.package) + 1:]:   # the name within its package
                 {field.name: (field.number, field.type, field.is_repeated) for field in message.fields}}
        for nested in message.nested_types:
            found.update(fields(nested))
        return found

    ours = load_stubs().open_inference_grpc_pb2.DESCRIPTOR.message_types_by_name
    for name in ("ModelInferRequest", "ModelInferResponse", "InferTensorContents", "InferParameter",
                 "ServerReadyRequest", "ServerReadyResponse"):
        assert fields(ours[name]) == fields(kserve_pb.DESCRIPTOR.message_types_by_name[name]), name


def test_make_bench_writes_both_engines_rows_and_their_ratio_into_the_readme_block(tmp_path):
    """The report of benchmarks/run.py's engines step (benchmarks/serve_load.py measure_engines): a
    row per engine in RESULTS.md and the README block, and the KServe engine's speed against
    TorchServe's. Made-up figures: only the writing is tested here; `make bench` measures."""
    from benchmarks import report
    from benchmarks.serve_load import ENGINE_ROWS

    results = json.loads((report.HERE / "results.json").read_text())
    run = {"connections": 16, "duration_s": 1.0, "requests": 100, "non_2xx": 0, "socket_errors": 0}
    results["engines"] = {ENGINE_ROWS[0]: {**run, "requests_per_s": 400.0, "latency_ms": {"p50": 30.0, "p99": 60.0}},
                          ENGINE_ROWS[1]: {**run, "requests_per_s": 300.0, "latency_ms": {"p50": 50.0, "p99": 90.0}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.README_BEGIN}\nold\n{report.README_END}\nafter\n")
    report.update_readme(results, readme)
    block = readme.read_text()
    assert all(row in block for row in ENGINE_ROWS), block
    assert "400 req/s (p50 30.0 ms, p99 60.0 ms) / 300 req/s (p50 50.0 ms, p99 90.0 ms)" in block
    assert "0.75x TorchServe's requests/s (slower" in block
    table = report.markdown(results)
    assert f"| {ENGINE_ROWS[1]} | 300 | 50.0 | 90.0 | 0 | 0 |" in table
