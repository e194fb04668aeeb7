"""Retry policy: only `Unavailable` errors (`Overloaded` included) are retried, with capped exponential
backoff and full jitter, waiting at least the server's Retry-After (capped)."""

from __future__ import annotations

import asyncio
import random
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
