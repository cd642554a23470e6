"""The handler's request model (serving/handler/parsing.py) without TorchServe or a model: which
requests are refused with which code, how each is answered, and that nothing raises."""
import base64
import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imaging import encode
from serving.handler.parsing import (HTTP_STATUS, MAX_IMAGES_PER_EXPLANATION, MAX_IMAGES_PER_REQUEST, EncodedRequest,
                                     ParsedRequest, answer_body, content_type, decode_base64, images_from_request,
                                     parse_batch)
from serving.handler.preprocess import UNIT_FRAME, Framed, ImageError
from training.data import MNIST_MEAN, MNIST_STD


def drawn_digit() -> bytes:
    """A one: a white stroke on black, 28x28, as a PNG."""
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).line([(14, 5), (14, 22)], fill=255, width=3)
    return encode(image)


GOOD = drawn_digit()
GOOD_B64 = base64.b64encode(GOOD).decode()


def v2_document(data, request_id=None) -> dict:
    document = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}]}
    return {**document, "id": request_id} if request_id is not None else document


def parse(*requests, headers=None):
    return parse_batch(list(requests), headers or [None] * len(requests), MNIST_MEAN, MNIST_STD)


def test_decode_base64_returns_bytes_or_the_error():
    assert decode_base64(GOOD_B64) == GOOD
    assert decode_base64("data:image/png;base64," + GOOD_B64) == GOOD
    for bad in ("%%% not base64", 7, None):
        error = decode_base64(bad)
        assert isinstance(error, ImageError) and error.code == "invalid_base64"


@pytest.mark.parametrize("request_dict,code", [
    ({}, "empty"),
    ({"body": None}, "empty"),
    ({"body": {"nothing": 1}}, "no_image_field"),
    ({"body": {"image": "%%%"}}, "invalid_base64"),
    ({"body": {"images": []}}, "no_image_field"),
    ({"body": -1}, "no_image_field"),            # bytes(-1) would raise: the whole batch got 503
    ({"body": 10 ** 20}, "no_image_field"),      # bytes(10**20) would exhaust memory
    ({"body": b'{"broken json'}, "invalid_json"),
    ({"body": b"[" * 100_000 + b"]" * 100_000}, "invalid_json"),   # json.loads: RecursionError
    ({"body": {"inputs": []}}, "no_image_field"),
    ({"body": v2_document([GOOD_B64, "%%%"])}, "invalid_base64"),
])
def test_requests_refused_before_preprocessing(request_dict, code):
    refused = images_from_request(request_dict)
    assert isinstance(refused, ImageError) and refused.code == code and str(refused)


def test_how_each_request_is_answered():
    assert images_from_request({"body": GOOD}) == EncodedRequest("one", [GOOD])
    assert images_from_request({"body": GOOD.decode("latin-1")}).answer == "one"   # a text/* body, decoded
    assert images_from_request({"body": {"image": GOOD_B64}}) == EncodedRequest("one", [GOOD])
    assert images_from_request({"body": json.dumps({"image": GOOD_B64}).encode()}) == EncodedRequest("one", [GOOD])
    several = images_from_request({"body": {"images": [GOOD_B64, "%%%"]}})
    assert several.answer == "many" and several.images[0] == GOOD and several.images[1].code == "invalid_base64"
    form = images_from_request({"data": GOOD, "other": bytearray(GOOD), "text": "a field"})
    assert form.answer == "many" and form.images[:2] == [GOOD, GOOD] and form.images[2].code == "not_an_image"
    assert images_from_request({"body": v2_document([GOOD_B64], "42")}) == EncodedRequest("v2", [GOOD], "42")
    assert images_from_request({"body": v2_document([GOOD_B64], 42)}).id is None   # only a string id is echoed


def test_content_type_is_found_whatever_the_header_case():
    assert content_type({"content-TYPE": "image/png"}) == "image/png"
    assert content_type({"Accept": "x"}) == "" and content_type(None) == ""


def test_a_batch_keeps_good_images_and_answers_each_request_on_its_own():
    batch = parse({"body": GOOD},                                       # one
                  {"body": b"plain text"},                              # refused
                  {"body": {"images": [GOOD_B64, "%%%", GOOD_B64]}},    # many: one bad image of three
                  {"body": v2_document([GOOD_B64, GOOD_B64], "7")})     # v2
    assert batch.inputs.shape == (5, 1, 28, 28) and batch.inputs.dtype == np.float32
    one, refused, many, v2 = batch.requests
    assert one == ParsedRequest("one", [0])
    assert refused.error.code == "not_an_image" and refused.slots == []
    assert many.answer == "many" and many.slots[0] == 1 and many.slots[1].code == "invalid_base64"
    assert many.slots[2] == 2
    assert v2 == ParsedRequest("v2", [3, 4], "7")
    assert [len(request.outcomes()) for request in batch.requests] == [1, 1, 3, 2]


def test_v2_and_single_images_are_all_or_nothing():
    batch = parse({"body": v2_document([GOOD_B64, base64.b64encode(b"not an image").decode()])},
                  {"body": encode(Image.new("L", (40, 40), 255))})
    assert batch.inputs is None     # the good image of the refused v2 request is not run
    assert [request.error.code for request in batch.requests] == ["not_an_image", "no_digit"]


def test_form_encoded_requests_are_refused_with_a_hint():
    batch = parse({"body": GOOD}, {"body": GOOD},
                  headers=[{"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
                           {"content-type": "image/png"}])
    refused, served = batch.requests
    assert refused.error.code == "form_encoded" and "curl -T" in str(refused.error)
    assert served == ParsedRequest("one", [0])


def test_answer_bodies():
    answers = [{"digit": 1, "is_digit": True, "probabilities": [0.0, 1.0]},
               {"digit": 0, "is_digit": False, "probabilities": [1.0, 0.0]}]
    error = ImageError("no_digit", "blank")
    assert answer_body(ParsedRequest("one", [1]), answers, "mnist", "v1") == answers[1]
    assert answer_body(ParsedRequest.refused(error), answers, "mnist", "v1") == {"error": "blank", "code": "no_digit"}
    assert answer_body(ParsedRequest("many", [0, error]), answers, "mnist", "v1") == {
        "predictions": [answers[0], {"error": "blank", "code": "no_digit"}]}
    v2 = answer_body(ParsedRequest("v2", [1, 0], "9"), answers, "mnist", "v1")
    assert (v2["model_name"], v2["model_version"], v2["id"]) == ("mnist", "v1", "9")
    assert v2["outputs"][0]["data"] == [0, 1] and v2["outputs"][1] == {
        "name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 0.0, 0.0, 1.0]}
    assert v2["outputs"][2] == {"name": "is_digit", "datatype": "BOOL", "shape": [2], "data": [False, True]}


def test_every_error_code_has_a_4xx_status():
    assert all(400 <= status < 500 for status in HTTP_STATUS.values())


# --- One request can never hurt another -----------------------------------------------------
def test_too_many_images_are_refused_in_every_shape_before_decoding():
    over = MAX_IMAGES_PER_REQUEST + 1
    # Undecodable items: a count checked after decoding would answer invalid_base64 / per image.
    for request in ({"body": {"images": ["%%%"] * over}},
                    {"body": {"images": [""] * 20_000}},        # 60 KB that killed a worker
                    {"body": v2_document(["%%%"] * over)},
                    {f"file{i}": b"not an image" for i in range(over)}):
        refused = images_from_request(request)
        assert isinstance(refused, ImageError) and refused.code == "too_many_images", request.keys()
        assert HTTP_STATUS[refused.code] == 413 and str(MAX_IMAGES_PER_REQUEST) in str(refused)
    at_the_limit = parse({"body": {"images": [GOOD_B64] * MAX_IMAGES_PER_REQUEST}})
    assert at_the_limit.inputs.shape[0] == MAX_IMAGES_PER_REQUEST


def test_the_image_cap_is_in_the_contract():
    import yaml

    from repo import REPO_ROOT
    spec = yaml.safe_load((REPO_ROOT / "serving" / "server" / "openapi.yaml").read_text())
    schemas = spec["components"]["schemas"]
    assert schemas["ImagesRequest"]["properties"]["images"]["maxItems"] == MAX_IMAGES_PER_REQUEST
    v2_input = schemas["V2InferenceRequest"]["properties"]["inputs"]["items"]["properties"]
    assert v2_input["data"]["maxItems"] == MAX_IMAGES_PER_REQUEST
    page = (REPO_ROOT / "serving" / "web" / "index.html").read_text()
    assert f"at most {MAX_IMAGES_PER_REQUEST} per request" in page


def test_a_huge_json_integer_is_invalid_json():
    # TorchServe's own json.loads fails on it (Python's 4,300-digit limit) and passes the bytes on.
    refused = images_from_request({"body": b"[" + b"1" * 5000 + b"]"})
    assert isinstance(refused, ImageError) and refused.code == "invalid_json"


def test_anything_a_request_raises_is_its_own_400_logged_once(monkeypatch, caplog):
    import serving.handler.parsing as parsing

    real = parsing.images_from_request

    def images_from_request_that_breaks(request):
        if request.get("body") == b"boom":
            raise ArithmeticError("nobody thought of this")
        return real(request)
    monkeypatch.setattr(parsing, "images_from_request", images_from_request_that_breaks)
    with caplog.at_level(logging.INFO, logger="serving.handler.parsing"):
        batch = parse({"body": GOOD}, {"body": b"boom"}, {"body": GOOD})
    served, broken, also_served = batch.requests
    assert broken.error.code == "invalid_request" and HTTP_STATUS["invalid_request"] == 400
    assert "ArithmeticError" in str(broken.error)
    assert served == ParsedRequest("one", [0]) and also_served == ParsedRequest("one", [1])
    assert batch.inputs.shape[0] == 2
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


def test_a_request_that_breaks_midway_runs_none_of_its_images(monkeypatch):
    import serving.handler.parsing as parsing

    calls = []

    def preprocess_framed_that_breaks_on_the_third(data, mean, std, budget=None):
        calls.append(data)
        if len(calls) == 3:
            raise RecursionError("deep")
        return Framed(np.zeros((1, 28, 28), np.float32), UNIT_FRAME)
    monkeypatch.setattr(parsing, "preprocess_framed", preprocess_framed_that_breaks_on_the_third)
    batch = parse({"body": GOOD}, {"body": {"images": [GOOD_B64, GOOD_B64]}})
    assert batch.requests[1].error.code == "invalid_request" and batch.inputs.shape[0] == 1


def test_failed_images_keep_code_and_message_only():
    """A raised ImageError's traceback holds the decoder's frames, its bytes and pixels with them."""
    not_an_image = base64.b64encode(b"plain text").decode()
    [request] = parse({"body": {"images": [GOOD_B64, not_an_image]}}).requests
    failed = request.slots[1]
    assert failed.code == "not_an_image" and str(failed)
    assert failed.__traceback__ is None and failed.__context__ is None and failed.__cause__ is None


def test_the_pixel_budget_is_per_request():
    """Blank 6000x6000 PNGs (36 MP, 0.1 MB each): one fits the request's budget, a second does
    not (issue 27 point 3: two ~40 MP images a request, at 15 requests/s, starved other clients);
    a small image after the large one still fits, and the next request has its own budget."""
    blank = base64.b64encode(encode(Image.new("L", (6000, 6000), 255))).decode()
    batch = parse({"body": {"images": [blank, blank, GOOD_B64]}}, {"body": {"images": [blank]}})
    codes = [getattr(slot, "code", "decoded") for slot in batch.requests[0].slots]
    assert codes == ["no_digit", "too_large", "decoded"], codes
    assert batch.requests[1].slots[0].code == "no_digit"   # the next request has its own budget


def test_the_largest_answer_fits_max_response_size():
    """TorchServe kills the worker whose answer passes max_response_size; with the image cap,
    the largest answer (64 predictions, or 64 of the longest error) must fit in both configs."""
    from repo import REPO_ROOT
    from serving.handler.artifact import Trust, predictions
    from serving.server.properties import read_properties

    # Uniform-ish logits make every probability a full-length float repr (e.g. 0.10000000000000002).
    logits = np.random.default_rng(0).normal(size=(MAX_IMAGES_PER_REQUEST, 10)) * 1e-3
    refuse_all = Trust("max_softmax", 1.1, 1.0, 0.97, "val")   # "is_digit": false, the longer answer
    answers = predictions(logits, [str(digit) for digit in range(10)], "w-0123456789ab", refuse_all)
    rows = list(range(MAX_IMAGES_PER_REQUEST))
    longest_error = max((ImageError(code, "x" * 300) for code in HTTP_STATUS), key=lambda e: len(e.code))
    bodies = [answer_body(ParsedRequest("many", rows), answers, "mnist", "w-0123456789ab"),
              answer_body(ParsedRequest("v2", rows, "x" * 64), answers, "mnist", "w-0123456789ab"),
              answer_body(ParsedRequest("many", [longest_error] * MAX_IMAGES_PER_REQUEST), answers, "mnist", "v")]
    largest = max(len(json.dumps(body).encode()) for body in bodies)
    for config in ("config.properties", "config.production.properties"):
        limit = int(read_properties(REPO_ROOT / config)["max_response_size"])
        assert largest * 4 < limit, (config, largest, limit)   # with room for longer messages


# --- Explanation requests (TorchServe's header explain: True) ----------------------------------
EXPLAIN = {"explain": "True"}


def test_explanation_requests_are_read_apart_from_predictions():
    batch = parse({"body": GOOD}, {"body": GOOD}, {"body": {"images": [GOOD_B64, "%%%", GOOD_B64]}},
                  headers=[EXPLAIN, {"Explain": "False"}, EXPLAIN])
    assert [request.explain for request in batch.requests] == [True, False, True]
    assert sorted(batch.explained) == [0, 2, 3]      # row 1 is the prediction's
    assert batch.requests[2].slots[1].code == "invalid_base64"


@pytest.mark.parametrize("request_dict,explainable,code", [
    ({"body": {"images": [GOOD_B64] * (MAX_IMAGES_PER_EXPLANATION + 1)}}, True, "too_many_images"),
    ({"body": v2_document([GOOD_B64])}, True, "no_image_field"),
    ({"body": GOOD}, False, "explanations_need_torchscript"),
])
def test_explanation_requests_refused_before_preprocessing(request_dict, explainable, code):
    batch = parse_batch([request_dict], [EXPLAIN], MNIST_MEAN, MNIST_STD, explainable=explainable)
    assert batch.requests[0].error.code == code and batch.inputs is None and not batch.explained
    # The same body as a prediction is read as usual.
    assert parse_batch([request_dict], [None], MNIST_MEAN, MNIST_STD, explainable=explainable).requests[0].error is None


def test_the_largest_explanation_answer_fits_max_response_size():
    """Each map is 784 floats: with the explanation image cap, the largest answer (a full
    request of maps whose every value takes the longest form, -1.235e-05) must fit in both configs."""
    from repo import REPO_ROOT
    from serving.handler.artifact import Trust, predictions
    from serving.handler.explain import explanation
    from serving.handler.preprocess import UNIT_FRAME
    from serving.server.properties import read_properties

    count = MAX_IMAGES_PER_EXPLANATION
    refuse_all = Trust("max_softmax", 1.1, 1.0, 0.97, "val")   # "is_digit": false, the longer answer
    answers = predictions(np.zeros((count, 10)), [str(digit) for digit in range(10)], "w-0123456789ab", refuse_all)
    longest = np.full((28, 28), -1.2345678e-05)
    explained = [explanation(answer, longest, UNIT_FRAME) for answer in answers]
    body = answer_body(ParsedRequest("many", list(range(count)), explain=True), explained, "mnist", "w")
    size = len(json.dumps(body).encode())
    assert size > count * 784 * 10        # every value really is written long (-1.235e-05, 10 characters)
    for config in ("config.properties", "config.production.properties"):
        limit = int(read_properties(REPO_ROOT / config)["max_response_size"])
        # 8 such requests in one batch are 8 answers, each its own response.
        assert size * 4 < limit, (config, size, limit)


def test_maps_keep_four_significant_digits_of_their_largest_value():
    """The blank background's attributions are float noise (~1e-10): rounded away, not sent long."""
    from serving.handler.explain import rounded_map

    attribution = np.zeros((28, 28))
    attribution[3, 4], attribution[5, 6], attribution[0, 0] = 0.123456, -0.0098765, 3e-10
    rounded = np.asarray(rounded_map(attribution))
    assert (rounded[3, 4], rounded[5, 6], rounded[0, 0]) == (0.1235, -0.0099, 0.0)
    assert rounded_map(np.zeros((28, 28))) == np.zeros((28, 28)).tolist()
    assert np.isnan(rounded_map(np.full((28, 28), np.nan))[0][0])   # left for the handler's 500
    attribution[1, 1] = -3e-10   # rounds to zero: sent as 0.0, never as JSON's "-0.0"
    sent = json.loads(json.dumps(rounded_map(attribution)))
    assert sent[1][1] == 0.0 and np.copysign(1.0, sent[1][1]) == 1.0


def test_a_v2_id_over_the_cap_is_refused_and_one_at_the_cap_echoed():
    """Issue 27 point 2: a 1.1 MB id made an answer over max_response_size and killed the worker."""
    from serving.handler.protocol import MAX_ID_CHARS

    def v2(request_id):
        return {"body": {"id": request_id, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                       "data": [GOOD_B64]}]}}
    batch = parse(v2("x" * 1_100_000), v2("x" * MAX_ID_CHARS))
    refused, kept = batch.requests
    assert refused.error is not None and refused.error.code == "invalid_request"
    assert HTTP_STATUS[refused.error.code] == 400 and str(MAX_ID_CHARS) in str(refused.error)
    assert kept.error is None and kept.id == "x" * MAX_ID_CHARS


def test_only_the_lowercase_explain_key_torchserve_sets_asks_for_an_explanation():
    """Issue 27 point 8: a client's `Explain: True` / `EXPLAIN: True` on a prediction made it an explanation."""
    batch = parse({"body": GOOD}, {"body": GOOD}, {"body": GOOD},
                  headers=[{"Explain": "True"}, {"EXPLAIN": "True"}, EXPLAIN])
    assert [request.explain for request in batch.requests] == [False, False, True]
