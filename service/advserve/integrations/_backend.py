"""What the integrations compute with: a remote advserve through the thin client, or the in-process engine."""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any

ADDRESS_ENV = "ADVSERVE_ADDRESS"


@functools.lru_cache(maxsize=None)
def _client(address: str) -> Any:
    from advserve_client import Client

    if address.startswith("grpc://"):
        return Client(address[len("grpc://"):], transport="grpc")
    return Client(address)


class RoundRobin:
    """Several advserve servers used in turn, one call each (OpenRLHF's convention for --reward.remote_url:
    a comma-separated list of URLs cycled through). Itself thread-safe enough: itertools.cycle under the GIL."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self._next = itertools.cycle([_client(address) for address in addresses])

    def compute_advantages(self, *args: Any, **kwargs: Any) -> Any:
        return next(self._next).compute_advantages(*args, **kwargs)

    def compute_losses(self, *args: Any, **kwargs: Any) -> Any:
        return next(self._next).compute_losses(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _pool(addresses: tuple[str, ...]) -> RoundRobin:
    return RoundRobin(list(addresses))


def backend(address: str | None = None) -> Any:
    """A `Client` of `address` (default: the ADVSERVE_ADDRESS environment variable: "host:port" or
    "http(s)://host:port" for REST, "grpc://host:port" for gRPC; one client per address and process,
    reused; a comma-separated list: those servers in turn, `RoundRobin`), or the in-process API
    (`advserve.api`) when neither is set. All have compute_advantages and compute_losses with the same
    arguments and results."""
    address = address if address is not None else os.environ.get(ADDRESS_ENV, "").strip()
    addresses = tuple(a.strip() for a in address.split(",") if a.strip())
    if len(addresses) > 1:
        return _pool(addresses)
    if addresses:
        return _client(addresses[0])
    from .. import api

    return api
