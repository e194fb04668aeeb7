"""The gRPC API against a real `advserve serve` process: the same numbers and errors as REST, the
standard health service, reflection, message limits and deadlines; the one error table."""

from __future__ import annotations

import asyncio
import threading

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import advserve
from advserve import errors as domain_errors
from advserve.transports.grpc_door import _abort
from advserve.transports.http_door import _error_response
from advserve_client import framing, protocol
from advserve_client._pb import advserve_pb2 as pb
from advserve_client._pb import advserve_pb2_grpc as pb_grpc
from conftest import RunningServer

R = framing.RawTensor.from_numpy


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb_grpc.AdvserveStub(channel)


def grpo_tensors():
    return {"rewards": R(np.array([1, 0, 1, 0, 0], np.float32)),
            "response_mask": R(np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], bool)),
            "group_ids": ["p1", "p2", "p1", "p1", "p2"]}


def test_grpo_over_grpc_matches_the_seed_and_rest(stub, client):
    request = protocol.advantages_request_to_pb({"estimator": "grpo", "dtype": "float64"}, grpo_tensors())
    document, tensors = protocol.advantages_response_from_pb(stub.ComputeAdvantages(request, timeout=30))
    adv = tensors["advantages"].to_numpy()
    s = np.sqrt(2 / 9)  # group p1: rewards (1, 1, 0), population std sqrt(2/9)
    np.testing.assert_allclose(adv[0], [(1 / 3) / s] * 3)
    np.testing.assert_allclose(adv[3], [(-2 / 3) / s] * 3)
    np.testing.assert_array_equal(adv[1], [0, 0, 0])
    assert document["stats"]["groups"]["ids"] == ["p1", "p2"]
    assert document["params"]["std_ddof"] == 0 and document["params"]["kl_clamp"] is None
    rest = client.post("/v1/advantages", json={"estimator": "grpo", "dtype": "float64", "tensors": {
        k: (v.to_numpy().tolist() if isinstance(v, framing.RawTensor) else v) for k, v in grpo_tensors().items()}})
    np.testing.assert_array_equal(adv, rest.json()["tensors"]["advantages"])
    assert rest.json()["stats"]["advantages"] == document["stats"]["advantages"]


def test_losses_over_grpc_equal_in_process(stub):
    rng = np.random.default_rng(1)
    b, t = 3, 5
    lp = np.log(rng.uniform(0.1, 0.9, size=(b, t)))
    arrays = {"logprobs": lp, "old_logprobs": lp + rng.normal(scale=0.3, size=(b, t)),
              "advantages": rng.normal(size=(b, t)), "response_mask": np.ones((b, t), bool),
              "ref_logprobs": lp + rng.normal(scale=0.1, size=(b, t))}
    spec = {"preset": "verl", "policy_loss": {"mode": "ppo_clip", "dual_clip": None}, "kl_loss": {"coef": 0.1}}
    request = protocol.losses_request_to_pb({**spec, "dtype": "float64"}, {k: R(v) for k, v in arrays.items()})
    document, tensors = protocol.losses_response_from_pb(stub.ComputeLosses(request, timeout=30))
    local = advserve.compute_losses(dtype="float64", **spec, **arrays)
    assert document["loss"] == pytest.approx(local.loss, abs=1e-15)
    np.testing.assert_array_equal(tensors["grad_logprobs"].to_numpy(), local.grad_logprobs)
    assert tensors["grad_values"] is None and document["components"]["value"] is None
    assert document["params"]["policy_loss"]["dual_clip"] is None
    assert document["params"]["kl_loss"]["clamp"] == 10.0  # verl clamps k3
    assert document["metrics"].keys() == local.metrics.keys()


def test_list_estimators(stub, client):
    response = stub.ListEstimators(pb.ListEstimatorsRequest(), timeout=30)
    assert [e.name for e in response.estimators] == list(advserve.estimators.ESTIMATORS)
    grpo = next(e for e in response.estimators if e.estimator == pb.ESTIMATOR_GRPO)
    verl = next(p for p in grpo.presets if p.preset == pb.PRESET_VERL)
    assert verl.available and verl.defaults["std_eps"].number_value == 1e-6
    dapo = next(e for e in response.estimators if e.name == "dapo")
    assert not next(p for p in dapo.presets if p.preset == pb.PRESET_VERL).available
    from google.protobuf import json_format
    assert json_format.MessageToDict(response.catalog) == client.get("/v1/estimators").json()


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "advserve.v1.Advserve"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"advserve.v1.Advserve", "grpc.health.v1.Health"} <= names


def test_grpc_errors_carry_code_field_and_rest_code(stub):
    bad = protocol.advantages_request_to_pb({"estimator": "grpo", "params": {"lam": 0.9}}, grpo_tensors())
    with pytest.raises(grpc.RpcError) as err:
        stub.ComputeAdvantages(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metadata = dict(err.value.trailing_metadata())
    assert metadata["advserve-error-code"] == "invalid_argument" and metadata["advserve-error-field"] == "params.lam"
    assert err.value.details().startswith("params.lam")

    unset = pb.ComputeAdvantagesRequest()  # no estimator
    with pytest.raises(grpc.RpcError) as err:
        stub.ComputeAdvantages(unset, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    verl_dapo = protocol.advantages_request_to_pb({"estimator": "dapo", "preset": "verl"}, grpo_tensors())
    with pytest.raises(grpc.RpcError) as err:
        stub.ComputeAdvantages(verl_dapo, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    wrong_size = protocol.advantages_request_to_pb({"estimator": "grpo"}, grpo_tensors())
    wrong_size.rewards.data = wrong_size.rewards.data[:-1]
    with pytest.raises(grpc.RpcError) as err:
        stub.ComputeAdvantages(wrong_size, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["advserve-error-field"] == "tensors.rewards"


def test_message_limit_and_deadline():
    small = RunningServer("--grpc-max-message-bytes", "4096")
    try:
        with grpc.insecure_channel(small.grpc_address) as channel:
            stub = pb_grpc.AdvserveStub(channel)
            big = protocol.advantages_request_to_pb({"estimator": "grpo"}, {
                "rewards": R(np.ones(4096, np.float32)), "response_mask": R(np.ones((4096, 1), bool)),
                "group_ids": R(np.zeros(4096, np.int64))})
            with pytest.raises(grpc.RpcError) as err:
                stub.ComputeAdvantages(big, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as err:
                stub.ComputeAdvantages(big, timeout=1e-6)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        small.stop()


def test_overloaded_over_both_transports():
    small = RunningServer("--admission-bytes", str(8 << 20))
    try:
        rng = np.random.default_rng(0)
        arrays = {"logprobs": -rng.random((512, 2048), dtype=np.float32), "response_mask": np.ones((512, 2048), bool)}
        arrays["old_logprobs"] = arrays["logprobs"]
        arrays["advantages"] = rng.normal(size=(512, 2048)).astype(np.float32)
        request = protocol.losses_request_to_pb({}, {k: R(v) for k, v in arrays.items()})  # ~13 MB > 8 MB
        with grpc.insecure_channel(small.grpc_address, options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AdvserveStub(ch).ComputeLosses(request, timeout=60)
        # larger than admission could ever hold (3 bytes per message byte): refused by grpc core from the
        # message's length prefix, before it is read (no advserve metadata: the server never saw it)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()

        part = {k: R(v[:16]) for k, v in arrays.items()}  # ~0.4 MB, 33k tokens: admitted, one call at a time
        small_request = protocol.losses_request_to_pb({}, part)
        codes, barrier = [], threading.Barrier(16)

        def call():
            with grpc.insecure_channel(small.grpc_address) as ch:
                barrier.wait()
                try:
                    pb_grpc.AdvserveStub(ch).ComputeLosses(small_request, timeout=60)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append((exc.code().name, dict(exc.trailing_metadata()).get("retry-after")))

        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the calls wait in line for admission (at most --grpc-admission-wait-s), then UNAVAILABLE + Retry-After
        assert "OK" in codes and set(codes) <= {"OK", ("UNAVAILABLE", "1")}, codes
    finally:
        small.stop()


class _FakeContext:
    def __init__(self):
        self.aborted = None

    async def abort(self, code, details, trailing_metadata=()):
        self.aborted = (code, details, dict(trailing_metadata))
        raise RuntimeError("aborted")


@pytest.mark.parametrize("code", sorted(domain_errors.STATUS))
def test_one_table_maps_every_error_on_both_transports(code):
    """Every domain error code: REST answers the table's HTTP status, gRPC the table's status code."""
    classes = [c for c in vars(domain_errors).values() if isinstance(c, type) and issubclass(c, Exception)
               and issubclass(c, domain_errors.AdvserveError)]
    cls = next(c for c in classes if c.code == code)
    error = cls("something is wrong", field="tensors.x")
    http_status, grpc_name = domain_errors.STATUS[code]
    response = _error_response(error)
    assert response.status_code == http_status
    context = _FakeContext()
    with pytest.raises(RuntimeError):
        asyncio.run(_abort(context, error))
    assert context.aborted[0] == getattr(grpc.StatusCode, grpc_name)
    assert context.aborted[2]["advserve-error-code"] == code
    if isinstance(error, domain_errors.Unavailable):
        assert context.aborted[2]["retry-after"] == "1" and response.headers["retry-after"] == "1"


def test_every_domain_error_class_is_in_the_table():
    classes = [c for c in vars(domain_errors).values() if isinstance(c, type) and issubclass(c, Exception)
               and issubclass(c, domain_errors.AdvserveError)]
    assert {c.code for c in classes} == set(domain_errors.STATUS)


def test_rest_and_grpc_are_served_by_one_process(server, stub):
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    request = protocol.advantages_request_to_pb({"estimator": "dr_grpo"}, grpo_tensors())
    assert stub.ComputeAdvantages(request, timeout=30).advantages.shape == [5, 3]
