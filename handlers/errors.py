"""The handlers' typed errors and the one place that maps them to HTTP statuses.

A handler raises one of these for a single request; the shared base turns it into a per-request
status and a JSON body (``{"error": ..., "code": ..., "type": ...}``) without touching the other
requests of the batch.
"""

from __future__ import annotations


class HandlerError(Exception):
    """Base of the errors a request can fail with; ``status`` is its HTTP code."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_payload(self) -> dict:
        return {"error": self.message, "code": self.status, "type": type(self).__name__}


class InvalidInput(HandlerError):
    """The request cannot be understood: no image, undecodable bytes, malformed JSON, bad parameter."""

    status = 400


class PayloadTooLarge(HandlerError):
    """The image is over the configured byte or pixel limit (decompression bombs included)."""

    status = 413


class UnsupportedMediaType(HandlerError):
    """The bytes are a file of a kind the handler does not accept (text, PDF, ...)."""

    status = 415


class InferenceError(HandlerError):
    """The model failed on input that passed validation: a bug or resource problem, not the client's."""

    status = 500


def error_payload(exc: BaseException) -> tuple[int, dict]:
    """Status and JSON body for any exception raised while serving one request."""
    if isinstance(exc, HandlerError):
        return exc.status, exc.to_payload()
    return InferenceError.status, {
        "error": f"internal error: {type(exc).__name__}: {exc}",
        "code": InferenceError.status,
        "type": InferenceError.__name__,
    }
