"""Start KServe's model server on one address: REST and the v2 gRPC service, bound where we say.

kserve.ModelServer binds 0.0.0.0 (REST) and [::] (gRPC) with no option to change it; this
subclass builds the same RESTServer and sets uvicorn's host before it starts, and serves gRPC
with grpc_server.DigitGrpcServer on the same host (docs/engines.md).
"""
from __future__ import annotations

import asyncio

from kserve import ModelServer
from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
from kserve.protocol.rest.server import RESTServer
from starlette.middleware.cors import CORSMiddleware

from serving.server.properties import read_properties

from .engine import DigitModel, add_routes
from .grpc_server import DigitGrpcServer


class LocalModelServer(ModelServer):
    def __init__(self, host: str, http_port: int, grpc_port: int):
        super().__init__(http_port=http_port, grpc_port=grpc_port, enable_grpc=False, workers=1)
        self.host = host

    def start(self, models: list, max_message_bytes: int) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       self.http_port, workers=1, grace_period=self.grace_period)
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        # KServe's stop() (on SIGTERM) stops whatever _grpc_server holds.
        self._grpc_server = DigitGrpcServer(f"{self.host}:{self.grpc_port}", models[0], self.dataplane,
                                            self.model_repository_extension, max_message_bytes)
        self.servers.append(self._grpc_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def allow_page_origin(properties: dict) -> None:
    """The draw-a-digit page's origin gets CORS answers, as config.properties' cors_* settings
    give them on TorchServe; no other origin does."""
    origins = [origin for origin in properties.get("cors_allowed_origin", "").split(",") if origin]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins,
                           allow_methods=properties.get("cors_allowed_methods", "POST").split(","),
                           allow_headers=properties.get("cors_allowed_headers", "").split(","))


def serve(artifact: str, host: str, port: int, grpc_port: int, threads: int, workers: int, config: str) -> None:
    """Load the artifact, then serve it until SIGTERM or SIGINT, with the request limits, queue and
    page origin of the TorchServe config file (max_request_size, job_queue_size, cors_*), so that
    both engines refuse the same bodies, answer 503 past the same queue and answer the same page."""
    properties = read_properties(config)
    max_body_bytes = int(properties["max_request_size"])
    model = DigitModel(artifact, threads, workers, int(properties["job_queue_size"]))
    model.load()
    add_routes(app, model, max_body_bytes)
    allow_page_origin(properties)
    LocalModelServer(host, port, grpc_port).start([model], max_body_bytes)
