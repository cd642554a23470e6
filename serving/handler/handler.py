"""TorchServe handler for the digit CNN.

Self-contained: it imports the standard library, NumPy, torch, `ts`, and the modules that
the archive ships beside it (preprocess.py, artifact.py, protocol.py, parsing.py, explain.py,
which imports Captum). Mean, std and labels come from the artifact's own metadata, never from
a copy here.

Accepts per request: raw image bytes (curl -T / --data-binary), multipart form files
(curl -F data=@digit.png), JSON {"image": "<base64>"} / {"images": ["<base64>", ...]}, or
an Open Inference Protocol (v2) body {"inputs": [...]}. Answers per image: {"digit",
"label", "is_digit", "confidence", "probabilities", "top_k", "model_version"}; per bad request a 4xx
status with {"error", "code"}. A request to /explanations/mnist gets, per image, the digit and
its Integrated Gradients map (explain.py). Good and bad requests, predictions and explanations,
can share a batch. parsing.py holds the request model; this module is the class alone
(TorchServe loads a handler module of one class).
"""
from __future__ import annotations

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
    from .artifact import (Trust, is_onnx, load, load_torchscript_module, predictions, public_card, run_batched,
                           torch_runner)
    from .explain import attribute, explanation
    from .parsing import (DIGIT_METRIC, NOT_DIGIT_METRIC, PREPROCESS_METRIC, REJECTED_METRIC, BatchOutput,
                          INFERENCE_CHUNK_IMAGES, MAX_ANSWER_BYTES, ParsedBatch, answer_body, http_status,
                          parse_batch)
else:  # inside the model archive, the modules sit beside this file
    from artifact import (Trust, is_onnx, load, load_torchscript_module, predictions, public_card, run_batched,
                          torch_runner)
    from explain import attribute, explanation
    from parsing import (DIGIT_METRIC, NOT_DIGIT_METRIC, PREPROCESS_METRIC, REJECTED_METRIC, BatchOutput,
                         INFERENCE_CHUNK_IMAGES, MAX_ANSWER_BYTES, ParsedBatch, answer_body, http_status,
                         parse_batch)

logger = logging.getLogger(__name__)


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
        self.load_model(path, threads)
        self.mean, self.std = float(self.metadata["mean"]), float(self.metadata["std"])
        self.labels = list(self.metadata["labels"])
        self.trust = Trust.from_metadata(self.metadata)
        # Answers name the archive's version, the one TorchServe registered and a rollout switches
        # (`serving.server.archive --version`, which defaults to the weights' own model_version); the
        # describe card keeps the weights' identity. An archive built without a version has none.
        self.model_version = self.manifest["model"].get("modelVersion") or self.metadata["model_version"]
        self.run_model(np.zeros((1, *self.metadata["input_shape"]), dtype=np.float32))  # warm-up
        self.initialized = True
        logger.info("digit model %s loaded from %s, %d threads", self.metadata.get("model_version"), path, threads)

    def load_model(self, path: str, threads: int) -> None:
        """run_model and metadata; and, for TorchScript, the module itself, which explanations
        differentiate (ONNX Runtime gives no gradients: self.module is None)."""
        if is_onnx(path):
            self.module = None
            self.run_model, self.metadata = load(path, self.device, threads)
        else:
            self.module, self.metadata = load_torchscript_module(path, self.device)
            self.run_model = torch_runner(self.module, self.device)

    def _is_explain(self) -> bool:
        # BaseHandler reads request 0's `explain` header and sends the whole batch down one path;
        # a batch can mix /explanations and /predictions requests, so preprocess reads each
        # request's own header (parsing.wants_explanation) and the usual cycle answers both.
        return False

    def _is_describe(self) -> bool:
        # BaseHandler reads request 0's `describe` header and answers the whole batch with one
        # card: the other requests would lose their answers. Honoured only for a request alone.
        return len(self.context.request_processor) == 1 and super()._is_describe()

    def describe_handle(self):
        # The int8 ONNX, fp32 ONNX and TorchScript files of one training run share its
        # model_version: the card also names the file served and the runtime that runs it.
        served = {"served_file": self.manifest["model"]["serializedFile"],
                  "runtime": "onnxruntime" if self.module is None else "torchscript"}
        return json.dumps({**public_card(self.metadata), **served}, allow_nan=False)

    def preprocess(self, data) -> ParsedBatch:
        started = time.perf_counter()
        headers = [self.context.get_all_request_header(index) for index in range(len(data))]
        batch = parse_batch(data, headers, self.mean, self.std, explainable=self.module is not None)
        self.context.metrics.add_time(PREPROCESS_METRIC, round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return batch

    def inference(self, batch: ParsedBatch, *args, **kwargs) -> BatchOutput:
        if batch.inputs is None:
            return BatchOutput(batch, None)
        logits = run_batched(self.run_model, batch.inputs, INFERENCE_CHUNK_IMAGES)
        return BatchOutput(batch, logits, self.attributions(batch, logits))

    def attributions(self, batch: ParsedBatch, logits: np.ndarray) -> dict[int, np.ndarray]:
        """The map of each explained row, for the digit the model predicts there."""
        rows = sorted(batch.explained)
        if not rows:
            return {}
        maps = attribute(self.module, batch.inputs[rows], logits[rows].argmax(axis=1), self.mean, self.std,
                         self.device)
        return dict(zip(rows, maps))

    def postprocess(self, inference_output: BatchOutput) -> list[str]:
        """One JSON answer per request; a refused request gets its 4xx status."""
        batch, logits = inference_output.batch, inference_output.logits
        answers = predictions(logits, self.labels, self.model_version, self.trust) if logits is not None else []
        for row, attribution in inference_output.attributions.items():
            answers[row] = explanation(answers[row], attribution, batch.explained[row])
        for index, parsed in enumerate(batch.requests):
            self.context.set_response_content_type(index, "application/json")
            if parsed.error is not None:
                self.context.set_response_status(http_status(parsed.error), parsed.error.code, index)
        self.record_metrics(batch, answers)
        return [self.answer_text(index, answer_body(parsed, answers, self.context.model_name, self.model_version))
                for index, parsed in enumerate(batch.requests)]

    def answer_text(self, index: int, body: dict) -> str:
        """Strict JSON: NaN or Infinity is not JSON, and no client can parse it. Preprocessing
        refuses non-finite pixels, so only a broken model gets here; that request gets a 500.
        An answer over MAX_ANSWER_BYTES would make TorchServe kill the worker and fail the whole
        batch: that request alone gets a 500 answer_too_large instead."""
        try:
            text = json.dumps(body, allow_nan=False)
        except ValueError:
            logger.error("answer %d of the batch holds a non-finite number", index)
            self.context.set_response_status(500, "non-finite answer", index)
            return json.dumps({"error": "the model produced a non-finite answer", "code": "internal_error"})
        if len(text.encode()) > MAX_ANSWER_BYTES:
            logger.error("answer %d of the batch has %d bytes, over %d", index, len(text.encode()), MAX_ANSWER_BYTES)
            self.context.set_response_status(500, "answer too large", index)
            return json.dumps({"error": f"the answer would exceed {MAX_ANSWER_BYTES} bytes", "code": "answer_too_large"})
        return text

    def record_metrics(self, batch: ParsedBatch, answers: list[dict]) -> None:
        """DigitPredictions per answered image by digit (NotDigitImages too when it is judged not
        a digit), RequestsRejected per refused request or image by error code. Counted per
        request (idx = its index in the batch) so that TorchServe adds ModelName and Level and
        logs the request id; equal outcomes of one request go out as one line."""
        counts = Counter()
        for index, parsed in enumerate(batch.requests):
            for outcome in parsed.outcomes():
                if isinstance(outcome, int):
                    answer = answers[outcome]
                    counts[DIGIT_METRIC, "Digit", str(answer["digit"]), index] += 1
                    if not answer["is_digit"]:
                        counts[NOT_DIGIT_METRIC, "Digit", str(answer["digit"]), index] += 1
                else:
                    counts[REJECTED_METRIC, "Code", outcome.code, index] += 1
        for (name, dimension, value, index), count in counts.items():
            self.context.metrics.add_counter(name, count, index, [Dimension(dimension, value)])
