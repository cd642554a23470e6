"""The Open Inference Protocol over gRPC (KServe's GRPCInferenceService) on the KServe engine.

KServe's servicer answers liveness, readiness and metadata; ModelInfer is ours: the request's
BYTES tensor becomes the v2 JSON document the REST route takes, and DigitModel.answer (the
TorchServe handler's parse_batch, predictions and answer_body) answers it, so the outputs
(digit INT64, probabilities FP32, is_digit BOOL), limits and error codes are those of REST v2.
A refused request ends with a gRPC status (STATUS_BY_HTTP) whose details are the REST error's
JSON, {"error": ..., "code": ...} (docs/engines.md).

The server listens on the engine's own address: KServe's GRPCServer binds [::] with no option.
"""
from __future__ import annotations

import base64
import json
import struct
from concurrent import futures

import grpc
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.utils.utils import to_headers

from serving.handler.artifact import MODEL_NAME

from .engine import BUSY_STATUS, Busy, DigitModel, Reply

# The REST status of a refusal -> its gRPC status (the mapping of KServe's and Triton's v2 servers).
STATUS_BY_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                  415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
                  500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}
# A v2 answer's datatype -> the InferTensorContents field that carries it.
CONTENTS_FIELD = {"INT64": "int64_contents", "FP32": "fp32_contents", "BOOL": "bool_contents"}
LENGTH_PREFIX = struct.Struct("<I")   # raw_input_contents: each BYTES element after its 4-byte length


def raw_elements(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor sent as raw_input_contents; a cut-short one ends the list
    with what is left, which then fails to decode as an image."""
    elements, offset = [], 0
    while offset + LENGTH_PREFIX.size <= len(raw):
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def v2_document(request: pb.ModelInferRequest) -> dict:
    """The REST v2 body carrying the same tensors: bytes elements as base64 strings."""
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if index < len(request.raw_input_contents):
            elements = raw_elements(request.raw_input_contents[index])
        else:
            elements = list(tensor.contents.bytes_contents)
        inputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                       "data": [base64.b64encode(element).decode() for element in elements]})
    document = {"inputs": inputs}
    if request.id:
        document["id"] = request.id
    return document


def infer_response(body: dict) -> pb.ModelInferResponse:
    """The REST v2 answer as a ModelInferResponse."""
    outputs = [pb.ModelInferResponse.InferOutputTensor(
        name=output["name"], datatype=output["datatype"], shape=output["shape"],
        contents=pb.InferTensorContents(**{CONTENTS_FIELD[output["datatype"]]: output["data"]}))
        for output in body["outputs"]]
    return pb.ModelInferResponse(model_name=body["model_name"], model_version=body["model_version"],
                                 id=body.get("id", ""), outputs=outputs)


class DigitServicer(InferenceServicer):
    """KServe's servicer with ModelInfer answered by the digit model."""

    def __init__(self, data_plane, repository_extension, model: DigitModel):
        super().__init__(data_plane, repository_extension)
        self.model = model

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        if request.model_name != MODEL_NAME:
            await context.abort(grpc.StatusCode.NOT_FOUND, json.dumps(
                {"error": f"no model {request.model_name!r}: this server serves {MODEL_NAME!r}", "code": "no_model"}))
        if not self.model.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                json.dumps({"error": "the model is still loading", "code": "not_ready"}))
        try:
            with self.model.pool.slot():
                reply = await self.model.pool.run(self.answer, request, to_headers(context))
        except Busy as busy:
            reply = Reply(BUSY_STATUS, busy.body())
        if reply.status != 200:
            await context.abort(STATUS_BY_HTTP.get(reply.status, grpc.StatusCode.INVALID_ARGUMENT),
                                json.dumps(reply.body))
        return infer_response(reply.body)

    def answer(self, request: pb.ModelInferRequest, headers: dict) -> Reply:
        """In the model's pool: base64 of up to max_request_size bytes is work for it too."""
        return self.model.answer({"body": v2_document(request)}, headers)


class DigitGrpcServer:
    """GRPCInferenceService on one address (HOST:PORT), started and stopped as KServe's ModelServer
    starts and stops its own GRPCServer; messages over max_message_bytes (TorchServe's
    max_request_size) are refused by gRPC itself (RESOURCE_EXHAUSTED)."""

    def __init__(self, address: str, model: DigitModel, data_plane, repository_extension, max_message_bytes: int,
                 threads: int = 4, grace_s: float = 5.0):
        self.address, self.threads, self.grace_s = address, threads, grace_s
        self.max_message_bytes = max_message_bytes
        self.servicer = DigitServicer(data_plane, repository_extension, model)
        self.server = None

    async def start(self) -> None:
        """Serve until stop(); the aio server is made here, on the loop that runs it."""
        self.server = aio.server(futures.ThreadPoolExecutor(max_workers=self.threads),
                                 options=[("grpc.max_receive_message_length", self.max_message_bytes)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        if self.server.add_insecure_port(self.address) == 0:
            raise OSError(f"cannot listen for gRPC on {self.address}")
        await self.server.start()
        await self.server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        if self.server is not None:
            await self.server.stop(grace=self.grace_s)
