"""One exception hierarchy for the engine; server/api/errors.py maps each kind to one HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``public_message`` is safe to show to a client."""

    def __init__(self, public_message: str) -> None:
        super().__init__(public_message)
        self.public_message = public_message


class InvalidRequestError(EngineError):
    """The request is well-formed JSON but asks for something impossible (422)."""

    def __init__(self, public_message: str, field: str | None = None) -> None:
        super().__init__(public_message)
        self.field = field


class PayloadTooLargeError(EngineError):
    """Too many inputs, too many tokens, or (in strict mode) an input longer than the model takes (413)."""


class QueueFullError(EngineError):
    """Admission refused: the engine would not answer in time, or the queue is full (429, Retry-After).

    ``reason``: ``deadline`` (predicted answer after the request's deadline), ``queue_wait`` (predicted
    queue wait over the server's bound) or ``queue_full`` (the row count cap).
    """

    def __init__(self, public_message: str, retry_after_s: float, reason: str = "queue_full") -> None:
        super().__init__(public_message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class DeadlineExceededError(EngineError):
    """The request's deadline passed before it was answered (504); its rows were dropped."""


class NotReadyError(EngineError):
    """No model loaded yet, the engine is restarting, or the server is draining (503)."""


class ModelNotFoundError(EngineError):
    """No served model of that name (404)."""


class BatchFailedError(EngineError):
    """Computing the batch this request was in raised; details are in the log (500)."""


class RequestCancelledError(EngineError):
    """The client went away; the request's rows were dropped before compute (499 in logs only)."""
