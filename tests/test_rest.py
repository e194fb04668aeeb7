"""The REST API against a real `advserve serve` process over loopback sockets."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest

import advserve
from conftest import RunningServer

RNG = np.random.default_rng(7)


def grpo_batch():
    mask = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    return {"rewards": [1.0, 0.0, 1.0, 0.0, 0.0], "response_mask": mask, "group_ids": ["p1", "p2", "p1", "p1", "p2"]}


def post(client, path, body):
    return client.post(path, json=body)


def test_health(client):
    assert client.get("/health/live").json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_grpo_over_rest_matches_the_seed(client):
    res = post(client, "/v1/advantages", {"estimator": "grpo", "dtype": "float64", "tensors": grpo_batch()})
    assert res.status_code == 200, res.text
    body = res.json()
    adv = np.array(body["tensors"]["advantages"])
    # group p1: rewards (1, 1, 0): p = 2/3, population std sqrt(2/9) -> ±(1/3)/sqrt(2/9), (2/3)/sqrt(2/9)
    s = np.sqrt(2 / 9)
    np.testing.assert_allclose(adv[0], [(1 / 3) / s] * 3)
    np.testing.assert_allclose(adv[3], [(-2 / 3) / s] * 3)
    # group p2: rewards (0, 0): all equal -> 0 advantages, never NaN
    np.testing.assert_array_equal(adv[1], [0, 0, 0])
    assert body["stats"]["groups"]["ids"] == ["p1", "p2"]
    assert body["stats"]["groups"]["zero_variance_fraction"] == 0.5
    np.testing.assert_allclose(body["stats"]["groups"]["reward_mean"], [2 / 3, 0])
    assert body["params"]["std_ddof"] == 0 and body["preset"] == "paper"


@pytest.mark.parametrize("estimator", sorted(advserve.estimators.ESTIMATORS))
def test_every_estimator_over_rest_equals_in_process(client, estimator):
    b, t = 6, 5
    lengths = RNG.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(int)
    tensors = {
        "rewards": RNG.integers(0, 2, size=b).astype(float), "response_mask": mask,
        "group_ids": [0, 1, 0, 1, 0, 1], "values": RNG.normal(size=(b, t)),
        "greedy_rewards": RNG.random(b), "old_logprobs": -RNG.random((b, t)), "sum_pi_squared": RNG.random((b, t)),
    }
    spec = advserve.estimators.ESTIMATORS[estimator]
    tensors = {k: v for k, v in tensors.items() if k in spec.requires | {"rewards", "response_mask"}}
    preset = next(p for p in advserve.presets.PRESETS.values() if estimator in p.estimators)  # paper, or a library's
    params = {"kl_coef": 0.0} if "kl_coef" in spec.params else {}
    local = advserve.compute_advantages(estimator, preset=preset.name, params=params, dtype="float64", **tensors)
    wire = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    res = post(client, "/v1/advantages", {"estimator": estimator, "preset": preset.name, "params": params,
                                          "dtype": "float64", "tensors": wire})
    assert res.status_code == 200, res.text
    np.testing.assert_allclose(res.json()["tensors"]["advantages"], local.advantages, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.json()["tensors"]["returns"], local.returns, rtol=0, atol=1e-12)


def test_losses_over_rest(client):
    b, t = 4, 6
    mask = np.ones((b, t), dtype=int)
    mask[1, 4:] = 0
    lp = np.log(RNG.uniform(0.05, 0.95, size=(b, t)))
    tensors = {
        "logprobs": lp, "old_logprobs": lp + RNG.normal(scale=0.3, size=(b, t)), "advantages": RNG.normal(size=(b, t)),
        "response_mask": mask, "ref_logprobs": lp + RNG.normal(scale=0.1, size=(b, t)),
        "values": RNG.normal(size=(b, t)), "old_values": RNG.normal(size=(b, t)), "returns": RNG.normal(size=(b, t)),
        "entropy": RNG.uniform(0, 2, size=(b, t)),
    }
    spec = {"preset": "verl", "kl_loss": {"coef": 0.1}, "value_loss": {"coef": 0.5}, "entropy_bonus": {"coef": 0.01}}
    local = advserve.compute_losses(dtype="float64", **spec, **tensors)
    res = post(client, "/v1/losses", {**spec, "dtype": "float64", "tensors": {k: v.tolist() for k, v in tensors.items()}})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["loss"] == pytest.approx(local.loss, abs=1e-12)
    assert set(body["tensors"]) == {"grad_logprobs", "grad_values", "grad_entropy"}
    np.testing.assert_allclose(body["tensors"]["grad_logprobs"], local.grad_logprobs, atol=1e-12)
    np.testing.assert_allclose(body["tensors"]["grad_values"], local.grad_values, atol=1e-12)
    assert body["components"]["kl"] == pytest.approx(local.components["kl"])
    assert "clip_fraction_high" in body["metrics"] and "kl_mean" in body["metrics"]


def test_catalog(client):
    catalog = client.get("/v1/estimators").json()
    names = {e["name"] for e in catalog["estimators"]}
    assert names == {"reinforce", "reinforce_rtg", "reinforce_pp", "reinforce_pp_baseline", "rloo", "remax", "gae",
                     "orz", "grpo", "grpo_original", "dapo", "dr_grpo", "flash_reinforce", "grpo_passk", "opo", "gpg",
                     "gdpo", "optimal_token_baseline", "tir_optimal_token_baseline"}
    grpo = next(e for e in catalog["estimators"] if e["name"] == "grpo")
    assert grpo["presets"]["paper"]["defaults"]["std_ddof"] == 0
    assert grpo["presets"]["verl"]["defaults"]["std_eps"] == 1e-6
    assert "group_ids" in grpo["tensors"]["required"]
    dapo = next(e for e in catalog["estimators"] if e["name"] == "dapo")
    assert "token-mean" in dapo["presets"]["verl"]["unavailable"]
    # the library presets: their defaults, and their options translated into requests
    assert grpo["presets"]["openrlhf"]["defaults"]["std_eps"] == 1e-9
    assert grpo["presets"]["trl"]["defaults"]["std_eps"] == 1e-4
    assert grpo["params"]["std_scope"]["choices"] == ["group", "batch"]
    flash = next(e for e in catalog["estimators"] if e["name"] == "flash_reinforce")
    assert "openrlhf" in flash["presets"]["paper"]["unavailable"]
    presets = {p["name"]: p for p in catalog["presets"]}
    assert presets["openrlhf"]["library"] == "openrlhf 0.11.2" and presets["trl"]["library"] == "trl 1.16.0"
    assert presets["openrlhf"]["options"]["--algo.advantage.estimator group_norm"] == "estimator='grpo'"
    assert "std_scope='batch'" in presets["trl"]["options"]["GRPOConfig.scale_rewards='batch'"]
    assert set(catalog["losses"]) == {"policy_loss", "kl_loss", "value_loss", "entropy_bonus", "rollout_correction",
                                      "token_loss"}


def test_openapi_documents_the_bodies(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/advantages", "/v1/losses", "/v1/estimators", "/health/live", "/health/ready"} <= set(schema["paths"])
    body = schema["paths"]["/v1/advantages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/AdvantagesBody"
    assert "estimator" in schema["components"]["schemas"]["AdvantagesBody"]["properties"]
    assert client.get("/docs").status_code == 200


BAD_REQUESTS = [
    # (body, status, field)
    ({"estimator": "nope", "tensors": grpo_batch()}, 404, "estimator"),
    ({"estimator": "grpo", "preset": "nope", "tensors": grpo_batch()}, 404, "preset"),
    ({"estimator": "dapo", "preset": "verl", "tensors": grpo_batch()}, 404, "estimator"),
    ({"estimator": "grpo", "params": {"lam": 0.9}, "tensors": grpo_batch()}, 400, "params.lam"),
    ({"estimator": "grpo", "params": {"std_eps": "x"}, "tensors": grpo_batch()}, 400, "params.std_eps"),
    ({"estimator": "grpo", "params": {"singleton_groups": "maybe"}, "tensors": grpo_batch()}, 400,
     "params.singleton_groups"),
    ({"estimator": "grpo", "tensors": {**grpo_batch(), "response_mask": [[1, 1]] * 4}}, 400, "tensors.response_mask"),
    ({"estimator": "grpo", "tensors": {**grpo_batch(), "response_mask": [[1, 1], [1]] * 2 + [[1, 1]]}}, 400,
     "tensors.response_mask"),
    ({"estimator": "grpo", "tensors": {**grpo_batch(), "response_mask": [[2, 1, 1]] * 5}}, 400,
     "tensors.response_mask"),
    ({"estimator": "grpo", "tensors": {**grpo_batch(), "rewards": [[1.0]] * 5}}, 400, "tensors.rewards"),
    ({"estimator": "grpo", "tensors": {**grpo_batch(), "rewards": ["a"] * 5}}, 400, "tensors.rewards"),
    ({"estimator": "grpo", "tensors": {**grpo_batch(), "values": [[0.0] * 3] * 5}}, 400, "tensors.values"),
    ({"estimator": "grpo", "tensors": {**grpo_batch(), "bogus": [1]}}, 400, "tensors.bogus"),
    ({"estimator": "grpo", "tensors": {"rewards": [], "response_mask": [], "group_ids": []}}, 400, None),
    ({"estimator": "grpo", "tensors": {"response_mask": [[1]], "group_ids": [0]}}, 400, "tensors.rewards"),
    ({"estimator": "gae", "tensors": {"rewards": [1.0], "response_mask": [[1]]}}, 400, "tensors.values"),
    ({"estimator": "rloo", "tensors": {"rewards": [1.0, 0.0, 1.0], "response_mask": [[1]] * 3,
                                       "group_ids": [0, 0, 1]}}, 400, "tensors.group_ids"),
    ({"estimator": "reinforce", "params": {"kl_coef": 0.1}, "tensors": {"rewards": [1.0], "response_mask": [[1]]}},
     400, "tensors.old_logprobs"),
    ({"estimator": "grpo", "dtype": "float16", "tensors": grpo_batch()}, 400, "dtype"),
    ({"tensors": grpo_batch()}, 400, "estimator"),
    ({"estimator": "grpo", "tensors": grpo_batch(), "extra": 1}, 400, "extra"),
]


@pytest.mark.parametrize("body,status,field", BAD_REQUESTS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_advantage_requests_name_the_field(client, body, status, field):
    res = post(client, "/v1/advantages", body)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert set(error) == {"code", "message", "field"}
    if field is not None:
        assert error["field"] == field, error
    assert error["message"]


def test_unknown_param_lists_the_valid_ones(client):
    res = post(client, "/v1/advantages", {"estimator": "grpo", "params": {"gama": 1}, "tensors": grpo_batch()})
    message = res.json()["error"]["message"]
    assert "gama" in message and "std_eps" in message and "singleton_groups" in message


BAD_LOSSES = [
    ({"tensors": {"logprobs": [[0.0]], "old_logprobs": [[0.0]], "advantages": [[1.0]], "response_mask": [[1]]},
      "policy_loss": {"mode": "trpo"}}, 400, "policy_loss.mode"),
    ({"tensors": {"logprobs": [[0.0]], "old_logprobs": [[0.0]], "advantages": [[1.0]], "response_mask": [[1]]},
      "policy_loss": {"dual_clip": 0.5}}, 400, "policy_loss.dual_clip"),
    ({"tensors": {"logprobs": [[0.0]], "old_logprobs": [[0.0]], "advantages": [[1.0]], "response_mask": [[1]]},
      "kl_loss": {"coef": 0.1}}, 400, "tensors.ref_logprobs"),
    ({"tensors": {"logprobs": [[0.0]], "old_logprobs": [[0.0]], "response_mask": [[1]]}}, 400, "tensors.advantages"),
    ({"tensors": {"logprobs": [[0.0]], "old_logprobs": [[0.0]], "advantages": [[1.0]], "response_mask": [[1]]},
      "num_tokens": -3}, 400, "num_tokens"),
    ({"tensors": {"logprobs": [[0.0]], "old_logprobs": [[0.0]], "advantages": [[1.0]], "response_mask": [[1]]},
      "rollout_correction": {"mode": "mask", "low": 3.0, "high": 2.0}}, 400, "rollout_correction.low"),
    ({"tensors": {"response_mask": [[1]]}, "policy_loss": False}, 400, "policy_loss"),
]
_ONE_TOKEN = {"logprobs": [[0.0]], "old_logprobs": [[0.0]], "advantages": [[1.0]], "response_mask": [[1]]}
# what in process and gRPC refuse, REST refuses with the same field (no lax coercion of true or "3" to a
# number; a union member is not a field)
BAD_LOSSES += [
    ({"tensors": _ONE_TOKEN, "num_tokens": True}, 400, "num_tokens"),
    ({"tensors": _ONE_TOKEN, "num_sequences": "3"}, 400, "num_sequences"),
    ({"tensors": _ONE_TOKEN, "policy_loss": 3}, 400, "policy_loss"),
]


@pytest.mark.parametrize("body,status,field", BAD_LOSSES, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_LOSSES)])
def test_bad_loss_requests_name_the_field(client, body, status, field):
    res = post(client, "/v1/losses", body)
    assert res.status_code == status, res.text
    assert res.json()["error"]["field"] == field


def test_in_process_takes_numpy_scalar_parameters_as_every_transport_does():
    m = np.ones((2, 3), dtype=bool)
    out = advserve.compute_advantages("reinforce_pp", params={"whiten_eps": np.float32(0.5), "gamma": np.int64(1),
                                                              "whiten": np.True_}, rewards=[1.0, 0.0], response_mask=m)
    assert out.params["whiten_eps"] == 0.5 and out.params["gamma"] == 1.0 and out.params["whiten"] is True
    assert type(out.params["whiten"]) is bool and type(out.params["gamma"]) is float


def test_malformed_json_is_a_400(client):
    res = client.post("/v1/advantages", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 400 and res.json()["error"]["field"] == "body"
    res = client.post("/v1/advantages", content=b"[1e999]", headers={"content-type": "application/json"})
    assert res.status_code == 400


def test_server_survives_errors_and_concurrency(client, server):
    good = {"estimator": "grpo", "tensors": grpo_batch()}
    bodies = [good, {"estimator": "nope", "tensors": {}}, {"estimator": "grpo", "tensors": {"rewards": "x"}}] * 10
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda b: httpx.post(f"{server.url}/v1/advantages", json=b, timeout=60).status_code,
                                 bodies))
    assert statuses.count(200) == 10 and statuses.count(404) == 10 and statuses.count(400) == 10
    assert client.get("/health/ready").status_code == 200


def test_oversized_body_is_a_413():
    small = RunningServer("--max-json-bytes", "2000")
    try:
        big = {"estimator": "grpo", "tensors": {"rewards": [1.0] * 2000, "response_mask": [[1]] * 2000,
                                                "group_ids": [0] * 2000}}
        res = httpx.post(f"{small.url}/v1/advantages", json=big, timeout=30)
        assert res.status_code == 413 and res.json()["error"]["code"] == "payload_too_large"

        def chunks():  # no content-length: the limit applies while streaming
            yield b'{"estimator": "grpo", "tensors": {"rewards": ['
            for _ in range(500):
                yield b"1.0, 1.0, 1.0, 1.0, "
            yield b"1.0]}}"

        res = httpx.post(f"{small.url}/v1/advantages", content=chunks(), timeout=30,
                         headers={"content-type": "application/json"})
        assert res.status_code == 413
        assert httpx.get(f"{small.url}/health/live").status_code == 200
    finally:
        small.stop()
