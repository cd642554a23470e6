"""The sample images the README and docs send exist after `make samples`, and answer as they say."""
from __future__ import annotations

import json
import re

from http_client import request
from repo import REPO_ROOT
from servers import predictions_url
from training.samples import write_samples

OCTET = {"Content-Type": "application/octet-stream"}


def named_samples() -> set[str]:
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    return {name for page in pages for name in re.findall(r"samples/([\w.-]+\.png)", page.read_text())}


def test_every_sample_the_docs_send_is_written(tmp_path, data_dir):
    written = {path.name for path in write_samples(data_dir, tmp_path)}
    assert "letter_k.png" in named_samples()
    assert named_samples() <= written, named_samples() - written


def test_the_letter_sample_is_answered_not_a_digit(tmp_path, data_dir, running_server):
    inference, _, _ = running_server
    letter = next(path for path in write_samples(data_dir, tmp_path) if path.name == "letter_k.png")
    status, body = request(predictions_url(inference), letter.read_bytes(), headers=OCTET)
    assert status == 200 and json.loads(body)["is_digit"] is False, body
