"""The Open Inference Protocol (KServe v2) over gRPC: ModelInfer on inference.GRPCInferenceService,
the service KServe's model server (python -m serving.kserve, :8086) and Triton answer.

    from serving.clients.v2_grpc import connect_v2
    with connect_v2("127.0.0.1:8086") as client:
        client.predict(Path("digit.png").read_bytes())   # {"digit": 7, "is_digit": true, "probabilities": [...],
                                                          #  "model_version": "..."}, or PredictionError

The messages come from TorchServe's own open_inference_grpc.proto (the stubs grpc_client makes
from its jar; nothing vendored): the same Open Inference Protocol messages, field for field, as
KServe's grpc_predict_v2.proto, in another proto package. So the calls name the protocol's
service path, /inference.GRPCInferenceService/..., rather than the package of TorchServe's file.

A refused image ends the call with a gRPC status whose details are the server's JSON
{"error", "code"} (serving/kserve/grpc_server.py); predict() raises it as PredictionError.
"""
from __future__ import annotations

import json

from serving.handler.artifact import MODEL_NAME

from .grpc_client import TIMEOUT_S, KeySource, PredictionError, auth_metadata, connect, load_stubs

V2_SERVICE = "inference.GRPCInferenceService"
IMAGE_INPUT = "image"


class V2Client:
    """ModelInfer and ServerReady of the Open Inference Protocol on one channel."""

    def __init__(self, channel, keys: KeySource = KeySource()):
        self.pb = load_stubs().open_inference_grpc_pb2
        self.keys = keys
        self.infer_call = channel.unary_unary(f"/{V2_SERVICE}/ModelInfer",
                                              request_serializer=self.pb.ModelInferRequest.SerializeToString,
                                              response_deserializer=self.pb.ModelInferResponse.FromString)
        self.ready_call = channel.unary_unary(f"/{V2_SERVICE}/ServerReady",
                                              request_serializer=self.pb.ServerReadyRequest.SerializeToString,
                                              response_deserializer=self.pb.ServerReadyResponse.FromString)

    @property
    def metadata(self) -> tuple:
        return auth_metadata(self.keys.current())

    def ready(self, timeout_s: float = TIMEOUT_S) -> bool:
        return self.ready_call(self.pb.ServerReadyRequest(), metadata=self.metadata, timeout=timeout_s).ready

    def infer_raw(self, images: list[bytes], model: str = MODEL_NAME, timeout_s: float = TIMEOUT_S):
        """The ModelInferResponse to one BYTES tensor of images; grpc.RpcError when refused."""
        tensor = self.pb.ModelInferRequest.InferInputTensor(
            name=IMAGE_INPUT, datatype="BYTES", shape=[len(images)],
            contents=self.pb.InferTensorContents(bytes_contents=images))
        request = self.pb.ModelInferRequest(model_name=model, inputs=[tensor])
        return self.infer_call(request, metadata=self.metadata, timeout=timeout_s)

    def predict(self, image: bytes, model: str = MODEL_NAME, timeout_s: float = TIMEOUT_S) -> dict:
        """The answer to one image; PredictionError when the server refused it."""
        import grpc

        try:
            response = self.infer_raw([image], model, timeout_s)
        except grpc.RpcError as error:
            refusal = refusal_body(error.details())
            if refusal is None:
                raise
            raise PredictionError(str(refusal["code"]), str(refusal.get("error", refusal["code"]))) from None
        return first_answer(response)


def refusal_body(details: str | None) -> dict | None:
    """The server's {"error", "code"} JSON in a status's details, else None (gRPC's own failures)."""
    try:
        body = json.loads(details or "")
    except ValueError:
        return None
    return body if isinstance(body, dict) and "code" in body else None


def first_answer(response) -> dict:
    """The first image's answer in a ModelInferResponse: digit, is_digit, probabilities, model_version."""
    outputs = {output.name: output for output in response.outputs}
    classes = outputs["probabilities"].shape[-1]
    return {"digit": int(outputs["digit"].contents.int64_contents[0]),
            "is_digit": bool(outputs["is_digit"].contents.bool_contents[0]),
            "probabilities": [float(value) for value in outputs["probabilities"].contents.fp32_contents[:classes]],
            "model_version": response.model_version}


def connect_v2(target: str, keys: KeySource | None = None):
    """A V2Client for HOST:PORT, with connect()'s key handling (KServe itself checks no key)."""
    return connect(target, keys=keys, client=V2Client)
