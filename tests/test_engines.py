"""The second engine (docs/engines.md): KServe's Python model server, started once from the same
exported TorchScript file the session's TorchServe archives, answers as TorchServe does.

Parity on real servers: real MNIST test PNGs and the hostile corpus (tests/imaging.py's, and
test_hostile.py's attacks) get the same status, error code, digit, is_digit and probabilities
within 1e-6 from both engines (same file, same backend: TorchScript on CPU).

Concurrency on the KServe engine: while the costliest request a client may send is being
answered, readiness and small predictions (REST and gRPC) are answered first; past its workers
and job_queue_size a request is refused with 503 {"code": "busy"} (gRPC: UNAVAILABLE).
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import re
import socket
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from http_client import request
from imaging import NOT_DIGITS, drawn_strokes, encode, hostile_corpus
from servers import predictions_url
from serving.handler.artifact import MODEL_NAME, TORCHSCRIPT_NAME
from serving.handler.parsing import MAX_IMAGES_PER_REQUEST
from serving.handler.preprocess import MAX_PIXELS_PER_REQUEST
from serving.kserve.launcher import DEFAULT_WORKERS
from test_hostile import attacks

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.trained]

# As the issue asks: the 1,000 images take ~5 s of requests on both engines together.
PARITY_IMAGES = 1000
TOLERANCE = 1e-6
GRPC_IMAGES = 40   # real digits sent one RPC each to both engines
JSON = {"Content-Type": "application/json"}
OCTET = {"Content-Type": "application/octet-stream"}
PNG = {"Content-Type": "image/png"}
# The engine under test queues this many requests beyond its workers (config.properties says 100):
# the flood test fills it with a few large images instead of a hundred.
TEST_QUEUE = 1
# Time for the engine to take in requests just sent, before the test asks something else of it:
# far under the large image's ~0.2-0.5 s of decoding and preprocessing.
SETTLE_S = 0.05


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def kserve(tmp_path_factory, exported):
    """The engine as `make serve ENGINE=kserve` starts it, with config.properties' limits, its
    queue cut to TEST_QUEUE."""
    from serving.kserve.launcher import start, stop
    run_dir = tmp_path_factory.mktemp("kserve")
    config, count = re.subn(r"(?m)^job_queue_size=.*$", f"job_queue_size={TEST_QUEUE}",
                            open("config.properties").read())
    assert count == 1, "config.properties sets job_queue_size once"
    (run_dir / "config.properties").write_text(config)
    engine = start(exported / TORCHSCRIPT_NAME, run_dir, port=free_port(), grpc_port=free_port(),
                   config=run_dir / "config.properties")
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
    """Equal JSON, numbers within TOLERANCE; true is not 1 (Python's True == 1 would pass)."""
    if isinstance(ours, bool) or isinstance(theirs, bool):
        assert ours is theirs, where
    elif isinstance(ours, float) or isinstance(theirs, float):
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


def test_a_form_encoded_image_gets_the_same_hint(running_server, kserve_engine, mnist_digits):
    """`curl --data-binary @digit.png` labels the PNG form-urlencoded. The corpus leaves such bodies
    out (TorchServe's frontend refuses many itself, tests/imaging.py); this real digit reaches the
    handler on TorchServe (tests/test_server.py), and gets its 415 form_encoded on both."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    (status, torchserve), (kserve_status, kserve) = both(running_server, kserve_engine, f"/predictions/{MODEL_NAME}",
                                                         mnist_digits.png(0), form)
    assert (status, torchserve["code"]) == (415, "form_encoded"), torchserve
    assert kserve_status == status
    assert_same(kserve, torchserve)


# The trust threshold decides is_digit; the 1,000 digits alone leave a gap around it (the nearest
# of them scored 0.0105 from it with a model of the test recipe: a threshold moved by less goes
# unseen). Images made to score just above and just below it close that gap to STRADDLE_GAP.
STRADDLE_GAP = 2e-3
NOISE_MARGIN = 1e-5   # far above the engines' float differences (probabilities within 1e-6)
# An MNIST test digit blended into a drawn non-digit (tests/imaging.py NOT_DIGITS), tried in turn. Two
# digits half and half no longer do: a model trained on shifted digits accepts such a blend.
STRADDLE_PAIRS = ((0, "K"), (1, "K"), (2, "star"), (3, "star"))
BISECTIONS = 24       # the blend weight to 2**-24: past the steps of 8-bit pixels
STRADDLE_SIDE = 280   # blended at 10x MNIST's size: each of the 28x28 inputs averages 100 pixels, finer steps


def blend(first: np.ndarray, second: np.ndarray, weight: float) -> bytes:
    """A PNG of (1 - weight) * first + weight * second, each digit upscaled to STRADDLE_SIDE."""
    def upscaled(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize((STRADDLE_SIDE, STRADDLE_SIDE), Image.BILINEAR), dtype=float)
    mixed = (1 - weight) * upscaled(first) + weight * upscaled(second)
    return encode(Image.fromarray(np.rint(mixed).astype(np.uint8)))


def mnist_form(strokes) -> np.ndarray:
    """A drawn non-digit as MNIST's uint8 28x28: white ink on black."""
    drawn = Image.open(io.BytesIO(drawn_strokes(strokes))).convert("L")
    return 255 - np.asarray(drawn.resize((28, 28), Image.LANCZOS), dtype=np.uint8)


def threshold_straddlers(artifact, first: np.ndarray, second: np.ndarray) -> dict[bool, tuple[bytes, float]]:
    """{True: (a PNG scoring just above the trust threshold, its distance), False: one just below}:
    bisection on the blend of a digit (accepted) with a non-digit (refused), scored in this process
    with the artifact both engines load; {} when the two ends are not so."""
    from serving.handler.artifact import Trust, load
    from serving.handler.preprocess import preprocess_bytes

    run, metadata = load(artifact)
    trust = Trust.from_metadata(metadata)

    def distance(data: bytes) -> float:
        pixels = preprocess_bytes(data, float(metadata["mean"]), float(metadata["std"]))[None]
        return float(trust.scores(run(pixels.astype(np.float32)))[0]) - trust.threshold

    accepted, refused = 0.0, 1.0
    if not distance(blend(first, second, accepted)) > 0 > distance(blend(first, second, refused)):
        return {}
    nearest: dict[bool, tuple[bytes, float]] = {}
    for _ in range(BISECTIONS):
        weight = (accepted + refused) / 2
        data = blend(first, second, weight)
        gap = distance(data)
        accepted, refused = (weight, refused) if gap >= 0 else (accepted, weight)
        side = gap >= 0
        if abs(gap) >= NOISE_MARGIN and abs(gap) < nearest.get(side, (b"", math.inf))[1]:
            nearest[side] = (data, abs(gap))
    return nearest


def test_images_at_the_trust_threshold_get_the_same_is_digit(running_server, kserve_engine, exported, mnist_digits):
    tried = {}
    for first, second in STRADDLE_PAIRS:   # the first pair whose blends come close enough on both sides
        straddlers = threshold_straddlers(exported / TORCHSCRIPT_NAME, mnist_digits.images[first],
                                          mnist_form(NOT_DIGITS[second]))
        tried[first, second] = gaps = {side: gap for side, (_, gap) in straddlers.items()}
        if gaps.keys() == {True, False} and max(gaps.values()) <= STRADDLE_GAP:
            break
    else:
        pytest.fail(f"no blend of {STRADDLE_PAIRS} came within {STRADDLE_GAP} of the threshold: {tried}")
    for is_digit, (image, gap) in straddlers.items():
        (status, torchserve), (kserve_status, kserve) = both(running_server, kserve_engine,
                                                             f"/predictions/{MODEL_NAME}", image, OCTET)
        assert status == kserve_status == 200
        assert torchserve["is_digit"] is is_digit, f"TorchServe, {gap:.1e} from the threshold"
        assert_same(kserve, torchserve, f"{is_digit}: {gap:.1e} from the threshold")


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


# --- Concurrency: answers run off the event loop, in a bounded pool ---------------------------------
@pytest.fixture(scope="module")
def largest_image() -> bytes:
    """A "1" on a white page of MAX_PIXELS_PER_REQUEST pixels, the most one request may decode:
    the costliest request a client may send (~50 KB of PNG, ~0.2-0.5 s to answer on one core)."""
    side = math.isqrt(MAX_PIXELS_PER_REQUEST)
    page = np.full((side, side), 255, dtype=np.uint8)
    page[side // 4:3 * side // 4, side // 2 - side // 20:side // 2 + side // 20] = 0
    return encode(Image.fromarray(page))


def post_in_background(kserve, image: bytes, over: str, answers: list) -> threading.Thread:
    """Send image to the engine over REST or gRPC v2 from a thread; return once it is sent. The
    thread appends ("slow", status or gRPC code name, digit or None) to answers."""
    from serving.clients.grpc_client import PredictionError
    from serving.clients.v2_grpc import connect_v2

    sent = threading.Event()

    def rest() -> None:
        url = urllib.parse.urlsplit(kserve.address)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        connection.request("POST", f"/predictions/{MODEL_NAME}", image, PNG)
        sent.set()
        response = connection.getresponse()
        body = json.loads(response.read())
        answers.append(("slow", response.status, body.get("digit")))

    def grpc_v2() -> None:
        with connect_v2(kserve.grpc_target) as client:
            client.ready()   # connected: the call below goes out at once
            sent.set()
            try:
                answers.append(("slow", "OK", client.predict(image, timeout_s=60)["digit"]))
            except PredictionError as refused:
                answers.append(("slow", refused.code, None))

    thread = threading.Thread(target=rest if over == "rest" else grpc_v2)
    thread.start()
    assert sent.wait(30), "the large image went out"
    return thread


@pytest.mark.parametrize("slow_over", ["rest", "grpc"])
def test_a_slow_request_holds_up_no_other(kserve, largest_image, mnist_digits, slow_over):
    """While the largest image is being answered, readiness, a small REST prediction and a small
    gRPC v2 prediction all come back before it does (before the fix, its decoding ran on the
    event loop and every other request waited for it)."""
    from serving.clients.v2_grpc import connect_v2

    answers: list = []
    with connect_v2(kserve.grpc_target) as client:
        client.ready()   # connected before the clock starts
        start = time.monotonic()
        slow = post_in_background(kserve, largest_image, slow_over, answers)
        time.sleep(SETTLE_S)
        with urllib.request.urlopen(f"{kserve.address}/v2/health/ready", timeout=30) as response:
            answers.append(("ready", response.status, json.loads(response.read())["ready"]))
        status, body = request(predictions_url(kserve.address), mnist_digits.png(0), headers=PNG)
        answers.append(("small rest", status, json.loads(body).get("digit")))
        answers.append(("small grpc", "OK", client.predict(mnist_digits.png(1))["digit"]))
    small_s = time.monotonic() - start
    slow.join(60)
    timing = f"small ones done {small_s:.3f} s, slow one {time.monotonic() - start:.3f} s after it started"
    assert [answer[0] for answer in answers] == ["ready", "small rest", "small grpc", "slow"], (answers, timing)
    ok = 200 if slow_over == "rest" else "OK"
    assert answers == [("ready", 200, True), ("small rest", 200, mnist_digits.label(0)),
                       ("small grpc", "OK", mnist_digits.label(1)), ("slow", ok, 1)], (answers, timing)


def test_a_flood_past_the_queue_gets_503_busy_while_readiness_answers(kserve, largest_image, mnist_digits):
    """DEFAULT_WORKERS large images in progress and TEST_QUEUE waiting fill the engine: the next
    request is refused at once, 503 {"code": "busy"} over REST and UNAVAILABLE with that JSON over
    gRPC, as TorchServe answers 503 past job_queue_size; readiness still answers; the admitted ones
    are all answered."""
    import grpc

    from serving.clients.v2_grpc import connect_v2

    answers: list = []
    with connect_v2(kserve.grpc_target) as client:
        client.ready()   # connected before the flood
        flood = [post_in_background(kserve, largest_image, "rest", answers)
                 for _ in range(DEFAULT_WORKERS + TEST_QUEUE)]
        time.sleep(SETTLE_S)
        status, body = request(predictions_url(kserve.address), mnist_digits.png(0), headers=PNG)
        with pytest.raises(grpc.RpcError) as refused:
            client.infer_raw([mnist_digits.png(0)])
    assert status == 503 and json.loads(body)["code"] == "busy", (status, body)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert json.loads(refused.value.details())["code"] == "busy"
    with urllib.request.urlopen(f"{kserve.address}/v2/health/ready", timeout=30) as response:
        assert json.loads(response.read())["ready"] is True
    for thread in flood:
        thread.join(60)
    assert answers == [("slow", 200, 1)] * len(flood), "the admitted requests are answered"


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


def test_the_engine_runs_torchscript_on_the_threads_it_is_given(exported):
    """--threads reached ONNX Runtime only: a TorchScript file ran on torch's default (every
    core) in each of the engine's answer threads, which oversubscribed the cores."""
    import torch

    from serving.kserve.engine import DigitModel

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        DigitModel(str(exported / TORCHSCRIPT_NAME), threads=1, workers=DEFAULT_WORKERS, queue_size=4).load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
