"""The compute thread survives whatever is queued: jobs alike but for their tensors, callers that
gave up while queued, and errors in picking a batch (a dead thread hangs every later request)."""

from __future__ import annotations

import asyncio

import numpy as np

from advserve.engine import Engine
from advserve.model import AdvantageRequest
from advserve.scheduler import Scheduler, _Job

engine = Engine("cpu")


def grpo(rows: int, width: int):
    return engine.prepare_advantages(AdvantageRequest(estimator="grpo", tensors={
        "response_mask": np.ones((rows, width), bool), "group_ids": np.arange(rows) // 2,
        "rewards": np.arange(rows) % 2 * 1.0}))


def gae(rows: int, width: int):
    return engine.prepare_advantages(AdvantageRequest(estimator="gae", tensors={
        "response_mask": np.ones((rows, width), bool), "rewards": np.ones(rows), "values": np.zeros((rows, width))}))


def test_taking_a_companion_past_a_job_alike_but_for_its_batch():
    """A same-key job over the token budget stays queued while a later one is taken: finding the
    taken one in the queue must not compare the two jobs' tensors (it raised, killing the thread)."""
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(engine, max_batch_tokens=100)
    try:
        with scheduler._cv:
            over, fits = _Job(None, grpo(2, 45), loop.create_future(), loop), _Job(None, grpo(2, 5), loop.create_future(), loop)
            scheduler._jobs.extend([over, fits])
            taken = scheduler._companions(_Job(None, grpo(2, 10), loop.create_future(), loop))
            assert taken == [fits] and list(scheduler._jobs) == [over]
            scheduler._jobs.clear()
    finally:
        scheduler.close()
        loop.close()


def test_a_caller_that_gave_up_in_the_queue_is_skipped_and_the_thread_serves_on():
    async def scenario():
        scheduler = Scheduler(engine, max_wait_s=0.2)
        try:
            first = asyncio.ensure_future(scheduler.advantages(grpo(2, 10)))  # waits 0.2 s for companions
            await asyncio.sleep(0.05)
            other = asyncio.ensure_future(scheduler.advantages(gae(3, 9)))
            gone = asyncio.ensure_future(scheduler.advantages(gae(3, 7)))
            await asyncio.sleep(0.01)
            gone.cancel()  # its caller's deadline passed while it was queued
            results = await asyncio.wait_for(asyncio.gather(first, other), timeout=30)
            assert [r.estimator for r, _ in results] == ["grpo", "gae"]
            later, _ = await asyncio.wait_for(scheduler.advantages(grpo(4, 3)), timeout=30)
            assert later.advantages.shape == (4, 3)
        finally:
            scheduler.close()

    asyncio.run(scenario())


def test_an_error_while_picking_a_batch_is_the_callers_answer():
    async def scenario():
        scheduler = Scheduler(engine)

        def broken(first):
            raise RuntimeError("selection bug")

        scheduler._companions = broken
        try:
            failed = scheduler.advantages(grpo(2, 4))
            try:
                await asyncio.wait_for(failed, timeout=30)
            except RuntimeError as exc:
                assert "selection bug" in str(exc)
            else:
                raise AssertionError("the selection error was swallowed")
            del scheduler._companions
            result, _ = await asyncio.wait_for(scheduler.advantages(grpo(2, 4)), timeout=30)
            assert result.estimator == "grpo"
        finally:
            scheduler.close()

    asyncio.run(scenario())


def test_a_shared_batch_that_fails_is_computed_again_request_by_request(monkeypatch):
    """One request that makes the shared batch's compute fail (its values found wrong only after it was
    queued, on a GPU) fails alone: its batch mates get what they get alone, and their own timing."""
    poisoned = grpo(2, 7)
    original = engine.run_advantages
    calls = []

    def run_advantages(jobs):
        calls.append(len(jobs))
        if any(job is poisoned for job in jobs):
            raise RuntimeError("the poisoned request")
        return original(jobs)

    monkeypatch.setattr(engine, "run_advantages", run_advantages)
    mates = [grpo(2, 5), grpo(4, 3)]

    async def scenario():
        scheduler = Scheduler(engine, max_wait_s=0.3)
        try:
            futures = [asyncio.ensure_future(scheduler.advantages(p)) for p in (mates[0], poisoned, mates[1])]
            return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout=30)
        finally:
            scheduler.close()

    first, failed, last = asyncio.run(scenario())
    assert calls == [3, 1, 1, 1]  # shared, then each alone
    assert isinstance(failed, RuntimeError) and str(failed) == "the poisoned request"
    for (result, timing), prepared in zip((first, last), mates):
        alone = original([prepared])[0]
        assert timing.coalesced == 1 and np.array_equal(result.advantages, alone.advantages)
