"""What the integrations compute with: a remote advserve through the thin client, or the in-process engine."""

from __future__ import annotations

import functools
import os
from typing import Any

ADDRESS_ENV = "ADVSERVE_ADDRESS"


@functools.lru_cache(maxsize=None)
def _client(address: str) -> Any:
    from advserve_client import Client

    if address.startswith("grpc://"):
        return Client(address[len("grpc://"):], transport="grpc")
    return Client(address)


def backend(address: str | None = None) -> Any:
    """A `Client` of `address` (default: the ADVSERVE_ADDRESS environment variable: "host:port" or
    "http(s)://host:port" for REST, "grpc://host:port" for gRPC; one client per address and process,
    reused), or the in-process API (`advserve.api`) when neither is set. Both have compute_advantages and
    compute_losses with the same arguments and results."""
    address = address if address is not None else os.environ.get(ADDRESS_ENV, "").strip()
    if address:
        return _client(address)
    from .. import api

    return api
