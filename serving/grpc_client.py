"""TorchServe's gRPC inference API from Python, with stubs made from the installed TorchServe.

    python -m serving.grpc_client          # (re)generate the stubs now; prints where they are

Nothing is vendored: the .proto files are read from TorchServe's own frontend jar
(ts/frontend/model-server.jar), so the stubs always match the server that is installed. They
are generated with grpcio-tools on first use into serving/_grpc/ (git-ignored) and again
whenever the jar's .proto files change (a TorchServe upgrade); no make step is needed.

    from serving.grpc_client import connect
    with connect("127.0.0.1:7070") as client:          # key="..." with token authorization
        client.ping()                                   # {"status": "Healthy"}
        client.predict(Path("digit.png").read_bytes())  # {"digit": 7, ...}, or PredictionError

TorchServe 0.12's Predictions RPC drops the status a handler sets per request (its GRPCJob
answers every handler reply with OK), so a refused image arrives as status OK with the
handler's {"error", "code"} JSON; predict() turns that back into a PredictionError.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from .artifact import MODEL_NAME

STUBS_DIR = Path(__file__).resolve().parent / "_grpc"
STAMP_NAME = "protos.sha256"
# inference.proto imports google/rpc/status.proto, which grpcio-tools does not bundle; the jar has it.
PROTO_FILES = ("inference.proto", "management.proto", "google/rpc/status.proto")
TIMEOUT_S = 30.0


class PredictionError(Exception):
    """The handler refused the image; code is its error code (not_an_image, no_digit, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class StubError(RuntimeError):
    """The stubs cannot be generated: no TorchServe, or a jar without the expected .proto files."""


def frontend_jar() -> Path:
    try:
        import ts
    except ImportError:
        raise StubError("TorchServe (ts) is not installed: its jar holds the .proto files") from None
    jar = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise StubError(f"no TorchServe frontend jar at {jar}")
    return jar


def read_protos(jar: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(jar) as archive:
        missing = [name for name in PROTO_FILES if name not in archive.namelist()]
        if missing:
            raise StubError(f"{jar} lacks {', '.join(missing)}")
        return {name: archive.read(name) for name in PROTO_FILES}


def protos_digest(protos: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(protos):
        digest.update(name.encode() + b"\0" + protos[name])
    return digest.hexdigest()


def compile_protos(protos: dict[str, bytes], out_dir: Path) -> None:
    from grpc_tools import protoc

    source_dir = out_dir / "_protos"
    for name, text in protos.items():
        (source_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (source_dir / name).write_bytes(text)
    bundled = Path(protoc.__file__).resolve().parent / "_proto"   # google/protobuf/*.proto
    status = protoc.main(["grpc_tools.protoc", f"-I{source_dir}", f"-I{bundled}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}", *protos])
    if status != 0:
        raise StubError(f"grpc_tools.protoc failed ({status}) on {', '.join(protos)}")
    shutil.rmtree(source_dir)


def stubs_current(stubs_dir: Path, digest: str) -> bool:
    stamp = stubs_dir / STAMP_NAME
    return stamp.is_file() and stamp.read_text().strip() == digest


def generate_stubs(stubs_dir: Path = STUBS_DIR) -> Path:
    """Generate the stubs unless stubs_dir already holds those of the installed jar. Built in
    a temporary folder and renamed into place, so a concurrent first use never sees half."""
    protos = read_protos(frontend_jar())
    digest = protos_digest(protos)
    if stubs_current(stubs_dir, digest):
        return stubs_dir
    stubs_dir.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="_grpc.", dir=stubs_dir.parent))
    try:
        compile_protos(protos, building)
        (building / STAMP_NAME).write_text(digest + "\n")
        if not stubs_current(stubs_dir, digest):   # else another process finished first
            shutil.rmtree(stubs_dir, ignore_errors=True)   # stubs of another TorchServe version
            os.rename(building, stubs_dir)
    except OSError:
        if not stubs_current(stubs_dir, digest):
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)   # gone after a rename
    return stubs_dir


@lru_cache(maxsize=1)
def load_stubs() -> SimpleNamespace:
    """The generated modules: inference_pb2(_grpc), management_pb2(_grpc) and empty_pb2."""
    stubs_dir = generate_stubs()
    # The generated code imports its siblings (and google.rpc) as top-level modules. Appended,
    # so an installed google.rpc (googleapis-common-protos), if any, keeps precedence.
    if str(stubs_dir) not in sys.path:
        sys.path.append(str(stubs_dir))
    from google.protobuf import empty_pb2

    names = ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")
    return SimpleNamespace(empty_pb2=empty_pb2, **{name: importlib.import_module(name) for name in names})


# --- A small client ------------------------------------------------------------------------
def auth_metadata(key: str | None) -> tuple:
    """gRPC metadata for TorchServe's token authorization (keys in the server's key_file.json)."""
    return (("authorization", f"Bearer {key}"),) if key else ()


class InferenceClient:
    """TorchServe's InferenceAPIsService on one channel, with the key sent on every call."""

    def __init__(self, channel, key: str | None = None):
        self.stubs = load_stubs()
        self.service = self.stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        self.metadata = auth_metadata(key)

    def ping(self, timeout_s: float = TIMEOUT_S) -> dict:
        """TorchServe's health, as /ping gives it: {"status": "Healthy"}."""
        health = self.service.Ping(self.stubs.empty_pb2.Empty(), metadata=self.metadata, timeout=timeout_s).health
        return json.loads(health)

    def predict_raw(self, image: bytes, model: str = MODEL_NAME, timeout_s: float = TIMEOUT_S) -> bytes:
        """The handler's answer to one image, as sent (JSON bytes)."""
        request = self.stubs.inference_pb2.PredictionsRequest(model_name=model, input={"data": image})
        return self.service.Predictions(request, metadata=self.metadata, timeout=timeout_s).prediction

    def predict(self, image: bytes, model: str = MODEL_NAME, timeout_s: float = TIMEOUT_S) -> dict:
        """The answer to one image; PredictionError when the handler refused it."""
        answer = json.loads(self.predict_raw(image, model, timeout_s))
        if isinstance(answer, dict) and "error" in answer:
            raise PredictionError(str(answer.get("code", "error")), str(answer["error"]))
        return answer


@contextmanager
def connect(target: str, key: str | None = None):
    """An InferenceClient for HOST:PORT (TorchServe's grpc_inference_port, 7070 by default)."""
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        yield InferenceClient(channel, key)
    finally:
        channel.close()


if __name__ == "__main__":
    print(f"gRPC stubs for {frontend_jar()}: {generate_stubs()}")
