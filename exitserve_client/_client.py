"""The client's request building, retry policy and reply parsing; one code path for sync and async."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

RETRYABLE_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Prediction:
    """The answer for one input."""

    label: str
    score: float
    exit_layer: int
    num_layers_run: int
    truncated: bool
    probs: dict[str, float] | None = None
    full_depth_agreement: float | None = None  # calibrated chance that this is the full-depth answer
    deadline_exit: bool = False  # answered at its deadline from the deepest ramp computed


@dataclass(frozen=True)
class Classification:
    """The answer for one request, in input order, with the server's timings."""

    model: str
    version: str
    speed: float
    criterion: str
    predictions: list[Prediction]
    degraded: bool = False
    requested_speed: float | None = None
    predicted_accuracy_drop: float | None = None
    queue_time_ms: float | None = None
    inference_time_ms: float | None = None
    total_time_ms: float | None = None
    num_attempts: int = 1


class ExitserveError(Exception):
    """A non-2xx reply (after retries): its status, the server's error type, message and field."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        field: str | None = None,
        retry_after_s: float | None = None,
        num_attempts: int = 1,
    ) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        self.num_attempts = num_attempts


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429 and 503: at most ``max_retries``, each after the server's ``Retry-After`` (else
    ``backoff_s`` doubling, with jitter), never waiting longer than ``max_retry_wait_s`` at once nor past
    the request's deadline."""

    max_retries: int = 3
    max_retry_wait_s: float = 10.0
    backoff_s: float = 0.1

    def wait_s(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return retry_after_s
        return self.backoff_s * (2**attempt) * (0.5 + random.random() / 2)


def _body(inputs: str | Sequence[str], options: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": inputs if isinstance(inputs, str) else list(inputs)}
    body.update({k: v for k, v in options.items() if v is not None and v is not False})
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


def _ms(headers: httpx.Headers, name: str) -> float | None:
    value = headers.get(name)
    return float(value) if value is not None else None


def _retry_after_s(reply: httpx.Response) -> float | None:
    value = reply.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error(reply: httpx.Response, num_attempts: int) -> ExitserveError:
    try:
        body = reply.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return ExitserveError(
            reply.status_code,
            str(error.get("type", "error")),
            str(error.get("message", reply.text)),
            error.get("field"),
            _retry_after_s(reply),
            num_attempts,
        )
    return ExitserveError(
        reply.status_code, "error", reply.text or reply.reason_phrase, None, None, num_attempts
    )


def _result(reply: httpx.Response, num_attempts: int) -> Classification:
    body = reply.json()
    predictions = [
        Prediction(
            label=row["label"],
            score=row["score"],
            exit_layer=row["exit_layer"],
            num_layers_run=row["num_layers_run"],
            truncated=row["truncated"],
            probs=row.get("probs"),
            full_depth_agreement=row.get("full_depth_agreement"),
            deadline_exit=bool(row.get("deadline_exit", False)),
        )
        for row in body["results"]
    ]
    return Classification(
        model=body["model"],
        version=body["version"],
        speed=body["speed"],
        criterion=body["criterion"],
        predictions=predictions,
        degraded=bool(body.get("degraded", False)),
        requested_speed=body.get("requested_speed"),
        predicted_accuracy_drop=body.get("predicted_accuracy_drop"),
        queue_time_ms=_ms(reply.headers, "x-queue-time-ms"),
        inference_time_ms=_ms(reply.headers, "x-inference-time-ms"),
        total_time_ms=_ms(reply.headers, "x-total-time-ms"),
        num_attempts=num_attempts,
    )


class _Attempts:
    """The retry loop's state for one request: what to send next and how long to wait before it."""

    def __init__(self, body: dict[str, Any], timeout_s: float, policy: RetryPolicy) -> None:
        self.body = body
        self.policy = policy
        self.timeout_s = timeout_s
        self.num_attempts = 0
        deadline_ms = body.get("deadline_ms")
        self.deadline_at = None if deadline_ms is None else time.monotonic() + deadline_ms / 1000.0

    def next_request(self) -> tuple[dict[str, Any], float]:
        """The body (its deadline what is left) and the HTTP timeout of the next attempt."""
        self.num_attempts += 1
        if self.deadline_at is None:
            return self.body, self.timeout_s
        left_s = self.deadline_at - time.monotonic()
        body = {**self.body, "deadline_ms": max(1, math.floor(left_s * 1000.0))}
        return body, max(0.001, min(self.timeout_s, left_s + 1.0))  # + 1 s: the server's 504 comes back

    def wait_before_retry(self, reply: httpx.Response) -> float | None:
        """Seconds to wait before retrying ``reply``, or None: give up and raise."""
        if reply.status_code not in RETRYABLE_STATUSES or self.num_attempts > self.policy.max_retries:
            return None
        wait_s = self.policy.wait_s(self.num_attempts - 1, _retry_after_s(reply))
        if wait_s > self.policy.max_retry_wait_s:
            return None
        if self.deadline_at is not None and time.monotonic() + wait_s >= self.deadline_at:
            return None
        return wait_s


class Client:
    """Synchronous client; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), transport=transport)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()

    def classify(self, inputs: str | Sequence[str], **options: Any) -> Classification:
        """``POST /v1/classify``; ``options`` are the v1 fields (``speed``, ``criterion``, ``max_layers``,
        ``max_accuracy_drop``, ``deadline_ms``, ``on_deadline``, ``overload_max_accuracy_drop``,
        ``return_probs``, ...). Raises :class:`ExitserveError` for a non-2xx reply after retries."""
        attempts = _Attempts(_body(inputs, options), self.timeout_s, self.retry)
        while True:
            body, timeout_s = attempts.next_request()
            reply = self._http.post("/v1/classify", json=body, timeout=timeout_s)
            if reply.is_success:
                return _result(reply, attempts.num_attempts)
            wait_s = attempts.wait_before_retry(reply)
            if wait_s is None:
                raise _error(reply, attempts.num_attempts)
            time.sleep(wait_s)

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the served model's description."""
        reply = self._http.get("/v1/models", timeout=self.timeout_s)
        if not reply.is_success:
            raise _error(reply, 1)
        return list(reply.json()["models"])

    def ready(self) -> bool:
        """``GET /readyz`` answered 200."""
        return self._http.get("/readyz", timeout=self.timeout_s).status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """Asynchronous client; use as an async context manager or await :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), transport=transport)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()

    async def classify(self, inputs: str | Sequence[str], **options: Any) -> Classification:
        """As :meth:`Client.classify`."""
        attempts = _Attempts(_body(inputs, options), self.timeout_s, self.retry)
        while True:
            body, timeout_s = attempts.next_request()
            reply = await self._http.post("/v1/classify", json=body, timeout=timeout_s)
            if reply.is_success:
                return _result(reply, attempts.num_attempts)
            wait_s = attempts.wait_before_retry(reply)
            if wait_s is None:
                raise _error(reply, attempts.num_attempts)
            await asyncio.sleep(wait_s)

    async def models(self) -> list[dict[str, Any]]:
        reply = await self._http.get("/v1/models", timeout=self.timeout_s)
        if not reply.is_success:
            raise _error(reply, 1)
        return list(reply.json()["models"])

    async def ready(self) -> bool:
        return (await self._http.get("/readyz", timeout=self.timeout_s)).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
