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
    """The server cannot take the request now (admission queue full, shutting down): retry later."""

    code = "unavailable"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float = 1.0):
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class PayloadTooLarge(AdvserveError):
    """The request body exceeds the configured limit."""

    code = "payload_too_large"


# code -> HTTP status. One table for every transport (the gRPC column joins it with the gRPC API).
STATUS: dict[str, int] = {
    InvalidArgument.code: 400,
    NotFound.code: 404,
    PayloadTooLarge.code: 413,
    Unavailable.code: 503,
    AdvserveError.code: 500,
}
