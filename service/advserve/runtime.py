"""What the transports share: the engine, the compute thread, admission (`Admission`, one request's
`Lease`), the one deadline of a request (`Deadline`), metrics, and the server's lifecycle (accepting,
draining for a graceful shutdown, giving freed memory back when idle)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import gc
import hmac
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
import torch

from .batch import DTYPES
from .config import Settings
from .engine import Engine
from .estimators import ESTIMATORS
from .errors import DeadlineExceeded, Overloaded, PayloadTooLarge, Unauthenticated, Unavailable
from .observability import Metrics
from .scheduler import Scheduler
from .workers import ADMITTED, IN_PROGRESS, QUEUED, READY, Worker
from .shm import Regions


log = logging.getLogger("advserve")
INLINE_LIMIT = 256 << 10  # bodies and results below this are decoded / encoded on the event loop
JSON_DECODE_COST = 16
"""Bytes of memory per byte of a JSON body while it is parsed (Python lists: 8 bytes per element and
a float object each), measured on /v1/losses bodies: 4 for float32 values, 13 for 0/1 integers (2 bytes
each in JSON). HTTP admission charges this much for a JSON body (a binary body costs its length, the
tensors being views of it); the JSON limits of the door (declared length) and of admission follow."""

COMPUTE_COST = 18
"""Bytes of memory per token (B·T, the padded form) and per byte of the compute dtype while a batch is
validated, computed and its result encoded (its float copies, temporaries, outputs, their wire copies),
measured as peak RSS growth (VmHWM) of one call in process: policy losses 15 (float32) and 17 (float64),
GAE 6 and 8, GRPO 2 and 2.5 (validation alone, `prepare_advantages`: GRPO 1, GAE 3). Every transport
charges it to the request's lease once the shapes are known, before the batch is validated and before
the job is queued (`compute_bytes`, `charge_compute`)."""

ANALYSIS_COST = 32
ANALYSIS_DTYPE_COST = 6
"""/v1/analysis costs, on top of COMPUTE_COST, per token and per analysed estimator, ANALYSIS_COST +
ANALYSIS_DTYPE_COST × the dtype's size in bytes: each estimator's validated batch (float copies) is
kept while the others run, its int8 signs too, and the sign matrices stack them as three float64
one-hot indicators [E, N] (24 bytes per token and estimator). Measured (VmHWM growth from the request's
tensors to its document, 512 x 2048 tokens, in process): all 12 estimators of the paper preset 645 MiB
(float32) and 848 MiB (float64), 4 (one whitened) 159 MiB, 1 41 MiB; charged 744, 1104, 296 and
128 MiB. An analysis that names no estimators is charged for all of them (ESTIMATORS) until it is
validated, then for those that apply."""


def compute_bytes(work: Any, max_tokens: int | None = None) -> int:
    """Memory for validating, computing and encoding one request, whatever its transport: COMPUTE_COST ×
    B·T × the compute dtype's size (float32 when unset), plus (ANALYSIS_COST + ANALYSIS_DTYPE_COST × that
    size) × B·T × the estimators of an analysis. `work` is what the transport decoded, validated or not:
    an AdvantageRequest, LossRequest or AnalysisRequest (B·T from its response_mask [B, T], or when
    packed from cu_seqlens, B × the longest row: the padded form the engine computes on), an OIP
    InferRequest (its inputs and parameters), or their validated forms (PreparedAdvantages,
    PreparedAnalysis: B·T of the batch; an OIP Prepared: its domain). 0 for anything else (the catalog),
    and for more than `max_tokens` tokens (--max-tokens: validation refuses it, 413 naming the tensor,
    before it allocates anything that size). Pure; shapes only, no Python loop over rows."""
    work = getattr(work, "domain", work)  # an OIP Prepared
    jobs = getattr(work, "jobs", None)  # a PreparedAnalysis: one validated job per estimator
    tensors, parameters = getattr(work, "tensors", None), {}
    if isinstance(getattr(work, "inputs", None), list):  # an OIP InferRequest
        tensors = {getattr(item, "name", ""): getattr(item, "data", None) for item in work.inputs}
        parameters = work.parameters if isinstance(getattr(work, "parameters", None), Mapping) else {}
    if jobs:
        estimators, dtype = len(jobs), jobs[0].dtype
    else:
        named = getattr(work, "estimators", _NONE)  # an AnalysisRequest: those it names, else all
        estimators = 0 if named is _NONE else len(named) if isinstance(named, (list, tuple)) else len(ESTIMATORS)
        dtype = getattr(work, "dtype", parameters.get("dtype"))
    mask = getattr(getattr(work, "batch", None), "mask", None)
    if mask is not None:
        tokens = math.prod(mask.shape)
    elif isinstance(tensors, Mapping):
        tokens = _request_tokens(tensors, getattr(work, "layout", parameters.get("layout")))
    else:
        return 0
    if max_tokens is not None and tokens > max_tokens:
        return 0
    if not isinstance(dtype, torch.dtype):
        dtype = DTYPES.get(dtype, torch.float32)
    size = dtype.itemsize
    return tokens * (COMPUTE_COST * size + (ANALYSIS_COST + ANALYSIS_DTYPE_COST * size) * estimators)


_NONE = object()


def _request_tokens(tensors: Mapping[str, Any], layout: Any) -> int:
    """B·T of a request not yet validated: response_mask's [B, T] (padded), or B × the longest
    row of cu_seqlens (packed); else the largest tensor's size. What validation will refuse is
    counted as it stands (it is refused before any compute)."""
    largest = max((math.prod(shape) for shape in map(_shape, tensors.values()) if shape), default=0)
    if layout == "packed" and tensors.get("cu_seqlens") is not None:
        try:
            bounds = np.asarray(tensors["cu_seqlens"], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError, RecursionError):
            bounds = np.zeros(0, np.int64)
        steps = np.diff(bounds)
        # bounds as validation will accept them (0 to N, non-decreasing); others are refused before compute
        if bounds.size >= 2 and bounds[0] == 0 and bounds[-1] <= largest and bool((steps >= 0).all()):
            return (bounds.size - 1) * max(int(steps.max()), 1)
    mask = _shape(tensors.get("response_mask"))
    return math.prod(mask) if layout != "packed" and len(mask) == 2 else largest


def _shape(value: Any) -> tuple[int, ...]:
    """The shape of a tensor or array, or of nested lists from their first elements (JSON)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        try:
            return tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            return ()
    dims: list[int] = []
    while isinstance(value, list) and len(dims) < 2:
        dims.append(len(value))
        value = value[0] if value else None
    return tuple(dims)


def charge_compute(lease: "Lease | None", work: Any) -> None:
    """Bring the request's compute charge to `compute_bytes(work)`, at once: called when the shapes are
    known (before the batch is validated, which allocates) and again once it is validated, before its
    job is queued (an estimate that was too high is given back). HTTP (/v1 and /v2): PayloadTooLarge
    (413, field body) when its body and its compute could never fit the admission capacity, Overloaded
    (503 + Retry-After) when they do not fit now: the first request to find no room waits up to
    COMPUTE_WAIT_S for it, the others are refused at once (`Admission.acquire_waiting`: bodies received
    together would otherwise each hold back the others' compute, and all be refused). gRPC's
    `Door.grow` waits in its own line, up to --grpc-admission-wait-s. No lease (an application without
    AdmissionControl): nothing to charge. On the event loop (a small body decoded inline, the charge
    after validation) it never waits."""
    if lease is None:
        return
    due = lease.compute_due(work)
    if due >= 0:
        lease.grow(due, what=COMPUTED, compute=True, wait_s=0.0 if _on_event_loop() else COMPUTE_WAIT_S)
    else:
        lease.shrink(-due, compute=True)


COMPUTED = "request (its body, and the memory to compute its batch)"
def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


COMPUTE_WAIT_S = 1.0  # HTTP: the longest wait of the head of the line for room to compute (`charge_compute`)
LINE_POLL_S = 0.005  # how often a request waiting for room looks again without a wake-up


class Admission:
    """Bytes of requests in flight (bodies as they arrive, inflated bodies as they grow), bounded: what
    does not fit is turned away (503 Overloaded; 413 if it never could) instead of growing memory.
    Nothing is reserved on a client's word: a declared length is only checked against the free capacity
    (`check`), the bytes are taken as they arrive (`Lease.grow`), so a connection that declares much and
    sends little holds only what it sent. Thread-safe (a worker thread inflating a body charges it)."""

    def __init__(self, capacity: int, max_tokens: int | None = None):
        self.capacity = capacity
        self.max_tokens = max_tokens  # --max-tokens, for `compute_bytes`
        self.in_flight = 0
        self._lock = threading.Lock()
        self._init_line()

    def _init_line(self) -> None:
        self._released = threading.Condition()  # notified when bytes are given back (`acquire_waiting`)
        self._someone_waits = False

    def try_acquire(self, nbytes: int) -> bool:
        with self._lock:
            if self.in_flight + nbytes > self.capacity:
                return False
            self.in_flight += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.in_flight -= nbytes
        self._wake()

    def _wake(self) -> None:
        with self._released:
            self._released.notify_all()

    def check(self, nbytes: int) -> None:
        """Raise as `acquire` would for `nbytes`, taking nothing: the door's test of a declared length."""
        if nbytes > self.capacity:
            raise PayloadTooLarge(f"request of {nbytes} bytes exceeds the server's admission capacity of "
                                  f"{self.capacity} bytes", field="body")
        if self.in_flight + nbytes > self.capacity:
            raise Overloaded(f"server busy: {self.in_flight} request bytes in flight of {self.capacity}; "
                             f"retry later")

    def acquire(self, nbytes: int) -> None:
        """Take `nbytes` or raise: PayloadTooLarge if they can never fit, Overloaded if not now."""
        if nbytes > self.capacity:
            raise PayloadTooLarge(f"request of {nbytes} bytes exceeds the server's admission capacity of "
                                  f"{self.capacity} bytes", field="body")
        if not self.try_acquire(nbytes):
            raise Overloaded(f"server busy: {self.in_flight} request bytes in flight of {self.capacity}; "
                             f"retry later")

    def acquire_waiting(self, nbytes: int, wait_s: float) -> None:
        """`acquire`, but the first request to find no room waits up to `wait_s` for it (bytes given back
        by requests that finish or are refused); one that finds another already waiting is refused at
        once, so that its own bytes (its body) go back and the one waiting gets in. Without this, bodies
        received together each hold back the others' compute and every one of them is refused. Called
        from worker threads, never on the event loop."""
        if nbytes > self.capacity:
            self.acquire(nbytes)  # PayloadTooLarge
        if self.try_acquire(nbytes):
            return
        with self._released:
            if self._someone_waits:
                self.acquire(nbytes)  # one more try; Overloaded when there is still no room
                return
            self._someone_waits = True
        try:
            give_up = time.monotonic() + wait_s
            while not self.try_acquire(nbytes):
                left = give_up - time.monotonic()
                if left <= 0:
                    self.acquire(nbytes)  # the last try, or Overloaded
                    return
                with self._released:  # polled too: other workers' bytes (SharedAdmission) send no wake-up
                    self._released.wait(min(left, LINE_POLL_S))
        finally:
            with self._released:
                self._someone_waits = False

    @contextlib.contextmanager
    def held(self, nbytes: int):
        """`acquire` for the duration of the block."""
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)

    def lease(self) -> "Lease":
        """An empty Lease on this admission, for one request."""
        return Lease(self)

    def held_here(self) -> int:
        """Bytes admitted by this process (`in_flight`: by the whole server)."""
        return self.in_flight


class SharedAdmission(Admission):
    """One admission budget for every worker of a server (--workers): each worker's bytes are its slot of
    the shared board (workers.Board), the check-and-take runs under the board's cross-process lock, and
    `in_flight` is the sum over the workers. The same API as Admission for its callers."""

    def __init__(self, capacity: int, max_tokens: int | None, board: Any, slot: int):
        self.capacity = capacity
        self.max_tokens = max_tokens
        self._board, self._slot = board, slot
        self._init_line()

    @property
    def in_flight(self) -> int:
        return self._board.total(ADMITTED)

    def held_here(self) -> int:
        return self._board.get(self._slot, ADMITTED)

    def try_acquire(self, nbytes: int) -> bool:
        with self._board.locked():
            if self._board.total(ADMITTED) + nbytes > self.capacity:
                return False
            self._board.add(self._slot, ADMITTED, nbytes)
            return True

    def release(self, nbytes: int) -> None:
        with self._board.locked():
            self._board.add(self._slot, ADMITTED, -nbytes)
        self._wake()


class Lease:
    """The bytes one request holds, grown as they arrive or inflate (`grow`), given back once by
    `close`: at once, or, when work the request handed to a thread outlives it (a decode abandoned at
    the deadline), when the last such work ends (`keep_until`), since its memory is still in use.
    Thread-safe."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.held = 0
        self.computed = 0  # of `held`, what was charged for computing the request (`charge_compute`)
        self._pending: set = set()
        self._closed = False
        self._lock = threading.Lock()

    def grow(self, nbytes: int, what: str = "request", *, compute: bool = False, wait_s: float = 0.0) -> None:
        """Take `nbytes` more (`compute`: for computing the request); raises PayloadTooLarge (never
        fits; the message says what `what` is held) or Overloaded (not now; `wait_s` > 0: after waiting
        at the head of the line that long, `Admission.acquire_waiting`)."""
        if nbytes <= 0:
            return
        if self.held + nbytes > self.admission.capacity:
            raise PayloadTooLarge(f"{what} of {self.held + nbytes} bytes exceeds the server's admission capacity "
                                  f"of {self.admission.capacity} bytes", field="body")
        if wait_s > 0:
            self.admission.acquire_waiting(nbytes, wait_s)
        else:
            self.admission.acquire(nbytes)
        with self._lock:
            self.held += nbytes
            self.computed += nbytes if compute else 0

    def shrink(self, nbytes: int, *, compute: bool = False) -> None:
        """Give `nbytes` back early (memory already freed; `compute`: of the compute charge)."""
        with self._lock:
            nbytes = min(nbytes, self.held, self.computed if compute else self.held)
            self.held -= nbytes
            self.computed -= nbytes if compute else 0
        self.admission.release(nbytes)

    def compute_due(self, work: Any) -> int:
        """`compute_bytes(work)` less what this lease holds for compute already (negative: too much)."""
        return compute_bytes(work, self.admission.max_tokens) - self.computed

    def keep_until(self, future: "asyncio.Future | concurrent.futures.Future") -> None:
        """Hold the bytes, even past `close`, until `future` (work still using them) is done."""
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._work_done)

    def _work_done(self, future) -> None:
        with self._lock:
            self._pending.discard(future)
            last = self._closed and not self._pending
        if last:
            self._release_all()

    def close(self) -> None:
        """Release everything held, now or when the work in `keep_until` ends."""
        with self._lock:
            self._closed = True
            waiting = bool(self._pending)
        if not waiting:
            self._release_all()

    def _release_all(self) -> None:
        with self._lock:
            held, self.held = self.held, 0
        self.admission.release(held)


class Abandoned(Exception):
    """The caller went away (disconnected) while its request waited: nothing to answer."""


@dataclass
class Deadline:
    """One request's deadline, from its arrival to its answer: reading and decoding the body, the
    queue, compute and encoding all run against it (--request-timeout-s, or the caller's shorter
    timeout). Shared by every transport: `Runtime.deadline()` starts one."""

    timeout_s: float
    at: float  # time.monotonic() when it passes

    @classmethod
    def start(cls, timeout_s: float) -> "Deadline":
        return cls(timeout_s, time.monotonic() + timeout_s)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def within(self, timeout_s: float | None) -> "Deadline":
        """This deadline, or the earlier one `timeout_s` after the same start (a caller's own timeout)."""
        if timeout_s is None or timeout_s >= self.timeout_s:
            return self
        return Deadline(timeout_s, self.at - self.timeout_s + timeout_s)

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"no result within the request timeout of {self.timeout_s:g} s")

    def check(self) -> None:
        """Raise DeadlineExceeded if the deadline has passed."""
        if self.expired():
            raise self.error()

    async def wait(self, awaitable: Awaitable, *, abandon: Awaitable | None = None) -> Any:
        """The result of `awaitable`, or DeadlineExceeded once the deadline passes (the awaitable is
        cancelled: a queued compute job whose future is cancelled is skipped by the scheduler). With
        `abandon` (e.g. the wait for the client's disconnect): Abandoned if it completes first."""
        task = asyncio.ensure_future(awaitable)
        watcher = asyncio.ensure_future(abandon) if abandon is not None else None
        try:
            done, _ = await asyncio.wait({task} | ({watcher} if watcher else set()),
                                         timeout=max(self.remaining(), 0.0), return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if watcher is not None and watcher in done:
                raise Abandoned()
            raise self.error()
        finally:
            for pending in (task, watcher):
                if pending is not None and not pending.done():
                    pending.cancel()

    async def off_loop(self, fn: Callable[[], Any], size: int, lease: Lease | None = None,
                       executor: concurrent.futures.Executor | None = None) -> Any:
        """`off_loop(fn, size)` against the deadline: in a worker thread of `executor` (default: the
        loop's) when `size` is worth the hop, DeadlineExceeded when the deadline passes first. The
        thread cannot be stopped: it finishes on its own, and `lease` keeps its bytes (still in use)
        until it does."""
        self.check()
        if size < INLINE_LIMIT:
            result = fn()
            self.check()
            return result
        future = asyncio.get_running_loop().run_in_executor(executor, _without_traceback, fn)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(self.remaining(), 0.0))
        except asyncio.TimeoutError:
            if lease is not None:
                lease.keep_until(future)
            future.add_done_callback(_ignore_outcome)
            raise self.error() from None


async def _disconnected(receive) -> None:
    """Return once the client has gone (its connection closed)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def admitted(request, runtime: "Runtime") -> tuple[bytes | memoryview, Deadline, Lease | None]:
    """(body, deadline, lease) of an HTTP request (a Starlette Request), as AdmissionControl read and
    admitted it (the ASGI scope's "advserve.*"); without that middleware, the body read here, a fresh
    deadline and no lease."""
    scope = request.scope
    if "advserve.body" not in scope:
        deadline = runtime.deadline()
        return await request.body(), deadline, None
    return scope["advserve.body"], scope["advserve.deadline"], scope["advserve.lease"]


def watch_disconnect(request):
    """A coroutine that returns once the client of `request` has gone (None without AdmissionControl):
    `Deadline.wait`'s `abandon`, so a queued job whose caller left is dropped."""
    receive = request.scope.get("advserve.receive")
    return _disconnected(receive) if receive is not None else None


def _without_traceback(fn: Callable[[], Any]) -> Any:
    """fn(), its exception (if any) raised without the frames below: their locals (a decoded or
    inflated body) would otherwise live as long as the exception, past the request's admission."""
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised as it is, less its traceback
        raise exc.with_traceback(None) from None


def _ignore_outcome(future) -> None:
    """Retrieve an abandoned future's exception (so asyncio does not log it as never retrieved)."""
    if not future.cancelled():
        future.exception()


MEMORY_SLACK = 256 << 20
"""A worker's memory beyond its resting size and its admitted bytes before it gives freed pages back
(`Runtime.trim_memory_over_budget`): the working set admission does not count (the batch in the engine's
temporaries beyond the estimate, responses being sent, allocator fragmentation)."""


def resident_bytes() -> int:
    """This process's resident set size (RSS) in bytes; 0 where /proc is not readable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): give the freed pages of every heap arena back to the system (RSS falls);
    False where that is not glibc."""
    path = ctypes.util.find_library("c")
    if not path:
        return False
    try:
        return bool(ctypes.CDLL(path).malloc_trim(0))
    except (OSError, AttributeError):
        return False


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    scheduler: Scheduler
    admission: Admission
    metrics: Metrics = field(init=False)
    draining: bool = False
    active: int = 0
    served: int = 0  # requests that entered `serving`, ever
    last_busy: float = field(default_factory=time.monotonic)
    worker: Worker | None = None
    """This process's place among the workers of a server (--workers > 1), None for a single process."""
    shared_dir: str = ""
    """A private (0700) directory shared by every worker of one server (--workers: made by the supervisor,
    which removes it at exit); a single process makes its own here, removed by `close`."""
    _idle: asyncio.Event | None = None
    _owns_shared_dir: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.worker is not None:
            self.shared_dir = self.worker.shared_dir
        if not self.shared_dir:
            self.shared_dir, self._owns_shared_dir = make_shared_dir(), True
        self.regions = Regions(self.shared_dir, device=self.engine.device)  # shared-memory tensors (shm.py)
        if self.worker is None:
            self.metrics = Metrics(queue_depth=lambda: self.scheduler.depth,
                                   bytes_in_flight=lambda: self.admission.in_flight, in_progress=lambda: self.active)
        else:  # every worker's /metrics shows the server's: summed over the workers
            board = self.worker.board
            self.metrics = Metrics(queue_depth=lambda: self.publish() or board.total(QUEUED),
                                   bytes_in_flight=lambda: self.admission.in_flight,
                                   in_progress=lambda: board.total(IN_PROGRESS),
                                   multiprocess_dir=self.worker.metrics_dir)

    @classmethod
    def build(cls, settings: Settings, engine: Engine | None = None, shared_dir: str = "",
              worker: Worker | None = None) -> "Runtime":
        """The runtime of `settings`; `shared_dir`: the server's, else one of its own; `worker`: this
        process's place among the server's workers (admission shared through its board)."""
        engine = engine or Engine(settings.device, max_tokens=settings.max_tokens, kernels=settings.kernels)
        scheduler = Scheduler(engine, max_wait_s=settings.max_wait_ms / 1e3,
                              max_batch_tokens=settings.max_batch_tokens, coalesce=settings.coalesce)
        if worker is None:
            admission = Admission(settings.admission_bytes, settings.max_tokens)
        else:
            admission = SharedAdmission(settings.admission_bytes, settings.max_tokens, worker.board, worker.slot)
        return cls(settings, engine, scheduler, admission, worker=worker, shared_dir=shared_dir)

    def publish(self) -> None:
        """A worker: its requests in progress and queued jobs into its slot of the board (for /metrics)."""
        if self.worker is not None:
            self.worker.board.set(self.worker.slot, IN_PROGRESS, self.active)
            self.worker.board.set(self.worker.slot, QUEUED, self.scheduler.depth)

    def mark_ready(self) -> None:
        """A worker: now serving (the supervisor gives up on workers that keep dying before this)."""
        if self.worker is not None:
            self.worker.board.set(self.worker.slot, READY, 1)

    @property
    def ready(self) -> bool:
        return not self.draining

    def deadline(self, timeout_s: float | None = None) -> Deadline:
        """A request's Deadline from now: --request-timeout-s, or the caller's `timeout_s` if shorter."""
        limit = self.settings.request_timeout_s
        return Deadline.start(limit if timeout_s is None else min(limit, timeout_s))

    @property
    def idle(self) -> bool:
        """No request in progress, queued or holding admitted bytes."""
        return self.active == 0 and self.scheduler.depth == 0 and self.admission.held_here() == 0

    async def trim_memory_when_idle(self, idle_s: float, trim: Callable[[], Any] = malloc_trim) -> None:
        """Forever: once the server has been idle for `idle_s` after serving anything since the last
        trim, call `trim` (malloc_trim: the pages a burst left in the heap go back to the system; the
        allocator keeps them otherwise, see docs/container.md). Checked every idle_s / 4."""
        trimmed_at = self.served
        idle_since = None
        while True:
            await asyncio.sleep(idle_s / 4)
            if not self.idle:
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = max(idle_since or now, self.last_busy)
            if self.served != trimmed_at and now - idle_since >= idle_s:
                trimmed_at = self.served
                gc.collect()  # cycles (a failed request's traceback and its buffers) first
                await asyncio.to_thread(trim)
                log.debug("idle for %.1f s: freed memory returned to the system", idle_s)

    async def trim_memory_over_budget(self, slack: int = MEMORY_SLACK, every_s: float = 0.25,
                                      trim: Callable[[], Any] = malloc_trim,
                                      rss: Callable[[], int] = lambda: resident_bytes()) -> None:
        """Forever (every server process): every `every_s`, when this process's RSS exceeds its resting
        size plus the bytes it holds in admission plus `slack`, call `trim` (in a thread). The allocator
        keeps freed pages (tune_allocator) and, under a long overload, a process can keep far more than it
        ever held at once; with N workers sharing one admission budget that would be N times the excess.
        So the server's memory stays within the admission limit plus, per worker, its resting size and
        `slack`. The resting size is the RSS at start, raised to what a trim cannot give back."""
        resting = rss()
        while True:
            await asyncio.sleep(every_s)
            if rss() > resting + self.admission.held_here() + slack:
                await asyncio.to_thread(trim)
                resting = max(resting, rss() - self.admission.held_here())
                log.debug("memory over the admitted bytes + %d MiB: freed memory returned", slack >> 20)

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
        self.served += 1
        self.publish()
        try:
            yield
        finally:
            self.active -= 1
            self.last_busy = time.monotonic()
            self.publish()
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
        if self._owns_shared_dir:
            shutil.rmtree(self.shared_dir, ignore_errors=True)


def make_shared_dir() -> str:
    """A new private directory (mode 0700, only this user) for what the processes of one server share."""
    path = tempfile.mkdtemp(prefix=f"advserve-{os.getpid()}-")
    os.chmod(path, 0o700)
    return path


# glibc mallopt parameters: keep large tensors' memory instead of mmap/munmap on every call, which
# costs page faults worth several times the compute at [256, 4096] (design/anchors-performance.md A.3);
# and at most MALLOC_ARENAS heap arenas: each thread that allocates gets its own arena up to 8 per core,
# and the pages freed in one arena are kept for that arena alone, so a burst handled by several threads
# (gRPC decode, the compute thread, the body readers) left a peak RSS near the sum of their peaks: the
# bursts of tests/test_hostile_grpc.py grew it 228-247 MiB over the resting size with glibc's default
# and 161-179 MiB with 2 arenas (three fresh servers each).

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process and cap its heap arenas at MALLOC_ARENAS
    (arenas already created stay: call it before the server's threads start); False where that is not
    glibc."""
    path = ctypes.util.find_library("c")
    if not path:
        return False
    try:
        libc = ctypes.CDLL(path)
        return all([libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS), libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30),
                    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)])
    except (OSError, AttributeError):
        return False
