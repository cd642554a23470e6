"""TorchServe handler for the digit CNN.

Self-contained: it imports the standard library, NumPy, Pillow, torch, onnxruntime, `ts`,
and the preprocessing module that the archive ships beside it. Mean, std and labels come
from the artifact's own metadata, never from a copy here.

Accepts per request: raw image bytes (curl -T / --data-binary), multipart form files
(curl -F data=@digit.png), or JSON {"image": "<base64>"} / {"images": ["<base64>", ...]}.
Answers per image: {"digit", "label", "confidence", "probabilities", "top_k"}; per bad
request a 4xx status with {"error", "code"}. Good and bad requests can share a batch.
An Open Inference Protocol (v2) body, {"inputs": [...]}, gets a v2 answer (protocol.py).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from collections import Counter

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

if __package__:  # imported from the source tree (tests)
    from .artifact import load, predictions
    from .preprocess import ImageError, preprocess_bytes
    from .protocol import ParsedBatch, V2Request, is_v2_request, parse_v2_request, v2_answer
else:  # inside the model archive, preprocess.py, artifact.py and protocol.py sit beside this file
    from artifact import load, predictions
    from preprocess import ImageError, preprocess_bytes
    from protocol import ParsedBatch, V2Request, is_v2_request, parse_v2_request, v2_answer

logger = logging.getLogger(__name__)

HTTP_STATUS = {"empty": 400, "invalid_json": 400, "invalid_base64": 400, "no_image_field": 400,
               "corrupt_image": 400, "not_an_image": 415, "unsupported_image": 415,
               "too_large": 413, "no_digit": 422, "form_encoded": 415}

# Our metrics, declared with their dimensions in serving/metrics.yaml (config.properties'
# metrics_config); TorchServe exports only what that file declares.
DIGIT_METRIC, REJECTED_METRIC, PREPROCESS_METRIC = "DigitPredictions", "RequestsRejected", "PreprocessTime"


def decode_base64(text) -> bytes:
    if not isinstance(text, str):
        raise ImageError("invalid_base64", "image field must be a base64 string")
    if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid_base64", "image field is not valid base64") from None


def try_decode_base64(text) -> bytes | ImageError:
    try:
        return decode_base64(text)
    except ImageError as error:
        return error


def images_from_json(document) -> tuple[list, bool | V2Request]:
    if is_v2_request(document):  # Open Inference Protocol: all images decode, or the request fails
        data, request = parse_v2_request(document)
        return [decode_base64(item) for item in data], request
    if isinstance(document, dict) and "image" in document:
        return [decode_base64(document["image"])], False
    if isinstance(document, dict) and isinstance(document.get("images"), list) and document["images"]:
        return [try_decode_base64(item) for item in document["images"]], True
    raise ImageError("no_image_field", 'JSON body needs "image": "<base64>" or "images": ["<base64>", ...]')


def images_from_request(request: dict) -> tuple[list, bool | V2Request]:
    """The encoded images in one TorchServe request (bytes, or the ImageError that one of
    several images got), and whether the request asked for several (True), or a V2Request
    for an Open Inference Protocol request."""
    values = [value for value in request.values() if value is not None]
    if not values:
        raise ImageError("empty", "empty body: send the image bytes")
    if len(values) > 1:  # multipart with several files
        return [bytes(value) if isinstance(value, (bytes, bytearray))
                else ImageError("not_an_image", "form field is not a file") for value in values], True
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
            return images_from_json(json.loads(value))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ImageError("invalid_json", "body looks like JSON but does not parse") from None
    return [value], False


def content_type(context, index: int) -> str:
    headers = context.get_all_request_header(index) or {}
    return next((str(value).lower() for key, value in headers.items()
                 if isinstance(key, str) and key.lower() == "content-type"), "")


def reject_form_encoding(context, index: int) -> None:
    """curl -d / --data-binary default to x-www-form-urlencoded; TorchServe then parses the
    image bytes as form fields and they are lost. Say so instead of "empty body"."""
    if content_type(context, index).startswith("application/x-www-form-urlencoded"):
        raise ImageError("form_encoded", "body was sent as application/x-www-form-urlencoded, which mangles "
                                         "image bytes: use curl -T FILE, or add -H 'Content-Type: image/png'")


def error_body(error: ImageError) -> dict:
    return {"error": str(error), "code": error.code}


class DigitHandler(BaseHandler):
    """BaseHandler's own handle() runs the cycle (HandlerTime metric, profiler, describe);
    this class fills its hooks: preprocess -> inference -> postprocess."""

    def initialize(self, context):
        properties = context.system_properties
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        threads = int(config.get("threads", 0)) or torch.get_num_threads()
        torch.set_num_threads(threads)
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None
                                   else "cpu")
        self.manifest = context.manifest
        path = os.path.join(properties["model_dir"], self.manifest["model"]["serializedFile"])
        self.run_model, self.metadata = load(path, self.device, threads)
        self.mean, self.std = float(self.metadata["mean"]), float(self.metadata["std"])
        self.labels = list(self.metadata["labels"])
        self.run_model(np.zeros((1, *self.metadata["input_shape"]), dtype=np.float32))  # warm-up
        self.initialized = True
        logger.info("digit model %s loaded from %s, %d threads", self.metadata.get("model_version"), path, threads)

    def describe_handle(self):
        return json.dumps(self.metadata)

    def preprocess_one(self, item, several: bool):
        """Model input for one image; an ImageError raises for a single-image request (the
        whole request fails) and is kept in place within a several-image request."""
        try:
            if isinstance(item, ImageError):
                raise item
            return preprocess_bytes(item, self.mean, self.std)
        except ImageError as error:
            if not several:
                raise
            return error

    def parse_request(self, index: int, request: dict, inputs: list):
        """Append this request's good images to inputs; return its slots or its ImageError."""
        try:
            reject_form_encoding(self.context, index)
            encoded, several = images_from_request(request)
            # Only {"images": [...]} and multipart answer each image on its own; v2 is all or nothing.
            arrays = [self.preprocess_one(item, several is True) for item in encoded]
        except ImageError as error:
            return error
        slots = []
        for array in arrays:
            if isinstance(array, ImageError):
                slots.append(array)
            else:
                slots.append(len(inputs))
                inputs.append(array)
        return slots, several

    def preprocess(self, data) -> ParsedBatch:
        started = time.perf_counter()
        inputs: list[np.ndarray] = []
        requests = [self.parse_request(index, request, inputs) for index, request in enumerate(data)]
        batch = ParsedBatch(np.stack(inputs) if inputs else None, requests)
        self.context.metrics.add_time(PREPROCESS_METRIC, round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return batch

    def inference(self, batch: ParsedBatch, *args, **kwargs):
        logits = self.run_model(batch.inputs) if batch.inputs is not None else None
        return batch, logits

    def postprocess(self, inference_output) -> list[str]:
        """One JSON answer per request; a refused request gets its 4xx status."""
        batch, logits = inference_output
        answers = predictions(logits, self.labels) if logits is not None else []
        responses = []
        for index, parsed in enumerate(batch.requests):
            self.context.set_response_content_type(index, "application/json")
            if isinstance(parsed, ImageError):
                self.context.set_response_status(HTTP_STATUS.get(parsed.code, 400), parsed.code, index)
                responses.append(json.dumps(error_body(parsed)))
                continue
            slots, several = parsed
            results = [error_body(slot) if isinstance(slot, ImageError) else answers[slot] for slot in slots]
            if isinstance(several, V2Request):
                responses.append(json.dumps(v2_answer(self.context.model_name, results, several)))
            else:
                responses.append(json.dumps({"predictions": results} if several else results[0]))
        self.record_metrics(batch, answers)
        return responses

    def record_metrics(self, batch: ParsedBatch, answers: list[dict]) -> None:
        """DigitPredictions per answered image by digit, RequestsRejected per refused request
        or image by error code. Counted per request (idx = its index in the batch) so that
        TorchServe adds ModelName and Level and logs the request id; equal outcomes of one
        request go out as one line."""
        counts = Counter()
        for index, parsed in enumerate(batch.requests):
            for slot in [parsed] if isinstance(parsed, ImageError) else parsed[0]:
                if isinstance(slot, ImageError):
                    counts[REJECTED_METRIC, "Code", slot.code, index] += 1
                else:
                    counts[DIGIT_METRIC, "Digit", str(answers[slot]["digit"]), index] += 1
        for (name, dimension, value, index), count in counts.items():
            self.context.metrics.add_counter(name, count, index, [Dimension(dimension, value)])

    def explain_handle(self, data_preprocess, raw_data):
        # No explanations for this model: an `explain: True` header gets the usual answer.
        return self.postprocess(self.inference(data_preprocess))
