"""Generate tests/golden/openrlhf_<version>.json: golden vectors for a future `openrlhf` preset,
computed by the real OpenRLHF library (0.11.2).

Run with a throwaway venv that has ``openrlhf==0.11.2`` installed ``--no-deps`` plus torch and numpy
(the rest of OpenRLHF's import-time dependencies are stubbed by ``openrlhf_stub.py``)::

    /tmp/orlhfenv/bin/python tests/golden/make_openrlhf_golden.py

Every number in "expected" comes out of OpenRLHF's own code, called the way its trainer calls it:

* advantages: ``openrlhf.models.utils.compute_approx_kl`` (KL of old vs ref, as make_experience does,
  only when kl_coef > 0) and ``RemoteExperienceMaker.compute_advantages_and_returns`` (group baseline on
  the reshaped (-1, n) reward matrix, reward clipping + KL-in-reward by ``compute_reward``, GAE /
  cumulative returns, global whitening), on an experience list. OpenRLHF groups by *position*:
  rewards are sorted by each sample's ``index`` and reshaped to (-1, n_samples_per_prompt), so groups
  must be equal-sized; scattered ``group_ids`` are expressed by giving the rows indices that make each
  group contiguous (exactly what OpenRLHF's own dynamic batching does). Rows are split into
  micro-batch experiences of 1-3 rows.
* losses: ``PolicyLoss`` / ``ValueLoss`` / ``aggregate_loss`` / ``compute_approx_kl`` composed as
  ``ppo_actor.training_step`` does (kl and entropy terms always aggregated token-level) plus the
  critic's value loss; gradients by torch.autograd.grad.

Params/requests use advserve's names; names that advserve does not have yet are listed in each case's
"proposed_new" (see docs/research/openrlhf.md). OpenRLHF computes the KL estimator in float32 and the
whitening statistics in float32 whatever the input dtype; cases affected carry "tol" 1e-6 (others 1e-12; abs and rel).
Outputs [B, T] are multiplied by response_mask (advserve defines masked positions as 0).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import sys
from types import SimpleNamespace as NS

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import openrlhf_stub  # noqa: E402

openrlhf_stub.install()

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from openrlhf.models.loss import PolicyLoss, ValueLoss, aggregate_loss  # noqa: E402
from openrlhf.models.utils import compute_approx_kl  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402

VERSION = importlib.metadata.version("openrlhf")
OUT = os.path.join(HERE, f"openrlhf_{VERSION}.json")
F64 = torch.float64

# our estimator -> OpenRLHF --algo.advantage.estimator
ORLHF_ADV = {
    "gae": "gae",
    "reinforce_pp": "reinforce",
    "reinforce_pp_baseline": "reinforce_baseline",
    "rloo": "rloo",
    "grpo": "group_norm",
    "dr_grpo": "dr_grpo",
    "flash_reinforce": "flash_reinforce",  # proposed new estimator (batch-mean baseline)
}
NEW_PARAMS = {"returns_pre_whiten", "reward_clip_low", "reward_clip_high", "whiten_std", "whiten_eps_mode", "mask_gaps", "kl_dtype",
              "whiten_dtype"}
NEW_LOSS_PARAMS = {("kl_loss", "agg"), ("kl_loss", "unbiased_gradient"), ("entropy_bonus", "agg"), ("value_loss", "agg"),
                   ("rollout_correction", "gating"), ("rollout_correction", "weight"),
                   ("policy_loss", "gspo_dual_clip")}

rng = np.random.default_rng(20251125)


# ----------------------------------------------------------------------------------------------- inputs
def mask(*rows):
    return np.array([[int(c) for c in r] for r in rows], dtype=np.int64)


def rnd(shape, scale=1.0, nd=4):
    return np.round(rng.normal(0.0, scale, size=shape), nd)


def logprobs(m, nd=4):
    return np.round(-np.abs(rng.normal(0.0, 1.2, size=m.shape)) - 0.01, nd)


def kl_inputs(m, spread=0.4, extremes=()):
    old = logprobs(m)
    ref = np.round(old + rng.normal(0.0, spread, size=m.shape), 4)
    for (i, j, d) in extremes:  # ref - old = d at (i, j)
        ref[i, j] = old[i, j] + d
    return old, ref


def scattered(n_groups, n):
    """group_ids of n_groups equal groups of size n, shuffled through the batch."""
    g = np.repeat(np.arange(n_groups) * 3 + 1, n)
    rng.shuffle(g)
    return g.tolist()


# -------------------------------------------------------------------------------- OpenRLHF: advantages
def openrlhf_params(estimator, p):
    """Full parameter table (our names) of a case; defaults = OpenRLHF 0.11.2 CLI defaults."""
    full = {"kl_coef": 0.0, "kl_estimator": "k1", "kl_clamp": 10.0, "kl_dtype": "float32",
            "reward_clip_low": -10.0, "reward_clip_high": 10.0, "mask_gaps": "step"}
    if estimator in ("gae", "reinforce_pp", "reinforce_pp_baseline"):
        full.update({"whiten": True, "whiten_std": True, "whiten_ddof": 0, "whiten_eps": 1e-8,
                     "whiten_eps_mode": "clamp", "whiten_dtype": "float32"})
    if estimator == "gae":
        full.update({"gamma": 1.0, "lam": 1.0})
    if estimator == "reinforce_pp":
        full["gamma"] = 1.0
    if estimator in ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline"):
        full.update({"kl_placement": "reward_to_go", "singleton_groups": "error"})
    if estimator == "grpo":
        full.update({"std_ddof": 1, "std_eps": 1e-9})
    if estimator == "reinforce_pp_baseline":
        full["returns_pre_whiten"] = True  # OpenRLHF returns the cumulative return before whitening
    full.update(p)
    return full


def group_positions(group_ids):
    """index per row such that sorting by index makes every group contiguous (OpenRLHF's layout)."""
    order = {}
    for i, g in enumerate(group_ids):
        order.setdefault(g, []).append(i)
    sizes = {len(v) for v in order.values()}
    assert len(sizes) == 1, "OpenRLHF needs equal-size groups"
    idx = [0] * len(group_ids)
    pos = 0
    for g in order:  # groups in order of first appearance
        for i in order[g]:
            idx[i] = pos
            pos += 1
    return idx, sizes.pop()


def openrlhf_advantages(estimator, p, tensors, chunks):
    m_np = np.asarray(tensors["response_mask"])
    B = m_np.shape[0]
    m = torch.tensor(m_np, dtype=torch.int64).bool()
    rewards = torch.tensor(tensors["rewards"], dtype=F64)
    if "group_ids" in tensors:
        index, n = group_positions(tensors["group_ids"])
    else:
        index, n = list(range(B)), 1
    values = torch.tensor(tensors["values"], dtype=F64) if "values" in tensors else None
    kl_full = None
    if p["kl_coef"] > 0:  # make_experience: a reference model and KL in reward (algo.kl.use_loss off)
        kl_full = compute_approx_kl(torch.tensor(tensors["old_logprobs"], dtype=F64),
                                    torch.tensor(tensors["ref_logprobs"], dtype=F64),
                                    kl_estimator=p["kl_estimator"])
    exps, start = [], 0
    for c in chunks:
        sl = slice(start, start + c)
        start += c
        exps.append(NS(
            rewards=rewards[sl].clone(), index=index[sl], action_mask=m[sl],
            kl=kl_full[sl] if kl_full is not None else torch.zeros(c, m.shape[1], dtype=F64),
            values=values[sl] if values is not None else None, info={},
            response_length=m[sl].sum(-1)))
    assert start == B
    args = NS(
        algo=NS(advantage=NS(estimator=ORLHF_ADV[estimator], gamma=p.get("gamma", 1.0), lambd=p.get("lam", 1.0),
                             no_std_norm=not p.get("whiten_std", True))),
        rollout=NS(n_samples_per_prompt=n, max_new_tokens=None),
        reward=NS(clip_range=(p["reward_clip_low"], p["reward_clip_high"]), overlong_buffer_len=None,
                  stop_properly_penalty_coef=None),
        data=NS(max_len=4096),
    )
    em = object.__new__(RemoteExperienceMaker)
    em.strategy = NS(args=args)
    em.args = args
    em.advantage_estimator = ORLHF_ADV[estimator]
    em.kl_ctl = NS(value=p["kl_coef"])
    out = em.compute_advantages_and_returns(exps)
    adv = torch.cat([e.advantages.to(F64) for e in out]) * m
    ret = torch.cat([e.returns.to(F64) for e in out]) * m
    return adv, ret


# ----------------------------------------------------------------------------------- OpenRLHF: losses
def openrlhf_losses(request, tensors):
    def T(name):
        return torch.tensor(tensors[name], dtype=F64)

    m = torch.tensor(tensors["response_mask"], dtype=torch.int64).bool()
    pl = request["policy_loss"]
    rc = request.get("rollout_correction")
    info = {"dp_size": 1, "batch_num_tokens": request.get("num_tokens"), "global_batch_size": request.get("num_sequences")}
    loss_fn = PolicyLoss(
        clip_eps_low=pl["clip_low"], clip_eps_high=pl["clip_high"], dual_clip=pl["dual_clip"],
        token_level_loss=pl["agg"] == "token-mean", policy_loss_type={"ppo_clip": "ppo", "gspo": "gspo"}[pl["mode"]],
        is_correction_level={None: "off", "token": "token", "sequence": "seq"}[rc["level"] if rc else None],
        is_correction_mode={"truncate": "clip", "mask": "mask"}[rc["mode"]] if rc else "mask",
        is_correction_gating=rc.get("gating", "ratio") if rc else "ratio",
        is_correction_threshold=[rc["low"] if rc["low"] is not None else 0.0, rc["high"]] if rc else (0.5, 5.0),
    )
    old = T("old_logprobs")
    lp = T("logprobs").requires_grad_(True)
    wrt = [lp]
    pg, *_ = loss_fn(lp, old, T("advantages"), action_mask=m,
                     rollout_log_probs=T("rollout_logprobs") if "rollout_logprobs" in tensors else None, **info)
    total = pg
    comps = {"policy": pg.item(), "kl": None, "value": None, "entropy": None}
    if "kl_loss" in request:
        kr = request["kl_loss"]
        kl = compute_approx_kl(lp, T("ref_logprobs"), log_probs_old=old, kl_estimator=kr["estimator"],
                               unbiased_gradient=kr.get("unbiased_gradient", False))
        kl_loss = aggregate_loss(kl, m, **info)  # token_level_loss defaults to True (ppo_actor)
        total = total + kl_loss * kr["coef"]
        comps["kl"] = kl_loss.item()
    ent = None
    if "entropy_bonus" in request:
        ent = T("entropy").requires_grad_(True)
        wrt.append(ent)
        el = aggregate_loss(ent, m, **info)
        total = total - el * request["entropy_bonus"]["coef"]
        comps["entropy"] = el.item()
    vp = None
    if "value_loss" in request:
        vl = request["value_loss"]
        vp = T("values").requires_grad_(True)
        wrt.append(vp)
        vf = ValueLoss(vl["clip"])(vp, T("old_values"), T("returns"), action_mask=m, **info)
        total = total + vl["coef"] * vf
        comps["value"] = vf.item()
    grads = dict(zip(["lp"] + (["ent"] if ent is not None else []) + (["vp"] if vp is not None else []),
                     torch.autograd.grad(total, wrt)))
    mf = m.to(F64)
    return {"loss": total.item(), "components": comps, "grad_logprobs": grads["lp"].to(F64) * mf,
            "grad_values": grads["vp"] * mf if vp is not None else None,
            "grad_entropy": grads["ent"] * mf if ent is not None else None}


# ------------------------------------------------------------------------------------------------ cases
ADV_CASES, LOSS_CASES = [], []


def adv(name, estimator, params, tensors, chunks=None, note=""):
    B = len(tensors["response_mask"])
    if chunks is None:
        chunks, left = [], B
        while left:
            c = min(left, int(rng.integers(1, 4)))
            chunks.append(c)
            left -= c
    ADV_CASES.append((name, estimator, params, tensors, chunks, note))


def loss(name, request, tensors, note=""):
    LOSS_CASES.append((name, request, note, tensors))


def pad(*rows):
    w = max(len(r) for r in rows)
    return mask(*[r.ljust(w, "0") for r in rows])


M12 = pad("111111111", "11111", "1111111", "1", "111", "111111111", "11", "11111111", "1111", "111111",
          "1111111", "111")
GAPS = pad("110111011", "1111", "101", "1", "111111111", "1100111")


def outcome(m, gids=None, kl=False, values=False, rewards=None, **kl_kw):
    t = {"response_mask": m.tolist()}
    if gids is not None:
        t["group_ids"] = gids
    t["rewards"] = [float(x) for x in (rewards if rewards is not None else rnd(m.shape[0]))]
    if kl:
        o, r = kl_inputs(m, **kl_kw)
        t["old_logprobs"], t["ref_logprobs"] = (o * m).tolist(), (r * m).tolist()
    if values:
        t["values"] = (rnd(m.shape, 0.8) * m).tolist()
    return t


def build_cases():
    # group_norm (our grpo): scattered equal groups, ragged lengths, length-1 rows
    g43 = scattered(4, 3)
    adv("grpo/scattered-ragged", "grpo", {}, outcome(M12, g43))
    t = outcome(M12, g43)
    for i, g in enumerate(g43):
        if g == g43[0]:
            t["rewards"][i] = 0.5  # an all-equal group
    t["rewards"] = [float(x) for x in t["rewards"]]
    adv("grpo/all-equal-group", "grpo", {}, t)
    adv("grpo/binary", "grpo", {}, outcome(M12, g43, rewards=(rng.uniform(size=12) < 0.5).astype(float)))
    for est in ("k1", "k2", "k3"):
        adv(f"grpo/kl-{est}-in-reward", "grpo", {"kl_coef": 0.05, "kl_estimator": est},
            outcome(M12, g43, kl=True, extremes=[(0, 2, 12.0), (5, 1, -14.0)]),
            note="KL (clamped to ±10, float32) added per token, reward-to-go after the group normalization")
    adv("grpo/reward-clip", "grpo", {"reward_clip_low": -0.5, "reward_clip_high": 0.5}, outcome(M12, g43),
        note="OpenRLHF clips the *normalized* reward (after the group baseline) to clip_range")
    adv("grpo/interior-gaps-kl", "grpo", {"kl_coef": 0.1}, outcome(GAPS, scattered(3, 2), kl=True))
    # dr_grpo
    adv("dr_grpo/scattered", "dr_grpo", {}, outcome(M12, scattered(3, 4)))
    adv("dr_grpo/kl-k3", "dr_grpo", {"kl_coef": 0.02, "kl_estimator": "k3"}, outcome(M12, scattered(6, 2), kl=True))
    # rloo
    adv("rloo/scattered-n4", "rloo", {}, outcome(M12, scattered(3, 4), rewards=rnd(12, 3.0)))
    adv("rloo/n2-kl-k1", "rloo", {"kl_coef": 0.05}, outcome(M12, scattered(6, 2), kl=True))
    adv("rloo/default-reward-clip", "rloo", {}, outcome(M12, scattered(4, 3), rewards=rnd(12, 12.0)),
        note="|R_i − mean_{-i} R| > 10 clipped to ±10 (reward.clip_range default)")
    # reinforce_baseline (our reinforce_pp_baseline)
    adv("reinforce_pp_baseline/scattered", "reinforce_pp_baseline", {}, outcome(M12, g43))
    adv("reinforce_pp_baseline/kl-k1", "reinforce_pp_baseline", {"kl_coef": 0.05},
        outcome(M12, scattered(6, 2), kl=True))
    adv("reinforce_pp_baseline/no-std-norm", "reinforce_pp_baseline", {"whiten_std": False, "kl_coef": 0.05},
        outcome(M12, g43, kl=True))
    adv("reinforce_pp_baseline/all-equal-batch", "reinforce_pp_baseline", {},
        outcome(M12, g43, rewards=[1.0] * 12), note="all advantages 0: var 0 -> rsqrt(max(0, 1e-8)) = 1e4 times 0")
    # reinforce (our reinforce_pp)
    adv("reinforce_pp/kl-k1", "reinforce_pp", {"kl_coef": 0.05}, outcome(M12, kl=True))
    adv("reinforce_pp/gamma-0.9-gaps-kl", "reinforce_pp", {"gamma": 0.9, "kl_coef": 0.1}, outcome(GAPS, kl=True),
        note="interior masked positions: r = 0 there but γ still applies per padded step (mask_gaps='step')")
    adv("reinforce_pp/reward-clip", "reinforce_pp", {}, outcome(M12, rewards=rnd(12, 12.0)))
    adv("reinforce_pp/no-std-norm", "reinforce_pp", {"whiten_std": False}, outcome(M12))
    # gae
    adv("gae/default", "gae", {}, outcome(M12, values=True))
    adv("gae/gamma-lam-kl-k1", "gae", {"gamma": 0.99, "lam": 0.95, "kl_coef": 0.05},
        outcome(M12, kl=True, values=True))
    adv("gae/interior-gaps", "gae", {"gamma": 0.99, "lam": 0.95}, outcome(GAPS, values=True),
        note="masked positions have V = r = 0 but the recursion steps through them (mask_gaps='step')")
    adv("gae/interior-gaps-gamma1", "gae", {"kl_coef": 0.05}, outcome(GAPS, kl=True, values=True))
    adv("gae/no-std-norm", "gae", {"whiten_std": False}, outcome(M12, values=True))
    adv("gae/length-1-rows", "gae", {"gamma": 0.99, "lam": 0.95},
        outcome(pad("1", "1", "111", "1", "11"), values=True))
    # flash_reinforce (proposed new estimator): batch mean baseline, no whitening
    adv("flash_reinforce/batch-mean", "flash_reinforce", {"kl_coef": 0.05}, outcome(M12, kl=True))

    # ---- losses
    Ml = pad("11111111", "111", "11011010", "1", "111111", "11110111")

    def lt(m, *, adv_scale=1.2, spread=0.25, shift=0.0, values=False, entropy=False, ref=False, rollout=False):
        old = logprobs(m)
        t = {"response_mask": m.tolist(), "old_logprobs": (old * m).tolist(),
             "logprobs": (np.round(old + rng.normal(shift, spread, m.shape), 4) * m).tolist(),
             "advantages": (rnd(m.shape, adv_scale) * m).tolist()}
        if ref:
            r = np.round(old + rng.normal(0, 0.5, m.shape), 4)
            r[0, 1] = old[0, 1] - 14.0
            r[2, 0] = old[2, 0] + 12.0
            t["ref_logprobs"] = (r * m).tolist()
        if rollout:
            t["rollout_logprobs"] = (np.round(old + rng.normal(0, 0.6, m.shape), 4) * m).tolist()
        if values:
            v_old = rnd(m.shape, 0.8)
            t["values"] = (np.round(v_old + rng.normal(0, 0.6, m.shape), 4) * m).tolist()
            t["old_values"] = (v_old * m).tolist()
            t["returns"] = (rnd(m.shape, 1.0) * m).tolist()
        if entropy:
            t["entropy"] = (np.round(rng.uniform(0.1, 2.5, m.shape), 4) * m).tolist()
        return t

    PL = {"mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None, "ratio_clamp": 20.0,
          "agg": "token-mean"}
    loss("ppo_clip/token-mean", {"policy_loss": PL}, lt(Ml, spread=0.4))
    loss("ppo_clip/dual-clip-3", {"policy_loss": {**PL, "dual_clip": 3.0}}, lt(Ml, spread=0.8))
    loss("ppo_clip/eps-low-high", {"policy_loss": {**PL, "clip_low": 0.2, "clip_high": 0.28}}, lt(Ml, spread=0.4))
    loss("ppo_clip/seq-mean-token-mean", {"policy_loss": {**PL, "agg": "seq-mean-token-mean"}}, lt(Ml, spread=0.4),
         note="OpenRLHF divides each row by (L_i + 1e-8)")
    loss("ppo_clip/global-num-tokens", {"policy_loss": PL, "num_tokens": 50}, lt(Ml, spread=0.4))
    loss("ppo_clip/global-num-sequences", {"policy_loss": {**PL, "agg": "seq-mean-token-mean"}, "num_sequences": 9},
         lt(Ml, spread=0.4))
    loss("gspo/seq", {"policy_loss": {**PL, "mode": "gspo", "clip_low": 3e-4, "clip_high": 4e-4,
                                      "agg": "seq-mean-token-mean", "ratio_clamp": None}}, lt(Ml, spread=0.02),
         note="OpenRLHF forces seq-mean-token-mean for gspo; ratio = exp(mean log ratio), gradient through the mean")
    t = lt(Ml, spread=0.05)
    t["advantages"] = (np.repeat(rnd((Ml.shape[0], 1), 1.2), Ml.shape[1], 1) * Ml).tolist()
    loss("gspo/seq-constant-advantage", {"policy_loss": {**PL, "mode": "gspo", "clip_low": 3e-4, "clip_high": 4e-4,
                                                         "agg": "seq-mean-token-mean", "ratio_clamp": None}}, t,
         note="A constant per row: OpenRLHF's gradient through the mean equals verl's token-level trick")
    loss("gspo/dual-clip", {"policy_loss": {**PL, "mode": "gspo", "clip_low": 0.01, "clip_high": 0.01,
                                            "agg": "seq-mean-token-mean", "ratio_clamp": None, "dual_clip": 1.05}},
         lt(Ml, spread=0.3, shift=0.08), note="OpenRLHF applies dual clip to gspo too (binds where s_i > 1.05, A < 0)")
    for est in ("k1", "k2", "k3"):
        loss(f"kl_loss/{est}", {"policy_loss": {**PL, "agg": "seq-mean-token-mean"},
                                "kl_loss": {"coef": 0.01, "estimator": est, "clamp": 10.0, "agg": "token-mean"}},
             lt(Ml, ref=True), note="kl_loss always token-mean in OpenRLHF, computed in float32")
    loss("kl_loss/k3-unbiased-gradient", {"policy_loss": PL, "kl_loss": {"coef": 0.01, "estimator": "k3", "clamp": 10.0,
                                                                          "agg": "token-mean", "unbiased_gradient": True}},
         lt(Ml, ref=True, spread=0.8))
    loss("entropy/token-mean", {"policy_loss": {**PL, "agg": "seq-mean-token-mean"},
                                "entropy_bonus": {"coef": 0.01, "agg": "token-mean"}}, lt(Ml, entropy=True))
    loss("value_loss/clip-0.5", {"policy_loss": PL, "value_loss": {"coef": 1.0, "clip": 0.5, "agg": "token-mean"}},
         lt(Ml, values=True))
    loss("value_loss/unclipped", {"policy_loss": PL, "value_loss": {"coef": 1.0, "clip": None, "agg": "token-mean"}},
         lt(Ml, values=True))
    RC = {"low": 0.5, "high": 5.0, "gating": "ratio", "weight": "token"}
    loss("is/tis-token-clip", {"policy_loss": PL, "rollout_correction": {**RC, "level": "token", "mode": "truncate",
                                                                          "low": 0.8, "high": 1.5}},
         lt(Ml, rollout=True))
    loss("is/icepop-token-mask", {"policy_loss": PL, "rollout_correction": {**RC, "level": "token", "mode": "mask",
                                                                             "low": 0.8, "high": 1.5}},
         lt(Ml, rollout=True))
    loss("is/seq-mask-tis", {"policy_loss": PL, "rollout_correction": {**RC, "level": "sequence", "mode": "mask",
                                                                        "low": 0.8, "high": 1.25}},
         lt(Ml, rollout=True), note="gate = exp(mean_t(old − rollout)) (geometric mean); survivors keep per-token w")
    loss("is/seq-binary-kl", {"policy_loss": PL, "rollout_correction": {**RC, "level": "sequence", "mode": "mask",
                                                                         "gating": "binary_kl", "low": None,
                                                                         "high": 0.05}},
         lt(Ml, rollout=True))
    loss("is/token-tv", {"policy_loss": PL, "rollout_correction": {**RC, "level": "token", "mode": "mask",
                                                                    "gating": "tv", "low": None, "high": 0.1}},
         lt(Ml, rollout=True))
    loss("all-terms", {"policy_loss": {**PL, "dual_clip": 3.0, "agg": "seq-mean-token-mean"},
                       "kl_loss": {"coef": 0.001, "estimator": "k3", "clamp": 10.0, "agg": "token-mean"},
                       "entropy_bonus": {"coef": 0.001, "agg": "token-mean"},
                       "value_loss": {"coef": 1.0, "clip": 0.5, "agg": "token-mean"},
                       "rollout_correction": {**RC, "level": "token", "mode": "truncate", "low": 0.5, "high": 5.0}},
         lt(Ml, ref=True, entropy=True, values=True, rollout=True, spread=0.5))

    # ---- value-clip ties that are ties only after rounding (appended last: the cases above keep their draws).
    # ValueLoss clamps v − v_old to ±clip and adds it back: where v = fl(v_old ± clip), fl(v − v_old) can miss
    # ±clip by an ulp (the clamp then passes no gradient, or all of it) while v_old + clamp(...) == v, a tie
    # of torch.max that halves dL/dv.
    def rounding_ties(m, clip):
        t = lt(m, values=True)
        old_v, v = np.array(t["old_values"]), np.array(t["values"])
        above = below = 0
        for i, j in zip(*np.nonzero(m)):
            sign = 1.0 if (i + j) % 2 == 0 else -1.0
            for _ in range(200):  # an old value whose fl(old ± clip) − old is not ±clip exactly
                o = float(rnd((), 0.8))
                tied = o + sign * clip
                if (tied - o) != sign * clip:
                    break
            old_v[i, j], v[i, j] = o, tied
            above += abs(tied - o) > clip
            below += abs(tied - o) < clip
        assert above and below, (above, below)
        t["old_values"], t["values"] = (old_v * m).tolist(), (v * m).tolist()
        return t

    for clip in (0.2, 0.5):
        loss(f"value_loss/rounding-ties-clip-{clip}", {"policy_loss": PL, "value_loss": {"coef": 1.0, "clip": clip,
                                                                                          "agg": "token-mean"}},
             rounding_ties(Ml, clip), note="v = fl(v_old ± clip) on every token: |fl(v − v_old)| misses clip by an "
             "ulp on some (OpenRLHF halves dL/dv there, or passes it whole), hits it on others")
    t = lt(pad("1"), values=True)
    t.update(values=[[0.30000000000000004]], old_values=[[0.1]], returns=[[2.0]])
    loss("value_loss/issue-16-rounding-tie", {"policy_loss": PL, "value_loss": {"coef": 1.0, "clip": 0.2,
                                                                                 "agg": "token-mean"}}, t,
         note="issue 16: returns 2.0, clip 0.2, old 0.1, values 0.30000000000000004: value loss 1.445, dL/dv −0.85")


def tolist(x):
    return None if x is None else x.detach().cpu().tolist()


def advantage_record(name, est, params, tensors, chunks, note):
    """One advantage case of the golden file, OpenRLHF's answer. Also used by tests/golden/fuzz_libraries.py."""
    full = openrlhf_params(est, params)
    a, r = openrlhf_advantages(est, full, tensors, chunks)
    assert torch.isfinite(a).all() and torch.isfinite(r).all(), name
    float32_path = full["kl_coef"] > 0 or full.get("whiten", False)
    case = {"case": name, "estimator": est, "openrlhf_estimator": ORLHF_ADV[est], "params": full,
            "proposed_new": sorted(k for k in full if k in NEW_PARAMS) + ([] if est != "flash_reinforce" else
                                                                           ["estimator:flash_reinforce"]),
            "dtype": "float64", "tol": 1e-6 if float32_path else 1e-12, "micro_batches": chunks,
            "tensors": tensors, "expected": {"advantages": tolist(a), "returns": tolist(r)}}
    if note:
        case["note"] = note
    return case


def loss_record(name, request, note, tensors):
    """One loss case of the golden file, OpenRLHF's answer. Also used by tests/golden/fuzz_libraries.py."""
    e = openrlhf_losses(request, tensors)
    assert math.isfinite(e["loss"]), name
    new = sorted(f"{t}.{k}" for t, sub in request.items() if isinstance(sub, dict) for k in sub
                 if (t, k) in NEW_LOSS_PARAMS)
    if request["policy_loss"]["mode"] == "gspo" and request["policy_loss"].get("dual_clip") is not None:
        new.append("policy_loss.gspo_dual_clip (dual clip applies to gspo)")
    case = {"case": name, "dtype": "float64", "tol": 1e-6 if "kl_loss" in request else 1e-12,
            "request": request, "proposed_new": new, "tensors": tensors,
            "expected": {"loss": e["loss"], "components": e["components"],
                         "grad_logprobs": tolist(e["grad_logprobs"]), "grad_values": tolist(e["grad_values"]),
                         "grad_entropy": tolist(e["grad_entropy"])}}
    if note:
        case["note"] = note
    return case


def main():
    build_cases()
    adv_out = [advantage_record(*c) for c in ADV_CASES]
    loss_out = [loss_record(*c) for c in LOSS_CASES]
    doc = {"library": "openrlhf", "version": VERSION, "torch": torch.__version__,
           "generated": datetime.date.today().isoformat(), "generator": "tests/golden/make_openrlhf_golden.py",
           "preset": "openrlhf (proposed; see docs/research/openrlhf.md)",
           "advantages": adv_out, "losses": loss_out}
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    print(f"wrote {OUT}: {len(adv_out)} advantage cases, {len(loss_out)} loss cases")


if __name__ == "__main__":
    main()
