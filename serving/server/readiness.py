"""Is the model really answering? A probe image through the inference API, the workers'
states through the management API, and a wait that retries either until it holds.

`python -m serving.server start` waits with wait_until_answering; `python -m serving.server ready`
is check_ready, for a Kubernetes exec probe or a load balancer.
"""
from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from serving.handler.artifact import MODEL_NAME
from serving.server.properties import address, read_properties, token_auth_enabled

T = TypeVar("T")


class NotReady(Exception):
    """The server cannot answer yet; the message says why, in one line."""


def probe_image() -> bytes:
    """A drawn '1' as PNG: enough to prove the model loads, preprocesses and predicts."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).line([(14, 5), (14, 23)], fill=255, width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_keys(key_file: Path, attempts: int = 5) -> dict | None:
    """TorchServe's key_file.json, or None while there is none. TorchServe rewrites the file in
    place (not atomically) each time it renews a key: a read that lands mid-write is retried."""
    for _ in range(attempts):
        try:
            keys = json.loads(key_file.read_text())
            return keys if isinstance(keys, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
    return None


def api_key(key_file: Path, api: str) -> str | None:
    """The bearer key of an API ("inference", "management", or "API", the one that renews the
    others) from TorchServe's key_file.json, read afresh: keys that expire are renewed."""
    try:
        return read_keys(key_file)[api]["key"]
    except (KeyError, TypeError):
        return None


def inference_key(key_file: Path) -> str | None:
    return api_key(key_file, "inference")


def open_authorized(request: urllib.request.Request, key_file: Path | None, api: str, timeout_s: float):
    """urlopen with the API's current key from key_file (none without token authorization).
    A key renewed between our read and the server's check is refused (TorchServe 0.12 answers
    400): read the file again and retry once with the new key."""
    if key_file is None:
        return urllib.request.urlopen(request, timeout=timeout_s)
    key = api_key(key_file, api)
    if key is None:
        raise NotReady(f"no {api} key in {key_file}")
    request.add_header("Authorization", f"Bearer {key}")
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        renewed = api_key(key_file, api)
        if error.code != 400 or renewed in (None, key):
            raise
    request.add_header("Authorization", f"Bearer {renewed}")
    return urllib.request.urlopen(request, timeout=timeout_s)


def key_file_of(properties: dict, cwd: str | os.PathLike | None) -> Path | None:
    """Where a server started in cwd keeps its keys, when token authorization is on."""
    return Path(cwd or ".").resolve() / "key_file.json" if token_auth_enabled(properties) else None


def reason(error: Exception) -> str:
    """One line for a failed HTTP call: "Connection refused", not "<urlopen error [Errno 111] ...>"."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    cause = getattr(error, "reason", error)
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__


def probe_once(inference_address: str, model: str = MODEL_NAME, key_file: Path | None = None,
               timeout_s: float = 10.0) -> dict:
    """POST the probe image once: the model's answer, or NotReady saying why not."""
    # An explicit content type: urllib would otherwise send form-urlencoded, which TorchServe parses as a form.
    headers = {"Content-Type": "application/octet-stream"}
    url = f"{inference_address}/predictions/{model}"
    request = urllib.request.Request(url, data=probe_image(), method="POST", headers=headers)
    try:
        with open_authorized(request, key_file, "inference", timeout_s) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as error:
        raise NotReady(f"{url}: {reason(error)}") from None
    if not isinstance(answer, dict) or "digit" not in answer:
        raise NotReady(f"{url}: unexpected answer {str(answer)[:200]}")
    return answer


def retry(check: Callable[[], T], timeout_s: float, interval_s: float = 0.5,
          give_up: Callable[[], None] = lambda: None) -> T:
    """check() until it returns instead of raising NotReady; NotReady with the last reason once
    timeout_s has passed. give_up() runs between tries: it raises to end the wait early (the server died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except NotReady as error:
            last = str(error)
        give_up()
        if time.monotonic() >= deadline:
            raise NotReady(last)
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def wait_until_answering(inference_address: str, timeout_s: float = 180.0, model: str = MODEL_NAME,
                         key_file: Path | None = None) -> dict:
    """POST a real image until the model returns a prediction (/ping alone says too little:
    it is Healthy before any worker has loaded the model). With key_file, authorize with its key."""
    try:
        return retry(lambda: probe_once(inference_address, model, key_file), timeout_s)
    except NotReady as error:
        raise TimeoutError(f"model {model} did not answer within {timeout_s:.0f} s: {error}") from None


def model_workers(management_address: str, model: str = MODEL_NAME, key_file: Path | None = None,
                  timeout_s: float = 5.0) -> list[dict]:
    """The model's workers as the management API lists them, or NotReady saying why not."""
    url = f"{management_address}/models/{model}"
    try:
        with open_authorized(urllib.request.Request(url), key_file, "management", timeout_s) as response:
            return json.loads(response.read())[0].get("workers", [])
    except urllib.error.HTTPError as error:
        raise NotReady(f"no model {model} at {management_address}" if error.code == 404
                       else f"{url}: {reason(error)}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, IndexError, AttributeError) as error:
        raise NotReady(f"{url}: {reason(error)}") from None


def check_ready(config: str | os.PathLike, cwd: str | os.PathLike = ".", timeout_s: float = 5.0) -> str:
    """One line saying why the server is ready: every worker of the model READY and one probe
    image answered. Otherwise NotReady with the reason. cwd: the server's working directory,
    where token authorization has its key_file.json."""
    properties = read_properties(config)
    key_file = key_file_of(properties, cwd)
    workers = model_workers(address(properties, "management_address"), MODEL_NAME, key_file, timeout_s)
    statuses = [worker.get("status", "?") for worker in workers]
    # A worker being replaced (killed, crashed, timed out) is not READY: report the pod
    # degraded until TorchServe has it back, rather than let the one left take all traffic.
    if not workers or statuses.count("READY") < len(workers):
        raise NotReady(f"workers not ready: {statuses.count('READY')} of {len(workers)} READY ({', '.join(statuses)})")
    started = time.monotonic()
    try:
        answer = probe_once(address(properties, "inference_address"), MODEL_NAME, key_file, timeout_s)
    except NotReady as error:
        raise NotReady(f"probe failed: {error}") from None
    return (f"ready: {MODEL_NAME} {len(workers)}/{len(workers)} workers READY, probe image answered "
            f"digit {answer['digit']} in {(time.monotonic() - started) * 1000:.0f} ms")
