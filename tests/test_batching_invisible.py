"""What else is in flight never changes a request's result, and the engine never writes into its inputs.

* Coalesced with random other requests (the scheduler's device batch), every coalescible estimator
  under every preset gives bit for bit its result alone: the bits of every float (so the signs of
  zeros too) and equal stats. Random batches: ragged rows, length-1 and empty rows, interior mask
  gaps, scattered int or string groups with singletons and ties, T not a multiple of the scan chunk,
  float32 and float64, padded and packed.
* What may not share a batch runs alone: scans (their matrix products round differently with the
  number of rows), KL terms (exp rounds differently in vector and scalar code) and batch-wide
  statistics have no coalescing key; through the scheduler every job gets its lone result.
* Results are contiguous (REST JSON refuses strided arrays: it answered 500 for the scans at T = 17).
* No estimator mutates its inputs; stats.rewards are the moments of the rewards as given (GAE and
  ORZ subtracted the values from the token rewards in place before the stats were taken).
* How the engine reads inputs: JSON null is NaN (ignored where masked), tensors of strings and
  running out of memory are a 400 and a 413 naming the tensor, and messages say how to fix a
  missing KL input, a rewards tensor of the wrong rank or a loss term's missing tensor.
"""

from __future__ import annotations

import asyncio
import itertools

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advserve import batch as batch_module
from advserve import estimators as estimators_module
from advserve.kernels import cpu as cpu_kernels
from advserve.engine import Engine
from advserve.errors import InvalidArgument, PayloadTooLarge
from advserve.estimators import ESTIMATORS
from advserve.model import AdvantageRequest, LossRequest
from advserve.presets import PRESETS
from advserve.scheduler import Scheduler
from conftest import RunningServer

ENGINE = Engine("cpu")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The IEEE bit patterns of a float tensor (torch.equal on them tells -0.0 from 0.0)."""
    return tensor.contiguous().view(torch.int64 if tensor.dtype == torch.float64 else torch.int32)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), (a - b).abs().max()


def probe(estimator: str, preset: str, params: dict) -> AdvantageRequest:
    tensors = {"rewards": [1.0, 0.0], "response_mask": [[1, 1], [1, 0]], "group_ids": [0, 0],
               "values": [[0.5, 0.1], [0.2, 0.0]], "greedy_rewards": [0.5, 0.5],
               "old_logprobs": [[-0.5, -1.0], [-0.2, 0.0]], "sum_pi_squared": [[0.5, 0.4], [0.7, 0.0]]}
    spec = ESTIMATORS[estimator]
    keep = {"rewards", "response_mask"} | spec.requires
    return AdvantageRequest(estimator, {k: v for k, v in tensors.items() if k in keep}, preset=preset, params=params)


def base_params(estimator: str) -> dict:
    """The parameters under which an estimator can coalesce at all: no KL term."""
    return {"kl_coef": 0.0} if "kl_coef" in ESTIMATORS[estimator].params else {}


COALESCIBLE = [(preset.name, name) for preset in PRESETS.values() for name in preset.estimators
               if ENGINE.prepare_advantages(probe(name, preset.name, base_params(name))).coalescing_key is not None]


def test_the_group_estimators_coalesce_under_every_preset():
    # the property below must not hold vacuously
    for preset in PRESETS.values():
        group = [name for name in ("grpo", "dr_grpo", "rloo", "dapo", "grpo_original") if name in preset.estimators]
        assert group and all((preset.name, name) in COALESCIBLE for name in group), preset.name
    assert ("paper", "reinforce") in COALESCIBLE


@pytest.mark.parametrize("estimator,params", [
    ("gae", {}), ("orz", {}), ("reinforce_rtg", {}), ("reinforce_pp", {"whiten": False}), ("remax", {}),
    ("grpo", {"kl_coef": 0.1}), ("rloo", {"whiten": True}), ("grpo", {"std_scope": "batch"}),
])
def test_what_could_round_differently_runs_alone(estimator, params):
    request = probe(estimator, "paper", params)
    if params.get("kl_coef"):
        request.tensors.update(old_logprobs=[[-1.0, -2.0], [-0.5, 0.0]], ref_logprobs=[[-1.5, -1.0], [-0.5, 0.0]])
    assert ENGINE.prepare_advantages(request).coalescing_key is None


def test_token_rewards_run_alone():
    # summed over the row, which rounds with the width
    tokens = probe("grpo", "paper", {})
    tokens.tensors["token_rewards"] = [[0.25, 0.5], [0.125, 0.0]]
    del tokens.tensors["rewards"]
    assert ENGINE.prepare_advantages(tokens).coalescing_key is None


@st.composite
def batches(draw, b_max: int = 12, t_max: int = 40) -> dict:
    """A random batch: ragged lengths with empty and length-1 rows, interior gaps, scattered groups of
    ints or strings with singletons, tied and signed-zero rewards, T from 1 to t_max (17, 33: not a
    multiple of the scan's 16)."""
    seed = draw(st.integers(0, 2**32 - 1))
    b, t = draw(st.integers(1, b_max)), draw(st.integers(1, t_max))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, size=b)
    lengths[rng.random(b) < 0.2] = 1
    mask = np.arange(t)[None, :] < lengths[:, None]
    if draw(st.booleans()):
        mask &= ~((rng.random((b, t)) < 0.25) & (np.arange(t)[None, :] < lengths[:, None] - 1))
    ties = np.array([0.0, -0.0, 1.0, 0.5, -1.0])
    rewards = np.where(rng.random(b) < 0.6, ties[rng.integers(0, len(ties), size=b)], rng.normal(size=b))
    groups = rng.integers(0, max(1, b // 2), size=b)
    group_ids = [f"prompt-{g}" for g in groups] if draw(st.booleans()) else groups.tolist()
    return {"rewards": rewards, "response_mask": mask, "group_ids": group_ids, "values": rng.normal(size=(b, t)),
            "greedy_rewards": rng.normal(size=b)}


def request_for(batch: dict, estimator: str, preset: str, params: dict, dtype: str, packed: bool) -> AdvantageRequest:
    tensors = {k: v for k, v in batch.items() if k == "rewards" or k == "response_mask"
               or k in ESTIMATORS[estimator].requires}
    layout = None
    if packed:  # each row's first L_i tokens end to end, L_i = its last valid index + 1
        mask = tensors["response_mask"]
        ends = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
        keep = np.arange(mask.shape[1])[None, :] < ends[:, None]
        tensors = {k: v[keep] if isinstance(v, np.ndarray) and v.ndim == 2 else v for k, v in tensors.items()}
        tensors["cu_seqlens"] = np.concatenate([[0], np.cumsum(ends)])
        layout = "packed"
    return AdvantageRequest(estimator, tensors, preset=preset, params=params, dtype=dtype, layout=layout)


@SETTINGS
@given(case=st.sampled_from(COALESCIBLE), target=batches(), others=st.lists(batches(), min_size=1, max_size=4),
       dtype=st.sampled_from(["float32", "float64"]), position=st.integers(0, 4), packed=st.lists(st.booleans(),
       min_size=5, max_size=5), singletons=st.sampled_from(["zero", "raw"]), clip=st.booleans())
def test_coalesced_results_are_bit_identical_to_alone(case, target, others, dtype, position, packed, singletons,
                                                       clip):
    preset, estimator = case
    params = base_params(estimator)
    if "singleton_groups" in ESTIMATORS[estimator].params:
        params["singleton_groups"] = singletons
    if clip and "reward_clip_low" in ESTIMATORS[estimator].params:
        params.update(reward_clip_low=-0.75, reward_clip_high=0.75)
    requests = [request_for(b, estimator, preset, params, dtype, p) for b, p in zip([target, *others], packed)]
    position = min(position, len(others))
    order = requests[1:position + 1] + [requests[0]] + requests[position + 1:]
    jobs = [ENGINE.prepare_advantages(r) for r in order]
    assert len({job.coalescing_key for job in jobs}) == 1 and jobs[0].coalescing_key is not None
    together = ENGINE.run_advantages(jobs)
    for request, shared in zip(order, together):
        alone = ENGINE.compute_advantages(request)
        assert shared.advantages.is_contiguous() and shared.returns.is_contiguous()
        assert_same_bits(shared.advantages, alone.advantages)
        assert_same_bits(shared.returns, alone.returns)
        assert shared.stats == alone.stats


def test_the_scheduler_coalesces_only_what_is_invisible():
    """A burst of coalescible and other jobs through the compute thread: every result is its lone
    result to the bit; the coalescible ones did share a batch, the others never did."""
    rng = np.random.default_rng(7)
    draws = []
    for i in range(12):
        b, t = int(rng.integers(2, 9)), int(rng.integers(1, 40))
        lengths = rng.integers(1, t + 1, size=b)
        batch = {"rewards": rng.normal(size=b), "response_mask": np.arange(t)[None, :] < lengths[:, None],
                 "group_ids": rng.integers(0, 3, size=b), "values": rng.normal(size=(b, t)),
                 "greedy_rewards": rng.normal(size=b)}
        estimator = ("grpo", "gae", "rloo", "reinforce_rtg")[i % 4]
        params = {"singleton_groups": "zero"} if estimator == "rloo" else {}
        draws.append(request_for(batch, estimator, "paper", params, "float32", False))
    scheduler = Scheduler(ENGINE, max_wait_s=0.2)

    async def burst():
        return await asyncio.gather(*(scheduler.advantages(ENGINE.prepare_advantages(r)) for r in draws))

    try:
        outcomes = asyncio.run(burst())
    finally:
        scheduler.close()
    for request, (result, timing) in zip(draws, outcomes):
        alone = ENGINE.compute_advantages(request)
        assert_same_bits(result.advantages, alone.advantages)
        assert_same_bits(result.returns, alone.returns)
        assert result.stats == alone.stats
        if request.estimator in ("gae", "reinforce_rtg"):
            assert timing.coalesced == 1
    assert max(timing.coalesced for request, (_, timing) in zip(draws, outcomes) if request.estimator == "grpo") > 1


# --- contiguity over REST JSON ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    running = RunningServer("--max-wait-ms", "200")
    yield running
    running.stop()


@pytest.mark.parametrize("estimator", ["reinforce_rtg", "reinforce_pp", "remax", "gae", "orz"])
def test_scans_at_t_17_answer_over_rest_json(server, estimator):
    # padded, B = 2, T = 17: the scan's result was a strided view and the JSON encoder answered 500
    mask = np.ones((2, 17), bool)
    mask[1, 9:] = False
    tensors = {"rewards": [1.0, 0.5], "response_mask": mask.tolist(), "values": np.linspace(0, 1, 34).reshape(2, 17)
               .tolist(), "greedy_rewards": [0.25, 0.75]}
    tensors = {k: v for k, v in tensors.items() if k in {"rewards", "response_mask"} | ESTIMATORS[estimator].requires}
    response = httpx.post(f"{server.url}/v1/advantages", json={"estimator": estimator, "tensors": tensors},
                          timeout=60)
    assert response.status_code == 200, response.text
    alone = ENGINE.compute_advantages(AdvantageRequest(estimator, tensors))
    np.testing.assert_array_equal(np.array(response.json()["tensors"]["advantages"], np.float32),
                                  alone.advantages.numpy())


def test_a_coalesced_burst_of_different_widths_answers_over_rest_json(server):
    rng = np.random.default_rng(3)
    bodies = []
    for width in (3, 17, 33, 5, 40, 1):
        b = 4
        mask = np.arange(width)[None, :] < rng.integers(1, width + 1, size=b)[:, None]
        bodies.append({"estimator": "grpo", "tensors": {"rewards": rng.normal(size=b).tolist(),
                                                         "response_mask": mask.tolist(),
                                                         "group_ids": ["a", "b", "a", "b"]}})

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/advantages", json=body) for body in bodies))

    for body, response in zip(bodies, asyncio.run(burst())):
        assert response.status_code == 200, response.text
        alone = ENGINE.compute_advantages(AdvantageRequest("grpo", body["tensors"]))
        np.testing.assert_array_equal(np.array(response.json()["tensors"]["advantages"], np.float32),
                                      alone.advantages.numpy())


# --- inputs are never written, stats are of the inputs -------------------------------------------------


@pytest.mark.parametrize("estimator", ["gae", "orz"])
def test_stats_rewards_are_the_token_rewards_given(estimator):
    # rewards 1 and 2 (one token each), non-zero values: mean 1.5 and population std 0.5
    tensors = {"token_rewards": [[0.0, 1.0], [2.0, 0.0]], "values": [[0.3, 0.2], [0.1, 0.0]],
               "response_mask": [[1, 1], [1, 0]]}
    result = ENGINE.compute_advantages(AdvantageRequest(estimator, tensors, dtype="float64"))
    assert result.stats["rewards"] == {"mean": 1.5, "std": 0.5}


CASES = [(preset.name, name) for preset in PRESETS.values() for name in preset.estimators]


@pytest.mark.parametrize("preset,estimator", CASES)
def test_no_estimator_writes_into_its_inputs(preset, estimator):
    """The caller's tensors (torch, in the compute dtype: nothing is copied on the way in) and the
    validated batch read the same after the call, with and without KL, with outcome and token rewards."""
    rng = np.random.default_rng(11)
    b, t = 6, 19
    mask = torch.as_tensor(np.arange(t)[None, :] < rng.integers(1, t + 1, size=(b, 1)))
    mask[2, 3] = False  # an interior gap
    spec = ESTIMATORS[estimator]
    for rewards in ("rewards", "token_rewards"):
        tensors = {
            "rewards": torch.as_tensor(rng.normal(size=b)),
            "token_rewards": torch.as_tensor(rng.normal(size=(b, t))) * mask,
            "response_mask": mask,
            "group_ids": torch.as_tensor(np.array([0, 0, 1, 1, 2, 2])),
            "values": torch.as_tensor(rng.normal(size=(b, t))) * mask,
            "greedy_rewards": torch.as_tensor(rng.normal(size=b)),
            "old_logprobs": -torch.as_tensor(rng.random((b, t))) * mask,
            "ref_logprobs": -torch.as_tensor(rng.random((b, t))) * mask,
            "sum_pi_squared": torch.as_tensor(rng.random((b, t))) * mask,
            "rollout_is_weights": torch.as_tensor(rng.random((b, t))) * mask,
        }
        keep = {rewards, "response_mask"} | spec.requires | spec.optional
        tensors = {k: v for k, v in tensors.items() if k in keep}
        params = {"kl_coef": 0.1} if "kl_coef" in spec.params else {}
        given = {k: v.clone() for k, v in tensors.items()}
        job = ENGINE.prepare_advantages(AdvantageRequest(estimator, tensors, preset=preset, params=params,
                                                         dtype="float64"))
        validated = {k: v.clone() for k, v in job.batch.tensors.items()}
        result = ENGINE.run_advantages([job])[0]
        result.stats  # noqa: B018 - the stats read the batch after the estimator ran
        for name, before in given.items():
            assert torch.equal(tensors[name], before), (rewards, name)
        for name, before in validated.items():
            assert_same_bits(job.batch.tensors[name], before)


# --- how the engine reads what it is given ----------------------------------------------------------------


def test_json_null_reads_as_nan_ignored_where_masked(server):
    """The client's JSON mode sends NaN as null: masked nulls are ignored like binary NaN, unmasked ones
    get binary NaN's 400."""
    mask = [[1, 1, 0], [1, 0, 0]]
    nulls = {"token_rewards": [[0.5, 1.0, None], [2.0, None, None]], "values": [[0.1, 0.2, None], [0.3, None, 0.0]],
             "response_mask": mask}
    zeros = {name: [[0.0 if v is None else v for v in row] for row in rows] for name, rows in nulls.items()}
    with_nulls, with_zeros = (ENGINE.compute_advantages(AdvantageRequest("gae", t)) for t in (nulls, zeros))
    assert_same_bits(with_nulls.advantages, with_zeros.advantages)
    assert_same_bits(with_nulls.returns, with_zeros.returns)
    over_rest = httpx.post(f"{server.url}/v1/advantages", json={"estimator": "gae", "tensors": nulls}, timeout=60)
    assert over_rest.status_code == 200, over_rest.text
    np.testing.assert_array_equal(np.array(over_rest.json()["tensors"]["advantages"], np.float32),
                                  with_zeros.advantages.numpy())

    unmasked = dict(nulls, values=[[0.1, None, 0.0], [0.3, 0.0, 0.0]])
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_advantages(AdvantageRequest("gae", unmasked))
    assert err.value.field == "tensors.values" and "NaN or Inf on an unmasked position" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_advantages(AdvantageRequest("grpo", {"rewards": [1.0, None], "response_mask": [[1], [1]],
                                                            "group_ids": [0, 0]}))
    assert err.value.field == "tensors.rewards" and "NaN" in str(err.value)


@pytest.mark.parametrize("name,value", [
    ("response_mask", [["a"], ["b"]]),
    ("rewards", ["1", "0"]),
    ("values", np.array([["0.5"], ["1"]])),
])
def test_tensors_of_strings_are_a_400_in_plain_words(server, name, value):
    tensors = {"rewards": [1.0, 0.0], "response_mask": [[1], [1]], "values": [[0.5], [0.25]], name: value}
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_advantages(AdvantageRequest("orz", tensors))
    assert err.value.field == f"tensors.{name}" and str(err.value).endswith("must be numeric, got strings")
    as_json = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    response = httpx.post(f"{server.url}/v1/advantages", json={"estimator": "orz", "tensors": as_json}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["field"] == f"tensors.{name}"


def test_running_out_of_memory_is_a_413_naming_the_tensor(monkeypatch):
    tensors = {"rewards": [1.0, 0.0], "response_mask": [[1, 1], [1, 0]], "values": [[0.5, 0.1], [0.2, 0.0]]}

    def no_memory_for_values(name, *args):
        if name == "values":
            raise MemoryError
        return real_numeric(name, *args)

    real_numeric = batch_module._numeric
    with monkeypatch.context() as patch:
        patch.setattr(batch_module, "_numeric", no_memory_for_values)
        with pytest.raises(PayloadTooLarge) as err:
            ENGINE.compute_advantages(AdvantageRequest("gae", tensors))
        assert err.value.field == "tensors.values"
    with monkeypatch.context() as patch:
        patch.setattr(batch_module, "_group_index", lambda *args: (_ for _ in ()).throw(MemoryError()))
        with pytest.raises(PayloadTooLarge) as err:
            ENGINE.compute_advantages(AdvantageRequest("grpo", {"rewards": [1.0, 0.0], "response_mask": [[1], [1]],
                                                                "group_ids": ["a", "a"]}))
        assert err.value.field == "tensors.group_ids"
    with monkeypatch.context() as patch:  # and while computing, on the torch path
        patch.setattr(estimators_module, "gae", lambda *args: (_ for _ in ()).throw(MemoryError()))
        with pytest.raises(PayloadTooLarge) as err:
            Engine("cpu", kernels="torch").compute_advantages(AdvantageRequest("gae", tensors))
        assert err.value.field == "tensors.response_mask"
    with monkeypatch.context() as patch:  # and in the numba kernel's pass (validation and scan in one)
        patch.setattr(cpu_kernels, "scan", lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError()))
        with pytest.raises(PayloadTooLarge) as err:
            Engine("cpu", kernels="numba").compute_advantages(AdvantageRequest("gae", tensors))
        assert err.value.field == "tensors.response_mask"


def test_a_preset_default_kl_coef_says_so_and_how_to_do_without():
    tensors = {"rewards": [1.0, 0.0], "response_mask": [[1], [1]], "group_ids": [0, 0]}
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_advantages(AdvantageRequest("grpo", tensors, preset="openrlhf"))
    message = str(err.value)
    assert err.value.field == "tensors.old_logprobs"
    assert "kl_coef 0.01 > 0 (the default of preset 'openrlhf')" in message and "params.kl_coef = 0" in message
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_advantages(AdvantageRequest("grpo", tensors, preset="openrlhf", params={"kl_coef": 0.5}))
    assert "kl_coef 0.5 > 0 needs" in str(err.value) and "default" not in str(err.value)


def test_shape_hints_point_to_the_other_rewards_tensor():
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_advantages(AdvantageRequest("gae", {"rewards": [[1.0, 0.0]], "response_mask": [[1, 1]],
                                                           "values": [[0.0, 0.0]]}))
    assert err.value.field == "tensors.rewards" and "'token_rewards'" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_advantages(AdvantageRequest("gae", {"token_rewards": [1.0], "response_mask": [[1, 1]],
                                                           "values": [[0.0, 0.0]]}))
    assert err.value.field == "tensors.token_rewards" and "'rewards'" in str(err.value)


def test_a_missing_loss_tensor_names_the_term_that_needs_it():
    mask = np.ones((2, 3), bool)
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_losses(LossRequest(policy_loss={"mode": "ppo_clip"}, tensors={
            "logprobs": -np.ones((2, 3)), "advantages": np.ones((2, 3)), "response_mask": mask}))
    assert err.value.field == "tensors.old_logprobs"
    assert str(err.value).startswith("policy_loss (ppo_clip) needs tensor 'old_logprobs'")
    with pytest.raises(InvalidArgument) as err:
        ENGINE.compute_losses(LossRequest(policy_loss=False, kl_loss={"unbiased_gradient": True}, tensors={
            "logprobs": -np.ones((2, 3)), "ref_logprobs": -np.ones((2, 3)), "response_mask": mask}))
    assert str(err.value).startswith("kl_loss (with unbiased_gradient) needs tensor 'old_logprobs'")


def test_a_mismatch_names_the_odd_tensor_whatever_the_order():
    """Every transport orders tensors its own way: the tensor named is the one the others disagree with
    (response_mask's size wins a tie), not whichever came second."""
    good = {"rewards": [1.0, 0.0], "response_mask": [[1], [1]], "group_ids": [0, 0]}
    odd_ones = {"rewards": [1.0, 0.0, 1.0], "response_mask": [[1]] * 3, "group_ids": [0, 0, 1]}
    for name, odd in odd_ones.items():
        for order in itertools.permutations(good):
            tensors = {n: odd if n == name else good[n] for n in order}
            with pytest.raises(InvalidArgument) as err:
                ENGINE.compute_advantages(AdvantageRequest("grpo", tensors))
            assert err.value.field == f"tensors.{name}", (order, str(err.value))
    for order in (("rewards", "response_mask"), ("response_mask", "rewards")):
        tensors = {"rewards": [1.0, 0.0], "response_mask": [[1]]}
        with pytest.raises(InvalidArgument) as err:
            ENGINE.compute_advantages(AdvantageRequest("reinforce", {n: tensors[n] for n in order}))
        assert err.value.field == "tensors.rewards"
