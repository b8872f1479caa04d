"""Errors that carry an HTTP status; every layer raises these, the protocols render them."""
from __future__ import annotations


class RtserveError(Exception):
    """Base error: ``status`` is the HTTP status the protocols answer with."""

    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, where one is (OpenAI errors name it)


class InvalidInput(RtserveError):
    status = 400


class Unauthorized(RtserveError):
    status = 401


class NotFound(RtserveError):
    status = 404


class PayloadTooLarge(RtserveError):
    status = 413


class TooManyRequests(RtserveError):
    """A language model's waiting queue is at its limit (admission control): try again after
    ``retry_after_s`` (sent as ``Retry-After``)."""

    status = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after_s)})


class Unavailable(RtserveError):
    """Model not ready, or the server is shutting down."""

    status = 503


class QueueFull(Unavailable):
    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after_s)})


class DeadlineExceeded(RtserveError):
    status = 504


class Cancelled(RtserveError):
    """The client went away before its request ran (nginx's 499)."""

    status = 499


class ConfigError(RtserveError):
    """A model.yaml or model file that cannot be used; names model, file and problem."""

    status = 400


class ModelLoadError(RtserveError):
    """A model failed to load for a reason other than its configuration (an exception from a
    runtime or a library: out of memory, an I/O error, a bug); names model, version and error."""

    status = 500


class BackendError(RtserveError):
    """The backend failed while running a batch (a real server-side fault)."""

    status = 500


class CompressError(ValueError):
    """Bad input to a compressor or converter (unknown method, missing file, mismatched calibration
    data...): raised before any output is written; the message names the offending item."""
