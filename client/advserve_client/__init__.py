"""advserve's client side: `Client` / `AsyncClient` over HTTP or gRPC, their typed errors, and the wire
format (binary tensor framing) shared with the server.

The server imports `advserve_client.framing`, so both ends of the wire use one codec. This package
needs numpy, httpx, grpcio and protobuf only: it never imports torch unless a torch tensor is passed in.
"""

from typing import TYPE_CHECKING, Any

from .errors import (AdvserveError, DeadlineExceeded, InternalError, InvalidArgument, NotFound, Overloaded,
                     PayloadTooLarge, Timeout, Unauthenticated, Unavailable)
from .framing import CONTENT_TYPE, HEADER_LENGTH, FramingError, RawTensor, decode, encode

if TYPE_CHECKING:
    from .client import AdvantageResult, AsyncClient, Client, LossResult, RetryPolicy

_LAZY = ("Client", "AsyncClient", "AdvantageResult", "LossResult", "RetryPolicy")


def __getattr__(name: str) -> Any:
    """The clients are imported on first use, so that `advserve_client.framing` (which the server
    imports) does not load httpx and grpc."""
    if name in _LAZY:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "CONTENT_TYPE", "HEADER_LENGTH", "FramingError", "RawTensor", "decode", "encode",
    "Client", "AsyncClient", "AdvantageResult", "LossResult", "RetryPolicy",
    "AdvserveError", "InvalidArgument", "NotFound", "PayloadTooLarge", "Unavailable", "Overloaded",
    "DeadlineExceeded", "Timeout", "Unauthenticated", "InternalError",
]
