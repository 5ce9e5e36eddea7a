"""Every reply carries its request id (the client's X-Request-Id, else a fresh one), the access log line
too, and no log line carries the request's text."""

from __future__ import annotations

import logging

import pytest

from server.logs import JsonFormatter
from tests.server.api.conftest import Served


async def test_the_reply_and_the_access_log_carry_the_request_id(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    secret_text = "MY-PRIVATE-EMAIL-BODY-7731"
    with caplog.at_level(logging.INFO, logger="exitserve.access"):
        reply = await served.client.post(
            "/v1/classify", json={"inputs": secret_text}, headers={"X-Request-Id": "trace-42"}
        )
        bad = await served.client.post("/v1/classify", json={"inputs": secret_text, "speed": 9})
    assert reply.headers["x-request-id"] == "trace-42"
    generated = bad.headers["x-request-id"]
    assert len(generated) == 32
    access = [r for r in caplog.records if r.name == "exitserve.access"]
    assert [getattr(r, "status", None) for r in access] == [200, 422]
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert all(secret_text not in line for line in lines)
