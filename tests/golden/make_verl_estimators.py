"""Generate tests/golden/verl_0.9.1_estimators.json: golden vectors for the advantage estimators verl 0.9.1
added beyond tests/golden/verl_0.9.1.json (grpo_passk, opo, gpg, gdpo, rloo_vectorized,
optimal_token_baseline, tir_optimal_token_baseline) and for verl's masked token rewards (its outcome
estimators sum token_level_rewards over every position, masked ones included), computed by the real verl.

Run with the throwaway venv of make_verl_golden.py (verl==0.9.1 --no-deps, torch, numpy, packaging,
omegaconf; the rest of verl's import-time dependencies stubbed by verl_stub.py)::

    /tmp/verlenv/bin/python tests/golden/make_verl_estimators.py

Every number in "expected" comes out of verl's own functions, called the way verl's trainer calls them:
``ray_trainer.apply_kl_penalty`` (KL in the reward) then ``ray_trainer.compute_advantage`` on a minimal
stand-in for DataProto, with ``sum_pi_squared``, ``old_log_probs`` and ``rollout_is_weights`` in the batch
for the optimal-token-baseline estimators. gdpo with ``reward_components`` goes through the trainer's own path:
``algorithm.gdpo_reward_keys`` (and ``gdpo_reward_weights``) with the components in ``non_tensor_batch``
and ``prompts``/``attention_mask`` in the batch, which verl reads as float32 (those cases are float32).
Two kinds of case call ``core_algos`` directly, because verl's trainer cannot reach them: gdpo with one
reward dimension (the trainer asserts gdpo_reward_keys; the function's own fallback is the
single-dimension form) and the optimal token baseline with handle_zero_tail=False (the trainer passes no
such argument). Outcome ``rewards`` [B] are placed on
the last valid position to build ``token_level_scores``; ``token_rewards`` [B, T] are given as they are,
masked positions included. Inputs float64 (gdpo with components: float32); outputs [B, T] multiplied by response_mask. A case whose
``expected`` is ``{"error": ...}`` is one verl refuses (a pass@k group of one).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import verl_stub  # noqa: E402

verl_stub.install()

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import verl  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos as ca  # noqa: E402
from verl.trainer.ppo import ray_trainer as rt  # noqa: E402

OUT = os.path.join(HERE, "verl_0.9.1_estimators.json")
KL_NAMES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl", "abs": "abs"}
# advserve estimator (with the params that select the verl variant) -> verl's registry name
VERL_NAME = {"grpo_passk": "grpo_passk", "opo": "opo", "gpg": "gpg", "gdpo": "gdpo", "grpo": "grpo",
             "dr_grpo": "grpo", "rloo": "rloo", "reinforce_pp_baseline": "reinforce_plus_plus_baseline",
             "optimal_token_baseline": "optimal_token_baseline",
             "tir_optimal_token_baseline": "tir_optimal_token_baseline"}
rng = np.random.default_rng(20261204)


# ------------------------------------------------------------------------------------------- inputs
def ragged_mask(B, T, gaps=True, one=True, empty=False):
    """Right-padded rows of random length in [1, T] (some of length 1), interior zeros (observation
    gaps) in some rows, optionally an empty row."""
    m = np.zeros((B, T), dtype=np.int64)
    for i in range(B):
        L = int(rng.integers(1, T + 1))
        if one and i % 5 == 2:
            L = 1
        m[i, :L] = 1
        if gaps and L >= 4 and rng.uniform() < 0.5:
            a = int(rng.integers(1, L - 2))
            m[i, a:a + int(rng.integers(1, L - a - 1))] = 0
    if empty:
        m[int(rng.integers(0, B)), :] = 0
    return m


def scattered_groups(B, sizes):
    """Group ids for groups of the given sizes (summing to B), shuffled through the batch."""
    assert sum(sizes) == B
    ids = [f"q{g}" for g, n in enumerate(sizes) for _ in range(n)]
    return [ids[i] for i in rng.permutation(B)]


def rewards(B, kind):
    if kind == "binary":
        return (rng.uniform(size=B) < 0.5).astype(np.float64)
    if kind == "ties":  # a few levels: ties inside groups, ties for the best
        return rng.choice([0.0, 0.5, 1.0], size=B)
    return np.round(rng.normal(0.3, 1.0, size=B), 4)


def token_rewards(m, masked=True):
    """Sparse token rewards on valid positions, and (`masked`) nonzero values on masked ones too."""
    tr = np.round(rng.normal(0.0, 0.8, size=m.shape), 4) * (rng.uniform(size=m.shape) < 0.5)
    tr = tr * m
    if masked:
        tr = tr + np.round(rng.normal(0.0, 0.5, size=m.shape), 4) * (1 - m) * (rng.uniform(size=m.shape) < 0.6)
    return tr


def logprobs(m):
    return np.round(-np.abs(rng.normal(0.0, 1.0, size=m.shape)) - 0.01, 4)


def sum_pi_sq(old):
    """Σ_v π_v² consistent with the sampled token's π: between π² and π² + (1 − π)²."""
    p = np.exp(old)
    return np.round(p * p + (1 - p) ** 2 * rng.uniform(0.05, 1.0, size=old.shape), 6)


# ------------------------------------------------------------------------------------ verl: advantages
_Batch, _Data = verl_stub.Batch, verl_stub.Data  # DataProto stand-ins


def token_scores(tensors):
    m = np.asarray(tensors["response_mask"])
    if "rewards" in tensors:
        s = np.zeros(m.shape)
        last = np.array([np.nonzero(row)[0][-1] for row in m])
        s[np.arange(m.shape[0]), last] = np.asarray(tensors["rewards"], dtype=np.float64)
        return s
    return np.asarray(tensors["token_rewards"], dtype=np.float64)


def verl_advantages(estimator, params, tensors, direct=None):
    """verl's (advantages, returns) [B, T] × mask; `direct`: call core_algos' function with these kwargs
    instead of the trainer's dispatch."""
    tdt = torch.float64
    m = torch.tensor(np.asarray(tensors["response_mask"]), dtype=tdt)
    B = m.shape[0]
    batch = _Batch(B, response_mask=m, token_level_scores=torch.tensor(token_scores(tensors), dtype=tdt))
    non_tensor = {"uid": np.array(list(tensors["group_ids"]), dtype=object)}
    for ours, theirs in (("old_logprobs", "old_log_probs"), ("sum_pi_squared", "sum_pi_squared"),
                         ("rollout_is_weights", "rollout_is_weights")):
        if ours in tensors:
            batch[theirs] = torch.tensor(tensors[ours], dtype=tdt)
    data = _Data(batch, non_tensor)
    kl_coef = params.get("kl_coef", 0.0)
    kl_name = KL_NAMES[params.get("kl_estimator", "k1")]
    if kl_coef:
        batch["ref_log_prob"] = torch.tensor(tensors["ref_logprobs"], dtype=tdt)
        data, _ = rt.apply_kl_penalty(data, kl_ctrl=ca.FixedKLController(kl_coef=kl_coef), kl_penalty=kl_name)
    else:
        batch["token_level_rewards"] = batch["token_level_scores"]
    name = VERL_NAME[estimator]
    if estimator == "rloo" and params.get("singleton_groups") == "zero":
        name = "rloo_vectorized"
    norm = estimator != "dr_grpo" and params.get("scale_by_std", True)
    if direct is not None:
        fn = ca.get_adv_estimator_fn(name)
        kwargs = {"token_level_rewards": batch["token_level_rewards"], "response_mask": m, "index": non_tensor["uid"]}
        for key in ("old_log_probs", "sum_pi_squared", "rollout_is_weights"):
            if key in batch:
                kwargs[key] = batch[key]
        adv, ret = fn(**kwargs, **direct)
    else:
        config = AlgoConfig(adv_estimator=name, norm_adv_by_std_in_grpo=norm, use_kl_in_reward=bool(kl_coef),
                            kl_penalty=kl_name)
        data = rt.compute_advantage(data, adv_estimator=name, num_repeat=1, norm_adv_by_std_in_grpo=norm,
                                    config=config)
        adv, ret = data.batch["advantages"], data.batch["returns"]
    assert adv.dtype == tdt and ret.dtype == tdt, (adv.dtype, ret.dtype)
    return adv * m, ret * m


# ---------------------------------------------------------------------------------------------- cases
CASES = []  # (name, estimator, params, tensors, direct)


def add(name, estimator, params, tensors, direct=None):
    CASES.append((name, estimator, params, tensors, direct))


def batch(B, T, sizes, kind="continuous", token=False, masked=True, kl=False, otb=False, is_weights=False,
          empty=False, gaps=True):
    m = ragged_mask(B, T, gaps=gaps, empty=empty)
    t = {"response_mask": m, "group_ids": scattered_groups(B, sizes)}
    if token or empty:
        t["token_rewards"] = token_rewards(m, masked)
    else:
        t["rewards"] = rewards(B, kind)
    if kl or otb:
        t["old_logprobs"] = logprobs(m)
    if kl:
        t["ref_logprobs"] = np.round(t["old_logprobs"] + rng.normal(0, 0.3, size=m.shape), 4)
    if otb:
        t["sum_pi_squared"] = sum_pi_sq(t["old_logprobs"])
    if is_weights:
        t["rollout_is_weights"] = np.round(rng.uniform(0.0, 2.0, size=m.shape), 4)
    return t


def build():
    outcome = ("grpo_passk", "opo", "gpg", "gdpo")
    for est in outcome:
        single_ok = est != "grpo_passk"
        sizes = [(4, 4), (3, 5, 2), (2, 2, 2, 2), (5, 3), (6,), (3, 3, 3)]
        if single_ok:
            sizes += [(1, 4, 1, 2), (1, 1, 3)]
        for n, sz in enumerate(sizes):
            B = sum(sz)
            kind = ("binary", "ties", "continuous")[n % 3]
            params = {}
            direct = {} if est == "gdpo" else None  # gdpo: the one-dimension form (see the docstring)
            add(f"{est}_{kind}_{'_'.join(map(str, sz))}", est, params, batch(B, 7, sz, kind), direct)
        add(f"{est}_token_rewards_masked_nonzero", est, {}, batch(9, 8, (4, 3, 2) if not single_ok else (4, 1, 4),
                                                                    token=True), {} if est == "gdpo" else None)
        add(f"{est}_token_rewards_masked_nonzero_2", est, {}, batch(8, 6, (2, 3, 3), token=True),
            {} if est == "gdpo" else None)
        add(f"{est}_length1_rows", est, {}, {"response_mask": np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]),
                                            "group_ids": ["a", "b", "a", "b"], "rewards": np.array([1.0, 0.0, 0.0, 0.7])},
            {} if est == "gdpo" else None)
        if est != "gdpo":  # gdpo's direct call takes no KL (the trainer's gdpo path needs reward keys)
            add(f"{est}_kl_k3", est, {"kl_coef": 0.05, "kl_estimator": "k3"}, batch(8, 6, (3, 3, 2), "ties", kl=True))
        if est == "grpo_passk":
            add("grpo_passk_no_std", est, {"scale_by_std": False}, batch(9, 6, (3, 3, 3), "ties"))
            add("grpo_passk_no_std_token", est, {"scale_by_std": False}, batch(8, 6, (4, 4), token=True))
            add("grpo_passk_all_tied", est, {}, {"response_mask": np.ones((4, 3), dtype=np.int64),
                                                 "group_ids": [0, 1, 0, 1], "rewards": np.array([1.0, 1.0, 1.0, 1.0])})
            add("grpo_passk_singleton_error", est, {}, batch(5, 4, (2, 1, 2), "binary"))
    # rloo_vectorized (singleton groups 0) and the masked-reward sums of the estimators advserve had
    for n, sz in enumerate([(1, 3, 2), (4, 1, 1, 2), (2, 2, 3), (1, 1), (5, 2, 1), (3, 3, 1, 1), (2, 5),
                            (1, 2, 3, 4), (6, 1), (2, 2, 2)]):
        add(f"rloo_vectorized_{n}", "rloo", {"singleton_groups": "zero"},
            batch(sum(sz), 6, sz, ("binary", "ties", "continuous")[n % 3], token=n % 2 == 1))
    add("rloo_vectorized_kl", "rloo", {"singleton_groups": "zero", "kl_coef": 0.1}, batch(7, 5, (3, 1, 3), kl=True))
    for est in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        for n, sz in enumerate([(3, 2, 1), (4, 4), (2, 3, 2)]):
            add(f"{est}_masked_token_rewards_{n}", est, {}, batch(sum(sz), 7, sz, token=True))
        add(f"{est}_masked_token_rewards_kl", est, {"kl_coef": 0.02}, batch(6, 6, (3, 3), token=True, kl=True))
    # gdpo with several reward components (verl's trainer path: float32)
    for n, (sz, k, weights) in enumerate([((4, 4), 2, None), ((3, 5, 2), 3, [1.0, 0.5, 0.25]), ((2, 2, 2), 2, [0.1, 2.0]),
                                          ((1, 4, 3), 2, None), ((5, 1, 1, 2), 3, [1.0, 1.0, 0.3]),
                                          ((3, 3), 1, [0.7]), ((6, 2), 4, None), ((2, 3, 1), 2, [1.0, -0.5])]):
        t = batch(sum(sz), 6, sz, gaps=n % 2 == 0)
        del t["rewards"]
        levels = np.array([0.0, 0.25, 0.5, 1.0])
        t["reward_components"] = np.where(rng.uniform(size=(sum(sz), k)) < 0.5, rng.choice(levels, size=(sum(sz), k)),
                                          np.round(rng.normal(0.0, 1.0, size=(sum(sz), k)), 3))
        add(f"gdpo_components_{n}", "gdpo", {} if weights is None else {"reward_weights": weights}, t)
    # the optimal token baselines
    for est in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        for n, sz in enumerate([(4, 4), (3, 1, 2), (2, 2, 2, 2), (5, 3), (1, 1, 4), (3, 3, 3), (6, 2)]):
            add(f"{est}_{n}", est, {}, batch(sum(sz), 8, sz, ("binary", "ties", "continuous")[n % 3],
                                            token=n % 3 == 2, otb=True, is_weights=n % 2 == 1))
        add(f"{est}_empty_row", est, {}, batch(7, 6, (3, 4), otb=True, empty=True))
        add(f"{est}_no_gaps", est, {}, batch(6, 6, (3, 3), otb=True, gaps=False))
        add(f"{est}_tied_longest", est, {}, {
            "response_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]),
            "group_ids": ["a", "a", "a", "b", "b"], "rewards": np.array([1.0, 0.0, 1.0, 0.5, 0.25]),
            "old_logprobs": -np.full((5, 4), 0.3), "sum_pi_squared": np.full((5, 4), 0.6)})
        add(f"{est}_kl", est, {"kl_coef": 0.05}, batch(6, 6, (3, 3), otb=True, kl=True))
        for n, sz in enumerate([(3, 3), (2, 1, 3)]):
            add(f"{est}_no_zero_tail_{n}", est, {"handle_zero_tail": False}, batch(sum(sz), 7, sz, otb=True),
                {"handle_zero_tail": False})


def verl_gdpo_components(params, tensors):
    """verl's trainer path for gdpo: one non_tensor_batch entry per reward component, placed by verl at
    the last non-padding response position (attention_mask), normalized per dimension, weighted, whitened."""
    m_np = np.asarray(tensors["response_mask"])
    B, T = m_np.shape
    m = torch.tensor(m_np, dtype=torch.float32)
    last = np.array([np.nonzero(row)[0][-1] for row in m_np])
    attention = (np.arange(T)[None, :] <= last[:, None]).astype(np.int64)
    P = 2
    batch = _Batch(B, response_mask=m, token_level_rewards=torch.zeros(B, T),
                   prompts=torch.zeros(B, P, dtype=torch.long),
                   attention_mask=torch.tensor(np.concatenate([np.ones((B, P), dtype=np.int64), attention], 1)))
    components = np.asarray(tensors["reward_components"])
    keys = [f"reward_{k}" for k in range(components.shape[1])]
    non_tensor = {"uid": np.array(list(tensors["group_ids"]), dtype=object)}
    for k, key in enumerate(keys):
        non_tensor[key] = components[:, k].tolist()
    config = AlgoConfig(adv_estimator="gdpo", gdpo_reward_keys=keys, gdpo_reward_weights=params.get("reward_weights"))
    data = rt.compute_advantage(_Data(batch, non_tensor), adv_estimator="gdpo", num_repeat=1, config=config)
    adv, ret = data.batch["advantages"], data.batch["returns"]
    assert adv.dtype == torch.float32, adv.dtype
    return adv * m, ret * m


def tolist(x):
    return np.asarray(x, dtype=np.float64).tolist()


def record(name, estimator, params, tensors, direct):
    components = "reward_components" in tensors
    case = {"case": name, "estimator": estimator, "params": params, "dtype": "float32" if components else "float64",
            "tensors": {k: (list(v) if k == "group_ids" else tolist(v)) for k, v in tensors.items()}}
    if direct is not None:
        case["verl_call"] = f"core_algos.{ca.get_adv_estimator_fn(VERL_NAME[estimator]).__name__}(**{direct!r})"
    try:
        adv, ret = (verl_gdpo_components(params, tensors) if components
                    else verl_advantages(estimator, params, tensors, direct))
    except ValueError as e:
        case["expected"] = {"error": str(e)}
        return case
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name
    case["expected"] = {"advantages": tolist(adv), "returns": tolist(ret)}
    return case


def main():
    build()
    out = [record(*c) for c in CASES]
    names = [c["case"] for c in out]
    assert len(names) == len(set(names)), "duplicate case names"
    doc = {
        "library": "verl",
        "version": getattr(verl, "__version__", None) or importlib.metadata.version("verl"),
        "torch": torch.__version__,
        "generated": datetime.date.today().isoformat(),
        "generator": "tests/golden/make_verl_estimators.py",
        "advantages": out,
    }
    assert doc["version"] == "0.9.1", doc["version"]
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    counts = {}
    for c in out:
        key = c["estimator"] + ("(vectorized)" if c["case"].startswith("rloo_vectorized") else "")
        counts[key] = counts.get(key, 0) + 1
    print(f"wrote {OUT}: {len(out)} cases, {os.path.getsize(OUT)} bytes; per estimator: {counts}")


if __name__ == "__main__":
    main()
