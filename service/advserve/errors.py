"""Domain errors. Every transport maps them through `STATUS` alone, so HTTP and gRPC cannot drift."""

from __future__ import annotations


MAX_MESSAGE_CHARS = 1000  # an error message longer than this is cut (it may echo a request's content)


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` itself when at most `limit` characters; else its first `limit` characters, an ellipsis and
    the original length, so an error never echoes an unbounded part of a request back."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters, truncated)"


class AdvserveError(Exception):
    """Base of every error advserve raises on purpose. `code` is stable API; `field` names the input.
    The message and the field are truncated to MAX_MESSAGE_CHARS here, the one place every transport's
    error passes, since either may quote request content (a shape, a name, a value)."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None):
        message = truncate(str(message))
        super().__init__(message)
        self.message = message
        self.field = truncate(field, 200) if isinstance(field, str) else field

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
    """The request body exceeds the configured limit (or the memory to decode or compute it)."""

    code = "payload_too_large"


class RequestTimeout(AdvserveError):
    """The request's body did not arrive in time: nothing for --body-idle-timeout-s between two chunks,
    or not complete within --request-timeout-s of the request's arrival."""

    code = "request_timeout"


class MethodNotAllowed(AdvserveError):
    """The path exists but not with this HTTP method."""

    code = "method_not_allowed"


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
    RequestTimeout.code: (408, "DEADLINE_EXCEEDED"),
    MethodNotAllowed.code: (405, "UNIMPLEMENTED"),
    AdvserveError.code: (500, "INTERNAL"),
}
