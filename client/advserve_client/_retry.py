"""Retry policy: only `Unavailable` errors (`Overloaded` included) are retried, with capped exponential
backoff and full jitter, waiting at least the server's Retry-After (capped); and the round robin over
several server addresses (`Balancer`)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass

from .errors import AdvserveError, Unavailable

# The sleeps the clients use (module attributes, so that tests can replace them).
sleep = time.sleep
async_sleep = asyncio.sleep


@dataclass(frozen=True)
class RetryPolicy:
    """max_retries: retries after the first attempt (0: none). The n-th retry (n = 0, 1, ...) waits a
    uniform random time in [0, min(max_backoff, base * 2**n)] (full jitter), and at least the server's
    Retry-After, itself capped at max_retry_after."""

    max_retries: int = 2
    base: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 30.0

    def should_retry(self, error: AdvserveError, attempt: int) -> bool:
        return isinstance(error, Unavailable) and attempt < self.max_retries

    def delay(self, error: AdvserveError, attempt: int) -> float:
        backoff = random.uniform(0.0, min(self.max_backoff, self.base * 2.0 ** attempt))
        if error.retry_after is not None:
            backoff = max(backoff, min(error.retry_after, self.max_retry_after))
        return backoff


class Balancer:
    """Round robin over a client's n addresses, one request at a time, skipping those that failed.

    `order()` gives the addresses to try for one request: the next in turn first, then the others in
    turn, those marked down (`down`) within the last `cooldown_s` seconds after every healthy one. A
    request goes to the first; on `Unavailable` (a connection failure, a draining or overloaded
    server) the client marks it down and tries the next at once: every call is a pure function of its
    request, so another server gives the same answer. Thread-safe."""

    def __init__(self, n: int, cooldown_s: float = 5.0, clock=time.monotonic):
        self.n, self.cooldown_s, self.clock = n, cooldown_s, clock
        self._next = 0
        self._down_until = [0.0] * n
        self._lock = threading.Lock()

    def order(self) -> list[int]:
        with self._lock:
            start, self._next = self._next, (self._next + 1) % self.n
            now = self.clock()
            turn = [(start + k) % self.n for k in range(self.n)]
            return [i for i in turn if self._down_until[i] <= now] + [i for i in turn if self._down_until[i] > now]

    def down(self, index: int) -> None:
        with self._lock:
            self._down_until[index] = self.clock() + self.cooldown_s

    def up(self, index: int) -> None:
        if self._down_until[index]:
            with self._lock:
                self._down_until[index] = 0.0
