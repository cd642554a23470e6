"""Start KServe's model server on one address: the REST server only, bound where we say.

kserve.ModelServer binds 0.0.0.0 (REST) and [::] (gRPC) with no option to change it; this
subclass builds the same RESTServer and sets uvicorn's host before it starts. gRPC is not
started (docs/engines.md: what differs).
"""
from __future__ import annotations

import asyncio

from kserve import ModelServer
from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
from kserve.protocol.rest.server import RESTServer

from serving.server.properties import read_properties

from .engine import DigitModel, add_routes


class LocalModelServer(ModelServer):
    def __init__(self, host: str, http_port: int):
        super().__init__(http_port=http_port, enable_grpc=False, workers=1)
        self.host = host

    def start(self, models: list) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       self.http_port, workers=1, grace_period=self.grace_period)
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def serve(artifact: str, host: str, port: int, threads: int, config: str) -> None:
    """Load the artifact, then serve it until SIGTERM or SIGINT, with the request limits of the
    TorchServe config file (its max_request_size), so that both engines refuse the same bodies."""
    max_body_bytes = int(read_properties(config)["max_request_size"])
    model = DigitModel(artifact, threads)
    model.load()
    add_routes(app, model, max_body_bytes)
    LocalModelServer(host, port).start([model])
