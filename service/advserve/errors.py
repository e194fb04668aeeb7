"""Domain errors. Every transport maps them through `STATUS` alone, so HTTP and gRPC cannot drift."""

from __future__ import annotations


class AdvserveError(Exception):
    """Base of every error advserve raises on purpose. `code` is stable API; `field` names the input."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


class InvalidArgument(AdvserveError, ValueError):
    """The request is malformed: a shape, dtype, value, missing or unknown name. `field` says where."""

    code = "invalid_argument"


class NotFound(AdvserveError, LookupError):
    """An estimator, preset or loss mode that does not exist (or does not exist in that preset)."""

    code = "not_found"


class Unavailable(AdvserveError):
    """The server cannot take the request now (shutting down): retry later, perhaps elsewhere."""

    code = "unavailable"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float = 1.0):
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    """Admission capacity full (request bytes in flight): retry after `retry_after_s`."""

    code = "overloaded"


class Unauthenticated(AdvserveError):
    """No valid bearer token (when the server requires one)."""

    code = "unauthenticated"


class DeadlineExceeded(AdvserveError):
    """The caller's deadline passed before the result was ready."""

    code = "deadline_exceeded"


class PayloadTooLarge(AdvserveError):
    """The request body exceeds the configured limit."""

    code = "payload_too_large"


def error_message(error: AdvserveError) -> str:
    """The one-string form of an error (gRPC status details, the OIP body): the message, led by the
    field it names unless it already starts with it."""
    field, message = error.field, error.message
    if field and not (message.startswith(field) and message[len(field):][:1] in ("", " ", ":", ",")):
        return f"{field}: {message}"
    return message


# code -> (HTTP status, gRPC status code name). The one table both transports read, so they cannot
# drift; tests walk it over both.
STATUS: dict[str, tuple[int, str]] = {
    InvalidArgument.code: (400, "INVALID_ARGUMENT"),
    NotFound.code: (404, "NOT_FOUND"),
    Unauthenticated.code: (401, "UNAUTHENTICATED"),
    PayloadTooLarge.code: (413, "RESOURCE_EXHAUSTED"),
    Overloaded.code: (503, "UNAVAILABLE"),
    Unavailable.code: (503, "UNAVAILABLE"),
    DeadlineExceeded.code: (504, "DEADLINE_EXCEEDED"),
    AdvserveError.code: (500, "INTERNAL"),
}
