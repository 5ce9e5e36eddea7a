"""server/logs.py: request ids, JSON log lines, and no request text in any log line."""

from __future__ import annotations

import json
import logging

import pytest

from server.logs import JsonFormatter, request_id_from, request_id_var

pytestmark = pytest.mark.unit


def test_request_ids_are_the_clients_when_sane_else_fresh() -> None:
    assert request_id_from("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, "", "has space", 'quote"', "x" * 129, "new\nline"):
        fresh = request_id_from(bad)
        assert fresh != bad and len(fresh) == 32


def test_json_lines_carry_the_request_id_and_extras() -> None:
    formatter = JsonFormatter("front end 1")
    record = logging.LogRecord("exitserve.access", logging.INFO, __file__, 1, "POST %s %d", ("/r", 200), None)
    record.route, record.status = "/r", 200
    token = request_id_var.set("req-1")
    try:
        line = json.loads(formatter.format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "req-1" and line["message"] == "POST /r 200"
    assert (line["route"], line["status"], line["process"], line["level"]) == (
        "/r",
        200,
        "front end 1",
        "info",
    )
    assert "request_id" not in json.loads(formatter.format(record))
