"""``--log-format json`` on a real server: every line is JSON, the access line of a request carries the
X-Request-Id it was sent with, and no line carries the request's text or the API key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from model_store.store import ModelStore
from tests.e2e.conftest import start_server

SECRET_TEXT = "PRIVATE-MESSAGE-BODY-90210"
API_KEY = "k-8f3a1c9e7b2d4056"


def test_json_log_lines_carry_the_request_id_and_never_the_text(
    tiny_store: ModelStore, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    server = start_server(tiny_store.root, log, "--log-format", "json", "--api-key", API_KEY, frontends=2)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "trace-77"}
        reply = httpx.post(f"{server.base_url}/v1/classify", json={"inputs": SECRET_TEXT}, headers=headers)
        assert reply.status_code == 200 and reply.headers["x-request-id"] == "trace-77"
        denied = httpx.post(f"{server.base_url}/v1/classify", json={"inputs": SECRET_TEXT})
        assert denied.status_code == 401 and len(denied.headers.get("x-request-id", "")) == 32
        time.sleep(0.5)  # the access line is written after the reply
    finally:
        assert server.terminate() == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    access = [
        line
        for line in lines
        if line["logger"] == "exitserve.access" and line.get("request_id") == "trace-77"
    ]
    assert len(access) == 1
    assert (access[0]["route"], access[0]["status"], access[0]["method"]) == ("/v1/classify", 200, "POST")
    assert access[0]["process"].startswith("front end")
    assert any(line["logger"].startswith("server") for line in lines)  # start-up lines are JSON too
    text = log.read_text()
    assert SECRET_TEXT not in text and API_KEY not in text
