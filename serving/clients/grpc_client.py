"""TorchServe's gRPC inference API from Python, with stubs made from the installed TorchServe.

    python -m serving.clients.grpc_client          # (re)generate the stubs now; prints where they are

Nothing is vendored: the .proto files are read from TorchServe's own frontend jar
(ts/frontend/model-server.jar), so the stubs always match the server that is installed. They
are generated with grpcio-tools on first use into the package serving.clients._grpc (git-ignored; the
generated imports are rewritten to relative ones, so nothing goes on sys.path) and again
whenever the jar's .proto files change (a TorchServe upgrade); no make step is needed.

    from serving.clients.grpc_client import KeySource, connect
    with connect("127.0.0.1:7070") as client:          # keys=KeySource(key_file=...) with token authorization
        client.ping()                                   # {"status": "Healthy"}
        client.predict(Path("digit.png").read_bytes())  # {"digit": 7, ...}, or PredictionError

The channel is plaintext: a key sent to a host that is not loopback crosses the network in clear
text, and connect() warns (ClearTextKeyWarning); put TLS in front of such a server.

TorchServe 0.12's Predictions RPC drops the status a handler sets per request (its GRPCJob
answers every handler reply with OK), so a refused image arrives as status OK with the
handler's {"error", "code"} JSON; predict() turns that back into a PredictionError.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from serving.handler.artifact import MODEL_NAME
from serving.server.readiness import inference_key

STUBS_DIR = Path(__file__).resolve().parent / "_grpc"
STAMP_NAME = "protos.sha256"
# inference.proto imports google/rpc/status.proto, which grpcio-tools does not bundle; the jar has it.
# open_inference_grpc.proto: the Open Inference Protocol's messages, for serving.clients.v2_grpc.
PROTO_FILES = ("inference.proto", "management.proto", "google/rpc/status.proto", "open_inference_grpc.proto")
# Bumped whenever the generated layout changes, so stubs of an older layout are made again.
STUBS_LAYOUT = "package-3"
TIMEOUT_S = 30.0
KEY_ENV = "DIGITSERVE_INFERENCE_KEY"


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
    digest = hashlib.sha256(STUBS_LAYOUT.encode() + b"\0")
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
    make_package(out_dir)


# protoc writes imports as if its output folder were on sys.path: `import inference_pb2` and
# `from google.rpc import status_pb2`. Relative imports make the folder a plain package.
SIBLING_IMPORT = re.compile(r"^import (\w+_pb2) as ", re.MULTILINE)
GOOGLE_RPC_IMPORT = re.compile(r"^from google\.rpc import ", re.MULTILINE)


def make_package(out_dir: Path) -> None:
    for module in out_dir.glob("*_pb2*.py"):
        text = SIBLING_IMPORT.sub(r"from . import \1 as ", module.read_text())
        module.write_text(GOOGLE_RPC_IMPORT.sub("from .google.rpc import ", text))
    for folder in (out_dir, out_dir / "google", out_dir / "google" / "rpc"):
        (folder / "__init__.py").touch()


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
    """The generated modules: inference_pb2(_grpc), management_pb2(_grpc), open_inference_grpc_pb2
    and empty_pb2."""
    generate_stubs()
    from google.protobuf import empty_pb2

    from ._grpc import (inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc,
                        open_inference_grpc_pb2)

    return SimpleNamespace(empty_pb2=empty_pb2, inference_pb2=inference_pb2, inference_pb2_grpc=inference_pb2_grpc,
                           management_pb2=management_pb2, management_pb2_grpc=management_pb2_grpc,
                           open_inference_grpc_pb2=open_inference_grpc_pb2)


# --- The key, and where it may travel ---------------------------------------------------------
class KeyFileError(Exception):
    """The key file given holds no inference key (missing, unreadable, not TorchServe's)."""


class ClearTextKeyWarning(UserWarning):
    """A key is about to cross the network unencrypted (the channel is plaintext gRPC)."""


@dataclass(frozen=True)
class KeySource:
    """Where the inference key comes from; never the command line, which every user of the
    machine can read (ps, /proc/PID/cmdline)."""
    key: str | None = None           # held in memory: from the environment, or a caller's own
    key_file: Path | None = None     # TorchServe's key_file.json, read at every call (keys are renewed)

    @classmethod
    def from_options(cls, key_file: str | os.PathLike | None, environ=os.environ) -> KeySource:
        """A key file when given, else $DIGITSERVE_INFERENCE_KEY, else no key."""
        if key_file is not None:
            return cls(key_file=Path(key_file))
        return cls(key=environ.get(KEY_ENV) or None)

    @property
    def present(self) -> bool:
        return self.key is not None or self.key_file is not None

    def current(self) -> str | None:
        if self.key_file is None:
            return self.key
        key = inference_key(self.key_file)
        if key is None:
            why = "no such file" if not self.key_file.is_file() else "no inference key in it"
            raise KeyFileError(f"key file {self.key_file}: {why} (TorchServe writes key_file.json in the "
                               f"directory it was started from)")
        return key


def is_loopback(target: str) -> bool:
    """Whether HOST:PORT (or a unix: socket) stays on this machine. Names other than localhost
    count as remote: resolving them here would not prove where the channel goes."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.rpartition(":")[0].strip("[]") or target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_metadata(key: str | None) -> tuple:
    """gRPC metadata for TorchServe's token authorization (keys in the server's key_file.json)."""
    return (("authorization", f"Bearer {key}"),) if key else ()


class InferenceClient:
    """TorchServe's InferenceAPIsService on one channel, with the current key sent on every call."""

    def __init__(self, channel, keys: KeySource = KeySource()):
        self.stubs = load_stubs()
        self.service = self.stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        self.keys = keys

    @property
    def metadata(self) -> tuple:
        return auth_metadata(self.keys.current())

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
def connect(target: str, key: str | None = None, keys: KeySource | None = None, client=InferenceClient):
    """An InferenceClient for HOST:PORT (TorchServe's grpc_inference_port, 7070 by default), or
    another client class on the same channel (serving.clients.v2_grpc.V2Client).
    key: a key in memory; keys: where to read it (KeySource); KeyFileError before any call
    when the key file holds no key; ClearTextKeyWarning when a key would leave this machine."""
    import grpc

    keys = keys if keys is not None else KeySource(key=key)
    keys.current()   # a missing key file fails here, once, not on every call
    if keys.present and not is_loopback(target):
        warnings.warn(f"the inference key goes to {target} in clear text (plaintext gRPC, not loopback): "
                      f"anyone on the path can read and reuse it; reach the server through TLS",
                      ClearTextKeyWarning, stacklevel=3)
    channel = grpc.insecure_channel(target)
    try:
        yield client(channel, keys)
    finally:
        channel.close()


if __name__ == "__main__":
    print(f"gRPC stubs for {frontend_jar()}: {generate_stubs()}")
