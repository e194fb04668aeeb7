"""The packed layout gives exactly the padded results; coalesced requests give exactly their one-by-one
results; the compute thread keeps the server responsive; admission turns load away with a 503."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advserve
from advserve.engine import Engine
from advserve.estimators import ESTIMATORS
from advserve.model import AdvantageRequest
from advserve.presets import PRESETS
from advserve.scheduler import Scheduler
from advserve_client import framing
from conftest import RunningServer

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_batch(rng: np.random.Generator, b: int, t: int, gaps: bool):
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0] = max(lengths[0], 1)
    mask = np.arange(t)[None, :] < lengths[:, None]
    if gaps:
        mask &= ~((rng.random((b, t)) < 0.2) & (np.arange(t)[None, :] < lengths[:, None] - 1))
    groups = rng.integers(0, max(1, b // 2), size=b)
    return {
        "rewards": rng.integers(0, 2, size=b).astype(float) + rng.normal(scale=0.1, size=b),
        "response_mask": mask,
        "group_ids": groups,
        "values": rng.normal(size=(b, t)),
        "old_logprobs": -rng.random((b, t)),
        "ref_logprobs": -rng.random((b, t)),
        "greedy_rewards": rng.random(b),
        "sum_pi_squared": rng.random((b, t)),
    }


def select(estimator: str, batch: dict, kl: bool) -> dict:
    spec = ESTIMATORS[estimator]
    names = {"rewards", "response_mask"} | spec.requires | (spec.optional if kl else set())
    return {k: v for k, v in batch.items() if k in names}


def pack(tensors: dict, mask: np.ndarray) -> dict:
    """The packed form of a padded batch: each row's first L_i = last valid index + 1 tokens, end to end."""
    lengths = np.array([np.flatnonzero(row).max() + 1 if row.any() else 0 for row in mask])
    keep = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    out = {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim == 2 else v) for k, v in tensors.items()}
    out["cu_seqlens"] = np.concatenate([[0], np.cumsum(lengths)])
    return out, keep


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(2, 7), t=st.integers(1, 9), gaps=st.booleans(),
       estimator=st.sampled_from(sorted(ESTIMATORS)), kl=st.booleans())
def test_packed_equals_padded_for_every_estimator(seed, b, t, gaps, estimator, kl):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, b, t, gaps)
    preset = next(p.name for p in PRESETS.values() if estimator in p.estimators)  # paper, or a library's
    params = {"singleton_groups": "zero"} if estimator in ("rloo", "grpo_passk") else {}
    if "kl_coef" in ESTIMATORS[estimator].params:
        params["kl_coef"] = 0.1 if kl else 0.0
    tensors = select(estimator, batch, params.get("kl_coef", 0.0) > 0)
    packed_tensors, keep = pack(tensors, batch["response_mask"])
    try:
        padded = advserve.compute_advantages(estimator, preset=preset, params=params, dtype="float64", **tensors)
    except advserve.InvalidArgument as refused:  # (whitening with ddof 1 over one valid token): the same refusal
        with pytest.raises(advserve.InvalidArgument) as err:
            advserve.compute_advantages(estimator, preset=preset, params=params, dtype="float64", layout="packed",
                                        **packed_tensors)
        assert (err.value.field, str(err.value)) == (refused.field, str(refused))
        return
    packed = advserve.compute_advantages(estimator, preset=preset, params=params, dtype="float64", layout="packed",
                                         **packed_tensors)
    np.testing.assert_allclose(packed.advantages, padded.advantages[keep], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(packed.returns, padded.returns[keep], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 6), t=st.integers(1, 9), gaps=st.booleans(),
       agg=st.sampled_from(["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum"]),
       mode=st.sampled_from(["ppo_clip", "gspo", "cispo", "reinforce"]))
def test_packed_equals_padded_for_losses(seed, b, t, gaps, agg, mode):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, b, t, gaps)
    lp = -rng.random((b, t))
    tensors = {"logprobs": lp, "old_logprobs": lp + rng.normal(scale=0.3, size=(b, t)),
               "advantages": rng.normal(size=(b, t)), "response_mask": batch["response_mask"],
               "ref_logprobs": batch["ref_logprobs"], "values": batch["values"], "old_values": rng.normal(size=(b, t)),
               "returns": rng.normal(size=(b, t))}
    spec = dict(preset="verl", policy_loss={"mode": mode, "agg": agg}, kl_loss={"coef": 0.1},
                value_loss={"coef": 0.5}, dtype="float64")
    padded = advserve.compute_losses(**spec, **tensors)
    packed_tensors, keep = pack(tensors, batch["response_mask"])
    packed = advserve.compute_losses(**spec, layout="packed", **packed_tensors)
    assert packed.loss == pytest.approx(padded.loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(packed.grad_logprobs, padded.grad_logprobs[keep], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(packed.grad_values, padded.grad_values[keep], rtol=1e-12, atol=1e-14)


def test_packed_layout_errors_name_the_field():
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("grpo", layout="packed", rewards=np.ones(2), group_ids=[0, 0],
                                    cu_seqlens=np.array([0, 3, 2]))
    assert err.value.field == "tensors.cu_seqlens"
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("gae", layout="packed", rewards=np.ones(2), values=np.zeros(4),
                                    cu_seqlens=np.array([0, 2, 5]))
    assert err.value.field == "tensors.values"
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("grpo", layout="packed", rewards=np.ones(2), group_ids=[0, 0])
    assert err.value.field == "tensors.cu_seqlens"
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("grpo", rewards=np.ones(2), group_ids=[0, 0], response_mask=np.ones((2, 2)),
                                    cu_seqlens=np.array([0, 2, 4]))
    assert err.value.field == "tensors.cu_seqlens"


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo", "dapo", "grpo_original", "reinforce"])
def test_coalesced_equals_one_by_one(estimator):
    engine = Engine("cpu")
    rng = np.random.default_rng(3)
    requests = []
    for i in range(5):  # different widths, the same group ids in every request: groups must not merge
        batch = random_batch(rng, b=4 + i, t=3 + 2 * i, gaps=i % 2 == 1)
        batch["group_ids"] = np.array([0, 0, 1, 1] + [2] * i if i != 1 else [0, 0, 1, 1, 1])
        tensors = select(estimator, batch, kl=False)
        requests.append(AdvantageRequest(estimator=estimator, tensors=tensors, dtype="float64"))
    prepared = [engine.prepare_advantages(r) for r in requests]
    assert len({p.coalescing_key for p in prepared}) == 1 and prepared[0].coalescing_key is not None
    together = engine.run_advantages(prepared)
    for request, result in zip(requests, together):
        alone = engine.compute_advantages(request)
        np.testing.assert_array_equal(result.advantages.numpy(), alone.advantages.numpy())
        np.testing.assert_array_equal(result.returns.numpy(), alone.returns.numpy())
        assert result.stats == alone.stats


def test_whitening_estimators_never_coalesce():
    engine = Engine("cpu")
    batch = random_batch(np.random.default_rng(0), 4, 3, False)
    prepared = engine.prepare_advantages(AdvantageRequest("gae", select("gae", batch, False), preset="verl"))
    assert prepared.coalescing_key is None


@pytest.mark.parametrize("estimator", ["gae", "remax", "reinforce_rtg", "orz"])
def test_scans_never_coalesce(estimator):
    # a scan's matrix products round differently with the number of rows (tests/test_batching_invisible.py)
    batch = random_batch(np.random.default_rng(0), 4, 3, False)
    prepared = Engine("cpu").prepare_advantages(AdvantageRequest(estimator, select(estimator, batch, False)))
    assert prepared.coalescing_key is None


def test_scheduler_coalesces_what_arrives_together():
    engine = Engine("cpu")
    scheduler = Scheduler(engine, max_wait_s=0.05)
    rng = np.random.default_rng(5)
    requests = [AdvantageRequest("grpo", select("grpo", random_batch(rng, 6, 4, False), False), dtype="float64")
                for _ in range(8)]

    async def main():
        prepared = [engine.prepare_advantages(r) for r in requests]
        return await asyncio.gather(*(scheduler.advantages(p) for p in prepared))

    try:
        outcomes = asyncio.run(main())
    finally:
        scheduler.close()
    assert max(timing.coalesced for _, timing in outcomes) > 1
    for request, (result, _) in zip(requests, outcomes):
        np.testing.assert_array_equal(result.advantages.numpy(), engine.compute_advantages(request).advantages.numpy())


def big_losses_body(b: int, t: int) -> tuple[bytes, dict]:
    rng = np.random.default_rng(0)
    lp = -rng.random((b, t), dtype=np.float32)
    tensors = {"logprobs": lp, "old_logprobs": lp, "advantages": rng.normal(size=(b, t)).astype(np.float32),
               "response_mask": np.ones((b, t), dtype=bool)}
    n, chunks = framing.encode({"preset": "verl"}, {k: framing.RawTensor.from_numpy(v) for k, v in tensors.items()})
    return b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}


def test_health_answers_while_a_batch_computes(server):
    body, headers = big_losses_body(512, 4096)  # ~25 MB: compute takes a while on 2 cores
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(lambda: httpx.post(f"{server.url}/v1/losses", content=body, headers=headers, timeout=120))
        probes = []
        while not busy.done() and len(probes) < 200:
            started = time.perf_counter()
            assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200
            probes.append(time.perf_counter() - started)
        assert busy.result().status_code == 200
    assert probes and sorted(probes)[len(probes) // 2] < 0.5


@pytest.mark.parametrize("round_", range(5))
def test_bodies_received_together_do_not_hold_back_every_compute(round_):
    """Six requests hold their bodies (25 units each) and then ask for their compute (151) at once, on
    a capacity of 200: room for one. The first to find no room waits for it, the others are refused
    at once and give their bodies back, so one is computed (without the line, each one's compute is
    held back by the five others' bodies and all six are refused)."""
    from advserve.errors import Overloaded
    from advserve.runtime import Admission

    admission = Admission(200)
    barrier = threading.Barrier(6)

    def request(_):
        lease = admission.lease()
        lease.grow(25)
        barrier.wait()
        try:
            lease.grow(151, compute=True, wait_s=5.0)
            time.sleep(0.01)  # computing
            return "computed"
        except Overloaded:
            time.sleep(0.2)  # its 503 being written: the body is given back a moment later
            return "refused"
        finally:
            lease.close()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outcomes = sorted(pool.map(request, range(6)))
    assert outcomes.count("computed") >= 1 and set(outcomes) <= {"computed", "refused"}, outcomes
    assert admission.in_flight == 0
    assert time.monotonic() - started < 4.0  # the one waiting got in when the others gave back, not at its limit


def test_the_line_waits_at_most_its_limit_and_never_on_the_event_loop():
    from advserve.errors import Overloaded
    from advserve.runtime import Admission, charge_compute, compute_bytes

    admission = Admission(10_000)
    holder = admission.lease()
    holder.grow(9_000)  # never given back while the other waits
    lease = admission.lease()
    started = time.monotonic()
    with pytest.raises(Overloaded):
        lease.grow(2_000, compute=True, wait_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0

    request = AdvantageRequest("grpo", {"rewards": np.ones(4), "response_mask": np.ones((4, 8))})
    assert 1_000 < compute_bytes(request) <= 10_000  # no room now, room once the holder is gone

    async def on_the_loop():
        begun = time.monotonic()
        with pytest.raises(Overloaded):
            charge_compute(lease, request)
        return time.monotonic() - begun
    assert asyncio.run(on_the_loop()) < 0.2  # refused at once: a wait there would stall every connection
    holder.close()
    lease.close()
    assert admission.in_flight == 0


def test_the_line_sees_room_another_worker_gives_back(tmp_path):
    """--workers: admission is one budget on a shared board; bytes another worker gives back send no
    wake-up to this one, so the request at the head of its line looks again every few milliseconds."""
    from advserve.runtime import SharedAdmission
    from advserve.workers import Board

    board = Board(2, str(tmp_path / "board.lock"))
    here, other = SharedAdmission(10_000, None, board, 0), SharedAdmission(10_000, None, board, 1)
    holder = other.lease()
    holder.grow(9_000)
    threading.Timer(0.2, holder.close).start()  # the other worker's request ends
    lease = here.lease()
    started = time.monotonic()
    lease.grow(2_000, compute=True, wait_s=5.0)
    assert 0.15 <= time.monotonic() - started < 2.0
    assert here.in_flight == 2_000
    lease.close()
    assert here.in_flight == 0


def test_admission_turns_load_away_with_503_and_loses_nothing():
    # room for one request at a time: its 25 MB body and its compute (2M float32 tokens x 72 bytes, 151 MB)
    small = RunningServer("--admission-bytes", str(200 << 20))
    try:
        body, headers = big_losses_body(512, 4096)
        barrier = threading.Barrier(6)

        def send(_):
            barrier.wait()
            return httpx.post(f"{small.url}/v1/losses", content=body, headers=headers, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(send, range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            else:
                doc, tensors = framing.decode(r.content, r.headers[framing.HEADER_LENGTH])
                assert tensors["grad_logprobs"].shape == (512, 4096)
        body, headers = big_losses_body(1024, 4096)  # 50 MB body + 302 MB compute: never fits
        too_big = httpx.post(f"{small.url}/v1/losses", content=body, headers=headers, timeout=60)
        assert too_big.status_code == 413
        assert httpx.get(f"{small.url}/health/ready").status_code == 200
    finally:
        small.stop()
