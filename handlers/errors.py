"""The handlers' typed errors and the one place that maps them to HTTP statuses.

A handler raises one of these for a single request; the shared base turns it into a per-request
status and a JSON body (``{"error": ..., "code": ..., "type": ...}``) without touching the other
requests of the batch.
"""

from __future__ import annotations

# An error message is at most this long, whatever part of the request it quotes.
MAX_MESSAGE_CHARS = 1000


def safe_message(text: str) -> str:
    """``text`` as printable ASCII of at most ``MAX_MESSAGE_CHARS`` characters.

    The message becomes the HTTP reason phrase as well as the JSON ``error``, and TorchServe 0.12
    frames the phrase with its length in characters but sends its UTF-8 bytes: one non-ASCII
    character corrupts the worker's reply and the frontend kills the worker ("Worker died.", every
    request of the batch lost). A reply over ``max_response_size`` kills it too, hence the bound.
    Whitespace becomes a space; any other character outside printable ASCII is escaped
    (``\\xe9``, ``\\u2603``).
    """
    out = []
    for ch in str(text):
        if " " <= ch <= "~":
            out.append(ch)
        elif ch.isspace():
            out.append(" ")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    message = "".join(out)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return message


class HandlerError(Exception):
    """Base of the errors a request can fail with; ``status`` is its HTTP code."""

    status = 500

    def __init__(self, message: str) -> None:
        message = safe_message(message)
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


class ResponseTooLarge(PayloadTooLarge):
    """The answer to this request would be over the server's ``max_response_size``: the request
    asked for more than one answer may carry (413: only the request can change it)."""


class UnsupportedMediaType(HandlerError):
    """The bytes are a file of a kind the handler does not accept (text, PDF, ...)."""

    status = 415


class InferenceError(HandlerError):
    """The model failed on input that passed validation: a bug or resource problem, not the client's."""

    status = 500


class NotExplainable(HandlerError):
    """An explanation was asked of a handler that offers none (its task does not implement ``explain``)."""

    status = 501


class TooManyRequests(HandlerError):
    """Over a share of work that refills with time (explanations: ``explain.max_share``): retry later."""

    status = 429


class DeadlineExceeded(HandlerError):
    """The work ran past its own time limit (explanations: ``explain.timeout_s``) and was stopped; the
    worker and the other requests of its batch are unharmed."""

    status = 503


class InjectedFault(HandlerError):
    """A failure injected on purpose (``faults`` in the handler config): rollout drills and tests only.

    503, like an overloaded or broken backend: the client did nothing wrong, and a canary that
    answers it must be rolled back.
    """

    status = 503


def error_payload(exc: BaseException) -> tuple[int, dict]:
    """Status and JSON body for any exception raised while serving one request."""
    if isinstance(exc, HandlerError):
        return exc.status, exc.to_payload()
    return InferenceError.status, {
        "error": safe_message(f"internal error: {type(exc).__name__}: {exc}"),
        "code": InferenceError.status,
        "type": InferenceError.__name__,
    }
