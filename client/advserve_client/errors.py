"""Typed errors of the advserve client, raised identically over HTTP and gRPC.

Every error is an `AdvserveError` whose `code` is the server's error code (the `"code"` of a REST
error body, the trailing metadata `advserve-error-code` of a gRPC status); the subclass is chosen by
that code, or, where the server sent none (a proxy, a connection failure, a client-side limit), by
the HTTP status or the gRPC status code:

| class | code | HTTP | gRPC |
|---|---|---|---|
| `InvalidArgument` | invalid_argument | 400 | INVALID_ARGUMENT |
| `NotFound` | not_found | 404 | NOT_FOUND |
| `PayloadTooLarge` | payload_too_large | 413 | RESOURCE_EXHAUSTED |
| `Unavailable` | unavailable (and connection failures) | 503 | UNAVAILABLE |
| `Overloaded` (an `Unavailable`) | overloaded | 503 + Retry-After | UNAVAILABLE + retry-after |
| `DeadlineExceeded` (alias `Timeout`) | deadline_exceeded (and client-side timeouts) | 504 | DEADLINE_EXCEEDED |
| `Unauthenticated` | unauthenticated | 401 | UNAUTHENTICATED |
| `InternalError` | internal (and any other 5xx) | 500 | INTERNAL |

Only `Unavailable` (so `Overloaded` too) is retried by the clients.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

__all__ = [
    "AdvserveError", "InvalidArgument", "NotFound", "PayloadTooLarge", "Unavailable", "Overloaded",
    "DeadlineExceeded", "Timeout", "Unauthenticated", "InternalError", "error_from",
    "parse_retry_after",
]


class AdvserveError(Exception):
    """Base of every error the client raises.

    code: the server's error code ("invalid_argument", ...), stable API. message: for humans (over
    gRPC the status details, which start with the field when there is one). field: the part of the
    request at fault ("tensors.rewards", "params.lam", "body") or None. status: the HTTP status
    (None over gRPC or before any response). grpc_code: the gRPC status code name (None over HTTP).
    retry_after: the server's Retry-After in seconds, or None.
    """

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None,
                 status: int | None = None, grpc_code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field
        self.status = status
        self.grpc_code = grpc_code
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" [{self.field}]" if self.field and not self.message.startswith(self.field) else ""
        return f"{self.code}{where}: {self.message}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, field={self.field!r}, "
                f"status={self.status!r}, grpc_code={self.grpc_code!r}, retry_after={self.retry_after!r})")


class InvalidArgument(AdvserveError, ValueError):
    """The request is malformed (a shape, dtype, value, a missing or unknown name); `field` says where."""

    code = "invalid_argument"


class NotFound(AdvserveError, LookupError):
    """An unknown estimator or preset, or an estimator the preset does not have."""

    code = "not_found"


class PayloadTooLarge(AdvserveError):
    """The request exceeds a size limit (body bytes, tokens, gRPC message size, admission capacity)."""

    code = "payload_too_large"


class Unavailable(AdvserveError):
    """The server cannot take the request now (shutting down, unreachable, connection refused). Retried."""

    code = "unavailable"


class Overloaded(Unavailable):
    """The server's admission capacity is full; retry after `retry_after` seconds. Retried."""

    code = "overloaded"


class DeadlineExceeded(AdvserveError, TimeoutError):
    """The deadline passed: the server's deadline_exceeded, or the client's own timeout. Not retried."""

    code = "deadline_exceeded"


Timeout = DeadlineExceeded


class Unauthenticated(AdvserveError):
    """Missing or wrong credentials (pass them in `headers=`, e.g. {"authorization": "Bearer ..."})."""

    code = "unauthenticated"


class InternalError(AdvserveError):
    """A server-side bug (code internal) or any other server failure (5xx)."""

    code = "internal"


_BY_CODE: dict[str, type[AdvserveError]] = {cls.code: cls for cls in (
    InvalidArgument, NotFound, PayloadTooLarge, Unavailable, Overloaded, DeadlineExceeded, Unauthenticated,
    InternalError)}
_HTTP_CODES = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found", 413: "payload_too_large",
               422: "invalid_argument", 429: "overloaded", 502: "unavailable", 503: "unavailable",
               504: "deadline_exceeded"}
_GRPC_CODES = {"INVALID_ARGUMENT": "invalid_argument", "OUT_OF_RANGE": "invalid_argument", "NOT_FOUND": "not_found",
               "RESOURCE_EXHAUSTED": "payload_too_large", "UNAVAILABLE": "unavailable",
               "DEADLINE_EXCEEDED": "deadline_exceeded", "UNAUTHENTICATED": "unauthenticated",
               "INTERNAL": "internal", "UNKNOWN": "internal", "DATA_LOSS": "internal", "UNIMPLEMENTED": "internal"}


def error_from(code: str | None, message: str, *, field: str | None = None, status: int | None = None,
               grpc_code: str | None = None, retry_after: float | None = None) -> AdvserveError:
    """The typed error for a server code, or, without one, for the HTTP status or gRPC status code."""
    if not code:
        if status is not None:
            code = _HTTP_CODES.get(status) or ("internal" if status >= 500 else f"http_{status}")
        elif grpc_code is not None:
            code = _GRPC_CODES.get(grpc_code) or grpc_code.lower()
        else:
            code = "internal"
    cls = _BY_CODE.get(code)
    if cls is None:
        server_side = (status is not None and status >= 500) or grpc_code in ("INTERNAL", "UNKNOWN")
        cls = InternalError if server_side else AdvserveError
    return cls(message, code=code, field=field, status=status, grpc_code=grpc_code, retry_after=retry_after)


def parse_retry_after(value: Any) -> float | None:
    """Seconds from a Retry-After value: a number of seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0 if seconds == seconds else None
    return seconds


def region_error(error: AdvserveError, what: str) -> AdvserveError:
    """The server's refusal of a shared-memory registration, saying what was tried and why it may fail."""
    error.message = (f"shared memory: {what} failed: {error.message} (shared_memory=True needs the server on "
                     "this host, able to open this client's /dev/shm)")
    error.args = (error.message,)
    return error
