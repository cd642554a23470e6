"""The Open Inference Protocol (KServe v2) envelope: reading a v2 request, writing a v2 answer.

Shipped beside handler.py in the model archive; parsing.py decides which requests are v2.

TorchServe 0.12 routes POST /v2/models/mnist/infer to the handler like /predictions/mnist,
with the JSON body untouched (no `service_envelope` is configured). A v2 request
    {"id": "42", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                             "data": ["<base64 image>", "<base64 image>"]}]}
is answered
    {"model_name": "mnist", "model_version": "<the artifact's model_version>", "id": "42", "outputs": [
        {"name": "digit", "datatype": "INT64", "shape": [2], "data": [7, 2]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 10], "data": [...20 values, row-major...]},
        {"name": "is_digit", "datatype": "BOOL", "shape": [2], "data": [true, false]}]}
is_digit false: the image does not look like a digit (the artifact's trust record); digit is then
the best guess, kept so a client can still show it.
All of a v2 request's images are answered or none: one bad image fails the request, as one
bad element fails a tensor.
"""
from __future__ import annotations

if __package__:  # imported from the source tree (tests)
    from .preprocess import ImageError
else:  # inside the model archive
    from preprocess import ImageError

V2_INPUT_DATATYPE = "BYTES"
DIGIT_OUTPUT, PROBABILITIES_OUTPUT, IS_DIGIT_OUTPUT = "digit", "probabilities", "is_digit"
# A v2 request's `id` is echoed in its answer: longer ones are refused (400), so an id can never
# push an answer towards max_response_size (a 1.1 MB id killed the worker and its batch: issue 27).
MAX_ID_CHARS = 256
V2_REQUEST_SHAPE = ('{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [N], '
                    '"data": ["<base64 image>", ...]}]}')


def is_v2_request(document) -> bool:
    return isinstance(document, dict) and "inputs" in document


def parse_v2_request(document: dict) -> tuple[list, str | None] | ImageError:
    """(the base64 strings of the one BYTES input tensor, the request's id), or ImageError
    no_image_field when the envelope holds no such tensor, invalid_request when the id is too long."""
    inputs = document["inputs"]
    tensor = inputs[0] if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict) else {}
    data = tensor.get("data")
    if tensor.get("datatype") != V2_INPUT_DATATYPE or not isinstance(data, list) or not data:
        return ImageError("no_image_field",
                          f"an Open Inference Protocol request needs one BYTES input: {V2_REQUEST_SHAPE}")
    if "shape" in tensor and tensor["shape"] != [len(data)]:
        return ImageError("no_image_field",
                          f"input shape {tensor['shape']!r} does not match its {len(data)} data items")
    request_id = document.get("id")
    if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
        return ImageError("invalid_request", f"the request id has {len(request_id)} characters; the limit is {MAX_ID_CHARS}")
    return data, request_id if isinstance(request_id, str) else None


def v2_answer(model_name: str, model_version: str, answers: list[dict], request_id: str | None) -> dict:
    """The v2 answer to the JSON answers of a request's images, in order."""
    rows = len(answers)
    classes = len(answers[0]["probabilities"])
    answer = {"model_name": model_name, "model_version": model_version, "outputs": [
        {"name": DIGIT_OUTPUT, "datatype": "INT64", "shape": [rows], "data": [item["digit"] for item in answers]},
        {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [rows, classes],
         "data": [value for item in answers for value in item["probabilities"]]},
        {"name": IS_DIGIT_OUTPUT, "datatype": "BOOL", "shape": [rows], "data": [item["is_digit"] for item in answers]},
    ]}
    if request_id is not None:
        answer["id"] = request_id
    return answer
