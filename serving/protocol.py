"""The handler's request and answer shapes beyond plain JSON: the batch that preprocess hands
to inference, and the Open Inference Protocol (KServe v2) envelope.

Shipped beside handler.py in the model archive. These classes live here, not in handler.py,
because TorchServe's model loader refuses a handler module that defines more than one class.

TorchServe 0.12 routes POST /v2/models/mnist/infer to the handler like /predictions/mnist,
with the JSON body untouched (no `service_envelope` is configured). A v2 request
    {"id": "42", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                             "data": ["<base64 image>", "<base64 image>"]}]}
is answered
    {"model_name": "mnist", "id": "42", "outputs": [
        {"name": "digit", "datatype": "INT64", "shape": [2], "data": [7, 2]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 10], "data": [...20 values, row-major...]}]}
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

if __package__:  # imported from the source tree (tests)
    from .preprocess import ImageError
else:  # inside the model archive
    from preprocess import ImageError

V2_INPUT_DATATYPE = "BYTES"
DIGIT_OUTPUT, PROBABILITIES_OUTPUT = "digit", "probabilities"
V2_REQUEST_SHAPE = ('{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [N], '
                    '"data": ["<base64 image>", ...]}]}')


@dataclass
class ParsedBatch:
    """What preprocess hands to inference: the stacked inputs of every good image, and per
    request either its ImageError or its list of slots (an image index into inputs, or the
    ImageError of one image among several)."""
    inputs: np.ndarray | None
    requests: list          # per request: ImageError, or (slots, several or V2Request)


@dataclass(frozen=True)
class V2Request:
    """Marks an Open Inference Protocol request, answered as v2 output tensors. All of its
    images are answered or none: one bad image fails the request, as one bad element fails
    a tensor."""
    id: str | None = None


def is_v2_request(document) -> bool:
    return isinstance(document, dict) and "inputs" in document


def parse_v2_request(document: dict) -> tuple[list, V2Request]:
    """(the base64 strings of the one BYTES input tensor, the request); ImageError
    no_image_field when the envelope holds no such tensor."""
    inputs = document["inputs"]
    tensor = inputs[0] if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict) else {}
    data = tensor.get("data")
    if tensor.get("datatype") != V2_INPUT_DATATYPE or not isinstance(data, list) or not data:
        raise ImageError("no_image_field", f"an Open Inference Protocol request needs one BYTES input: {V2_REQUEST_SHAPE}")
    if "shape" in tensor and tensor["shape"] != [len(data)]:
        raise ImageError("no_image_field", f"input shape {tensor['shape']!r} does not match its {len(data)} data items")
    request_id = document.get("id")
    return data, V2Request(request_id if isinstance(request_id, str) else None)


def v2_answer(model_name: str, answers: list[dict], request: V2Request) -> dict:
    """The v2 answer to the JSON answers of a request's images, in order."""
    rows = len(answers)
    classes = len(answers[0]["probabilities"])
    answer = {"model_name": model_name, "outputs": [
        {"name": DIGIT_OUTPUT, "datatype": "INT64", "shape": [rows], "data": [item["digit"] for item in answers]},
        {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [rows, classes],
         "data": [value for item in answers for value in item["probabilities"]]},
    ]}
    if request.id is not None:
        answer["id"] = request.id
    return answer
