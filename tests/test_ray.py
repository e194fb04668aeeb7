"""advserve on Ray Serve (advserve.ray, docs/deploy.md): one Ray start and one application for the module,
two replicas of the AdvServe deployment built from deploy/ray/serve_config.yaml (its import path, args and
deployment options; two fixed replicas of a quarter CPU instead of its autoscaling).

* every estimator/preset pair of the catalog and every loss mode/preset through `RayClient` is the
  in-process result bit for bit (tensors, statistics, parameters), on read-only numpy inputs (what the
  object store hands a replica), and torch in gives torch out;
* invalid requests raise the `advserve_client.errors` class and field the in-process API raises, never a
  Ray exception;
* a batch sharded across the replicas (`shards=k`) equals the one call: GRPO, RLOO, GAE and REINFORCE++
  with whitening bit for bit; a seq-mean loss's gradients bit for bit, its loss to the last bits;
* Serve's HTTP proxy answers REST as `advserve serve`'s app does (auth included), and the stock
  tritonclient.grpc works against Serve's gRPC proxy;
* a replica killed under load loses no request (the client retries `Unavailable` on the other replica).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advserve
import advserve_client
import advserve_client._retry
from advserve_client import errors as client_errors
from conftest import ROOT
from advserve.testing import free_port, start_local_ray

sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_transports as fz  # noqa: E402

import ray  # noqa: E402 - advserve[ray], in the test extra
from ray import serve  # noqa: E402
from ray.serve.config import gRPCOptions  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from advserve.ray import RayClient, build_app, sharding  # noqa: E402
from advserve.ray.deployment import AdvServe, Options, deployment  # noqa: E402

CONFIG = ROOT / "deploy" / "ray" / "serve_config.yaml"
TOKEN = "ray-test-token"


def _config() -> ServeDeploySchema:
    # Serve's schemas are pydantic v2 models in Ray 2.55 and later, pydantic.v1 ones (parse_obj) in 2.41-2.43
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    return validate(yaml.safe_load(CONFIG.read_text()))


@pytest.fixture(scope="module")
def cluster():
    """Ray (2 CPUs, no dashboard), Serve's proxies on free ports, the application of the config file
    with two replicas; its settings as the file gives them plus a bearer token for the ingress."""
    config = _config()
    app = config.applications[0]
    spec = app.deployments[0]
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port,
                                         grpc_servicer_functions=config.grpc_options.grpc_servicer_functions))
    settings = {**app.args["settings"], "auth_token": TOKEN}
    options = Options(num_replicas=2, num_cpus=0.25, max_ongoing_requests=spec.max_ongoing_requests,
                      max_queued_requests=spec.max_queued_requests)
    serve.run(deployment(options).bind(settings), name=app.name, route_prefix=app.route_prefix)
    try:
        yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "app": app.name,
               "settings": settings}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return RayClient(cluster["app"], timeout=60.0)


def read_only(tensors: dict) -> dict:
    """The tensors as read-only numpy arrays (lists as they are): what a replica gets from the object store."""
    out = {}
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            value = value.copy()
            value.setflags(write=False)
        out[name] = value
    return out


def through(client: RayClient, case: fz.Case) -> fz.Outcome:
    """The case through the RayClient, as an Outcome (an error: its code and field)."""
    doc = dict(case.document)
    try:
        if case.kind == "advantages":
            result = client.compute_advantages(doc.pop("estimator"), **doc, **case.tensors)
        else:
            result = client.compute_losses(**doc, **case.tensors)
    except client_errors.AdvserveError as exc:
        return fz.Outcome(error=(exc.code, exc.field), status=None, message=str(exc))
    return fz._result_outcome(case.kind, result)


def same_as_in_process(client: RayClient, case: fz.Case) -> fz.Outcome:
    case.tensors = read_only(case.tensors)
    before = {name: v.copy() for name, v in case.tensors.items() if isinstance(v, np.ndarray)}
    expected = fz.in_process(case)
    got = through(client, case)
    found = fz.differences(expected, got)
    assert not found, f"{case.repro()}\nin process: {expected.brief()}\nray: {got.brief()}\n" + "; ".join(found[:4])
    for name, value in before.items():  # nothing wrote into the inputs
        assert value.dtype == case.tensors[name].dtype and value.tobytes() == case.tensors[name].tobytes(), name
    return expected


# --- the handle: the in-process function, bit for bit -------------------------------------------------


def test_every_estimator_and_preset_is_the_in_process_result(client):
    outcomes = []
    for index, (estimator, preset) in enumerate(fz.estimator_presets()):
        for seed in (index, 1000 + index):
            draw = fz.RandomDraw(seed)
            case = fz.valid_case(draw, lambda: fz.advantage_case(draw, estimator, preset))
            outcomes.append(same_as_in_process(client, case))
    # results compared, not only agreeing errors (the fuzzer's generator cannot yet draw a valid batch for
    # verl's optimal_token_baseline pair: it sends no old_logprobs; those cases compare the error)
    assert sum(o.error is None for o in outcomes) >= 0.9 * len(outcomes)


def test_every_loss_mode_and_preset_is_the_in_process_result(client):
    outcomes = []
    for index, (mode, preset) in enumerate((m, p) for m in (*fz.MODES, None) for p in fz.PRESETS):
        for seed in (index, 2000 + index):
            draw = fz.RandomDraw(seed)
            outcomes.append(same_as_in_process(client, fz.valid_case(draw, lambda: fz.loss_case(draw, mode, preset))))
    assert sum(o.error is None for o in outcomes) >= 0.95 * len(outcomes)


def test_invalid_requests_raise_the_in_process_error_and_field(client):
    codes = {}
    for index, variant in enumerate(fz.INVALID):
        case = fz.invalid_case(fz.RandomDraw(3000 + index), variant)
        expected = same_as_in_process(client, case)
        codes[variant] = expected.error
    assert codes["unknown_estimator"] == ("not_found", "estimator")
    assert codes["nan_unmasked"][0] == "invalid_argument" and codes["nan_unmasked"][1].startswith("tensors.")


def test_errors_are_the_clients_typed_errors_not_ray_exceptions(client):
    mask = np.ones((2, 3), bool)
    with pytest.raises(client_errors.InvalidArgument) as caught:
        client.compute_advantages("grpo", rewards=np.array([1.0, 0.0]), response_mask=mask)
    assert caught.value.field == "tensors.group_ids" and type(caught.value).__module__ == "advserve_client.errors"
    with pytest.raises(client_errors.NotFound) as caught:
        client.compute_advantages("nope", rewards=np.array([1.0, 0.0]), response_mask=mask)
    assert caught.value.field == "estimator"
    with pytest.raises(client_errors.InvalidArgument) as caught:  # refused in the client, as Client does
        client.compute_advantages("grpo", rewards=np.array([1.0, 0.0]), response_mask=mask, group_ids=[1, "1"])
    assert caught.value.field == "tensors.group_ids"


def test_torch_in_torch_out_and_analysis(client):
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=torch.float64)
    tensors = dict(logprobs=logp, old_logprobs=logp + 0.1 * torch.randn(4, 5, dtype=torch.float64),
                   advantages=torch.randn(4, 5, dtype=torch.float64), response_mask=torch.ones(4, 5, dtype=torch.bool))
    got = client.compute_losses(preset="verl", **tensors)
    expected = advserve.compute_losses(preset="verl", **tensors)
    assert isinstance(got, advserve_client.LossResult) and isinstance(got.grad_logprobs, torch.Tensor)
    assert torch.equal(got.grad_logprobs, expected.grad_logprobs) and got.loss == expected.loss
    batch = dict(rewards=np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), response_mask=np.ones((6, 4), bool),
                 group_ids=np.array([0, 0, 0, 1, 1, 1]))
    assert client.analyze(["grpo", "rloo"], **batch) == advserve.analyze(["grpo", "rloo"], **batch)
    assert client.list_estimators() == advserve.catalog()


def test_rays_own_failures_become_the_clients_typed_errors():
    """What Ray raises around a call (the replica's own errors come back as data) and what it becomes."""
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    from advserve.ray.client import _ray_error

    cases = [(sex.BackPressureError(num_queued_requests=8, max_queued_requests=8), client_errors.Overloaded),
             (rex.ActorDiedError(), client_errors.Unavailable),
             (rex.ActorUnavailableError("gone", None), client_errors.Unavailable),
             (sex.DeploymentUnavailableError("advserve"), client_errors.Unavailable),
             (rex.GetTimeoutError("slow"), client_errors.DeadlineExceeded),
             (TimeoutError(), client_errors.DeadlineExceeded),
             (rex.RayTaskError("compute", "traceback", ValueError("bug")), client_errors.InternalError)]
    for raised, expected in cases:
        error = _ray_error(raised, 5.0)
        assert type(error) is expected, (raised, error)
    assert _ray_error(cases[0][0], 5.0).retry_after == 1.0
    policy = advserve_client.RetryPolicy()
    assert policy.should_retry(_ray_error(cases[1][0], 5.0), 0)
    assert not policy.should_retry(_ray_error(cases[-1][0], 5.0), 0)


def test_calls_reach_both_replicas(client):
    pids = {client.handle.pid.remote().result() for _ in range(40)}
    assert len(pids) == 2


# --- sharding: one batch across the replicas ---------------------------------------------------------


def _grouped_batch(seed: int, b: int = 24, t: int = 37):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, b)
    mask = np.arange(t) < lengths[:, None]
    groups = rng.permutation(np.repeat(np.arange(b // 4), 4))  # groups scattered through the batch
    return rng, mask, groups


@pytest.mark.parametrize("estimator,params", [
    ("grpo", {}),
    ("rloo", {"whiten": True}),
    ("gae", {"whiten": True}),
    ("reinforce_pp", {"whiten": True}),
    ("dr_grpo", {}),
    ("grpo", {"std_scope": "batch"}),
    ("rloo", {"whiten": True, "whiten_scope": "sequence"}),
])
def test_a_sharded_batch_is_the_one_call_result_bit_for_bit(cluster, estimator, params):
    rng, mask, groups = _grouped_batch(7)
    b, t = mask.shape
    tensors = dict(rewards=rng.integers(0, 2, b).astype(np.float64), response_mask=mask, group_ids=groups)
    if estimator in ("gae",):
        tensors["values"] = rng.standard_normal((b, t)) * mask
    if estimator in ("reinforce_pp", "gae"):
        del tensors["group_ids"]
    one = advserve.compute_advantages(estimator, params=params, dtype="float64", **tensors)
    prepared = advserve.Engine("cpu").prepare_advantages(
        advserve.AdvantageRequest(estimator, tensors, params=params, dtype="float64"))
    two_pass = params.get("whiten") and params.get("whiten_scope") != "sequence"
    assert sharding.plan(prepared, 2).mode == ("two_pass" if two_pass else "rows")
    for shards in (2, 3):
        sharded = RayClient(cluster["app"], shards=shards).compute_advantages(estimator, params=params,
                                                                              dtype="float64", **tensors)
        assert np.array_equal(sharded.advantages, one.advantages) and np.array_equal(sharded.returns, one.returns)
        assert sharded.advantages.tobytes() == one.advantages.tobytes()  # signed zeros too
        assert sharded.stats == one.stats and sharded.params == one.params


def test_a_sharded_call_raises_the_one_calls_errors(cluster):
    sharded = RayClient(cluster["app"], shards=2)
    rng, mask, groups = _grouped_batch(13)
    b, t = mask.shape
    bad_rewards = rng.random(b)
    bad_rewards[3] = np.nan
    logp = rng.standard_normal((b, t)) * mask
    bad_logp = logp.copy()
    bad_logp[np.nonzero(mask)[0][-1], 0] = np.inf  # at an unmasked position of the last shard's rows
    requests = [
        ("advantages", dict(estimator="grpo", rewards=rng.random(b), response_mask=mask)),  # no group_ids
        ("advantages", dict(estimator="grpo", rewards=bad_rewards, response_mask=mask, group_ids=groups)),
        ("advantages", dict(estimator="rloo", rewards=rng.random(b), response_mask=mask, group_ids=groups,
                            params={"whiten": True, "gamma": 0.5})),
        ("losses", dict(logprobs=bad_logp, old_logprobs=logp, advantages=logp, response_mask=mask)),
        ("losses", dict(logprobs=logp, old_logprobs=logp, advantages=logp, response_mask=mask, num_tokens=5.0,
                        policy_loss={"agg": "seq-mean-token-sum"})),
    ]
    for kind, request in requests:
        request = dict(request)
        if kind == "advantages":
            estimator = request.pop("estimator")
            call, local = (lambda c: c.compute_advantages(estimator, **request),
                           lambda: advserve.compute_advantages(estimator, **request))
        else:
            call, local = (lambda c: c.compute_losses(**request), lambda: advserve.compute_losses(**request))
        with pytest.raises(advserve.AdvserveError) as expected:
            local()
        with pytest.raises(client_errors.AdvserveError) as got:
            call(sharded)
        assert (got.value.code, got.value.field) == (expected.value.code, expected.value.field), request.keys()
        assert type(got.value).__name__ == type(expected.value).__name__


def test_the_sharding_plan_keeps_groups_whole_and_whitening_in_two_passes():
    rng, mask, groups = _grouped_batch(11, b=40)
    engine = advserve.Engine("cpu")
    request = advserve.AdvantageRequest("rloo", {"rewards": rng.random(40), "response_mask": mask, "group_ids": groups},
                                        params={"whiten": True})
    plan = sharding.plan(engine.prepare_advantages(request), 3)
    assert plan.mode == "two_pass" and len(plan.shards) == 3
    assert sorted(np.concatenate(plan.shards).tolist()) == list(range(40))
    owner = {int(g): k for k, rows in enumerate(plan.shards) for g in groups[rows]}
    assert all(owner[int(g)] == k for k, rows in enumerate(plan.shards) for g in groups[rows])  # never split
    batch_std = advserve.AdvantageRequest("grpo", request.tensors, params={"std_scope": "batch"}, preset="trl")
    plan = sharding.plan(engine.prepare_advantages(batch_std), 3)
    assert plan.mode == "rows" and set(plan.statistics) == {"score_std"}
    plain = advserve.AdvantageRequest("grpo", request.tensors)
    plan = sharding.plan(engine.prepare_advantages(plain), 3)
    assert plan.mode == "rows" and plan.statistics == {}


# --- batch-wide statistics: every shard computed with the whole batch's ------------------------------


class _Done:
    """A finished call, as a DeploymentResponse answers it."""

    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value


class InProcessHandle:
    """A DeploymentHandle over one AdvServe replica in this process: its `compute` as Serve calls it, the
    numpy inputs read-only (as the object store gives them), so the sharding's math is checked on many
    batches without Ray's per-call cost."""

    def __init__(self):
        replica = AdvServe({})
        handle = self

        class Compute:
            @staticmethod
            def remote(kind, document, tensors):
                handle.calls += 1
                return _Done(asyncio.run(replica.compute(kind, document, read_only(tensors))))

        self.compute = Compute()
        self.calls = 0


# (estimator, preset, params): every estimator with batch-wide statistics, in the forms the presets give
STATISTICS_CASES = [
    ("grpo", "verl", {"std_scope": "batch"}),
    ("grpo", "trl", {"std_scope": "batch"}),
    ("grpo", "verl", {"std_scope": "batch", "kl_coef": 0.05, "kl_placement": "sequence"}),
    ("grpo", "paper", {"std_scope": "batch", "kl_coef": 0.05, "kl_placement": "token"}),
    ("grpo_original", "paper", {"std_scope": "batch"}),
    ("dapo", "paper", {"std_scope": "batch"}),
    ("rloo", "trl", {"whiten": True, "whiten_scope": "sequence", "singleton_groups": "raw"}),
    ("rloo", "openrlhf", {"whiten": True, "whiten_scope": "sequence", "kl_coef": 0.05, "kl_placement": "sequence",
                          "singleton_groups": "zero"}),
    ("rloo", "paper", {"whiten": True, "whiten_scope": "sequence", "whiten_std": False, "singleton_groups": "zero"}),
    ("flash_reinforce", "openrlhf", {}),
    ("flash_reinforce", "openrlhf", {"kl_coef": 0.05}),
    ("gpg", "verl", {}),
    ("gdpo", "verl", {"std_scope": "batch"}),  # and its token whitening, in two passes
]


@pytest.fixture(scope="module")
def in_process_handle():
    return InProcessHandle()


def _statistics_batch(seed: int, estimator: str) -> dict:
    """A ragged batch: rows of 0..T valid tokens with interior gaps, groups of 1..5 members scattered
    through it, tied rewards, KL inputs (read when the preset's or the params' kl_coef > 0)."""
    rng = np.random.default_rng(seed)
    b, t = int(rng.integers(2, 30)), int(rng.integers(1, 12))
    mask = (np.arange(t) < rng.integers(0, t + 1, b)[:, None]) & (rng.random((b, t)) < 0.9)
    tensors = {"rewards": rng.integers(0, 3, b) * rng.choice([0.5, 1.0, 1.3], b), "response_mask": mask}
    if estimator != "flash_reinforce":
        tensors["group_ids"] = rng.integers(0, max(b // 3, 1), b)
    tensors["old_logprobs"] = -rng.random((b, t)) * mask
    tensors["ref_logprobs"] = -rng.random((b, t)) * mask
    return tensors


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(STATISTICS_CASES), seed=st.integers(0, 2**32 - 1), shards=st.integers(2, 5),
       dtype=st.sampled_from(["float32", "float64"]))
def test_batch_statistics_make_a_sharded_batch_the_one_call_result(in_process_handle, case, seed, shards, dtype):
    estimator, preset, params = case
    tensors = _statistics_batch(seed, estimator)
    try:
        one = advserve.compute_advantages(estimator, preset=preset, params=params, dtype=dtype, **tensors)
    except advserve.AdvserveError as refused:  # e.g. a preset's singleton_groups 'error': refused the same way
        with pytest.raises(client_errors.AdvserveError) as got:
            RayClient(handle=in_process_handle, shards=shards).compute_advantages(
                estimator, preset=preset, params=params, dtype=dtype, **tensors)
        assert (got.value.code, got.value.field) == (refused.code, refused.field)
        return
    prepared = advserve.Engine("cpu").prepare_advantages(
        advserve.AdvantageRequest(estimator, tensors, preset=preset, params=params, dtype=dtype))
    plan = sharding.plan(prepared, shards)
    assert plan.mode != "whole" or len(plan.shards) == 1  # whole only when the groups leave one shard
    assert plan.mode == "whole" or plan.statistics  # sent with the shards, not taken from each shard's rows
    calls = in_process_handle.calls
    sharded = RayClient(handle=in_process_handle, shards=shards).compute_advantages(
        estimator, preset=preset, params=params, dtype=dtype, **tensors)
    assert in_process_handle.calls - calls == len(plan.shards)
    assert sharded.advantages.tobytes() == one.advantages.tobytes(), case  # bit for bit, signed zeros too
    assert sharded.returns.tobytes() == one.returns.tobytes() and sharded.stats == one.stats


def test_a_shards_statistics_are_checked_by_name_shape_and_value():
    engine = advserve.Engine("cpu")
    tensors = _statistics_batch(3, "grpo")
    prepared = engine.prepare_advantages(advserve.AdvantageRequest("grpo", tensors, params={"std_scope": "batch"}))
    assert set(engine.as_shard(prepared, {"score_std": 0.5}).statistics) == {"score_std"}
    for statistics, field in [({}, "batch_statistics"), ({"score_std": 0.5, "alpha": 2.0}, "batch_statistics"),
                              ({"score_std": float("nan")}, "batch_statistics.score_std"),
                              ({"score_std": [0.5, 0.5]}, "batch_statistics.score_std"),
                              ({"score_std": "wide"}, "batch_statistics.score_std"), ([0.5], "batch_statistics")]:
        with pytest.raises(advserve.AdvserveError) as info:
            engine.as_shard(prepared, statistics)
        assert info.value.field == field, statistics
    plain = engine.prepare_advantages(advserve.AdvantageRequest("grpo", tensors))
    with pytest.raises(advserve.AdvserveError, match="none"):
        engine.as_shard(plain, {"score_std": 0.5})


def test_a_sharded_seq_mean_loss_has_the_one_call_gradients(cluster):
    rng = np.random.default_rng(5)
    b, t = 21, 30
    mask = np.arange(t) < rng.integers(0, t + 1, b)[:, None]
    logp = rng.standard_normal((b, t)) * mask
    tensors = dict(logprobs=logp, old_logprobs=logp + 0.2 * rng.standard_normal((b, t)) * mask,
                   advantages=rng.standard_normal((b, t)) * mask, response_mask=mask,
                   ref_logprobs=logp + 0.1 * rng.standard_normal((b, t)) * mask,
                   entropy=rng.random((b, t)) * mask)
    kwargs = dict(preset="verl", policy_loss={"agg": "seq-mean-token-mean"}, kl_loss={"coef": 0.1},
                  entropy_bonus={"coef": 0.01}, dtype="float64")
    one = advserve.compute_losses(**kwargs, **tensors)
    for shards in (2, 3):
        got = RayClient(cluster["app"], shards=shards).compute_losses(**kwargs, **tensors)
        assert got.grad_logprobs.tobytes() == one.grad_logprobs.tobytes()
        assert got.grad_entropy.tobytes() == one.grad_entropy.tobytes()
        assert got.loss == pytest.approx(one.loss, rel=1e-14, abs=1e-15)
        for name, value in one.components.items():
            assert (got.components[name] is None) == (value is None)
            if value is not None:
                assert got.components[name] == pytest.approx(value, rel=1e-14, abs=1e-15)
        assert got.metrics.keys() == one.metrics.keys()
        for name, value in one.metrics.items():
            assert got.metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
        assert got.params == one.params


# --- Serve's HTTP and gRPC ingress ------------------------------------------------------------------


def test_the_http_ingress_answers_as_advserve_serve(cluster):
    from fastapi.testclient import TestClient

    from advserve.config import Settings
    from advserve.runtime import Runtime
    from advserve.server import create_app

    body = {"estimator": "grpo", "preset": "verl", "tensors": {"rewards": [1, 0, 0, 1],
            "response_mask": [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], "group_ids": ["q1", "q1", "q2", "q2"]}}
    auth = {"authorization": f"Bearer {TOKEN}"}
    runtime = Runtime.build(Settings(device="cpu", auth_token=TOKEN))
    try:
        with TestClient(create_app(runtime)) as local:
            expected = local.post("/v1/advantages", json=body, headers=auth)
            refused = local.post("/v1/advantages", json=body)
            bad = local.post("/v1/advantages", json={**body, "estimator": "nope"}, headers=auth)
    finally:
        runtime.close()
    got = httpx.post(f"{cluster['http']}/v1/advantages", json=body, headers=auth, timeout=30)
    assert got.status_code == expected.status_code == 200 and got.content == expected.content
    no_token = httpx.post(f"{cluster['http']}/v1/advantages", json=body, timeout=30)
    assert no_token.status_code == refused.status_code == 401 and no_token.json() == refused.json()
    unknown = httpx.post(f"{cluster['http']}/v1/advantages", json={**body, "estimator": "nope"}, headers=auth,
                         timeout=30)
    assert unknown.status_code == 404 and unknown.json() == bad.json()
    with advserve_client.Client(cluster["http"], headers=auth) as rest:  # the binary framing through the proxy
        framed = rest.compute_advantages("gae", rewards=np.array([1.0, 0.5]), values=np.zeros((2, 4)),
                                         response_mask=np.ones((2, 4), bool), dtype="float64")
        rng = np.random.default_rng(3)  # a body past 256 KiB: sent as views of the arrays (memoryviews)
        batch = dict(logprobs=rng.standard_normal((64, 1024)), old_logprobs=rng.standard_normal((64, 1024)),
                     advantages=rng.standard_normal((64, 1024)), response_mask=np.ones((64, 1024), bool))
        large = rest.compute_losses(preset="verl", **batch)
    assert np.array_equal(framed.advantages, advserve.compute_advantages(
        "gae", rewards=np.array([1.0, 0.5]), values=np.zeros((2, 4)), response_mask=np.ones((2, 4), bool),
        dtype="float64").advantages)
    assert large.grad_logprobs.tobytes() == advserve.compute_losses(preset="verl", **batch).grad_logprobs.tobytes()


def test_tritonclient_against_serves_grpc_proxy(cluster):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    triton = grpcclient.InferenceServerClient(cluster["grpc"])
    assert triton.is_server_live()
    rewards, mask = np.array([1, 0, 0, 1], np.float32), np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
    ids = np.array([0, 0, 1, 1], np.int64)
    inputs = []
    for name, array in (("rewards", rewards), ("response_mask", mask), ("group_ids", ids)):
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    auth = {"authorization": f"Bearer {TOKEN}"}
    result = triton.infer("grpo", inputs, headers=auth)
    expected = advserve.compute_advantages("grpo", rewards=rewards, response_mask=mask, group_ids=ids)
    assert result.as_numpy("advantages").tobytes() == expected.advantages.tobytes()
    assert triton.get_model_metadata("losses", headers=auth).name == "losses"
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("nope", inputs, headers=auth)
    assert "NOT_FOUND" in str(caught.value.status()) and "model_name" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("grpo", inputs)
    assert "UNAUTHENTICATED" in str(caught.value.status())


# --- the config file, the import ----------------------------------------------------------------------


def test_the_config_file_builds_the_application():
    app = _config().applications[0]
    module, _, name = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), name) is build_app
    assert type(build_app(app.args)).__name__ == "Application"
    with pytest.raises(ValueError, match="num_replica"):
        build_app({"num_replica": 2})
    with pytest.raises(ValueError, match="max-tokens"):
        build_app({"settings": {"max_tokens": 0}})


def test_deployment_options_reach_serve():
    made = deployment(Options(num_replicas="auto", num_gpus=1, num_cpus=2, max_queued_requests=8,
                              autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1}))
    assert made.ray_actor_options == {"num_cpus": 2, "num_gpus": 1} and made.max_ongoing_requests == 2
    config = made._deployment_config
    assert config.max_queued_requests == 8 and config.autoscaling_config.max_replicas == 3
    assert config.autoscaling_config.target_ongoing_requests == 1


def test_import_advserve_never_imports_ray():
    code = ("import sys, advserve, numpy as np; advserve.compute_advantages('grpo', rewards=np.ones(2), "
            "response_mask=np.ones((2, 2), bool), group_ids=[0, 0]); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})


# --- a replica killed under load (last: the cluster has one fresh replica after it) -----------------------


def test_a_replica_killed_under_load_loses_no_request(cluster, monkeypatch):
    """Four threads keep both replicas busy; one replica is killed while it holds requests. Every request
    is answered with the in-process numbers, those of the dead replica through the client's retry of
    `Unavailable`. A kill can land between two of the replica's requests (one that Serve itself
    re-routes, before it started): then the experiment runs again on a replica alive at that time, at
    most three times, until a retry was needed."""
    client = RayClient(cluster["app"], timeout=60.0, max_retries=6)
    rng = np.random.default_rng(1)
    b, t = 256, 2048
    mask = np.arange(t) < rng.integers(1, t + 1, b)[:, None]
    batches = [dict(rewards=rng.standard_normal(b), values=rng.standard_normal((b, t)) * mask, response_mask=mask)
               for _ in range(4)]
    expected = [advserve.compute_advantages("gae", **batch).advantages for batch in batches]
    retries = []
    sleep = advserve_client._retry.sleep
    monkeypatch.setattr(advserve_client._retry, "sleep", lambda s: (retries.append(s), sleep(min(s, 0.2))))

    def work(i: int):
        return i % 4, client.compute_advantages("gae", **batches[i % 4]).advantages

    killed: set[str] = set()

    def replicas() -> list[dict]:
        return [name for name in ray.util.list_named_actors(all_namespaces=True)
                if name["name"].startswith("SERVE_REPLICA::") and name["name"] not in killed]

    assert len(replicas()) == 2
    for _attempt in range(3):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(work, i) for i in range(32)]
            name = replicas()[0]
            killed.add(name["name"])
            victim = ray.get_actor(name["name"], namespace=name["namespace"])
            deadline = time.monotonic() + 20  # both of its slots taken (max_ongoing_requests 2), or one
            while time.monotonic() < deadline:
                busy = ray.get(victim.get_num_ongoing_requests.remote())  # Serve's replica actor, own thread
                if busy >= 2 or (busy and time.monotonic() > deadline - 10):
                    break
            ray.kill(victim, no_restart=True)
            results = [future.result(timeout=120) for future in futures]
        assert len(results) == 32
        for i, advantages in results:
            assert np.array_equal(advantages, expected[i])
        if retries:
            break
    assert retries, "no request was in flight on a killed replica in three tries: the retry path was not exercised"


# --- the paths for older Ray, checked here on this one ------------------------------------------------


def test_replica_app_hands_http_requests_to_the_app_its_replica_builds(monkeypatch):
    """Before Ray 2.56 Serve's ingress gets `ReplicaApp`: each request goes to the app the replica builds
    (`__serve_build_asgi_app__`, once), with the exception handlers Serve put on the ingress app."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    deployment_module = importlib.import_module("advserve.ray.deployment")

    class Boom(Exception):
        pass

    async def hello(request):
        return PlainTextResponse(f"replica {request.url.path}")

    async def boom(request):
        raise Boom()

    built = []

    class Replica:
        def __serve_build_asgi_app__(self):
            built.append(1)
            return Starlette(routes=[Route("/hello", hello), Route("/boom", boom)])

    context = type("Context", (), {"servable_object": Replica()})()
    monkeypatch.setattr(deployment_module.serve, "get_replica_context", lambda: context)
    app = deployment_module.ReplicaApp()
    app.add_exception_handler(Boom, lambda request, exc: PlainTextResponse("handled by Serve's handler", 599))
    with TestClient(app) as http:
        assert http.get("/hello").text == "replica /hello"
        assert http.get("/hello").status_code == 200
        answer = http.get("/boom")
        assert (answer.status_code, answer.text) == (599, "handled by Serve's handler")
    assert built == [1]


def test_the_oip_servicer_registers_generic_handlers_only_on_a_proxy_that_routes_only_those():
    """Serve's gRPC proxy before Ray 2.60 overrides add_generic_rpc_handlers only: the registered-method
    handlers (preferred by grpcio >= 1.63) would call the proxy's dummy servicer, so they are left out."""
    from advserve._oip_pb import grpc_service_pb2_grpc
    from advserve.ray import grpc_proxy

    class Base:
        def __init__(self):
            self.generic, self.registered = [], []

        def add_generic_rpc_handlers(self, handlers):
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service, handlers):
            self.registered.append(service)

    class OldProxy(Base):  # routes generic handlers only
        def add_generic_rpc_handlers(self, handlers):
            super().add_generic_rpc_handlers(handlers)

    class NewProxy(OldProxy):  # routes both (Ray 2.60)
        def add_registered_method_handlers(self, service, handlers):
            super().add_registered_method_handlers(service, handlers)

    for server_class, registered in ((OldProxy, []), (NewProxy, ["inference.GRPCInferenceService"])):
        server = server_class()
        grpc_proxy.add_GRPCInferenceServiceServicer_to_server(grpc_service_pb2_grpc.GRPCInferenceServiceServicer(),
                                                             server)
        assert len(server.generic) == 1 and server.registered == registered, server_class


def test_a_local_ray_that_does_not_start_is_started_again_once(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append("init")
        if calls.count("init") <= failures:
            raise Exception("The current node timed out during startup. This could happen because ...")
        return "started"

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    failures = 1
    assert start_local_ray(num_cpus=2) == "started" and calls == ["init", "shutdown", "init"]
    calls.clear()
    failures = 2
    with pytest.raises(Exception, match="timed out during startup"):
        start_local_ray(num_cpus=2)
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(ValueError("bad argument")))
    with pytest.raises(ValueError):
        start_local_ray(num_cpus=2)
    assert calls == []
