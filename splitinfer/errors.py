"""Errors a user can cause, and the one vocabulary of error codes.

- ``UserError``: a mistake in what the user asked for; the CLI prints it as one line on
  stderr and exits with code 2.
- ``ErrorCode``: why the cloud refused or failed a request; the value is what goes on the
  wire (``error.code`` of an error message) and each code has one HTTP status.
- ``EdgeReason``: why an edge answer did not come from the cloud, or why a request failed
  on the edge side (the record's ``reason``, or its ``error.code`` when nothing answered).

A record's ``error.code`` is always one of these two enums' values, so one table in the
README explains every code a user can see.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["UserError", "ErrorCode", "EdgeReason", "HTTP_STATUS", "WORKER_FAILURES"]


class UserError(Exception):
    """A mistake in what the user asked for (bad model name, bad file, bad number)."""


class ErrorCode(str, Enum):
    """Why the cloud refused or failed a request. The value is what goes on the wire."""

    BAD_MESSAGE = "bad_message"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_MISMATCH = "model_mismatch"
    UNKNOWN_CUT = "unknown_cut"
    BAD_TENSOR = "bad_tensor"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAUTHORIZED = "unauthorized"
    INTERNAL = "internal"
    SESSION_LOST = "session_lost"  # an LM session is unknown, expired, evicted, another caller's, or out of step

    def __str__(self) -> str:
        return self.value

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self]

    @property
    def worker_failure(self) -> bool:
        """The worker, not the request, is at fault: try another worker, count it against
        this one's circuit breaker."""
        return self.value in WORKER_FAILURES


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.TOO_LARGE: 413,
    # 400, not 426: 426 Upgrade Required is about switching HTTP protocols and needs an
    # Upgrade header; the message text says which versions this peer speaks.
    ErrorCode.UNSUPPORTED_VERSION: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.MODEL_MISMATCH: 409,  # the model id is known but its weights hash differs
    ErrorCode.UNKNOWN_CUT: 404,
    ErrorCode.BAD_TENSOR: 422,  # well-formed message, tensors unusable (shape, dtype, payload)
    ErrorCode.OVERLOADED: 503,  # retry later or elsewhere
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.INTERNAL: 500,
    ErrorCode.SESSION_LOST: 410,  # the edge opens a new session and re-sends its token history
}

# Codes that say the worker is at fault, not the request (retry elsewhere; breaker counts it).
# Held as the wire strings: an Enum member hashes by its name, so `"internal" in {ErrorCode.INTERNAL}`
# would be False.
WORKER_FAILURES: frozenset[str] = frozenset({ErrorCode.OVERLOADED.value, ErrorCode.INTERNAL.value})


class EdgeReason(str, Enum):
    """Why the edge answered itself, or what went wrong before any worker answered."""

    CLOUD_UNAVAILABLE = "cloud_unavailable"  # no worker reachable (breakers open, none found)
    PREDICTED_OVER_DEADLINE = "predicted_over_deadline"  # the cut's predicted latency misses the deadline
    DEADLINE = "deadline"  # the deadline passed before the cloud answered
    CONFIDENT = "confident"  # --confidence-exit: the fallback was sure enough
    PROGRESSIVE = "progressive"  # --progressive: the fallback's early answer stood
    UNAVAILABLE = "unavailable"  # the connection failed or was lost mid-request
    TIMEOUT = "timeout"  # the worker did not answer in time (no deadline set)

    def __str__(self) -> str:
        return self.value
