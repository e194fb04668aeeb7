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
