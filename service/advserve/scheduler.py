"""The compute thread, its queue and the coalescing of small requests.

One thread owns the device and runs jobs in arrival order. Decoding and validation happen before a job is
queued (in the transport's threads), so the compute thread only computes. On a GPU the value checks (NaN,
masks, group sizes) are computed there too but read with the results, one host sync per request
(`Engine.prepare_advantages(defer_checks=True)`): a request with bad values may then reach a batch. Its
result carries its error, and where a shared batch fails as a whole, each of its requests is computed
again alone, so that one request's mistake is never its batch mates'. When the thread picks up an
advantage job it also takes every queued job with the same coalescing key (same estimator, preset,
parameters, dtype and tensors) up to `max_batch_tokens`, waiting up to `max_wait_s` for more (default 0:
only what already arrived), and runs them as one batch. Only requests whose result is bit for bit the same
in a shared batch as alone have a key (`PreparedAdvantages.coalescing_key`, `Estimator.coalescible`: the
group estimators and REINFORCE/RLOO on outcome rewards without a KL term); the others run one by one, so
what else is in flight never changes a result.

On CUDA the thread records an event on its stream after each job and notes it on the job's result
tensors (`device.mark_ready`), so that a response's device-to-host copies (`device.copy_to_host`) wait
for that job's kernels only, not for the later requests' kernels queued behind them.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .device import mark_ready
from .engine import Engine, PreparedAdvantages
from .errors import Unavailable


@dataclass
class Timing:
    """Seconds spent waiting in the queue and computing (a coalesced batch's compute is shared)."""

    queue: float = 0.0
    compute: float = 0.0
    coalesced: int = 1


@dataclass(eq=False)  # identity: the queue finds a job by `is`, never by comparing its tensors
class _Job:
    run: Callable[[], Any] | None  # a single job (losses, or anything not coalescible)
    prepared: PreparedAdvantages | None  # an advantage job that may be coalesced
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():  # the caller went away (cancelled)
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


class Scheduler:
    """FIFO of compute jobs served by one thread; see the module docstring."""

    def __init__(self, engine: Engine, *, max_wait_s: float = 0.0, max_batch_tokens: int = 1 << 18,
                 coalesce: bool = True):
        self.engine = engine
        self.max_wait_s = max_wait_s
        self.max_batch_tokens = max_batch_tokens
        self.coalesce = coalesce
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="advserve-compute", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting for the compute thread."""
        return len(self._jobs)

    async def advantages(self, prepared: PreparedAdvantages):
        """(AdvantageResult, Timing) of a prepared request."""
        return await self._submit(None, prepared)

    async def call(self, fn: Callable[[], Any]):
        """(fn(), Timing) with fn run on the compute thread."""
        return await self._submit(fn, None)

    async def _submit(self, run, prepared):
        loop = asyncio.get_running_loop()
        job = _Job(run, prepared, loop.create_future(), loop)
        with self._cv:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            self._jobs.append(job)
            self._cv.notify()
        return await job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # --- the compute thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        """The compute thread's loop. Nothing escapes it: an error in picking a batch or in computing
        is each caller's answer, and the thread serves the next job (a dead thread would hang every
        later request while the health checks still said ready)."""
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if not self._jobs:
                    return
                first = self._jobs.popleft()
                try:
                    batch = [first] + self._companions(first)
                except BaseException as exc:  # noqa: BLE001 - a bug in the selection: answered, not fatal
                    first.finish(error=exc)
                    continue
            # callers that gave up (deadline, disconnect) while queued or while companions were awaited
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            first = batch[0]
            if first.run is not None:
                self._answer(batch, lambda: [first.run()])
            elif not self._answer(batch, lambda: self.engine.run_advantages([job.prepared for job in batch]),
                                  retry=len(batch) > 1):
                for job in batch:  # one request's failure is not its batch mates': each runs alone
                    self._answer([job], lambda job=job: self.engine.run_advantages([job.prepared]))

    def _answer(self, jobs: list[_Job], compute: Callable[[], list[Any]], retry: bool = False) -> bool:
        """Run `compute` (the outcomes of `jobs`, in order) and answer each job with its outcome and
        timing, or with the error; with `retry`, a failure answers nobody and returns False."""
        started = time.perf_counter()
        try:
            outcomes = compute()
            self._mark_ready(outcomes)
        except BaseException as exc:  # noqa: BLE001 - each caller gets its error, the thread lives on
            if retry:
                return False
            for job in jobs:
                job.finish(error=exc)
            return True
        done = time.perf_counter()
        for job, outcome in zip(jobs, outcomes):
            job.finish((outcome, Timing(queue=started - job.queued_at, compute=done - started, coalesced=len(jobs))))
        return True

    def _mark_ready(self, outcomes: list[Any]) -> None:
        """On CUDA: one event recorded after this job's kernels, noted on every result tensor of its
        outcomes (results that have `tensors()`); nothing on the CPU."""
        device = getattr(self.engine, "device", None)
        if device is None or device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        for outcome in outcomes:
            tensors = getattr(outcome, "tensors", None)
            if callable(tensors):
                mark_ready(tensors(), event)

    def _companions(self, first: _Job) -> list[_Job]:
        """Queued jobs that can share `first`'s device batch (called with the lock held)."""
        if not self.coalesce or first.prepared is None:
            return []
        key = first.prepared.coalescing_key
        if key is None:
            return []
        tokens = first.prepared.tokens
        deadline = time.perf_counter() + self.max_wait_s
        taken: list[_Job] = []
        while True:
            for job in list(self._jobs):
                if job.future.done():
                    self._jobs.remove(job)
                elif job.prepared is not None and job.prepared.coalescing_key == key \
                        and tokens + job.prepared.tokens <= self.max_batch_tokens:
                    self._jobs.remove(job)
                    taken.append(job)
                    tokens += job.prepared.tokens
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or tokens >= self.max_batch_tokens or self._stopping:
                return taken
            self._cv.wait(remaining)
