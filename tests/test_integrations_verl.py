"""advserve in verl (`advserve.integrations.verl`): estimators and policy losses registered in verl's
registries, selected by verl's config, computing verl's numbers.

* Against the REAL verl 0.9.1 (installed by the suite, --no-deps, into build/real-libraries/verl:
  tests/real_libraries.py): tests/integrations_verl_check.py runs with it, where
  `import verl` loads advserve through the `verl.plugins` entry point, and compares, on random batches,
  verl's trainer function `compute_advantage(adv_estimator="advserve_<name>")` with verl's own `<name>`,
  and `get_policy_loss_fn("advserve_<mode>")` (loss, autograd gradient, metrics) with verl's own
  `<mode>`; in process and against a running server.
* Everywhere (CI too): a faithful minimal copy of verl 0.9.1's registry API (`register_adv_est`,
  `get_adv_estimator_fn`, `register_policy_loss`, `get_policy_loss_fn`, and the trainer's dispatch of
  `compute_advantage` and `ppo_loss`'s call) stands in for `verl.trainer.ppo.core_algos`; the golden
  cases of tests/golden/verl_0.9.1.json (computed by the real verl) that a registered function can
  express go through it and must give the real verl's numbers.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import types
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch

import real_libraries

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "verl_0.9.1.json").read_text())


# --- the real verl --------------------------------------------------------------------------------------


def run_real_verl(address: str) -> dict:
    script = ROOT / "tests" / "integrations_verl_check.py"
    out = real_libraries.run("verl", script, sysconfig.get_paths()["purelib"], address)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("where", ["in process", "remote"])
def test_real_verl_registries_and_numbers(where, request):
    address = request.getfixturevalue("server").url if where == "remote" else ""
    report = run_real_verl(address)
    assert "error" not in report, report.get("error")
    from advserve.integrations import verl as integration

    expected = sorted([*integration.ESTIMATOR_FUNCTIONS, *integration.POLICY_LOSS_FUNCTIONS])
    assert report["registered"] == expected  # by `import verl` alone (the entry point)
    assert len(report["advantages"]) == 6 * len(integration.ESTIMATORS)
    for case in report["advantages"]:
        assert case["dtype_kept"], case
        assert case["advantages"] <= 1e-6 and case["returns"] <= 1e-6, case  # verl computes some in float32
    assert len(report["policy_losses"]) == 8 * len(integration.POLICY_LOSSES)
    for case in report["policy_losses"]:
        assert case["metric_names"] and case["scalar_of_dtype"], case
        tolerance = 1e-6 if case["dtype"] == "torch.float32" else 1e-12
        assert case["loss"] <= tolerance and case["grad"] <= tolerance, case
        assert max(case["metrics"].values(), default=0.0) <= 1e-6, case  # verl's masked_mean: N + 1e-8
    assert len(report["value_losses"]) == 10  # core_algos.compute_value_loss, every agg mode, dp_size 1 and 2
    for case in report["value_losses"]:
        tolerance = 1e-6 if case["dtype"] == "torch.float32" else 1e-12
        assert case["same_dtype"] and case["clipfrac"] <= 1e-6, case
        assert max(case["loss"], case["grad"]) <= tolerance, case
    assert len(report["actor_losses"]) == 14  # verl's ppo_loss composition, k3+ and dp_size 2 included
    for case in report["actor_losses"]:
        tolerance = 1e-6 if case["dtype"] == "torch.float32" else 1e-12
        assert case["metric_names"] and case["metrics"] <= 1e-6, case
        assert max(case["loss"], case["grad"], case["grad_entropy"]) <= tolerance, case


# --- a faithful minimal verl registry API (verl 0.9.1, verl/trainer/ppo/core_algos.py) -------------------


class AdvantageEstimator(str, Enum):
    GAE = "gae"
    GRPO = "grpo"


def fake_core_algos() -> types.ModuleType:
    """verl 0.9.1's registry functions, their behaviour copied: registering a name twice with another
    function raises, an unknown name raises ValueError."""
    module = types.ModuleType("verl.trainer.ppo.core_algos")
    module.POLICY_LOSS_REGISTRY, module.ADV_ESTIMATOR_REGISTRY = {}, {}

    def register_policy_loss(name):
        def decorator(func):
            module.POLICY_LOSS_REGISTRY[name] = func
            return func
        return decorator

    def get_policy_loss_fn(name):
        if name not in module.POLICY_LOSS_REGISTRY:
            raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: "
                             f"{list(module.POLICY_LOSS_REGISTRY.keys())}")
        return module.POLICY_LOSS_REGISTRY[name]

    def register_adv_est(name_or_enum):
        def decorator(fn):
            name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum
            if name in module.ADV_ESTIMATOR_REGISTRY and module.ADV_ESTIMATOR_REGISTRY[name] != fn:
                raise ValueError(f"Adv estimator {name} has already been registered: "
                                 f"{module.ADV_ESTIMATOR_REGISTRY[name]} vs {fn}")
            module.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn
        return decorator

    def get_adv_estimator_fn(name_or_enum):
        name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum
        if name not in module.ADV_ESTIMATOR_REGISTRY:
            raise ValueError(f"Unknown advantage estimator simply: {name}")
        return module.ADV_ESTIMATOR_REGISTRY[name]

    module.register_policy_loss, module.get_policy_loss_fn = register_policy_loss, get_policy_loss_fn
    module.register_adv_est, module.get_adv_estimator_fn = register_adv_est, get_adv_estimator_fn
    module.AdvantageEstimator = AdvantageEstimator
    return module


class Config(dict):
    """verl's configs are Mappings with attribute access (DictConfig, BaseConfig)."""

    __getattr__ = dict.__getitem__


def compute_advantage(core_algos, batch: dict, non_tensor_batch: dict, adv_estimator: str, config: Config):
    """verl.trainer.ppo.ray_trainer.compute_advantage's dispatch for a registered estimator (0.9.1, the
    branch every name but gae and grpo takes): these keywords, and only these."""
    adv_estimator_fn = core_algos.get_adv_estimator_fn(adv_estimator)
    adv_kwargs = {"token_level_rewards": batch["token_level_rewards"], "response_mask": batch["response_mask"],
                  "config": config}
    if "uid" in non_tensor_batch:
        adv_kwargs["index"] = non_tensor_batch["uid"]
    if "reward_baselines" in batch:
        adv_kwargs["reward_baselines"] = batch["reward_baselines"]
    return adv_estimator_fn(**adv_kwargs)


def policy_loss(core_algos, config: Config, log_prob, old_log_prob, advantages, response_mask,
                rollout_is_weights=None):
    """verl.workers.utils.losses.ppo_loss's call of the policy loss (0.9.1)."""
    policy_loss_fn = core_algos.get_policy_loss_fn(config["policy_loss"].get("loss_mode", "vanilla"))
    return policy_loss_fn(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                          response_mask=response_mask, loss_agg_mode=config["loss_agg_mode"], config=config,
                          rollout_is_weights=rollout_is_weights)


@pytest.fixture
def verl(monkeypatch):
    """A stand-in `verl` package whose core_algos is the fake registry; advserve.integrations.verl
    (re)imported with it in place, as verl's plugin loading imports it."""
    core_algos = fake_core_algos()
    for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core_algos)
    sys.modules["verl.trainer.ppo"].core_algos = core_algos
    monkeypatch.delenv("ADVSERVE_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "advserve.integrations.verl", raising=False)  # imported afresh, as by verl
    return core_algos, importlib.import_module("advserve.integrations.verl")


def test_importing_the_module_registers_every_name(verl):
    core_algos, integration = verl
    estimators = {f"advserve_{name}" for name in integration.ESTIMATORS}
    assert estimators <= set(core_algos.ADV_ESTIMATOR_REGISTRY)
    assert {"advserve", *(f"advserve_{m}" for m in integration.POLICY_LOSSES)} <= set(core_algos.POLICY_LOSS_REGISTRY)
    assert core_algos.get_policy_loss_fn("advserve") is core_algos.get_policy_loss_fn("advserve_vanilla")
    assert integration.register(core_algos) == integration.register(core_algos)  # idempotent, as verl allows


def last_token_rewards(tensors, dtype):
    mask = np.asarray(tensors["response_mask"], bool)
    if "token_rewards" in tensors:
        return torch.tensor(tensors["token_rewards"], dtype=dtype)
    scores = np.zeros(mask.shape)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    scores[np.arange(mask.shape[0]), last] = tensors["rewards"]
    return torch.tensor(scores, dtype=dtype)


# advserve's golden estimator (and the params that select the verl variant) -> verl's name, its
# norm_adv_by_std_in_grpo
VERL_ESTIMATOR = {("grpo", ()): ("grpo", True), ("dr_grpo", ()): ("grpo", False), ("rloo", ()): ("rloo", True),
                  ("rloo", (("singleton_groups", "zero"),)): ("rloo_vectorized", True),
                  ("reinforce_pp", ()): ("reinforce_plus_plus", True),
                  ("reinforce_pp", (("gamma", None),)): ("reinforce_plus_plus", True),
                  ("reinforce_pp_baseline", ()): ("reinforce_plus_plus_baseline", True), ("remax", ()): ("remax", True),
                  ("grpo_passk", ()): ("grpo_passk", True),
                  ("grpo_passk", (("scale_by_std", False),)): ("grpo_passk", False),
                  ("opo", ()): ("opo", True), ("gpg", ()): ("gpg", True), ("gdpo", ()): ("gdpo", True),
                  ("optimal_token_baseline", ()): ("optimal_token_baseline", True),
                  ("optimal_token_baseline", (("handle_zero_tail", False),)): ("optimal_token_baseline", True),
                  ("tir_optimal_token_baseline", ()): ("tir_optimal_token_baseline", True),
                  ("tir_optimal_token_baseline", (("handle_zero_tail", False),)): ("tir_optimal_token_baseline", True)}
# verl's trainer passes old_log_probs and sum_pi_squared to its own names only: these are called directly
DIRECT = {"optimal_token_baseline", "tir_optimal_token_baseline"}


def verl_name_of(case: dict) -> tuple[str, bool] | None:
    if not {"rewards", "token_rewards"} & set(case["tensors"]):  # gdpo's reward components: verl's own gdpo only
        return None
    params = tuple(sorted((k, None if k == "gamma" else v) for k, v in case["params"].items()))
    try:
        return VERL_ESTIMATOR.get((case["estimator"], params))
    except TypeError:  # a list-valued parameter (gdpo's reward weights): not a verl option of ours
        return None


ESTIMATOR_GOLDEN = json.loads((ROOT / "tests" / "golden" / "verl_0.9.1_estimators.json").read_text())
ADVANTAGE_CASES = [c for c in GOLDEN["advantages"] + ESTIMATOR_GOLDEN["advantages"] if verl_name_of(c)]


@pytest.mark.parametrize("case", ADVANTAGE_CASES, ids=[c["case"] for c in ADVANTAGE_CASES])
def test_registered_estimators_give_the_real_verls_golden_numbers(verl, case):
    """Every golden case of the real verl (tests/golden/verl_0.9.1*.json) whose estimator is registered and
    whose parameters are verl options (no KL in the reward, which verl adds to token_level_rewards before):
    through the trainer's dispatch, or called as verl's tests call them (DIRECT)."""
    core_algos, _ = verl
    verl_name, norm = verl_name_of(case)
    dtype = torch.float64 if case["dtype"] == "float64" else torch.float32
    tensors = case["tensors"]
    mask = torch.tensor(tensors["response_mask"], dtype=dtype)
    rewards = last_token_rewards(tensors, dtype)
    uids = np.array(tensors["group_ids"], dtype=object) if "group_ids" in tensors else None
    if "error" in case["expected"]:  # verl raises (a group of one for Pass@k): so does the registered function
        with pytest.raises(ValueError, match="single response"):
            compute_advantage(core_algos, {"token_level_rewards": rewards, "response_mask": mask}, {"uid": uids},
                              f"advserve_{verl_name}", Config(norm_adv_by_std_in_grpo=norm))
        return
    if verl_name in DIRECT:
        extra = {name: torch.tensor(tensors[key], dtype=dtype) for name, key in (
            ("old_log_probs", "old_logprobs"), ("sum_pi_squared", "sum_pi_squared"),
            ("rollout_is_weights", "rollout_is_weights")) if key in tensors}
        advantages, returns = core_algos.get_adv_estimator_fn(f"advserve_{verl_name}")(
            rewards, mask, uids, handle_zero_tail=case["params"].get("handle_zero_tail", True), **extra)
    else:
        batch = {"token_level_rewards": rewards, "response_mask": mask}
        if "greedy_rewards" in tensors:
            batch["reward_baselines"] = torch.tensor(tensors["greedy_rewards"], dtype=dtype)
        config = Config(gamma=case["params"].get("gamma", 1.0), lam=1.0, norm_adv_by_std_in_grpo=norm)
        advantages, returns = compute_advantage(core_algos, batch, {} if uids is None else {"uid": uids},
                                                f"advserve_{verl_name}", config)
    assert advantages.dtype == returns.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-8  # tests/test_verl_golden.py's (verl's N + 1e-8)
    np.testing.assert_allclose((advantages * mask).numpy(), case["expected"]["advantages"], rtol=0, atol=tolerance)
    np.testing.assert_allclose((returns * mask).numpy(), case["expected"]["returns"], rtol=0, atol=tolerance)


VERL_MODE = {"ppo_clip": "advserve", "gspo": "advserve_gspo", "cispo": "advserve_cispo"}
LOSS_CASES = [c for c in GOLDEN["losses"] if set(c["request"]) <= {"policy_loss", "num_tokens", "num_sequences"}
              and c["request"]["policy_loss"]["mode"] in VERL_MODE]


def actor_config(term: dict, loss_mode: str, **global_batch_info) -> Config:
    """verl's ActorConfig fields the policy losses read, as the golden generator set them."""
    dual = term.get("dual_clip", 3.0)
    return Config(clip_ratio=term["clip_low"], clip_ratio_low=term["clip_low"], clip_ratio_high=term["clip_high"],
                  clip_ratio_c=math.inf if dual is None else dual, loss_agg_mode=term["agg"],
                  loss_scale_factor=term.get("loss_scale_factor"), policy_loss=Config(loss_mode=loss_mode),
                  global_batch_info={"dp_size": 1, "loss_scale_factor": term.get("loss_scale_factor"),
                                     **global_batch_info})


@pytest.mark.parametrize("case", LOSS_CASES, ids=[c["case"] for c in LOSS_CASES])
def test_registered_policy_losses_give_the_real_verls_golden_numbers(verl, case):
    core_algos, _ = verl
    request, tensors = case["request"], case["tensors"]
    term = request["policy_loss"]
    config = actor_config(term, VERL_MODE[term["mode"]], batch_num_tokens=request.get("num_tokens"),
                          global_batch_size=request.get("num_sequences"))
    log_prob = torch.tensor(tensors["logprobs"], dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(core_algos, config, log_prob, torch.tensor(tensors["old_logprobs"], dtype=torch.float64),
                                torch.tensor(tensors["advantages"], dtype=torch.float64),
                                torch.tensor(tensors["response_mask"], dtype=torch.bool))
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float64
    assert float(loss.detach()) == pytest.approx(case["expected"]["loss"], rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(log_prob.grad.numpy(), case["expected"]["grad_logprobs"], rtol=1e-10, atol=1e-14)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}


KL_NAMES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl", "abs": "abs"}
ACTOR_CASES = [c for c in GOLDEN["losses"] if set(c["request"]) - {"num_tokens", "num_sequences"}
               in ({"policy_loss", "kl_loss"}, {"policy_loss", "entropy_bonus"})
               and c["request"]["policy_loss"]["mode"] in VERL_MODE]


@pytest.mark.parametrize("case", ACTOR_CASES, ids=[c["case"] for c in ACTOR_CASES])
def test_the_whole_actor_loss_gives_the_real_verls_golden_numbers(verl, case):
    """compute_actor_loss (verl's ppo_loss in one call: policy − entropy_coeff · entropy + kl_loss_coef · kl,
    translated from the ActorConfig) on the golden cases with a KL or entropy term: the real verl's loss and
    gradients with respect to the log-probs and the entropy."""
    _, integration = verl
    request, tensors = case["request"], case["tensors"]
    term = request["policy_loss"]
    config = actor_config(term, VERL_MODE[term["mode"]], batch_num_tokens=request.get("num_tokens"),
                          global_batch_size=request.get("num_sequences"))
    kl, entropy_bonus = request.get("kl_loss"), request.get("entropy_bonus")
    config.update(use_kl_loss=kl is not None, kl_loss_coef=(kl or {}).get("coef", 0.001),
                  kl_loss_type=KL_NAMES[(kl or {}).get("estimator", "k3")],
                  entropy_coeff=(entropy_bonus or {}).get("coef", 0.0))

    def tensor(name, grad=False):
        return torch.tensor(tensors[name], dtype=torch.float64, requires_grad=grad) if name in tensors else None

    log_prob, entropy = tensor("logprobs", True), tensor("entropy", True)
    loss, metrics = integration.compute_actor_loss(config, log_prob, tensor("old_logprobs"), tensor("advantages"),
                                                   torch.tensor(tensors["response_mask"], dtype=torch.bool),
                                                   entropy=entropy, ref_log_prob=tensor("ref_logprobs"))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(case["expected"]["loss"], rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(log_prob.grad.numpy(), case["expected"]["grad_logprobs"], rtol=1e-10, atol=1e-14)
    if entropy is not None:
        np.testing.assert_allclose(entropy.grad.numpy(), case["expected"]["grad_entropy"], rtol=1e-10, atol=1e-14)
    assert {"actor/pg_loss", "actor/ppo_kl"} <= set(metrics)
    assert ("kl_loss" in metrics) == (kl is not None) and ("actor/entropy_loss" in metrics) == (entropy is not None)


def test_kl_loss_types_translate(verl):
    _, integration = verl
    assert integration.kl_loss_term("low_var_kl", 0.01, "token-mean") == {"coef": 0.01, "estimator": "k3",
                                                                         "agg": "token-mean"}
    assert integration.kl_loss_term("k3+", 0.01, "token-mean")["gradient_estimator"] == "k2"
    assert integration.kl_loss_term("low_var_kl+", 0.01, "token-mean")["gradient_estimator"] == "k2"
    assert "gradient_estimator" not in integration.kl_loss_term("mse+", 0.01, "token-mean")  # k2's own gradient
    with pytest.raises(ValueError, match="'full' needs the logits"):
        integration.kl_loss_term("full", 0.01, "token-mean")


def test_data_parallel_normalizers_are_verls(verl):
    """dp_size d with the global counts gives the local share of the global loss × d (verl's agg_loss);
    token-sum is multiplied by d; d > 1 without the global count is verl's ValueError."""
    core_algos, integration = verl
    case = next(c for c in LOSS_CASES if c["case"] == "ppo_clip/token-mean")
    term, tensors = case["request"]["policy_loss"], case["tensors"]
    mask = torch.tensor(tensors["response_mask"], dtype=torch.bool)
    args = [torch.tensor(tensors[n], dtype=torch.float64) for n in ("logprobs", "old_logprobs", "advantages")]
    local = float(policy_loss(core_algos, actor_config(term, "advserve"), *args, mask)[0])
    tokens = int(mask.sum())
    for agg, info, factor in (("token-mean", {"dp_size": 4, "batch_num_tokens": 3 * tokens}, 4 / 3),
                              ("token-sum", {"dp_size": 4}, 4 * tokens)):
        config = actor_config(dict(term, agg=agg), "advserve", **info)
        assert float(policy_loss(core_algos, config, *args, mask)[0]) == pytest.approx(local * factor, rel=1e-12)
    with pytest.raises(ValueError, match="batch_num_tokens is required when dp_size > 1"):
        policy_loss(core_algos, actor_config(term, "advserve", dp_size=2), *args, mask)


def test_verl_options_translate(verl):
    _, integration = verl
    assert integration.estimator_request("grpo", Config(norm_adv_by_std_in_grpo=False)) == ("dr_grpo", {})
    assert integration.estimator_request("grpo", None, norm_adv_by_std_in_grpo=False) == ("dr_grpo", {})
    assert integration.estimator_request("grpo", None, epsilon=1e-4) == ("grpo", {"std_eps": 1e-4})
    assert integration.estimator_request("grpo_vectorized", Config(norm_adv_by_std_in_grpo=False)) == ("grpo", {})
    assert integration.estimator_request("reinforce_plus_plus", Config(gamma=0.9)) == ("reinforce_pp", {"gamma": 0.9})
    term = integration.policy_loss_term("vanilla", "seq-mean-token-sum-norm", Config(
        clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=10.0, loss_scale_factor=None,
        global_batch_info={"loss_scale_factor": 512}))
    assert term == {"mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 10.0,
                    "agg": "seq-mean-token-sum-norm", "loss_scale_factor": 512.0}
    assert integration.verl_metrics("vanilla", {"clip_fraction_high": 0.25, "clip_fraction_low": 0.5, "approx_kl": 0.1,
                                     "dual_clip_fraction": 0.125}) == {
        "actor/pg_clipfrac": 0.75, "actor/ppo_kl": 0.1, "actor/pg_clipfrac_lower": 0.125}
    with pytest.raises(ValueError, match="no verl estimator 'gae'"):
        integration.estimator_request("gae", None)


def test_the_address_in_the_config_selects_the_remote_service(verl, server, monkeypatch):
    """ADVSERVE_ADDRESS (set for every Ray process by verl's ray_kwargs.ray_init.runtime_env.env_vars)
    sends the calls to that server, over REST or gRPC; the numbers are the in-process ones."""
    core_algos, integration = verl
    case = next(c for c in ADVANTAGE_CASES if c["case"] == "grpo/string-ids")
    batch = {"token_level_rewards": last_token_rewards(case["tensors"], torch.float64),
             "response_mask": torch.tensor(case["tensors"]["response_mask"], dtype=torch.float64)}
    uids = {"uid": np.array(case["tensors"]["group_ids"], dtype=object)}
    config = Config(gamma=1.0, norm_adv_by_std_in_grpo=True)
    local = compute_advantage(core_algos, batch, uids, "advserve_grpo", config)
    for address in (server.url, f"grpc://{server.grpc_address}"):
        monkeypatch.setenv("ADVSERVE_ADDRESS", address)
        backend = integration.backend()
        assert backend.address == address.removeprefix("grpc://")
        assert backend.transport == ("grpc" if address.startswith("grpc") else "http")
        remote = compute_advantage(core_algos, batch, uids, "advserve_grpo", config)
        torch.testing.assert_close(remote, local, rtol=0, atol=0)
    monkeypatch.delenv("ADVSERVE_ADDRESS")
    assert integration.backend().__name__ == "advserve.api"


def test_pyproject_declares_the_verl_plugin():
    """verl 0.9.1 loads every `verl.plugins` entry point on `import verl` (VERL_USE_EXTERNAL_PLUGINS=auto,
    its default): installing advserve in verl's environment is what registers it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["verl.plugins"] == {"advserve": "advserve.integrations.verl"}


# --- docs/integrations.md's verl config diff --------------------------------------------------------------

SWITCH_REMOVED = ["algorithm.adv_estimator=grpo"]
SWITCH_ADDED = ["algorithm.adv_estimator=advserve_grpo", "actor_rollout_ref.actor.policy_loss.loss_mode=advserve",
                "+ray_kwargs.ray_init.runtime_env.env_vars.ADVSERVE_ADDRESS=advserve.internal:8000"]


def docs_diff() -> list[str]:
    import re

    text = (ROOT / "docs" / "integrations.md").read_text()
    return re.search(r"```diff\n(.*?)```", text, re.S)[1].splitlines()


def test_the_documented_verl_config_diff_is_exactly_the_switch(verl):
    """The stock GRPO command and the switched one differ in these lines only, and the names they set are
    the module's (an estimator and a policy loss it registers, the address variable its backend reads)."""
    _, integration = verl
    lines = docs_diff()
    assert all(line[:1] in " +-" for line in lines)
    removed = [line[1:].strip().rstrip("\\").strip() for line in lines if line.startswith("-")]
    added = [line[1:].strip().rstrip("\\").strip() for line in lines if line.startswith("+")]
    assert removed == SWITCH_REMOVED and added == SWITCH_ADDED
    assert "advserve_grpo" in integration.ESTIMATOR_FUNCTIONS and "advserve" in integration.POLICY_LOSS_FUNCTIONS
    from advserve.integrations._backend import ADDRESS_ENV

    assert SWITCH_ADDED[2].split("=")[0].endswith("." + ADDRESS_ENV)
    assert sum(line.startswith(" ") for line in lines) >= 15  # a whole GRPO command around them


def test_the_documented_diff_applied_to_verls_own_config():
    """Applied to verl's trainer config (as Hydra applies overrides), the diff changes exactly three keys;
    `import verl` registered what they name; the actor's policy_loss section still converts to verl's
    PolicyLossConfig; Ray gets the address; GRPO through verl's compute_advantage with the switched config
    gives verl's own numbers."""
    out = real_libraries.run("verl", ROOT / "tests" / "integrations_verl_config.py", sysconfig.get_paths()["purelib"])
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["changed"] == ["actor_rollout_ref.actor.policy_loss.loss_mode", "algorithm.adv_estimator",
                                 "ray_kwargs.ray_init.runtime_env.env_vars.ADVSERVE_ADDRESS"]
    assert report["estimator"] == report["policy_loss"] == "advserve.integrations.verl"
    assert report["policy_loss_config_mode"] == "advserve" and report["address"] == "advserve.internal:8000"
    assert report["advantages_diff"] <= 1e-6


VERL_TESTS = Path("tests") / "trainer" / "ppo"  # in verl's wheel, beside the verl package
VERL_TEST_FILES = ("test_core_algos_on_cpu.py", "test_dynamic_policy_losses_on_cpu.py",
                   "test_reinforce_pp_multiturn_on_cpu.py", "test_rollout_corr_integration.py",
                   "test_value_loss_normalization_on_cpu.py")
# verl's functions those tests call -> the advserve function registered in their place
VERL_SWAP = {"compute_grpo_outcome_advantage": "advserve_grpo",
             "compute_grpo_vectorized_outcome_advantage": "advserve_grpo_vectorized",
             "compute_rloo_outcome_advantage": "advserve_rloo",
             "compute_rloo_vectorized_outcome_advantage": "advserve_rloo_vectorized",
             "compute_reinforce_plus_plus_outcome_advantage": "advserve_reinforce_plus_plus",
             "compute_policy_loss_vanilla": "advserve_vanilla", "compute_policy_loss_dro": "advserve_dro",
             "compute_value_loss": "compute_value_loss"}  # no registry: advserve.integrations.verl's function
CONFTEST = '''
import os, sys
sys.path[:0] = [{golden!r}, {client!r}, {service!r}]
sys.path.append({verl_site!r})
import verl_stub
verl_stub.install()
from verl.trainer.ppo import core_algos as ca
import advserve.integrations.verl as integration

SWAP = {swap!r}


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("ADVSERVE_SWAP") != "1":
        return
    swapped = set()
    for item in items:
        names = item.module.__dict__
        for theirs, ours in SWAP.items():
            if theirs in names:
                names[theirs] = (ca.ADV_ESTIMATOR_REGISTRY.get(ours) or ca.POLICY_LOSS_REGISTRY.get(ours)
                                 or getattr(integration, ours))
                swapped.add(theirs)
    with open("swapped.txt", "w") as f:
        f.write("\\n".join(sorted(swapped)))
'''


def test_verls_own_tests_pass_with_advserves_functions(tmp_path):
    """verl 0.9.1's own CPU tests of its estimators and policy losses, run with each function they call
    replaced by the advserve function registered for it: every test that passes with verl's functions
    passes with advserve's (the ones that need verl's real tensordict fail alike under the stubs)."""
    import shutil

    verl_site = real_libraries.installed("verl")
    for name in VERL_TEST_FILES:
        shutil.copy(verl_site / VERL_TESTS / name, tmp_path / name)
    (tmp_path / "conftest.py").write_text(CONFTEST.format(
        golden=str(ROOT / "tests" / "golden"), client=str(ROOT / "client"), service=str(ROOT / "service"),
        verl_site=str(verl_site), swap=VERL_SWAP))
    outcomes = {}
    for swap in ("0", "1"):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", str(tmp_path)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, "ADVSERVE_SWAP": swap, "ADVSERVE_ADDRESS": ""})
        failed = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("FAILED ")}
        passed = int(next(iter(re.findall(r"(\d+) passed", out.stdout)), 0))
        outcomes[swap] = failed, passed
    assert outcomes["1"] == outcomes["0"], outcomes
    assert outcomes["1"][1] >= 40
    assert set((tmp_path / "swapped.txt").read_text().split()) == set(VERL_SWAP)  # every one of them replaced
