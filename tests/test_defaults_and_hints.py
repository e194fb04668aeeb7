"""A newcomer's defaults and errors (issue 17): the paper preset's policy loss is PPO's clipped
surrogate, a response echoes the parameters its policy mode reads, a parameter sent where a tensor
or a request field goes is refused with the fix, and the access log of a refused request says what
was refused and why."""

from __future__ import annotations

import json
import logging
import math

import grpc
import httpx
import numpy as np
import pytest
from advserve_client import framing, protocol
from advserve_client._pb import advserve_pb2_grpc as pb_grpc

import advserve
from advserve.observability import MESSAGE_LIMIT, Metrics
from conftest import RunningServer

R = framing.RawTensor.from_numpy

# the parameters each mode reads, written out here (not read from loss_specs): what the echo must hold
AGGREGATION = {"mode", "agg", "loss_scale_factor", "seq_denominator"}
ECHO = {
    "ppo_clip": AGGREGATION | {"clip_low", "clip_high", "dual_clip", "ratio_clamp", "ratio_cap"},
    "gspo": AGGREGATION | {"clip_low", "clip_high", "dual_clip", "ratio_clamp", "ratio_cap", "sequence_ratio_gradient"},
    "cispo": AGGREGATION | {"clip_low", "clip_high", "ratio_clamp", "cispo_cap", "cispo_level",
                            "sequence_ratio_gradient"},
    "reinforce": AGGREGATION | {"ratio_clamp"},
}
PRESETS = ("paper", "verl", "openrlhf", "trl")


def policy_batch(seed: int = 0, b: int = 4, t: int = 6) -> dict[str, np.ndarray]:
    """Ratios far outside [0.8, 1.2] on some tokens, ragged rows."""
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(1.0, 0.5, size=(b, t)))
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, size=(b, 1))
    return {"logprobs": old + rng.choice([-0.9, -0.1, 0.05, 0.6], size=(b, t)), "old_logprobs": old,
            "advantages": rng.normal(size=(b, t)), "response_mask": mask}


# --- the paper preset's policy loss ---------------------------------------------------------------------


def test_default_loss_is_ppo_clip_and_the_clip_binds():
    # one row, S = 1 (seq-mean-token-sum), clip 0.2/0.2, lp − old = [0.5, 0.5, −0.5, 0.1], A = [1, −1, −1, 1]:
    #  ρ = e^.5 > 1.2, A > 0: clipped, ℓ = −1.2, no gradient
    #  ρ = e^.5,       A < 0: ℓ = max(ρ, 1.2) = ρ, ∂ℓ/∂lp = ρ
    #  ρ = e^−.5 < 0.8, A < 0: clipped, ℓ = 0.8, no gradient
    #  ρ = e^.1 inside: ℓ = −ρ, ∂ℓ/∂lp = −ρ
    old = np.full((1, 4), -1.0)
    lp = old + np.array([[0.5, 0.5, -0.5, 0.1]])
    a = np.array([[1.0, -1.0, -1.0, 1.0]])
    m = np.ones((1, 4), dtype=bool)
    res = advserve.compute_losses(logprobs=lp, old_logprobs=old, advantages=a, response_mask=m, dtype="float64")
    e5, e1 = math.exp(0.5), math.exp(0.1)
    assert res.loss == pytest.approx(-1.2 + e5 + 0.8 - e1, abs=1e-12)
    np.testing.assert_allclose(res.grad_logprobs, [[0.0, e5, 0.0, -e1]], rtol=1e-12, atol=0)
    assert res.metrics["clip_fraction_high"] == 0.25 and res.metrics["clip_fraction_low"] == 0.25
    assert res.params["policy_loss"] == {"mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None,
                                         "ratio_clamp": None, "ratio_cap": None, "agg": "seq-mean-token-sum",
                                         "loss_scale_factor": None, "seq_denominator": "nonempty"}
    # the seed's unclipped surrogate, by name: every token gets −Aρ
    plain = advserve.compute_losses(policy_loss={"mode": "reinforce"}, logprobs=lp, old_logprobs=old, advantages=a,
                                    response_mask=m, dtype="float64")
    np.testing.assert_allclose(plain.grad_logprobs, -a * np.exp(lp - old), rtol=1e-12, atol=0)
    assert plain.params["policy_loss"] == {"mode": "reinforce", "ratio_clamp": None, "agg": "seq-mean-token-sum",
                                           "loss_scale_factor": None, "seq_denominator": "nonempty"}


def test_catalog_lists_the_new_default(client):
    defaults = client.get("/v1/estimators").json()["losses"]["policy_loss"]["defaults"]
    paper = defaults["paper"]
    assert paper["mode"] == "ppo_clip"
    # defaults that depend on the mode: GMPO's paper clips its log-space ratio at ±0.4 and averages over
    # all responses, SAPO's averages each response's token mean; every other mode keeps the seed's
    clip = {"depends_on": "mode", "values": {"geo_mean": 0.4}, "otherwise": 0.2}
    assert paper["clip_low"] == paper["clip_high"] == clip
    assert paper["agg"] == {"depends_on": "mode", "values": {"sapo": "seq-mean-token-mean",
                                                             "geo_mean": "seq-mean-token-mean"},
                            "otherwise": "seq-mean-token-sum"}
    assert paper["dual_clip"] is None and paper["ratio_clamp"] is None
    assert {defaults[name]["mode"] for name in ("verl", "openrlhf", "trl")} == {"ppo_clip"}
    assert advserve.catalog()["losses"]["policy_loss"]["defaults"] == defaults


# --- the echo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mode", sorted(ECHO))
def test_echo_holds_the_parameters_the_mode_reads(preset, mode):
    batch = policy_batch()
    res = advserve.compute_losses(preset=preset, policy_loss={"mode": mode}, kl_loss={},
                                  ref_logprobs=batch["old_logprobs"] - 0.1, **batch)
    assert set(res.params["policy_loss"]) == ECHO[mode]
    assert {"coef", "estimator", "clamp", "agg"} <= set(res.params["kl_loss"])  # other terms: everything


# a parameter a mode does not echo may be set and changes nothing
UNREAD = [(mode, name, value) for mode, name, value in (
    ("reinforce", "clip_low", 0.05), ("reinforce", "clip_high", 0.01), ("reinforce", "dual_clip", 1.5),
    ("reinforce", "sequence_ratio_gradient", "through_mean"), ("ppo_clip", "sequence_ratio_gradient", "through_mean"),
    ("cispo", "dual_clip", 1.5))]


@pytest.mark.parametrize("mode,name,value", UNREAD)
def test_a_parameter_left_out_of_the_echo_is_not_read(mode, name, value):
    batch = policy_batch(1)
    base = advserve.compute_losses(policy_loss={"mode": mode}, dtype="float64", **batch)
    other = advserve.compute_losses(policy_loss={"mode": mode, name: value}, dtype="float64", **batch)
    assert name not in other.params["policy_loss"]
    assert other.loss == base.loss and other.components == base.components
    np.testing.assert_array_equal(other.grad_logprobs, base.grad_logprobs)


@pytest.mark.parametrize("mode,name,value", [("ppo_clip", "clip_low", 0.05), ("ppo_clip", "clip_high", 0.01),
                                             ("cispo", "clip_high", 0.01), ("reinforce", "ratio_clamp", 0.2)])
def test_an_echoed_parameter_is_read(mode, name, value):
    batch = policy_batch(1)
    base = advserve.compute_losses(policy_loss={"mode": mode}, dtype="float64", **batch)
    other = advserve.compute_losses(policy_loss={"mode": mode, name: value}, dtype="float64", **batch)
    assert other.params["policy_loss"][name] == value
    assert not np.array_equal(other.grad_logprobs, base.grad_logprobs)


def _v2_losses(client: httpx.Client, batch: dict[str, np.ndarray], parameters: dict) -> dict:
    inputs = [{"name": name, "shape": list(a.shape), "datatype": "BOOL" if a.dtype == bool else "FP64",
               "data": a.ravel().tolist()} for name, a in batch.items()]
    res = client.post("/v2/models/losses/infer", json={"parameters": parameters, "inputs": inputs})
    assert res.status_code == 200, res.text
    return res.json()["parameters"]


@pytest.mark.parametrize("mode", sorted(ECHO))
def test_echo_over_rest_and_v2_is_the_in_process_echo(client, mode):
    batch = policy_batch(2)
    local = advserve.compute_losses(policy_loss={"mode": mode}, dtype="float64", **batch)
    body = {"policy_loss": {"mode": mode}, "dtype": "float64",
            "tensors": {name: a.tolist() for name, a in batch.items()}}
    res = client.post("/v1/losses", json=body)
    assert res.status_code == 200, res.text
    assert res.json()["params"] == local.params
    v2 = _v2_losses(client, batch, {"policy_loss.mode": mode, "dtype": "float64"})
    echoed = {key.removeprefix("policy_loss."): value for key, value in v2.items() if key.startswith("policy_loss.")}
    # /v2 response parameters cannot be null: the non-null ones
    assert echoed == {k: v for k, v in local.params["policy_loss"].items() if v is not None}


# --- parameters where tensors or request fields go -----------------------------------------------------


def test_keyword_parameters_are_refused_with_the_fix():
    m = np.ones((2, 3), dtype=bool)
    gae = dict(rewards=np.array([1.0, 0.0]), values=np.zeros((2, 3)), response_mask=m)
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("gae", gamma=1, lam=0.95, **gae)
    assert str(err.value) == "'gamma' is a parameter of estimator 'gae', not a tensor: pass params={'gamma': 1}"
    assert err.value.field == "tensors.gamma"
    fixed = advserve.compute_advantages("gae", params={"gamma": 1, "lam": 0.95}, **gae)  # the hint's fix works
    assert fixed.params["gamma"] == 1.0 and fixed.params["lam"] == 0.95
    with pytest.raises(advserve.InvalidArgument, match=r"^'gamma' is a parameter of estimators .*gae.*, not of "
                       r"'grpo', and not a tensor"):
        advserve.compute_advantages("grpo", gamma=1, rewards=np.ones(2), group_ids=[0, 0], response_mask=m)
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_losses(clip_high=0.3, **policy_batch())
    assert str(err.value) == ("'clip_high' is a parameter of loss term policy_loss, not a tensor: "
                              "pass policy_loss={'clip_high': 0.3}")
    with pytest.raises(advserve.InvalidArgument, match="loss terms kl_loss, value_loss, entropy_bonus"):
        advserve.compute_losses(coef=0.1, **policy_batch())
    with pytest.raises(advserve.InvalidArgument, match=r"pass params=\{'<estimator>': \{'std_eps': 0.001\}\}"):
        advserve.analyze(std_eps=1e-3, rewards=np.ones(2), group_ids=[0, 0], response_mask=m)
    with pytest.raises(advserve.InvalidArgument, match="tensor 'bogus' is unknown"):  # not a parameter either
        advserve.compute_advantages("gae", bogus=np.ones(2), **gae)


GAE_TENSORS = {"rewards": [1.0, 0.0], "values": [[0.0, 0.0], [0.0, 0.0]], "response_mask": [[1, 1], [1, 0]]}


@pytest.mark.parametrize("path,body,message", [
    ("/v1/advantages", {"estimator": "gae", "lam": 0.9},
     "lam: not a request field; 'lam' is a parameter of estimator 'gae': put it in \"params\": {\"lam\": ...}"),
    ("/v1/advantages", {"estimator": "gae", "gamma": 1},
     "gamma: not a request field; 'gamma' is a parameter of estimators reinforce_rtg, reinforce_pp, gae: put it in "
     "\"params\": {\"gamma\": ...}"),
    ("/v1/advantages", {"estimator": "gae", "rewards": [1.0, 0.0]},
     "rewards: not a request field; 'rewards' is a tensor: put it in \"tensors\": {\"rewards\": ...}"),
    ("/v1/losses", {"clip_high": 0.28},
     "clip_high: not a request field; 'clip_high' is a parameter of loss term policy_loss: put it in "
     "\"policy_loss\": {\"clip_high\": ...}"),
    ("/v1/analysis", {"std_eps": 0.001},
     "std_eps: not a request field; 'std_eps' is a parameter of estimators grpo, grpo_original, dapo, grpo_passk, "
     "gdpo: put it in "
     "\"params\": {\"<estimator>\": {\"std_eps\": ...}}"),
    ("/v1/advantages", {"estimator": "gae", "zzz": 1}, "zzz: Extra inputs are not permitted"),
])
def test_rest_top_level_parameters_are_refused_with_the_fix(client, path, body, message):
    res = client.post(path, json={**body, "tensors": GAE_TENSORS})
    assert res.status_code == 400
    error = res.json()["error"]
    assert error["code"] == "invalid_argument" and error["message"] == message
    assert error["field"] == message.split(":")[0]


# --- the access log of a refused request ---------------------------------------------------------------


def test_access_log_message_is_cut(caplog):
    metrics = Metrics(lambda: 0, lambda: 0, lambda: 0)
    with caplog.at_level(logging.INFO, logger="advserve.access"):
        metrics.observe(transport="http", endpoint="advantages", estimator=None, status="400", bytes_in=1,
                        bytes_out=1, phases={}, batch=None, request_id="r", started=0.0, error="invalid_argument",
                        message="x" * (3 * MESSAGE_LIMIT), named_estimator="y" * 1000)
        metrics.observe(transport="http", endpoint="advantages", estimator="grpo", status="200", bytes_in=1,
                        bytes_out=1, phases={}, batch=None, request_id="s", started=0.0, named_estimator="gae")
    refused, served = (json.loads(record.getMessage()) for record in caplog.records)
    assert len(refused["message"]) == MESSAGE_LIMIT and refused["message"].startswith("x" * 100)
    assert refused["estimator"].startswith("yyy") and len(refused["estimator"]) == 64
    assert served["estimator"] == "grpo" and "message" not in served and "error" not in served
    # a refused request's estimator is logged, never a metric label (any string can arrive)
    assert metrics.registry.get_sample_value("advserve_requests_total", {
        "transport": "http", "endpoint": "advantages", "estimator": "", "status": "400"}) == 1.0


def test_access_log_of_refused_requests_names_the_estimator_and_the_message():
    server = RunningServer("--log-format", "json", "--log-level", "info")
    try:
        bad_field = httpx.post(f"{server.url}/v1/advantages", headers={"x-request-id": "top-level-lam"},
                               json={"estimator": "gae", "lam": 0.9, "tensors": GAE_TENSORS})
        assert bad_field.status_code == 400
        no_values = {k: v for k, v in GAE_TENSORS.items() if k != "values"}
        missing = httpx.post(f"{server.url}/v1/advantages", headers={"x-request-id": "no-values"},
                             json={"estimator": "gae", "tensors": no_values})
        assert missing.status_code == 400
        unknown = httpx.post(f"{server.url}/v1/advantages", headers={"x-request-id": "unknown"},
                             json={"estimator": "nope", "tensors": {}})
        assert unknown.status_code == 404
        request = protocol.advantages_request_to_pb({"estimator": "gae"}, {
            "rewards": R(np.array([1, 0], np.float32)), "response_mask": R(np.ones((2, 2), bool))})
        with grpc.insecure_channel(server.grpc_address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AdvserveStub(channel).ComputeAdvantages(request, timeout=30,
                                                                metadata=(("x-request-id", "grpc-no-values"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("logger") == "advserve.access"}
    assert access["top-level-lam"]["estimator"] == "gae"
    assert access["top-level-lam"]["error"] == "invalid_argument"
    assert access["top-level-lam"]["message"] == bad_field.json()["error"]["message"]
    assert access["no-values"]["estimator"] == "gae"
    assert access["no-values"]["message"] == missing.json()["error"]["message"]
    assert access["unknown"]["estimator"] == "nope" and access["unknown"]["error"] == "not_found"
    assert access["unknown"]["message"] == unknown.json()["error"]["message"]
    assert access["grpc-no-values"]["estimator"] == "gae"
    assert access["grpc-no-values"]["message"] == err.value.details()


def test_a_parameter_sent_as_a_tensor_gets_the_same_hint_on_every_transport(server):
    """The Python client sends keyword arguments as tensors: the engine answers with the fix, so REST
    and in process give the same field and message (gRPC's typed tensors have no slot for the name:
    its client refuses it before sending, naming the same field)."""
    from advserve_client import Client
    from advserve_client import InvalidArgument as ClientInvalidArgument

    gae = dict(rewards=np.array([1.0, 0.0]), values=np.zeros((2, 3)), response_mask=np.ones((2, 3), dtype=bool))
    with pytest.raises(advserve.InvalidArgument) as local:
        advserve.compute_advantages("gae", gamma=1.0, **gae)
    for address, transport in ((server.url, "http"), (server.grpc_address, "grpc")):
        with Client(address, transport=transport, max_retries=0) as client:
            with pytest.raises(ClientInvalidArgument) as remote:
                client.compute_advantages("gae", gamma=np.ones(2), **gae)
        assert remote.value.field == local.value.field == "tensors.gamma", transport
        if transport == "http":
            assert remote.value.message == local.value.message.replace("1.0", "...")
            assert "is a parameter of estimator 'gae', not a tensor: pass params={'gamma': " in remote.value.message
