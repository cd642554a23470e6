"""The handler's request model: what TorchServe hands the handler for one batch, parsed into
one ParsedRequest per request, and the JSON answer each one gets.

Shipped beside handler.py in the model archive (the handler imports it as a top-level
module there). The dataclasses live here, not in handler.py, because TorchServe's model
loader refuses a handler module that defines more than one class. Every function returns
a refusal as an ImageError value instead of raising it: a raise would fail the whole batch.
What nobody foresaw is still caught at the request boundary (parse_batch): that request alone
gets 400 invalid_request.

A request is answered in one of three ways:
    one    a single image (raw body, one form file, {"image": ...}): its answer, or its 4xx error
    many   {"images": [...]} or several form files: {"predictions": [...]}, one entry per image,
           each an answer or that image's own error ({"explanations": [...]} when explained)
    v2     an Open Inference Protocol body: the v2 answer (protocol.py); all images or none

Each request is a prediction or an explanation on its own: TorchServe marks a request to
/explanations/{model} with the header `explain: True`, and one batch can mix both kinds.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

if __package__:  # imported from the source tree (tests)
    from .preprocess import Frame, Framed, ImageError, PixelBudget, preprocess_framed
    from .protocol import is_v2_request, parse_v2_request, v2_answer
else:  # inside the model archive
    from preprocess import Frame, Framed, ImageError, PixelBudget, preprocess_framed
    from protocol import is_v2_request, parse_v2_request, v2_answer

HTTP_STATUS = {"empty": 400, "invalid_json": 400, "invalid_base64": 400, "no_image_field": 400,
               "invalid_request": 400, "corrupt_image": 400, "not_an_image": 415, "unsupported_image": 415,
               "too_large": 413, "too_many_images": 413, "no_digit": 422, "form_encoded": 415,
               "explanations_need_torchscript": 400}
# Codes only an explanation request gets (POST /explanations/mnist).
EXPLANATION_CODES = ("explanations_need_torchscript",)

# Images one request may carry, whatever its shape; counted before any is decoded. It bounds
# the answer too: 64 predictions of ~520 bytes (or 64 of the longest error) are ~35 KB, far
# under config.properties' max_response_size (1 MiB), past which TorchServe kills the worker
# (tests/test_parsing.py checks the worst case against that file).
MAX_IMAGES_PER_REQUEST = 64
# A TorchServe batch holds up to batchSize x MAX_IMAGES_PER_REQUEST images (8 x 64); the model sees
# them in chunks of this many, so one batch's activations stay the size of one full request's.
INFERENCE_CHUNK_IMAGES = MAX_IMAGES_PER_REQUEST
# Images one explanation request may carry: Integrated Gradients runs the model forward and
# backward explain.IG_STEPS times per image (4 images: ~0.3 s on one core), and each answer
# carries a 28x28 map (3-10 KB of JSON), so a batch of 8 such requests stays ~2 s and ~300 KB.
MAX_IMAGES_PER_EXPLANATION = 4
# The longest serialized answer the handler sends. TorchServe 0.12's frontend kills the worker
# whose answer passes max_response_size (TooLongFrameException, "Worker died"), failing its whole
# batch; the worker cannot read that setting (ts/context.py passes only model_dir, gpu_id,
# batch_size, server name/version, limit_max_image_pixels), so this bound sits under it with room
# for the frame's own fields (tests/test_config.py checks it against every config). A longer
# answer is replaced by a 500 answer_too_large for that request alone.
MAX_ANSWER_BYTES = 768 * 1024
# TorchServe's frontend sets this header to "True" on requests to /explanations/{model}.
EXPLAIN_HEADER = "explain"

logger = logging.getLogger(__name__)

# Our metrics, declared with their dimensions in serving/server/metrics.yaml (config.properties'
# metrics_config); TorchServe exports only what that file declares.
DIGIT_METRIC, REJECTED_METRIC, PREPROCESS_METRIC = "DigitPredictions", "RequestsRejected", "PreprocessTime"
NOT_DIGIT_METRIC = "NotDigitImages"   # answered images judged not a digit, by best guess

Answer = Literal["one", "many", "v2"]


@dataclass(frozen=True)
class EncodedRequest:
    """One request's images before preprocessing: encoded bytes, or (only when answered
    "many") the ImageError that one image already got."""
    answer: Answer
    images: list[bytes | ImageError]
    id: str | None = None     # a v2 request's id, echoed in its answer


@dataclass(frozen=True)
class ParsedRequest:
    """One request after preprocessing. Refused as a whole: `error` is set and slots is empty.
    Otherwise one slot per image: its row in the batch's inputs, or (answered "many") the
    ImageError of that image alone."""
    answer: Answer
    slots: list[int | ImageError] = field(default_factory=list)
    id: str | None = None
    error: ImageError | None = None
    explain: bool = False     # an explanation request: its images get attribution maps

    @classmethod
    def refused(cls, error: ImageError, explain: bool = False) -> ParsedRequest:
        return cls("one", error=error, explain=explain)

    def outcomes(self) -> list[int | ImageError]:
        """What each image (or the refused request) came to: a row of inputs, or an error."""
        return [self.error] if self.error is not None else self.slots


@dataclass
class ParsedBatch:
    """What preprocess hands to inference: the stacked inputs of every good image (None when
    there is none), each request of the batch, in order, and the rows to explain (those of
    explanation requests) with where each one's input lies on its image."""
    inputs: np.ndarray | None
    requests: list[ParsedRequest]
    explained: dict[int, Frame] = field(default_factory=dict)


@dataclass
class BatchOutput:
    """What inference hands to postprocess: the logits of every row of the batch's inputs
    (None when there is none) and an attribution map [28, 28] per explained row."""
    batch: ParsedBatch
    logits: np.ndarray | None
    attributions: dict[int, np.ndarray] = field(default_factory=dict)


# --- Reading the images out of one request ---------------------------------------------------
def decode_base64(text) -> bytes | ImageError:
    if not isinstance(text, str):
        return ImageError("invalid_base64", "image field must be a base64 string")
    if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return ImageError("invalid_base64", "image field is not valid base64")


def first_error(items: list) -> ImageError | None:
    return next((item for item in items if isinstance(item, ImageError)), None)


def too_many_images(count: int) -> ImageError | None:
    if count > MAX_IMAGES_PER_REQUEST:
        return ImageError("too_many_images", f"{count} images in one request; the limit is "
                                             f"{MAX_IMAGES_PER_REQUEST}: split them over several requests")
    return None


def images_from_json(document) -> EncodedRequest | ImageError:
    if is_v2_request(document):  # Open Inference Protocol: all images decode, or the request fails
        parsed = parse_v2_request(document)
        if isinstance(parsed, ImageError):
            return parsed
        data, request_id = parsed
        if refused := too_many_images(len(data)):
            return refused
        images = [decode_base64(item) for item in data]
        return first_error(images) or EncodedRequest("v2", images, request_id)
    if isinstance(document, dict) and "image" in document:
        image = decode_base64(document["image"])
        return image if isinstance(image, ImageError) else EncodedRequest("one", [image])
    if isinstance(document, dict) and isinstance(document.get("images"), list) and document["images"]:
        if refused := too_many_images(len(document["images"])):
            return refused
        return EncodedRequest("many", [decode_base64(item) for item in document["images"]])
    return ImageError("no_image_field", 'JSON body needs "image": "<base64>" or "images": ["<base64>", ...]')


def images_from_request(request: dict) -> EncodedRequest | ImageError:
    """The encoded images of one TorchServe request (its dict of body or form fields)."""
    values = [value for value in request.values() if value is not None]
    if not values:
        return ImageError("empty", "empty body: send the image bytes")
    if len(values) > 1:  # multipart with several files
        if refused := too_many_images(len(values)):
            return refused
        return EncodedRequest("many", [bytes(value) if isinstance(value, (bytes, bytearray))
                                       else ImageError("not_an_image", "form field is not a file")
                                       for value in values])
    value = values[0]
    # TorchServe already parsed an application/json body. A bare JSON number must not reach
    # bytes(): bytes(-1) raises and bytes(10**20) exhausts memory (the whole batch got 503).
    if isinstance(value, (dict, list, int, float)):
        return images_from_json(value)
    if isinstance(value, str):  # text/* bodies arrive decoded
        value = value.encode()
    value = bytes(value)
    if value[:1] in (b"{", b"["):  # JSON sent without (or with a broken) application/json
        try:
            document = json.loads(value)
        # Deep nesting raises RecursionError; an integer of over 4,300 digits a plain ValueError
        # (Python's int-conversion limit), which TorchServe's own json.loads met first and passed on.
        except (ValueError, RecursionError):
            return ImageError("invalid_json", "body looks like JSON but does not parse")
        return images_from_json(document)
    return EncodedRequest("one", [value])


def wants_explanation(headers: dict | None) -> bool:
    """Whether TorchServe marked this request as one to /explanations/{model}: only the exact
    lowercase key TorchServe sets counts, so a client's `Explain: True` on a prediction does not
    turn it into an explanation (issue 27 point 8)."""
    return str((headers or {}).get(EXPLAIN_HEADER)) == "True"


def explanation_error(encoded: EncodedRequest, explainable: bool) -> ImageError | None:
    """Why an explanation request cannot be explained, checked before any image is decoded."""
    if not explainable:
        return ImageError("explanations_need_torchscript",
                          "explanations need the TorchScript model, and this server runs the ONNX one: "
                          "serve the archive built from the .torchscript.pt file")
    if encoded.answer == "v2":
        return ImageError("no_image_field", "explanations take the image as raw bytes, form files or JSON "
                                            '{"image": ...} / {"images": [...]}, not an Open Inference Protocol body')
    if len(encoded.images) > MAX_IMAGES_PER_EXPLANATION:
        return ImageError("too_many_images", f"{len(encoded.images)} images in one explanation request; the limit "
                                             f"is {MAX_IMAGES_PER_EXPLANATION}: split them over several requests")
    return None


def form_encoding_error(content_type: str) -> ImageError | None:
    """curl -d / --data-binary default to x-www-form-urlencoded; TorchServe then parses the
    image bytes as form fields and they are lost. Say so instead of "empty body"."""
    if content_type.lower().startswith("application/x-www-form-urlencoded"):
        return ImageError("form_encoded", "body was sent as application/x-www-form-urlencoded, which mangles "
                                          "image bytes: use curl -T FILE, or add -H 'Content-Type: image/png'")
    return None


def content_type(headers: dict | None) -> str:
    """The Content-Type of one request's headers, whatever the header name's case."""
    return next((str(value) for key, value in (headers or {}).items()
                 if isinstance(key, str) and key.lower() == "content-type"), "")


# --- Preprocessing a batch --------------------------------------------------------------------
def preprocess_image(item: bytes | ImageError, mean: float, std: float,
                     budget: PixelBudget) -> Framed | ImageError:
    if isinstance(item, ImageError):
        return item
    try:
        return preprocess_framed(item, mean, std, budget)
    except ImageError as error:
        # Code and message only: the raised error's traceback holds the decoder's frames, and
        # with them the image bytes and pixels, until the batch is answered.
        return ImageError(error.code, str(error))


@dataclass(frozen=True)
class Reading:
    """How a batch's requests are read: the artifact's normalization, and whether the served
    model can be explained (TorchScript; not ONNX)."""
    mean: float
    std: float
    explainable: bool = True


def parse_request(request: dict, headers: dict | None, reading: Reading,
                  inputs: list[Framed], explain: bool) -> ParsedRequest:
    """Parse and preprocess one request; append its good images to inputs."""
    encoded = form_encoding_error(content_type(headers)) or images_from_request(request)
    if not isinstance(encoded, ImageError) and explain:
        encoded = explanation_error(encoded, reading.explainable) or encoded
    if isinstance(encoded, ImageError):
        return ParsedRequest.refused(encoded, explain)
    arrays = []
    budget = PixelBudget()
    for item in encoded.images:
        array = preprocess_image(item, reading.mean, reading.std, budget)
        # Only "many" answers each image on its own; one image, or v2, is all or nothing.
        if isinstance(array, ImageError) and encoded.answer != "many":
            return ParsedRequest.refused(array, explain)
        arrays.append(array)
    slots: list[int | ImageError] = []
    for array in arrays:
        if isinstance(array, ImageError):
            slots.append(array)
        else:
            slots.append(len(inputs))
            inputs.append(array)
    return ParsedRequest(encoded.answer, slots, encoded.id, explain=explain)


def parse_batch(data: list[dict], headers: list[dict | None], mean: float, std: float,
                explainable: bool = True) -> ParsedBatch:
    """Every request of one TorchServe batch, with its headers; never raises for bad input.
    explainable: whether explanation requests can be answered (the served model is TorchScript)."""
    inputs: list[Framed] = []
    reading = Reading(mean, std, explainable)
    requests = [parse_request_safely(index, request, request_headers, reading, inputs)
                for index, (request, request_headers) in enumerate(zip(data, headers))]
    explained = {row: inputs[row].frame for parsed in requests if parsed.explain
                 for row in parsed.slots if isinstance(row, int)}
    return ParsedBatch(np.stack([item.pixels for item in inputs]) if inputs else None, requests, explained)


def parse_request_safely(index: int, request: dict, headers: dict | None, reading: Reading,
                         inputs: list[Framed]) -> ParsedRequest:
    """parse_request, with the request boundary's catch-all: whatever a request raises that
    nobody foresaw is that request's 400, logged once, and never the whole batch's 503."""
    first_row = len(inputs)
    explain = wants_explanation(headers)
    try:
        return parse_request(request, headers, reading, inputs, explain)
    except Exception as error:
        del inputs[first_row:]   # none of its images is run
        logger.exception("request %d of the batch could not be parsed", index)
        return ParsedRequest.refused(ImageError("invalid_request",
                                                f"the request could not be read ({type(error).__name__})"), explain)


# --- Answers ------------------------------------------------------------------------------
def error_body(error: ImageError) -> dict:
    return {"error": str(error), "code": error.code}


def http_status(error: ImageError) -> int:
    return HTTP_STATUS.get(error.code, 400)


def answer_body(parsed: ParsedRequest, answers: list[dict], model_name: str, model_version: str) -> dict:
    """The JSON answer to one request, from the batch's per-image answers (artifact.predictions,
    or explain.explanation for the rows of an explanation request), indexed by row."""
    if parsed.error is not None:
        return error_body(parsed.error)
    results = [error_body(slot) if isinstance(slot, ImageError) else answers[slot] for slot in parsed.slots]
    if parsed.answer == "v2":
        return v2_answer(model_name, model_version, results, parsed.id)
    if parsed.answer == "many":
        return {"explanations" if parsed.explain else "predictions": results}
    return results[0]
