"""Run by tests/test_integrations_verl.py under the REAL verl 0.9.1 (tests/real_libraries.py: verl installed
--no-deps, its other import-time dependencies stubbed by tests/golden/verl_stub.py).

advserve's own dependencies come from the project venv (its site-packages appended to sys.path, as if
advserve were installed into verl's environment), and advserve is made visible to verl as an installed
distribution with the `verl.plugins` entry point of pyproject.toml (a dist-info folder on sys.path), so
`import verl` itself registers the advserve functions, as in a verl run. Then, on random batches:

* advantages through verl's trainer function `verl.trainer.ppo.ray_trainer.compute_advantage` with
  `adv_estimator=advserve_<name>` against the same call with verl's own `<name>`;
* policy losses through `core_algos.get_policy_loss_fn("advserve_<mode>")` called as
  `verl.workers.utils.losses.ppo_loss` calls it (keywords, an ActorConfig with global_batch_info), against
  verl's own `<mode>`: the loss, d loss / d log_prob by autograd, and the metrics.

argv: <project venv site-packages> <advserve address or "">. Prints one JSON document: the registered names
and, per case, the largest absolute differences.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE, ADDRESS = sys.argv[1], sys.argv[2]

sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
sys.path.insert(0, os.path.join(ROOT, "client"))
sys.path.insert(0, os.path.join(ROOT, "service"))
sys.path.append(SITE)  # after verl's own packages: its torch and numpy stay the ones verl runs with

# advserve as an installed distribution declaring the entry point verl loads (pyproject.toml's)
plugin_dir = tempfile.mkdtemp()
info = os.path.join(plugin_dir, "advserve_verl_plugin-0.0.0.dist-info")
os.makedirs(info)
with open(os.path.join(info, "METADATA"), "w") as f:
    f.write("Metadata-Version: 2.1\nName: advserve-verl-plugin\nVersion: 0.0.0\n")
with open(os.path.join(info, "entry_points.txt"), "w") as f:
    f.write("[verl.plugins]\nadvserve = advserve.integrations.verl\n")
sys.path.insert(0, plugin_dir)

if ADDRESS:
    os.environ["ADVSERVE_ADDRESS"] = ADDRESS

import verl_stub  # noqa: E402

verl_stub.install()

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import verl  # noqa: E402,F401  (loads the verl.plugins entry points: advserve registers itself here)
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos as ca  # noqa: E402
from verl.trainer.ppo import ray_trainer as rt  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

registered = sorted(name for name in [*ca.ADV_ESTIMATOR_REGISTRY, *ca.POLICY_LOSS_REGISTRY]
                    if name.startswith("advserve"))
if not registered:
    print(json.dumps({"error": "import verl did not register advserve (the verl.plugins entry point)"}))
    sys.exit(0)

from advserve.integrations import verl as integration  # noqa: E402

rng = np.random.default_rng(20261204)


_Batch, _Data = verl_stub.Batch, verl_stub.Data  # DataProto stand-ins


def batch_inputs(dtype, min_size=1):
    groups, size = int(rng.integers(2, 5)), int(rng.integers(min_size, 5))
    B, T = groups * size, int(rng.integers(2, 9))
    lengths = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    scores = np.zeros((B, T))
    scores[np.arange(B), lengths - 1] = rng.integers(0, 2, B) if rng.random() < 0.5 else rng.normal(size=B)
    uids = np.array([f"q{i // size}" for i in rng.permutation(B)], dtype=object)
    baselines = rng.normal(size=B)
    return (torch.tensor(mask, dtype=dtype), torch.tensor(scores, dtype=dtype), uids,
            torch.tensor(baselines, dtype=dtype))


def advantages(name, mask, scores, uids, baselines, gamma, norm):
    batch = _Batch(len(uids), response_mask=mask, token_level_rewards=scores.clone())
    if name.endswith("remax"):  # the trainer passes reward_baselines when the batch has them (ReMax's)
        batch["reward_baselines"] = baselines.clone()
    data = _Data(batch, {"uid": uids})
    config = AlgoConfig(gamma=gamma, lam=1.0, adv_estimator=name, norm_adv_by_std_in_grpo=norm)
    data = rt.compute_advantage(data, adv_estimator=name, gamma=gamma, lam=1.0, num_repeat=1,
                                norm_adv_by_std_in_grpo=norm, config=config)
    return data.batch["advantages"] * mask, data.batch["returns"] * mask


def diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# verl's trainer passes the extra inputs of these to its own names only: compared by direct calls
DIRECT = {"gdpo", "optimal_token_baseline", "tir_optimal_token_baseline"}


def direct(name, mask, scores, uids, norm):
    function = ca.get_adv_estimator_fn(name)
    if name.endswith("gdpo"):
        out = function(token_level_rewards=scores.clone(), response_mask=mask, index=uids,
                       norm_adv_by_std_in_grpo=norm)
    else:
        g = torch.Generator().manual_seed(len(uids))
        old = torch.log(torch.rand(mask.shape, generator=g, dtype=scores.dtype) * 0.9 + 0.05)
        sum_pi_squared = torch.rand(mask.shape, generator=g, dtype=scores.dtype)
        weights = torch.rand(mask.shape, generator=g, dtype=scores.dtype) * 2 if norm else None
        out = function(token_level_rewards=scores.clone(), response_mask=mask, index=uids, old_log_probs=old,
                       sum_pi_squared=sum_pi_squared, rollout_is_weights=weights)
    return out[0] * mask, out[1] * mask


report = {"registered": registered, "advantages": [], "policy_losses": []}
for verl_name in integration.ESTIMATORS:
    for trial in range(6):
        dtype = torch.float64 if trial % 2 else torch.float32
        mask, scores, uids, baselines = batch_inputs(dtype, min_size=2 if verl_name == "grpo_passk" else 1)
        gamma, norm = (1.0, trial % 3 != 0) if trial < 4 else (float(rng.uniform(0.5, 1.0)), True)
        if verl_name in DIRECT:
            ours = direct(integration.PREFIX + verl_name, mask, scores, uids, norm)
            theirs = direct(verl_name, mask, scores, uids, norm)
        else:
            ours = advantages(integration.PREFIX + verl_name, mask, scores, uids, baselines, gamma, norm)
            theirs = advantages(verl_name, mask, scores, uids, baselines, gamma, norm)
        report["advantages"].append({"estimator": verl_name, "dtype": str(dtype), "norm": norm, "gamma": gamma,
                                     "advantages": diff(ours[0], theirs[0]), "returns": diff(ours[1], theirs[1]),
                                     "dtype_kept": ours[0].dtype == theirs[0].dtype == dtype})

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
for verl_mode in integration.POLICY_LOSSES:
    for trial in range(8):
        dtype = torch.float64 if trial % 2 else torch.float32
        mask, _, _, _ = batch_inputs(dtype)
        B, T = mask.shape
        old = torch.tensor(np.log(rng.uniform(0.05, 0.95, (B, T))), dtype=dtype)
        new = (old + torch.tensor(rng.normal(0, 0.3, (B, T)), dtype=dtype)).requires_grad_(True)
        adv = torch.tensor(rng.normal(size=(B, T)), dtype=dtype)
        agg = AGGS[trial % len(AGGS)]
        low, high = float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.2, 0.4))
        clip_c = float(rng.uniform(1.5, 4.0))
        dp = 2 if trial >= 5 else 1
        info = {"dp_size": dp, "batch_num_tokens": int(mask.sum()) * dp if trial >= 4 else None,
                "global_batch_size": B * dp if trial >= 4 else None,
                "loss_scale_factor": 7 if trial == 3 else None}
        weights = torch.tensor(rng.uniform(0, 2, (B, T)), dtype=dtype) if trial == 6 else None
        results = {}
        for name in (integration.PREFIX + verl_mode, verl_mode):
            config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                                 clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=clip_c, loss_agg_mode=agg, loss_scale_factor=info["loss_scale_factor"],
                                 tau_pos=1.2, tau_neg=1.5,
                                 policy_loss=PolicyLossConfig(loss_mode=name, clip_cov_ratio=1.0, clip_cov_lb=-1.0,
                                                              clip_cov_ub=0.5, kl_cov_ratio=0.25, ppo_kl_coef=0.3,
                                                              dro_beta=0.7))
            config.global_batch_info.update(info)
            new.grad = None
            loss, metrics = ca.get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))(
                old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask.to(bool),
                loss_agg_mode=agg, config=config, rollout_is_weights=weights)
            loss.backward()
            results[name] = (loss.detach(), new.grad.clone(), metrics, loss.dtype, loss.dim())
        ours, theirs = results[integration.PREFIX + verl_mode], results[verl_mode]
        report["policy_losses"].append({
            "mode": verl_mode, "agg": agg, "dtype": str(dtype), "dp_size": dp, "weights": weights is not None,
            "loss": diff(ours[0], theirs[0]), "grad": diff(ours[1], theirs[1]),
            "metrics": {k: abs(ours[2][k] - theirs[2][k]) for k in theirs[2]},
            "metric_names": sorted(ours[2]) == sorted(theirs[2]), "scalar_of_dtype": ours[3] == dtype and ours[4] == 0})

# the whole actor loss: verl's ppo_loss composition (pg − entropy_coeff · entropy + kl_coef · kl, agg_loss with
# the global batch info) against compute_actor_loss
report["actor_losses"] = []
KL_TYPES = ("low_var_kl", "low_var_kl+", "k3+", "kl", "k1+", "mse", "abs")
for trial in range(14):
    dtype = torch.float64 if trial % 2 else torch.float32
    mask, _, _, _ = batch_inputs(dtype)
    B, T = mask.shape
    old = torch.tensor(np.log(rng.uniform(0.05, 0.95, (B, T))), dtype=dtype)
    ref = old + torch.tensor(rng.normal(0, 0.3, (B, T)), dtype=dtype)
    adv = torch.tensor(rng.normal(size=(B, T)), dtype=dtype)
    agg = AGGS[trial % len(AGGS)]
    mode = ("vanilla", "gspo", "cispo")[trial % 3]
    kl_type = KL_TYPES[trial % len(KL_TYPES)]
    dp = 2 if trial >= 9 else 1
    info = {"dp_size": dp, "batch_num_tokens": int(mask.sum()) * dp if dp > 1 else None,
            "global_batch_size": B * dp if dp > 1 else None, "loss_scale_factor": None}
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg, entropy_coeff=0.01,
                         use_kl_loss=True, kl_loss_coef=float(rng.uniform(0.001, 0.1)), kl_loss_type=kl_type,
                         policy_loss=PolicyLossConfig(loss_mode=mode))
    config.global_batch_info.update(info)
    grads, totals, metric_sets = [], [], []
    new = old + torch.tensor(rng.normal(0, 0.3, (B, T)), dtype=dtype)
    entropy = torch.tensor(rng.uniform(0, 2, (B, T)), dtype=dtype)
    for ours in (True, False):
        lp, ent = new.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
        m = mask.to(bool)
        if ours:
            total, metrics = integration.compute_actor_loss(config, lp, old, adv, m, entropy=ent, ref_log_prob=ref)
        else:
            pg, metrics = ca.get_policy_loss_fn(mode)(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=m,
                                                      loss_agg_mode=agg, config=config)
            entropy_loss = ca.agg_loss(loss_mat=ent, loss_mask=m, loss_agg_mode=agg, **config.global_batch_info)
            kl = ca.agg_loss(loss_mat=ca.kl_penalty(lp, ref, kl_type), loss_mask=m, loss_agg_mode=agg,
                             **config.global_batch_info)
            total = pg - config.entropy_coeff * entropy_loss + kl * config.kl_loss_coef
            metrics = dict(metrics, **{"actor/pg_loss": float(pg), "actor/entropy_loss": float(entropy_loss),
                                       "kl_loss": float(kl), "kl_coef": config.kl_loss_coef})
        total.backward()
        grads.append((lp.grad.clone(), ent.grad.clone()))
        totals.append(total.detach())
        metric_sets.append(metrics)
    report["actor_losses"].append({
        "mode": mode, "agg": agg, "kl": kl_type, "dtype": str(dtype), "dp_size": dp,
        "loss": diff(totals[0], totals[1]), "grad": diff(grads[0][0], grads[1][0]),
        "grad_entropy": diff(grads[0][1], grads[1][1]),
        "metric_names": sorted(metric_sets[0]) == sorted(metric_sets[1]),
        "metrics": max(abs(metric_sets[0][k] - metric_sets[1][k]) for k in metric_sets[1])})

# the critic's loss: core_algos.compute_value_loss against advserve's (verl's own signature)
report["value_losses"] = []
for trial in range(10):
    dtype = torch.float64 if trial % 2 else torch.float32
    mask, _, _, _ = batch_inputs(dtype)
    B, T = mask.shape
    old_values = torch.tensor(rng.normal(size=(B, T)), dtype=dtype)
    vpreds = old_values + torch.tensor(rng.normal(0, 0.5, (B, T)), dtype=dtype)
    returns = torch.tensor(rng.normal(size=(B, T)), dtype=dtype)
    agg = AGGS[trial % len(AGGS)]
    dp = 2 if trial >= 5 else 1
    kwargs = {"loss_agg_mode": agg, "dp_size": dp, "batch_num_tokens": int(mask.sum()) * dp if dp > 1 else None,
              "global_batch_size": B * dp if dp > 1 else None, "loss_scale_factor": 16 if trial % 5 == 3 else None}
    outs = []
    for function in (integration.compute_value_loss, ca.compute_value_loss):
        v = vpreds.clone().requires_grad_(True)
        loss, clipfrac = function(v, returns, old_values, mask.to(bool), 0.2, **kwargs)
        loss.backward()
        outs.append((loss.detach(), v.grad.clone(), float(clipfrac), loss.dtype))
    report["value_losses"].append({"agg": agg, "dtype": str(dtype), "dp_size": dp, "loss": diff(outs[0][0], outs[1][0]),
                                   "grad": diff(outs[0][1], outs[1][1]), "clipfrac": abs(outs[0][2] - outs[1][2]),
                                   "same_dtype": outs[0][3] == outs[1][3]})

print("\n" + json.dumps(report))  # the last line
