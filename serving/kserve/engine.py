"""The digit model on KServe's Python model server, answered by the code the TorchServe archive ships.

KServe gives the process: uvicorn, readiness (/v2/health/ready, /v2/models/mnist/ready,
/v1/models/mnist), model metadata (/v2/models/mnist) and Prometheus (/metrics). The two
inference routes, POST /predictions/mnist and POST /v2/models/mnist/infer, are ours and sit in
front of KServe's own v2 route: each request goes through serving/handler's parse_batch,
artifact.predictions and answer_body, the same functions the TorchServe handler calls, so the
answers, is_digit, error codes and 4xx JSON are those of docs/serving.md. What KServe's own
pydantic v2 route would answer differently (a 422 of FastAPI's shape for a bad envelope) never
runs for this model.

Each answer (decoding, preprocessing, the model) runs in the model's AnswerPool, off uvicorn's
event loop, which also serves gRPC, readiness and metrics: one slow request holds one worker,
not the server. A request that finds every worker busy and the queue full is refused at once with
503 {"code": "busy"}, as TorchServe answers 503 past its job_queue_size.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import kserve
import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter

from serving.handler.artifact import (MODEL_NAME, Trust, is_onnx, load, load_torchscript_module, predictions,
                                      run_batched, torch_runner)
from serving.handler.parsing import INFERENCE_CHUNK_IMAGES, answer_body, error_body, http_status, parse_batch
from serving.handler.preprocess import ImageError

logger = logging.getLogger(__name__)

DIGITS = Counter("digitserve_digit_predictions", "Answered images, by digit", ["digit"])
NOT_DIGITS = Counter("digitserve_not_digit_images", "Answered images judged not a digit, by best guess", ["digit"])
REJECTED = Counter("digitserve_requests_rejected", "Refused requests or images, by error code", ["code"])
BUSY_STATUS = 503   # TorchServe's answer past job_queue_size; gRPC: UNAVAILABLE (grpc_server.STATUS_BY_HTTP)
Result = TypeVar("Result")


class Busy(Exception):
    """Every worker is busy and the queue is full: refuse now rather than hold the body."""

    def body(self) -> dict:
        return {"error": str(self), "code": "busy"}


@dataclass(frozen=True)
class Reply:
    """One request's HTTP answer: its status and JSON body."""
    status: int
    body: dict


class AnswerPool:
    """Threads that answer requests off the event loop: `workers` at once, `queue_size` more
    waiting (each holding its body, up to max_request_size), past that Busy. Decoding (Pillow),
    numpy and torch release the GIL for their heavy parts, so the loop keeps answering meanwhile.
    Slots are counted on the event loop's thread only (REST and gRPC share that loop): no lock."""

    def __init__(self, workers: int, queue_size: int):
        self.workers, self.queue_size = workers, queue_size
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="answer")
        self.taken = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of workers + queue_size places for a request's lifetime; Busy when none is left."""
        if self.taken >= self.workers + self.queue_size:
            REJECTED.labels("busy").inc()
            raise Busy(f"the server is busy: {self.workers} requests in progress and {self.queue_size} "
                       "waiting; try again shortly")
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1

    async def run(self, function: Callable[..., Result], *args) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)


class DigitModel(kserve.Model):
    """The exported ONNX or TorchScript file with its model card; ready once loaded."""

    def __init__(self, path: str, threads: int, workers: int, queue_size: int):
        super().__init__(MODEL_NAME)
        self.path, self.threads = path, threads
        self.pool = AnswerPool(workers, queue_size)

    def load(self) -> bool:
        if is_onnx(self.path):
            self.run_model, self.metadata = load(self.path, "cpu", self.threads)
        else:   # as TorchServe's handler does: torch's threads per process, workers x threads = cores
            if self.threads > 0:
                torch.set_num_threads(self.threads)
            module, self.metadata = load_torchscript_module(self.path, "cpu")
            self.run_model = torch_runner(module, "cpu")
        self.mean, self.std = float(self.metadata["mean"]), float(self.metadata["std"])
        self.labels = list(self.metadata["labels"])
        self.trust = Trust.from_metadata(self.metadata)
        self.model_version = self.metadata["model_version"]
        self.run_model(np.zeros((1, *self.metadata["input_shape"]), dtype=np.float32))   # warm-up
        self.ready = True
        logger.info("digit model %s loaded from %s", self.model_version, self.path)
        return self.ready

    def answer(self, request: dict, headers: dict) -> Reply:
        """One request, as TorchServe hands it to the handler ({"body": ...} or form fields)."""
        batch = parse_batch([request], [headers], self.mean, self.std, explainable=False)
        logits = run_batched(self.run_model, batch.inputs, INFERENCE_CHUNK_IMAGES) if batch.inputs is not None else None
        answers = predictions(logits, self.labels, self.model_version, self.trust) if logits is not None else []
        parsed = batch.requests[0]
        count(parsed.outcomes(), answers)
        status = http_status(parsed.error) if parsed.error is not None else 200
        return Reply(status, answer_body(parsed, answers, MODEL_NAME, self.model_version))


def count(outcomes: list, answers: list[dict]) -> None:
    """The Prometheus counters of TorchServe's DigitPredictions, NotDigitImages and RequestsRejected."""
    for outcome in outcomes:
        if isinstance(outcome, ImageError):
            REJECTED.labels(outcome.code).inc()
        else:
            DIGITS.labels(str(answers[outcome]["digit"])).inc()
            if not answers[outcome]["is_digit"]:
                NOT_DIGITS.labels(str(answers[outcome]["digit"])).inc()


async def torchserve_request(request: Request, max_body_bytes: int) -> dict | ImageError:
    """The request as TorchServe's frontend and backend hand it to a handler: form fields by name
    for multipart, else {"body": ...}, parsed JSON for application/json, text for text/*. A body
    over max_body_bytes (TorchServe's max_request_size) is refused, as TorchServe refuses it."""
    kind = request.headers.get("content-type", "").lower()
    body = await request.body()
    if len(body) > max_body_bytes:
        return ImageError("too_large", f"request body of {len(body)} bytes; the limit is {max_body_bytes}")
    if kind.startswith("multipart/form-data"):   # Starlette reads the form from the body read above
        form = await request.form(max_files=1000, max_fields=1000)
        return {name: (await value.read()) if hasattr(value, "read") else value for name, value in form.multi_items()}
    if kind == "application/json":   # TorchServe's backend parses exactly this type
        try:
            return {"body": json.loads(body)}
        except (ValueError, RecursionError):
            return {"body": body}
    if kind.startswith("text/"):
        return {"body": body.decode(errors="replace")}
    if kind.startswith("application/x-www-form-urlencoded"):
        return {}   # TorchServe parses such a body as form fields; parse_batch names the mistake
    return {"body": body}


def add_routes(app, model: DigitModel, max_body_bytes: int) -> None:
    """Ours before KServe's: Starlette takes the first route that matches."""
    async def infer(request: Request) -> JSONResponse:
        if not model.ready:
            return JSONResponse({"error": "the model is still loading", "code": "not_ready"}, status_code=503)
        try:
            with model.pool.slot():   # taken before the body is read: a refused body is never read
                return await answer(request)
        except Busy as busy:
            return JSONResponse(busy.body(), status_code=BUSY_STATUS)

    async def answer(request: Request) -> JSONResponse:
        torchserve = await torchserve_request(request, max_body_bytes)
        if isinstance(torchserve, ImageError):
            REJECTED.labels(torchserve.code).inc()
            return JSONResponse(error_body(torchserve), status_code=http_status(torchserve))
        reply = await model.pool.run(model.answer, torchserve, dict(request.headers))
        return JSONResponse(reply.body, status_code=reply.status)

    for path in (f"/predictions/{MODEL_NAME}", f"/v2/models/{MODEL_NAME}/infer"):
        app.add_api_route(path, infer, methods=["POST", "PUT"])   # curl -T sends PUT, as TorchServe takes
