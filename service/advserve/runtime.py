"""What the transports share: the engine, the compute thread, admission, metrics, and the server's
lifecycle (accepting, draining for a graceful shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass, field

from .config import Settings
from .engine import Engine
from .errors import Overloaded, PayloadTooLarge, Unauthenticated, Unavailable
from .observability import Metrics
from .scheduler import Scheduler


INLINE_LIMIT = 256 << 10  # bodies and results below this are decoded / encoded on the event loop


async def off_loop(fn, size: int):
    """Run fn in a worker thread when `size` (bytes or elements) makes it worth the hop; small
    requests are cheaper decoded and encoded right here on the event loop."""
    return await asyncio.to_thread(fn) if size >= INLINE_LIMIT else fn()


class Admission:
    """Bytes of request bodies in flight, bounded: a request that does not fit is turned away (503)
    before its body is read, instead of growing memory. Only touched on the event loop."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0

    def try_acquire(self, nbytes: int) -> bool:
        if self.in_flight + nbytes > self.capacity:
            return False
        self.in_flight += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.in_flight -= nbytes

    def acquire(self, nbytes: int) -> None:
        """Take `nbytes` or raise: PayloadTooLarge if they can never fit, Overloaded if not now."""
        if nbytes > self.capacity:
            raise PayloadTooLarge(f"request of {nbytes} bytes exceeds the server's admission capacity of "
                                  f"{self.capacity} bytes", field="body")
        if not self.try_acquire(nbytes):
            raise Overloaded(f"server busy: {self.in_flight} request bytes in flight of {self.capacity}; "
                             f"retry later")

    @contextlib.contextmanager
    def held(self, nbytes: int):
        """`acquire` for the duration of the block."""
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    scheduler: Scheduler
    admission: Admission
    metrics: Metrics = field(init=False)
    draining: bool = False
    active: int = 0
    _idle: asyncio.Event | None = None

    def __post_init__(self):
        self.metrics = Metrics(queue_depth=lambda: self.scheduler.depth,
                               bytes_in_flight=lambda: self.admission.in_flight, in_progress=lambda: self.active)

    @classmethod
    def build(cls, settings: Settings, engine: Engine | None = None) -> "Runtime":
        engine = engine or Engine(settings.device, max_tokens=settings.max_tokens)
        scheduler = Scheduler(engine, max_wait_s=settings.max_wait_ms / 1e3,
                              max_batch_tokens=settings.max_batch_tokens, coalesce=settings.coalesce)
        return cls(settings, engine, scheduler, Admission(settings.admission_bytes))

    @property
    def ready(self) -> bool:
        return not self.draining

    def authenticate(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is "Bearer <token>" with the configured token
        (compared in constant time). No token configured: everyone is let in."""
        token = self.settings.auth_token
        if not token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthenticated("missing or invalid bearer token (Authorization: Bearer <token>)")

    @contextlib.contextmanager
    def serving(self):
        """Around every compute request: refused while draining; counted while in progress."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another instance", retry_after_s=1.0)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0 and self._idle is not None:
                self._idle.set()

    async def drain(self, grace_s: float) -> bool:
        """Stop accepting work (readiness false) and wait for the requests in progress, at most
        `grace_s`. True when everything accepted was answered."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.active > 0 or self.scheduler.depth > 0:
            self._idle = asyncio.Event()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=min(remaining, 0.1))
        return True

    def close(self) -> None:
        self.scheduler.close()
