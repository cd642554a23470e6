"""The TorchServe handler without a server: ts's own Context stands in for the frontend."""
import base64
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from export.artifacts import load_model
from export.run import normalized_images
from imaging import NOT_DIGITS, all_formats, as_paper_photo, drawn_strokes, encode
from repo import REPO_ROOT
from serving.handler.artifact import INT8_NAME, LOCAL_PATH_KEYS, MODEL_NAME, ONNX_NAME, TORCHSCRIPT_NAME, Trust, public_card
from serving.server.properties import read_properties
from training.data import preprocess_metadata

# TorchServe is a serving dependency, not a training one: where it is absent (a GPU box with
# torch only), this file is skipped as a whole instead of failing to collect.
ts_context = pytest.importorskip("ts.context", reason="TorchServe (ts) is not installed")
Context, RequestProcessor = ts_context.Context, ts_context.RequestProcessor
from serving.handler.handler import INFERENCE_CHUNK_IMAGES, DigitHandler  # noqa: E402
from serving.handler.parsing import (DIGIT_METRIC, NOT_DIGIT_METRIC, PREPROCESS_METRIC, REJECTED_METRIC,  # noqa: E402
                                     ParsedBatch, ParsedRequest)

# The metrics file the server runs with; relative paths in config.properties are from the repo root.
METRICS_CONFIG = REPO_ROOT / read_properties(REPO_ROOT / "config.properties")["metrics_config"]


def make_context(model_dir, serialized_file, batch_size=8, yaml_config=None):
    manifest = {"model": {"modelName": MODEL_NAME, "serializedFile": serialized_file, "handler": "handler.py"}}
    return Context(MODEL_NAME, str(model_dir), manifest, batch_size, None, "0.12.0", metrics=metrics_cache(),
                   model_yaml_config=yaml_config or {"handler": {"threads": 1}})


def metrics_cache():
    """TorchServe's own metrics cache, set up as its worker sets it up for a batch, from the
    metrics file the server is configured with (serving/server/metrics.yaml)."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(str(METRICS_CONFIG))
    cache.initialize_cache()
    cache.model_name = MODEL_NAME
    cache.set_request_ids({0: "test-request"})
    return cache


@pytest.fixture(scope="module", params=[TORCHSCRIPT_NAME, ONNX_NAME, INT8_NAME])
def handler(request, exported):
    handler = DigitHandler()
    handler.initialize(make_context(exported, request.param))
    return handler


def call(handler, requests, headers=None):
    """Run one batch; return [(status, body dict)] per request."""
    context = make_context(".", "unused")
    context.request_processor = [RequestProcessor(dict(headers[i]) if headers else {}) for i in range(len(requests))]
    responses = handler.handle(requests, context)
    assert len(responses) == len(requests)
    return [(context.get_response_status(i)[0] or 200, strict_json(body)) for i, body in enumerate(responses)]


def strict_json(text: str):
    """JSON as RFC 8259 has it: NaN and Infinity, which json.loads accepts, are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_response_schema(handler, mnist_digits):
    images, labels = mnist_digits
    [(status, body)] = call(handler, [{"body": encode(Image.fromarray(images[0]))}])
    assert status == 200
    assert set(body) >= {"digit", "label", "confidence", "probabilities", "top_k"}
    assert isinstance(body["digit"], int) and 0 <= body["digit"] <= 9
    assert len(body["probabilities"]) == 10
    assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-6)
    assert body["confidence"] == pytest.approx(max(body["probabilities"]))
    assert body["top_k"][0]["digit"] == body["digit"] and len(body["top_k"]) == 3
    assert body["label"] == str(body["digit"])
    assert body["model_version"] == handler.metadata["model_version"]   # which model answered


def test_predictions_agree_with_the_eager_model(handler, mnist_digits, trained_checkpoint):
    images = mnist_digits.images[:64]
    model, checkpoint = load_model(trained_checkpoint)
    with torch.inference_mode():
        eager = model(torch.from_numpy(normalized_images(torch.tensor(images), preprocess_metadata())))
    # Answers report probabilities at the trust record's calibrated temperature (issue 18).
    eager_probabilities = Trust.from_metadata(checkpoint).probabilities(eager.double().numpy())
    answers = call(handler, [{"body": encode(Image.fromarray(image))} for image in images])
    int8 = handler.metadata.get("quantization") is not None
    for (status, body), expected in zip(answers, eager_probabilities):
        assert status == 200
        if int8:   # quantized: close, not equal; the digit may differ on a rare borderline image
            np.testing.assert_allclose(body["probabilities"], expected, atol=0.05)
        else:
            assert body["digit"] == int(expected.argmax())
            np.testing.assert_allclose(body["probabilities"], expected, atol=1e-5)
    if int8:
        agree = sum(body["digit"] == int(e.argmax()) for (_, body), e in zip(answers, eager_probabilities))
        assert agree >= len(answers) - 1


def test_every_format_gets_the_right_digit(handler, mnist_digits):
    images, labels = mnist_digits
    for image, label in list(zip(images, labels))[:3]:
        formats = all_formats(image)
        answers = call(handler, [{"body": data} for data in formats.values()])
        for name, (status, body) in zip(formats, answers):
            assert status == 200, (name, body)
            assert body["digit"] == label, (name, body)


def test_large_off_centre_paper_photos_keep_their_label(handler, mnist_digits, trained_min_accuracy):
    images, labels = mnist_digits
    photos = [encode(as_paper_photo(image, size=(400, 300), scale=9, offset=(150, 20)), "JPEG", quality=92)
              for image in images[:32]]
    answers = call(handler, [{"body": photo} for photo in photos])
    correct = sum(body["digit"] == label for (_, body), label in zip(answers, labels[:32]))
    # As good as on the originals, less one photo for the JPEG and the resampling.
    assert correct >= int(trained_min_accuracy * 32) - 1, correct


def test_request_formats_raw_multipart_json(handler, mnist_digits):
    images, labels = mnist_digits
    png = encode(Image.fromarray(images[0]))
    b64 = base64.b64encode(png).decode()
    requests = [
        {"body": png},                                              # curl -T / --data-binary
        {"data": png},                                              # curl -F data=@digit.png
        {"body": {"image": b64}},                                   # JSON, parsed by TorchServe
        {"body": json.dumps({"image": "data:image/png;base64," + b64}).encode()},  # JSON as bytes
    ]
    for status, body in call(handler, requests):
        assert status == 200 and body["digit"] == labels[0]


def test_several_images_in_one_request(handler, mnist_digits):
    images, labels = mnist_digits
    encoded = [base64.b64encode(encode(Image.fromarray(image))).decode() for image in images[:5]]
    [(status, body)] = call(handler, [{"body": {"images": encoded + ["not base64!"]}}])
    assert status == 200
    digits = [item.get("digit") for item in body["predictions"]]
    assert digits[:5] == list(labels[:5])
    assert body["predictions"][5]["code"] == "invalid_base64"
    assert {item["model_version"] for item in body["predictions"][:5]} == {handler.metadata["model_version"]}


def test_mixed_batch_each_request_gets_its_own_answer(handler, mnist_digits):
    images, labels = mnist_digits
    good = lambda i: {"body": encode(Image.fromarray(images[i]))}
    requests = [good(0), {"body": b""}, good(1), {"body": b"plain text"}, {"body": {"image": "%%%"}},
                {"body": b'{"broken json'}, {"body": encode(Image.new("L", (50, 50), 255))},
                {"body": {"nothing": 1}}, good(2)]
    answers = call(handler, requests)
    expected = [(200, labels[0]), (400, "empty"), (200, labels[1]), (415, "not_an_image"),
                (400, "invalid_base64"), (400, "invalid_json"), (422, "no_digit"), (400, "no_image_field"),
                (200, labels[2])]
    for (status, body), (want_status, want) in zip(answers, expected):
        assert status == want_status, body
        if status == 200:
            assert body["digit"] == want
        else:
            assert body["code"] == want and body["error"]


def test_form_encoded_requests_are_refused_with_a_hint(handler, mnist_digits):
    images, labels = mnist_digits
    png = encode(Image.fromarray(images[0]))
    answers = call(handler, [{"body": b""}, {"body": png}],
                   headers=[{"Content-Type": "application/x-www-form-urlencoded"}, {"content-type": "image/png"}])
    assert answers[0][0] == 415 and answers[0][1]["code"] == "form_encoded"
    assert answers[1][0] == 200 and answers[1][1]["digit"] == labels[0]


def test_describe_returns_the_model_card(handler):
    card = strict_json(handler.describe_handle())
    assert card["mean"] == pytest.approx(0.1307) and card["labels"][7] == "7"
    assert 0.9 < card["test_acc"] <= 1.0 and "train_config" in card


def test_the_model_card_leaves_out_local_paths(handler, monkeypatch):
    """Export writes no local paths into the card any more, but an artifact exported before that
    still holds where training read and wrote on its machine: the served card never shows them."""
    assert not set(LOCAL_PATH_KEYS) & set(handler.metadata["train_config"])
    older = {**handler.metadata, "train_config": {**handler.metadata["train_config"], "data_dir": "/srv/mnist",
                                                  "out": "/home/someone/artifacts/mnist_cnn.pt", "tensorboard": None}}
    monkeypatch.setattr(handler, "metadata", older)
    card = strict_json(handler.describe_handle())
    assert not set(LOCAL_PATH_KEYS) & set(card["train_config"])
    assert card["train_config"]["epochs"] == handler.metadata["train_config"]["epochs"]
    assert not [value for value in json.dumps(card).split('"') if value.startswith("/")]   # no absolute path


def test_handler_runs_on_basehandlers_cycle_and_reports_handler_time(handler, mnist_digits, caplog):
    """No handle() of our own: BaseHandler's cycle runs our hooks and emits TorchServe's HandlerTime."""
    assert "handle" not in vars(DigitHandler)
    images, labels = mnist_digits
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        [(status, body)] = call(handler, [{"body": encode(Image.fromarray(images[0]))}])
    assert status == 200 and body["digit"] == labels[0]
    # TorchServe writes the unit "ms" of metrics.yaml out as "Milliseconds".
    assert any(record.getMessage().startswith("[METRICS]HandlerTime.Milliseconds:") for record in caplog.records)


def test_describe_header_returns_the_model_card_through_the_cycle(handler):
    [(status, card)] = call(handler, [{"body": b""}], headers=[{"describe": "True"}])
    served = handler.manifest["model"]["serializedFile"]
    runtime = "onnxruntime" if served.endswith(".onnx") else "torchscript"
    assert status == 200 and card["labels"][7] == "7"
    assert card == {**public_card(handler.metadata), "served_file": served, "runtime": runtime}


def test_a_describe_header_in_a_batch_breaks_nothing(handler, mnist_digits):
    """BaseHandler answers a whole batch with one card when request 0 asks for it: the other
    requests lost their answers. In a batch the header is ignored; each request is answered."""
    png = mnist_digits.png(0)
    answers = call(handler, [{"body": png}, {"body": png}], headers=[{"describe": "True"}, {}])
    assert [(status, body["digit"]) for status, body in answers] == [(200, mnist_digits.label(0))] * 2


def test_the_model_runs_in_bounded_chunks(handler, monkeypatch):
    """A batch holds up to 8 requests x 64 images: the model sees at most one chunk at a time."""
    seen = []
    real = handler.run_model
    monkeypatch.setattr(handler, "run_model", lambda inputs: seen.append(len(inputs)) or real(inputs))
    rows = 8 * 64 + 3
    batch = ParsedBatch(np.zeros((rows, 1, 28, 28), np.float32), [ParsedRequest("many", list(range(rows)))])
    logits = handler.inference(batch).logits
    assert logits.shape == (rows, 10) and max(seen) <= INFERENCE_CHUNK_IMAGES and sum(seen) == rows


def test_non_finite_pixels_are_refused_and_the_neighbour_served(handler, mnist_digits):
    pixels = mnist_digits.images[0].astype(np.float32) / 255
    pixels[5, 5] = np.nan
    nan_tiff = encode(Image.fromarray(pixels, mode="F"), "TIFF")
    answers = call(handler, [{"body": nan_tiff}, {"body": mnist_digits.png(1)}])
    assert answers[0][0] == 415 and answers[0][1]["code"] == "unsupported_image"
    assert answers[1][0] == 200 and answers[1][1]["digit"] == mnist_digits.label(1)


def test_a_non_finite_answer_is_never_sent_as_json(handler, mnist_digits, monkeypatch):
    """Only a broken model gets here (inputs are finite): that request gets a 500, in real JSON."""
    def broken_model(inputs):
        logits = np.zeros((len(inputs), 10), np.float32)
        logits[0] = np.nan
        return logits
    monkeypatch.setattr(handler, "run_model", broken_model)
    answers = call(handler, [{"body": mnist_digits.png(0)}, {"body": mnist_digits.png(1)}])
    assert answers[0][0] == 500 and answers[0][1]["code"] == "internal_error"
    assert answers[1][0] == 200 and 0 <= answers[1][1]["digit"] <= 9


def logged_counts(records, name: str) -> dict[str, float]:
    """{dimension value: summed value} of one counter's [METRICS] log lines; a line whose
    dimensions are not (ours, ModelName, Level), in the order metrics.yaml declares, fails."""
    pattern = re.compile(rf"\[METRICS\]{name}\.Count:([\d.]+)\|#\w+:(\w+),ModelName:{MODEL_NAME},Level:Model\|")
    counts: dict[str, float] = {}
    for message in (record.getMessage() for record in records):
        if message.startswith(f"[METRICS]{name}."):
            match = pattern.match(message)
            assert match, message
            counts[match[2]] = counts.get(match[2], 0) + float(match[1])
    return counts


def test_metrics_count_each_answered_digit_and_each_refusal_by_code(handler, mnist_digits, caplog):
    images, _ = mnist_digits
    pngs = [encode(Image.fromarray(image)) for image in images[:4]]
    several = json.dumps({"images": [base64.b64encode(pngs[2]).decode(), "%%%", base64.b64encode(pngs[3]).decode()]})
    requests = [{"body": pngs[0]}, {"body": b""}, {"body": pngs[1]}, {"body": b"hello"}, {"body": several.encode()}]
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        answers = call(handler, requests)
    bodies = [body for _, body in answers]
    answered = [bodies[0], bodies[2], bodies[4]["predictions"][0], bodies[4]["predictions"][2]]
    expected_digits: dict[str, float] = {}
    for answer in answered:
        expected_digits[str(answer["digit"])] = expected_digits.get(str(answer["digit"]), 0) + 1
    assert logged_counts(caplog.records, DIGIT_METRIC) == expected_digits
    assert logged_counts(caplog.records, REJECTED_METRIC) == {"empty": 1, "not_an_image": 1, "invalid_base64": 1}
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith(f"[METRICS]{PREPROCESS_METRIC}.Milliseconds:") for message in messages)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], messages


def test_drawn_non_digits_are_answered_not_a_digit_and_counted(handler, mnist_digits, caplog):
    """Every answer says is_digit; a letter keeps its best guess, and NotDigitImages counts
    exactly the images answered false, by best guess."""
    letters = [drawn_strokes(strokes) for strokes in NOT_DIGITS.values()]
    digits = [mnist_digits.png(i) for i in range(8)]
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        answers = [body for _, body in call(handler, [{"body": image} for image in letters + digits])]
    assert [answer["is_digit"] for answer in answers[:len(letters)]] == [False] * len(letters)
    assert all(0 <= answer["digit"] <= 9 and len(answer["probabilities"]) == 10 for answer in answers)
    assert sum(answer["is_digit"] for answer in answers[len(letters):]) >= len(digits) - 1
    refused: dict[str, float] = {}
    for answer in answers:
        if not answer["is_digit"]:
            refused[str(answer["digit"])] = refused.get(str(answer["digit"]), 0) + 1
    assert logged_counts(caplog.records, NOT_DIGIT_METRIC) == refused
    assert sum(logged_counts(caplog.records, DIGIT_METRIC).values()) == len(answers)   # still counted there


def test_handler_module_defines_the_one_class_torchserve_loads():
    """TorchServe's loader refuses a handler module defining more than one class (the worker
    dies at load: "Expected only one class"), so helper classes live in serving/handler/parsing.py and serving/handler/protocol.py."""
    import serving.handler.handler
    from ts.utils.util import list_classes_from_module

    assert list_classes_from_module(serving.handler.handler) == [DigitHandler]


# --- Explanations: POST /explanations/mnist (the frontend adds the header explain: True) --------
EXPLAIN = {"explain": "True"}


def test_explanations_and_predictions_share_a_batch_each_answered_as_asked(handler, mnist_digits):
    """BaseHandler reads request 0's explain header for the whole batch; here each request's own
    header decides (request 0 asks for a map, request 1 does not). An ONNX model cannot be
    differentiated: its explanation requests get 400 explanations_need_torchscript, and its
    predictions are still served."""
    images = [base64.b64encode(mnist_digits.png(i)).decode() for i in (2, 3)]
    requests = [{"body": mnist_digits.png(0)}, {"body": mnist_digits.png(1)}, {"body": {"images": images}},
                {"body": b"not an image"}, {"body": mnist_digits.png(4)}]
    headers = [EXPLAIN, {}, EXPLAIN, EXPLAIN, {}]
    answers = call(handler, requests, headers)
    plain = [answers[1], answers[4]]
    assert [(status, body["digit"]) for status, body in plain] == [(200, mnist_digits.label(1)),
                                                                   (200, mnist_digits.label(4))]
    assert all("attributions" not in body and len(body["probabilities"]) == 10 for _, body in plain)
    if handler.module is None:   # ONNX, int8 ONNX
        for status, body in (answers[0], *answers[2:4]):
            assert (status, body["code"]) == (400, "explanations_need_torchscript"), body
            assert "TorchScript" in body["error"]
        return
    status, one = answers[0]
    assert status == 200 and one["digit"] == mnist_digits.label(0)
    assert (one["method"], one["baseline"], one["model_version"]) == ("integrated_gradients", "blank",
                                                                      handler.metadata["model_version"])
    assert np.asarray(one["attributions"]).shape == (28, 28)
    status, several = answers[2]
    assert status == 200 and [item["digit"] for item in several["explanations"]] == [mnist_digits.label(2),
                                                                                     mnist_digits.label(3)]
    assert all(np.asarray(item["attributions"]).shape == (28, 28) for item in several["explanations"])
    assert answers[3][0] == 415 and answers[3][1]["code"] == "not_an_image"


@pytest.fixture(scope="module")
def torchscript_handler(exported):
    handler = DigitHandler()
    handler.initialize(make_context(exported, TORCHSCRIPT_NAME))
    return handler


def test_a_map_is_the_predicted_digits_and_sums_to_its_rise_over_a_blank_image(torchscript_handler, mnist_digits):
    """Integrated Gradients' completeness: a map sums to its digit's logit here minus on a blank
    image. A map for another digit, or one scaled or cut short, misses by far more (rises are 4-20)."""
    handler = torchscript_handler
    indices = range(8)
    answers = call(handler, [{"body": mnist_digits.png(i)} for i in indices], [EXPLAIN] * len(indices))
    inputs = mnist_digits.images[list(indices)].astype(np.float32)[:, None] / 255
    logits = handler.run_model((inputs - handler.mean) / handler.std)
    blank = handler.run_model(np.full((1, 1, 28, 28), -handler.mean / handler.std, np.float32))[0]
    for (status, body), row in zip(answers, logits):
        assert status == 200 and body["digit"] == int(row.argmax())
        rise = row[body["digit"]] - blank[body["digit"]]
        assert np.sum(body["attributions"]) == pytest.approx(rise, rel=0.05, abs=0.3), body["digit"]


def test_an_explanation_takes_at_most_a_few_images(torchscript_handler, mnist_digits):
    from serving.handler.parsing import MAX_IMAGES_PER_EXPLANATION

    images = [base64.b64encode(mnist_digits.png(i)).decode() for i in range(MAX_IMAGES_PER_EXPLANATION + 1)]
    over, at_the_limit = call(torchscript_handler, [{"body": {"images": images}}, {"body": {"images": images[:-1]}}],
                              [EXPLAIN, EXPLAIN])
    assert over[0] == 413 and over[1]["code"] == "too_many_images"
    assert str(MAX_IMAGES_PER_EXPLANATION) in over[1]["error"]
    assert at_the_limit[0] == 200 and len(at_the_limit[1]["explanations"]) == MAX_IMAGES_PER_EXPLANATION


def test_an_oversize_answer_fails_its_own_request_only(handler, mnist_digits, monkeypatch):
    """Issue 27 point 2: an answer over max_response_size made TorchServe kill the worker and fail
    the batch. The handler measures each answer: the long one gets a 500, its neighbour its digit."""
    import serving.handler.handler as handler_module
    monkeypatch.setattr(handler_module, "MAX_ANSWER_BYTES", 2000)
    many = {"body": {"images": [base64.b64encode(mnist_digits.png(0)).decode()] * 8}}
    answers = call(handler, [many, {"body": mnist_digits.png(1)}])
    assert answers[0][0] == 500 and answers[0][1]["code"] == "answer_too_large"
    assert answers[1][0] == 200 and answers[1][1]["digit"] == mnist_digits.label(1)
