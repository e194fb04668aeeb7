"""Generate tests/golden/verl_0.9.1.json: golden vectors for advserve's `verl` preset, computed by the
real verl library (version 0.9.1).

Run with a throwaway venv that has ``verl==0.9.1`` installed ``--no-deps`` plus torch, numpy, packaging
and omegaconf (the rest of verl's import-time dependencies are stubbed by ``verl_stub.py``)::

    /tmp/verlenv/bin/python tests/golden/make_verl_golden.py

Every number in "expected" comes out of verl's own functions, called the way verl's trainer calls them:

* advantages: ``verl.trainer.ppo.ray_trainer.apply_kl_penalty`` (KL in reward, use_kl_in_reward) and
  ``verl.trainer.ppo.ray_trainer.compute_advantage`` (which dispatches to ``core_algos``), on a minimal
  stand-in for DataProto (a dict of tensors). Outcome ``rewards`` [B] are placed on the last position
  where response_mask == 1 to build verl's ``token_level_scores``.
* losses: the composition of ``verl.workers.utils.losses.ppo_loss`` / ``value_loss`` (policy loss from
  ``core_algos.get_policy_loss_fn``, ``agg_loss`` for entropy and KL loss, ``kl_penalty``,
  ``compute_value_loss``; response_mask as bool, as those functions convert it), with rollout IS weights
  from ``rollout_corr_helper.compute_rollout_correction_weights`` (log_ratio = old - rollout).
  Total = pg + kl_coef * kl + vf_coef * vf - entropy_coef * entropy; gradients by torch.autograd.grad.

All inputs are float64 (two GRPO cases float32); the advantage estimators get a float64 (resp. float32)
response_mask. Outputs [B, T] are multiplied by response_mask (advserve defines masked positions as 0).

A small independent reference written from docs/semantics.md runs on every case as a sanity check of how
verl is called here (loose tolerance 1e-6; verl's float32/eps quirks are far below it).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
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
from verl.trainer.ppo import rollout_corr_helper as rch  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

OUT = os.path.join(HERE, "verl_0.9.1.json")
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# our KL estimator names -> verl's kl_penalty names (verl accepts both "k2" and "mse" etc.)
KL_NAMES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl", "abs": "abs"}
VERL_ADV = {
    "gae": "gae",
    "orz": "gae",
    "grpo": "grpo",
    "dr_grpo": "grpo",
    "rloo": "rloo",
    "reinforce_pp": "reinforce_plus_plus",
    "reinforce_pp_baseline": "reinforce_plus_plus_baseline",
    "remax": "remax",
}
POLICY_LOSS = {"ppo_clip": "vanilla", "gspo": "gspo", "cispo": "cispo"}

rng = np.random.default_rng(20250917)


# ----------------------------------------------------------------------------------------------- inputs
def mask(*rows: str) -> np.ndarray:
    return np.array([[int(c) for c in r] for r in rows], dtype=np.int64)


def rnd(shape, scale=1.0, loc=0.0, nd=4):
    return np.round(rng.normal(loc, scale, size=shape), nd)


def unif(shape, lo, hi, nd=4):
    return np.round(rng.uniform(lo, hi, size=shape), nd)


def binary(n, p=0.5):
    return (rng.uniform(size=n) < p).astype(np.float64)


def logprobs(m, nd=4):
    return np.round(-np.abs(rng.normal(0.0, 1.2, size=m.shape)) - 0.01, nd)


def token_rewards(m, density=0.5):
    """Process rewards on some valid tokens, zero off-mask."""
    tr = rnd(m.shape, 0.7) * (rng.uniform(size=m.shape) < density)
    return tr * m


def kl_inputs(m, spread=0.4, extremes=()):
    old = logprobs(m)
    ref = np.round(old + rng.normal(0.0, spread, size=m.shape), 4)
    for (i, j, d) in extremes:  # ref - old = d at (i, j)
        ref[i, j] = old[i, j] + d
    return old, ref


# ------------------------------------------------------------------------------------- verl: advantages
_Batch, _Data = verl_stub.Batch, verl_stub.Data  # DataProto stand-ins


def last_valid_index(m: np.ndarray) -> np.ndarray:
    T = m.shape[1]
    idx = np.full(m.shape[0], -1)
    for i in range(m.shape[0]):
        nz = np.nonzero(m[i])[0]
        if len(nz):
            idx[i] = nz[-1]
    assert (idx >= 0).all() and (idx < T).all()
    return idx


def token_scores(tensors) -> np.ndarray:
    m = np.asarray(tensors["response_mask"])
    if "rewards" in tensors:
        s = np.zeros(m.shape)
        s[np.arange(m.shape[0]), last_valid_index(m)] = np.asarray(tensors["rewards"], dtype=np.float64)
        return s
    return np.asarray(tensors["token_rewards"], dtype=np.float64)


def verl_advantages(estimator, params, tensors, dtype):
    tdt = TORCH_DTYPES[dtype]
    m_np = np.asarray(tensors["response_mask"])
    B = m_np.shape[0]
    m = torch.tensor(m_np, dtype=tdt)
    batch = _Batch(B, response_mask=m, token_level_scores=torch.tensor(token_scores(tensors), dtype=tdt))
    non_tensor = {}
    if "group_ids" in tensors:
        non_tensor["uid"] = np.array(list(tensors["group_ids"]), dtype=object)
    if "values" in tensors:
        batch["values"] = torch.tensor(tensors["values"], dtype=tdt)
    if "greedy_rewards" in tensors:
        batch["reward_baselines"] = torch.tensor(tensors["greedy_rewards"], dtype=tdt)
    data = _Data(batch, non_tensor)

    kl_coef = params.get("kl_coef", 0.0)
    use_kl_in_reward = kl_coef != 0.0
    kl_name = KL_NAMES[params.get("kl_estimator", "k1")]
    if use_kl_in_reward:
        batch["old_log_probs"] = torch.tensor(tensors["old_logprobs"], dtype=tdt)
        batch["ref_log_prob"] = torch.tensor(tensors["ref_logprobs"], dtype=tdt)
        data, _ = rt.apply_kl_penalty(data, kl_ctrl=ca.FixedKLController(kl_coef=kl_coef), kl_penalty=kl_name)
    else:
        batch["token_level_rewards"] = batch["token_level_scores"]

    if estimator == "orz":
        gamma, lam = 1.0, 1.0
    else:
        gamma, lam = params.get("gamma", 1.0), params.get("lam", 1.0)
    norm = estimator != "dr_grpo"
    config = AlgoConfig(
        gamma=gamma,
        lam=lam,
        adv_estimator=VERL_ADV[estimator],
        norm_adv_by_std_in_grpo=norm,
        use_kl_in_reward=use_kl_in_reward,
        kl_penalty=kl_name,
    )
    data = rt.compute_advantage(
        data,
        adv_estimator=VERL_ADV[estimator],
        gamma=gamma,
        lam=lam,
        num_repeat=1,
        norm_adv_by_std_in_grpo=norm,
        config=config,
    )
    adv = data.batch["advantages"] * m
    ret = data.batch["returns"] * m
    assert adv.dtype == tdt and ret.dtype == tdt, (adv.dtype, ret.dtype)
    return adv, ret


# ------------------------------------------------------------------------------ reference (docs) checks
def _rtg(x, m, g):
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        run = 0.0
        for t in reversed(range(x.shape[1])):
            if m[i, t]:
                run = x[i, t] + g * run
                out[i, t] = run
    return out


def _whiten(x, m):
    v = x[m > 0]
    mu, var = v.mean(), v.var(ddof=1)
    return (x - mu) / math.sqrt(var + 1e-8) * m


def _kl(old, ref, est):
    d = old - ref
    if est == "k1":
        return d
    if est == "k2":
        return 0.5 * d * d
    if est == "abs":
        return np.abs(d)
    lr = np.clip(ref - old, -20, 20)
    return np.clip(np.exp(lr) - lr - 1, -10, 10)


def ref_advantages(est, params, tensors):
    m = np.asarray(tensors["response_mask"], dtype=np.float64)
    r = token_scores(tensors)
    beta = params.get("kl_coef", 0.0)
    if beta:
        kl = _kl(np.asarray(tensors["old_logprobs"]), np.asarray(tensors["ref_logprobs"]), params.get("kl_estimator", "k1"))
        r = r - beta * kl
    r = r * m
    R = r.sum(-1)
    gids = list(tensors.get("group_ids", range(len(R))))
    groups = {}
    for i, g in enumerate(gids):
        groups.setdefault(g, []).append(i)

    def bcast(a):
        return a[:, None] * m

    if est in ("gae", "orz"):
        g, lam = (1.0, 1.0) if est == "orz" else (params.get("gamma", 1.0), params.get("lam", 1.0))
        V = np.asarray(tensors["values"], dtype=np.float64)
        A = np.zeros_like(V)
        for i in range(V.shape[0]):
            idx = np.nonzero(m[i])[0]
            run = 0.0
            for k in reversed(range(len(idx))):
                t = idx[k]
                vnext = V[i, idx[k + 1]] if k + 1 < len(idx) else 0.0
                run = r[i, t] + g * vnext - V[i, t] + g * lam * run
                A[i, t] = run
        return _whiten(A, m), (A + V) * m
    if est in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        out = np.zeros_like(R)
        for g, idx in groups.items():
            x = R[idx]
            n = len(idx)
            if est == "grpo":
                mu, sd = (0.0, 1.0) if n == 1 else (x.mean(), x.std(ddof=1))
                out[idx] = (x - mu) / (sd + 1e-6)
            elif est == "dr_grpo" or est == "reinforce_pp_baseline":
                out[idx] = x - (0.0 if n == 1 else x.mean())
            else:
                out[idx] = x if n == 1 else x - (x.sum() - x) / (n - 1)
        A = bcast(out)
        if est == "reinforce_pp_baseline":
            A = _whiten(A, m)
        return A, A
    if est == "reinforce_pp":
        ret = _rtg(r, m, params.get("gamma", 1.0))
        return _whiten(ret, m), ret
    if est == "remax":
        ret = _rtg(r, m, 1.0)
        return ret - bcast(np.asarray(tensors["greedy_rewards"], dtype=np.float64)), ret
    raise KeyError(est)


def _close(a, b, tol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.allclose(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------- verl: losses
def verl_losses(request, tensors, dtype):
    tdt = TORCH_DTYPES[dtype]

    def T(name):
        return torch.tensor(tensors[name], dtype=tdt)

    m_int = torch.tensor(tensors["response_mask"], dtype=torch.int64)
    m = m_int.to(bool)  # ppo_loss / value_loss: data["response_mask"].to(bool)
    pl = request["policy_loss"]
    agg = pl["agg"]
    loss_mode = POLICY_LOSS[pl["mode"]]
    dual = pl.get("dual_clip", 3.0)
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=pl["clip_low"],
        clip_ratio_low=pl["clip_low"],
        clip_ratio_high=pl["clip_high"],
        clip_ratio_c=math.inf if dual is None else dual,
        loss_agg_mode=agg,
        loss_scale_factor=pl.get("loss_scale_factor"),
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
        entropy_coeff=request.get("entropy_bonus", {}).get("coef", 0.0),
        use_kl_loss="kl_loss" in request,
        kl_loss_coef=request.get("kl_loss", {}).get("coef", 0.001),
        kl_loss_type=KL_NAMES[request.get("kl_loss", {}).get("estimator", "k3")],
    )
    # as verl.workers.utils.losses.ppo_loss fills it (single data-parallel rank)
    cfg.global_batch_info["dp_size"] = 1
    cfg.global_batch_info["batch_num_tokens"] = request.get("num_tokens")
    cfg.global_batch_info["global_batch_size"] = request.get("num_sequences")
    cfg.global_batch_info["loss_scale_factor"] = cfg.loss_scale_factor

    old = T("old_logprobs")
    lp = T("logprobs").requires_grad_(True)
    wrt = [lp]

    is_w = None
    if "rollout_correction" in request:
        rc = request["rollout_correction"]
        thr = rc["high"] if rc["mode"] == "truncate" else f"{rc['low']}_{rc['high']}"
        is_w, _ = rch.compute_rollout_correction_weights(
            log_ratio=old - T("rollout_logprobs"),
            response_mask=m_int,
            rollout_is=rc["level"],
            rollout_is_threshold=thr,
            rollout_is_batch_normalize=False,
        )

    pg_loss, _ = ca.get_policy_loss_fn(loss_mode)(
        old_log_prob=old,
        log_prob=lp,
        advantages=T("advantages"),
        response_mask=m,
        loss_agg_mode=agg,
        config=cfg,
        rollout_is_weights=is_w,
    )
    total = pg_loss
    comps = {"policy": pg_loss.item(), "kl": None, "value": None, "entropy": None}

    ent = None
    if "entropy_bonus" in request:
        ent = T("entropy").requires_grad_(True)
        wrt.append(ent)
        entropy_loss = ca.agg_loss(loss_mat=ent, loss_mask=m, loss_agg_mode=agg, **cfg.global_batch_info)
        total = total - cfg.entropy_coeff * entropy_loss
        comps["entropy"] = entropy_loss.item()
    if "kl_loss" in request:
        kld = ca.kl_penalty(logprob=lp, ref_logprob=T("ref_logprobs"), kl_penalty=cfg.kl_loss_type)
        kl_loss = ca.agg_loss(loss_mat=kld, loss_mask=m, loss_agg_mode=agg, **cfg.global_batch_info)
        total = total + kl_loss * cfg.kl_loss_coef
        comps["kl"] = kl_loss.item()
    vp = None
    if "value_loss" in request:
        vl = request["value_loss"]
        vp = T("values").requires_grad_(True)
        wrt.append(vp)
        vf_loss, _ = ca.compute_value_loss(
            vpreds=vp,
            returns=T("returns"),
            values=T("old_values"),
            response_mask=m,
            cliprange_value=vl["clip"],
            loss_agg_mode=agg,
            dp_size=1,
            batch_num_tokens=request.get("num_tokens"),
            global_batch_size=request.get("num_sequences"),
            loss_scale_factor=pl.get("loss_scale_factor"),
        )
        total = total + vl["coef"] * vf_loss
        comps["value"] = vf_loss.item()

    grads = torch.autograd.grad(total, wrt)
    g = dict(zip(["lp"] + (["ent"] if ent is not None else []) + (["vp"] if vp is not None else []), grads))
    mf = m.to(tdt)
    return {
        "loss": total.item(),
        "components": comps,
        "grad_logprobs": g["lp"] * mf,
        "grad_values": g["vp"] * mf if vp is not None else None,
        "grad_entropy": g["ent"] * mf if ent is not None else None,
    }


def ref_losses(request, tensors):
    """docs/semantics.md 'Losses', written independently (torch autograd, float64)."""

    def T(name):
        return torch.tensor(tensors[name], dtype=torch.float64)

    m = T("response_mask")
    Bn, Tn = m.shape
    L = m.sum(-1)
    pl = request["policy_loss"]
    agg = pl["agg"]
    N = request.get("num_tokens") or m.sum()
    S = request.get("num_sequences") or (L > 0).sum()
    C = pl.get("loss_scale_factor") or Tn
    w = {
        "token-mean": m / N,
        "token-sum": m,
        "seq-mean-token-mean": m / (S * L.clamp(min=1))[:, None],
        "seq-mean-token-sum": m / S,
        "seq-mean-token-sum-norm": m / (S * C),
    }[agg]
    lp = T("logprobs").requires_grad_(True)
    old, A = T("old_logprobs"), T("advantages")
    lo, hi = 1 - pl["clip_low"], 1 + pl["clip_high"]
    if pl["mode"] == "ppo_clip":
        rho = torch.exp(torch.clamp(lp - old, -20, 20))
        ell = torch.maximum(-A * rho, -A * torch.clamp(rho, lo, hi))
        c = pl.get("dual_clip", 3.0)
        if c is not None:
            ell = torch.where(A < 0, torch.minimum(ell, -c * A), ell)
    elif pl["mode"] == "gspo":
        s = ((lp - old) * m).sum(-1) / L.clamp(min=1)
        rho = torch.exp(torch.clamp(s.detach()[:, None] + lp - lp.detach(), max=10.0))
        ell = torch.maximum(-A * rho, -A * torch.clamp(rho, lo, hi))
    else:
        rho = torch.exp(torch.clamp(lp - old, -20, 20))
        ell = -torch.clamp(rho, lo, hi).detach() * A * lp
    if "rollout_correction" in request:
        rc = request["rollout_correction"]
        d = old - T("rollout_logprobs")
        if rc["level"] == "sequence":
            d = (d * m).sum(-1, keepdim=True).expand_as(d)
        wt = torch.exp(torch.clamp(d, -20, 20))
        if rc["mode"] == "truncate":
            wt = torch.clamp(wt, max=rc["high"])
        else:
            wt = wt * ((wt >= rc["low"]) & (wt <= rc["high"]))
        ell = ell * wt
    pol = (w * ell).sum()
    total, wrt, comps = pol, [lp], {"policy": pol.item(), "kl": None, "value": None, "entropy": None}
    if "kl_loss" in request:
        kl = request["kl_loss"]
        d = lp - T("ref_logprobs")
        est = kl["estimator"]
        if est == "k1":
            k = d
        elif est == "k2":
            k = 0.5 * d * d
        elif est == "abs":
            k = d.abs()
        else:
            x = torch.clamp(-d, -20, 20)
            k = torch.clamp(torch.exp(x) - x - 1, -10, 10)
        kv = (w * k).sum()
        total = total + kl["coef"] * kv
        comps["kl"] = kv.item()
    ent = vp = None
    if "entropy_bonus" in request:
        ent = T("entropy").requires_grad_(True)
        wrt.append(ent)
        ev = (w * ent).sum()
        total = total - request["entropy_bonus"]["coef"] * ev
        comps["entropy"] = ev.item()
    if "value_loss" in request:
        vl = request["value_loss"]
        vp = T("values").requires_grad_(True)
        wrt.append(vp)
        G, vo = T("returns"), T("old_values")
        vc = torch.clamp(vp, vo - vl["clip"], vo + vl["clip"])
        vv = 0.5 * (w * torch.maximum((vp - G) ** 2, (vc - G) ** 2)).sum()
        total = total + vl["coef"] * vv
        comps["value"] = vv.item()
    grads = torch.autograd.grad(total, wrt)
    g = dict(zip(["lp"] + (["ent"] if ent is not None else []) + (["vp"] if vp is not None else []), grads))
    return {
        "loss": total.item(),
        "components": comps,
        "grad_logprobs": g["lp"] * m,
        "grad_values": g["vp"] * m if vp is not None else None,
        "grad_entropy": g["ent"] * m if ent is not None else None,
    }


# ---------------------------------------------------------------------------------------------- cases
def tolist(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "iub":
            return x.astype(np.int64).tolist()
        if x.dtype.kind == "f":
            return x.astype(np.float64).tolist()
        return x.tolist()
    return list(x)


ADV_CASES = []
LOSS_CASES = []


def adv_case(name, estimator, params, dtype="float64", note=None, **tensors):
    ADV_CASES.append((name, estimator, params, dtype, note, tensors))


def loss_case(name, request, note=None, **tensors):
    LOSS_CASES.append((name, request, note, tensors))


def f32(x):
    return np.asarray(x, dtype=np.float32).astype(np.float64)


# Masks reused below.
M_RAGGED = mask(
    "111111111",
    "111110000",
    "111111100",
    "100000000",  # length 1
    "111000000",
    "111111111",
    "110000000",
    "111111110",
    "111100000",
    "111111000",
)
M_GAPS = mask(  # interior zeros = multi-turn observation tokens
    "110011100",
    "111000111",
    "101010100",
    "111111000",
    "100000000",
    "100111000",
    "111101110",
)
M_SMALL = mask("1111", "1100", "1110", "1000", "1111", "1010")


def build_advantage_cases():
    B = M_RAGGED.shape[0]
    # ---- GRPO
    gids = [3, 1, 3, 2, 1, 3, 7, 2, 1, 3]  # scattered, ragged sizes 4/3/2/1
    adv_case("grpo/scattered-ragged", "grpo", {}, response_mask=M_RAGGED, group_ids=gids, rewards=rnd(B, 1.0))
    adv_case(
        "grpo/binary-ties-and-singletons",
        "grpo",
        {},
        note="size-1 groups: verl divides by (torch.tensor(1.0) + 1e-6), i.e. by float32(1 + 1e-6) = "
        "1.00000095367431640625, not by 1.000001 (relative difference 4.6e-8)",
        response_mask=M_RAGGED,
        group_ids=[0, 0, 1, 1, 1, 2, 3, 3, 4, 0],
        rewards=np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=np.float64),
    )
    adv_case(
        "grpo/string-ids",
        "grpo",
        {},
        response_mask=M_SMALL,
        group_ids=["b7f1", "a0c2", "b7f1", "a0c2", "b7f1", "a0c2"],
        rewards=rnd(6, 2.0, 0.5),
    )
    tr = token_rewards(M_GAPS, 0.6)
    adv_case(
        "grpo/token-rewards-mask-gaps",
        "grpo",
        {},
        response_mask=M_GAPS,
        group_ids=[0, 1, 0, 1, 0, 1, 1],
        token_rewards=tr,
    )
    ml1 = mask("1", "1", "1", "1", "1")
    adv_case("grpo/length-1-responses-T1", "grpo", {}, response_mask=ml1, group_ids=[5, 5, 6, 6, 5], rewards=rnd(5))
    adv_case(
        "grpo/single-row",
        "grpo",
        {},
        note="single size-1 group: float32(1 + 1e-6) divisor, see grpo/binary-ties-and-singletons",
        response_mask=mask("11100"),
        group_ids=[0],
        rewards=np.array([0.75]),
    )
    old, ref = kl_inputs(M_RAGGED)
    adv_case(
        "grpo/kl-in-reward-k1",
        "grpo",
        {"kl_coef": 0.05, "kl_estimator": "k1"},
        response_mask=M_RAGGED,
        group_ids=gids,
        rewards=binary(B),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    old, ref = kl_inputs(M_SMALL, 0.8, extremes=[(0, 1, 13.0), (2, 0, -15.0), (4, 3, 25.0)])
    adv_case(
        "grpo/kl-in-reward-k3-clamped",
        "grpo",
        {"kl_coef": 0.01, "kl_estimator": "k3"},
        response_mask=M_SMALL,
        group_ids=[0, 0, 0, 1, 1, 1],
        rewards=rnd(6),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    # float32, near-equal rewards: std ~ 1e-7..1e-6, the size of epsilon; (R - mean)/(std + eps) differs
    # from (R - mean)/sqrt(var + eps) by orders of magnitude here. Differences are exact in float32.
    q = 2.0**-21
    adv_case(
        "grpo/float32-near-equal",
        "grpo",
        {},
        dtype="float32",
        response_mask=mask("111", "110", "111", "100", "111", "111", "110", "111"),
        group_ids=[0, 0, 0, 0, 1, 1, 1, 1],
        rewards=f32([1.0, 1.0 + q, 1.0 + 3 * q, 1.0, 0.5, 0.5 + 4 * q, 0.5, 0.5 + 4 * q]),
    )
    adv_case(
        "grpo/float32-near-equal-with-ties-and-singleton",
        "grpo",
        {},
        dtype="float32",
        response_mask=mask("1111", "1110", "1100", "1111", "1000", "1111"),
        group_ids=[0, 0, 1, 1, 2, 0],
        rewards=f32([2.0, 2.0 + 8 * q, 0.25, 0.25, 0.125, 2.0 + 16 * q]),
    )

    # ---- Dr. GRPO
    adv_case("dr_grpo/scattered-ragged", "dr_grpo", {}, response_mask=M_RAGGED, group_ids=gids, rewards=rnd(B, 1.0))
    old, ref = kl_inputs(M_GAPS)
    adv_case(
        "dr_grpo/kl-in-reward-k2-mask-gaps",
        "dr_grpo",
        {"kl_coef": 0.1, "kl_estimator": "k2"},
        response_mask=M_GAPS,
        group_ids=["x", "y", "x", "z", "y", "x", "y"],
        rewards=binary(7),
        old_logprobs=old,
        ref_logprobs=ref,
    )

    # ---- RLOO
    adv_case(
        "rloo/scattered-ragged-singletons",
        "rloo",
        {},
        response_mask=M_RAGGED,
        group_ids=gids,
        rewards=rnd(B, 1.0),
    )
    adv_case(
        "rloo/string-ids-ties",
        "rloo",
        {},
        response_mask=M_SMALL,
        group_ids=["p", "q", "p", "q", "p", "q"],
        rewards=np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]),
    )
    old, ref = kl_inputs(M_RAGGED)
    adv_case(
        "rloo/kl-in-reward-abs",
        "rloo",
        {"kl_coef": 0.2, "kl_estimator": "abs"},
        response_mask=M_RAGGED,
        group_ids=[0, 1, 0, 1, 0, 1, 0, 1, 2, 2],
        rewards=rnd(B),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    adv_case(
        "rloo/token-rewards",
        "rloo",
        {},
        response_mask=M_GAPS,
        group_ids=[1, 1, 2, 2, 1, 2, 2],
        token_rewards=token_rewards(M_GAPS),
    )

    # ---- REINFORCE++
    adv_case("reinforce_pp/default-gamma", "reinforce_pp", {}, response_mask=M_RAGGED, rewards=rnd(B))
    adv_case(
        "reinforce_pp/gamma-0.9-mask-gaps-token-rewards",
        "reinforce_pp",
        {"gamma": 0.9},
        response_mask=M_GAPS,
        token_rewards=token_rewards(M_GAPS, 0.7),
    )
    old, ref = kl_inputs(M_GAPS)
    adv_case(
        "reinforce_pp/kl-in-reward-k1-mask-gaps",
        "reinforce_pp",
        {"gamma": 0.95, "kl_coef": 0.05, "kl_estimator": "k1"},
        response_mask=M_GAPS,
        rewards=binary(7),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    old, ref = kl_inputs(M_SMALL, 0.8, extremes=[(0, 0, 14.0), (1, 1, -30.0), (4, 2, 21.0)])
    adv_case(
        "reinforce_pp/kl-in-reward-k3-clamped",
        "reinforce_pp",
        {"kl_coef": 0.02, "kl_estimator": "k3"},
        response_mask=M_SMALL,
        rewards=rnd(6),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    adv_case(
        "reinforce_pp/length-1-rows",
        "reinforce_pp",
        {"gamma": 0.99},
        response_mask=mask("10", "11", "10", "10"),
        rewards=np.array([1.0, -0.5, 0.25, 2.0]),
    )

    # ---- REINFORCE++-baseline
    adv_case(
        "reinforce_pp_baseline/scattered-ragged-singletons",
        "reinforce_pp_baseline",
        {},
        response_mask=M_RAGGED,
        group_ids=gids,
        rewards=rnd(B),
    )
    old, ref = kl_inputs(M_GAPS)
    adv_case(
        "reinforce_pp_baseline/kl-in-reward-k2-mask-gaps-string-ids",
        "reinforce_pp_baseline",
        {"kl_coef": 0.1, "kl_estimator": "k2"},
        response_mask=M_GAPS,
        group_ids=["u1", "u2", "u1", "u2", "u1", "u3", "u2"],
        rewards=binary(7),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    adv_case(
        "reinforce_pp_baseline/all-ties",
        "reinforce_pp_baseline",
        {},
        response_mask=M_SMALL,
        group_ids=[0, 0, 0, 1, 1, 1],
        rewards=np.array([1.0, 1.0, 1.0, 0.0, 0.0, 2.0]),
    )

    # ---- ReMax
    adv_case(
        "remax/basic",
        "remax",
        {},
        response_mask=M_RAGGED,
        rewards=rnd(B),
        greedy_rewards=rnd(B),
    )
    adv_case(
        "remax/token-rewards-mask-gaps",
        "remax",
        {},
        response_mask=M_GAPS,
        token_rewards=token_rewards(M_GAPS),
        greedy_rewards=rnd(7),
    )
    old, ref = kl_inputs(M_GAPS)
    adv_case(
        "remax/kl-in-reward-k1-mask-gaps",
        "remax",
        {"kl_coef": 0.1, "kl_estimator": "k1"},
        response_mask=M_GAPS,
        rewards=binary(7),
        greedy_rewards=binary(7),
        old_logprobs=old,
        ref_logprobs=ref,
    )

    # ---- GAE
    adv_case(
        "gae/defaults",
        "gae",
        {},
        response_mask=M_RAGGED,
        rewards=rnd(B),
        values=rnd(M_RAGGED.shape, 0.5),
    )
    adv_case(
        "gae/gamma-lam-mask-gaps",
        "gae",
        {"gamma": 0.99, "lam": 0.95},
        response_mask=M_GAPS,
        rewards=rnd(7),
        values=rnd(M_GAPS.shape, 0.5),
    )
    old, ref = kl_inputs(M_RAGGED)
    adv_case(
        "gae/kl-in-reward-default-k1",
        "gae",
        {"gamma": 1.0, "lam": 0.95, "kl_coef": 0.05},
        response_mask=M_RAGGED,
        rewards=binary(B),
        values=rnd(M_RAGGED.shape, 0.5),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    old, ref = kl_inputs(M_GAPS, 0.8, extremes=[(0, 1, 16.0), (3, 2, -22.0)])
    adv_case(
        "gae/kl-in-reward-k3-mask-gaps",
        "gae",
        {"gamma": 0.9, "lam": 0.8, "kl_coef": 0.02, "kl_estimator": "k3"},
        response_mask=M_GAPS,
        rewards=rnd(7),
        values=rnd(M_GAPS.shape, 0.5),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    old, ref = kl_inputs(M_SMALL)
    adv_case(
        "gae/token-rewards-kl-abs",
        "gae",
        {"gamma": 0.97, "lam": 0.9, "kl_coef": 0.1, "kl_estimator": "abs"},
        response_mask=M_SMALL,
        token_rewards=token_rewards(M_SMALL),
        values=rnd(M_SMALL.shape, 0.5),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    adv_case(
        "gae/length-1-rows",
        "gae",
        {"gamma": 0.99, "lam": 0.95},
        response_mask=mask("1", "1", "1"),
        rewards=np.array([1.0, 0.0, -1.0]),
        values=rnd((3, 1), 0.5),
    )

    # ---- ORZ (= verl GAE with gamma = lam = 1)
    adv_case("orz/basic", "orz", {}, response_mask=M_RAGGED, rewards=binary(B), values=rnd(M_RAGGED.shape, 0.5))
    adv_case("orz/mask-gaps", "orz", {}, response_mask=M_GAPS, rewards=rnd(7), values=rnd(M_GAPS.shape, 0.5))


def loss_tensors(m, with_ref=False, with_values=False, with_entropy=False, with_rollout=False, lp_scale=0.25):
    old = logprobs(m)
    t = {
        "response_mask": m,
        "old_logprobs": old,
        "logprobs": np.round(old + rng.normal(0.0, lp_scale, size=m.shape), 4),
        "advantages": rnd(m.shape, 1.0),
    }
    if with_ref:
        t["ref_logprobs"] = np.round(old + rng.normal(0.0, 0.5, size=m.shape), 4)
    if with_values:
        t["old_values"] = rnd(m.shape, 1.0)
        t["values"] = np.round(t["old_values"] + rng.normal(0.0, 0.4, size=m.shape), 4)
        t["returns"] = rnd(m.shape, 1.0)
    if with_entropy:
        t["entropy"] = unif(m.shape, 0.05, 3.0)
    if with_rollout:
        t["rollout_logprobs"] = np.round(old + rng.normal(0.0, 0.4, size=m.shape), 4)
    return t


def PPO(agg="token-mean", lo=0.2, hi=0.2, dual=3.0, lsf=None):
    p = {"mode": "ppo_clip", "clip_low": lo, "clip_high": hi, "dual_clip": dual, "agg": agg}
    if lsf is not None:
        p["loss_scale_factor"] = lsf
    return p


def PL(mode, agg, lo, hi, lsf=None):
    p = {"mode": mode, "clip_low": lo, "clip_high": hi, "agg": agg}
    if lsf is not None:
        p["loss_scale_factor"] = lsf
    return p


M_LOSS = mask(  # ragged, length-1 row, interior gaps
    "11111111",
    "11100000",
    "11011010",
    "10000000",
    "11111100",
    "11110111",
)
M_EMPTY = mask(  # includes a fully masked row (L = 0)
    "1111110",
    "0000000",
    "1101100",
    "1110000",
    "1000000",
)


def build_loss_cases():
    # ---- ppo_clip, the five aggregation modes
    for agg in ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        loss_case(f"ppo_clip/{agg}", {"policy_loss": PPO(agg)}, **loss_tensors(M_LOSS))
    t = loss_tensors(M_LOSS)
    # dual clip binds (A < 0, ratio > 3), and the log-ratio clamp at +-20
    t["advantages"][0, :4] = [-1.5, -0.7, 0.9, -2.0]
    t["logprobs"][0, :4] = t["old_logprobs"][0, :4] + np.array([1.5, 25.0, 25.0, -25.0])
    t["advantages"][4, 1] = 0.0
    loss_case("ppo_clip/dual-clip-binds-ratio-clamp", {"policy_loss": PPO("token-mean")}, **t)
    t = loss_tensors(M_LOSS, lp_scale=0.8)
    loss_case("ppo_clip/clip-higher-dual-2", {"policy_loss": PPO("token-mean", 0.2, 0.28, 2.0)}, **t)
    t = loss_tensors(M_LOSS, lp_scale=0.8)
    loss_case(
        "ppo_clip/no-dual-clip",
        {"policy_loss": PPO("seq-mean-token-mean", 0.2, 0.2, None)},
        note="verl cannot switch dual clip off; expected computed with clip_ratio_c = inf",
        **t,
    )
    loss_case(
        "ppo_clip/seq-mean-token-sum-norm-scale-factor",
        {"policy_loss": PPO("seq-mean-token-sum-norm", lsf=16)},
        **loss_tensors(M_LOSS),
    )
    loss_case(
        "ppo_clip/empty-row-seq-mean-token-mean",
        {"policy_loss": PPO("seq-mean-token-mean")},
        **loss_tensors(M_EMPTY),
    )
    loss_case(
        "ppo_clip/empty-row-seq-mean-token-sum",
        {"policy_loss": PPO("seq-mean-token-sum")},
        **loss_tensors(M_EMPTY),
    )
    # ---- global normalizers (micro-batch of a bigger batch)
    loss_case(
        "ppo_clip/global-num-tokens",
        {"policy_loss": PPO("token-mean"), "num_tokens": 113, "num_sequences": 24},
        **loss_tensors(M_LOSS),
    )
    loss_case(
        "ppo_clip/global-token-sum-ignores-normalizers",
        {"policy_loss": PPO("token-sum"), "num_tokens": 113, "num_sequences": 24},
        **loss_tensors(M_LOSS),
    )
    loss_case(
        "ppo_clip/global-seq-mean-token-mean",
        {"policy_loss": PPO("seq-mean-token-mean"), "num_sequences": 24},
        **loss_tensors(M_EMPTY),
    )
    loss_case(
        "ppo_clip/global-seq-mean-token-sum",
        {"policy_loss": PPO("seq-mean-token-sum"), "num_sequences": 16},
        **loss_tensors(M_LOSS),
    )
    loss_case(
        "ppo_clip/global-seq-mean-token-sum-norm-scale-factor",
        {"policy_loss": PPO("seq-mean-token-sum-norm", lsf=4096), "num_tokens": 200, "num_sequences": 32},
        **loss_tensors(M_LOSS),
    )
    loss_case(
        "ppo_clip/global-seq-mean-token-sum-norm-default-factor",
        {"policy_loss": PPO("seq-mean-token-sum-norm"), "num_sequences": 12},
        **loss_tensors(M_EMPTY),
    )

    # ---- GSPO
    t = loss_tensors(M_LOSS, lp_scale=0.01)
    loss_case("gspo/seq-mean-token-mean", {"policy_loss": PL("gspo", "seq-mean-token-mean", 3e-4, 4e-4)}, **t)
    t = loss_tensors(M_EMPTY, lp_scale=0.3)
    loss_case("gspo/token-mean-empty-row", {"policy_loss": PL("gspo", "token-mean", 0.2, 0.28)}, **t)
    t = loss_tensors(M_LOSS, lp_scale=0.3)
    t["logprobs"][1] = t["old_logprobs"][1] + 11.0  # sequence log ratio 11 > 10: clamp binds
    t["advantages"][1] = [-1.0, 0.5, -0.25, 0, 0, 0, 0, 0]
    loss_case("gspo/log-ratio-clamp-10", {"policy_loss": PL("gspo", "seq-mean-token-sum", 0.2, 0.2)}, **t)

    # ---- CISPO
    t = loss_tensors(M_LOSS, lp_scale=0.5)
    loss_case("cispo/token-mean", {"policy_loss": PL("cispo", "token-mean", 0.2, 0.28)}, **t)
    t = loss_tensors(M_EMPTY, lp_scale=0.8)
    loss_case("cispo/seq-mean-token-mean-wide-clip", {"policy_loss": PL("cispo", "seq-mean-token-mean", 1.0, 4.0)}, **t)

    # ---- KL loss
    for est, agg, coef in [
        ("k1", "token-mean", 0.001),
        ("k2", "seq-mean-token-mean", 0.01),
        ("k3", "seq-mean-token-sum", 0.1),
        ("abs", "token-sum", 0.05),
    ]:
        t = loss_tensors(M_LOSS, with_ref=True)
        if est == "k3":  # value clamp at 10 (both sides) and the log-ratio clamp at 20
            t["ref_logprobs"][0, 1] = t["logprobs"][0, 1] + 14.0
            t["ref_logprobs"][0, 2] = t["logprobs"][0, 2] - 15.0
            t["ref_logprobs"][4, 0] = t["logprobs"][4, 0] + 24.0
        loss_case(f"kl_loss/{est}-{agg}", {"policy_loss": PPO(agg), "kl_loss": {"coef": coef, "estimator": est}}, **t)

    # ---- value loss, entropy
    loss_case(
        "value_loss/token-mean-clip-0.5",
        {"policy_loss": PPO("token-mean"), "value_loss": {"coef": 0.5, "clip": 0.5}},
        **loss_tensors(M_LOSS, with_values=True),
    )
    loss_case(
        "value_loss/seq-mean-token-sum-norm-global-clip-0.2",
        {
            "policy_loss": PPO("seq-mean-token-sum-norm", lsf=32),
            "value_loss": {"coef": 1.0, "clip": 0.2},
            "num_tokens": 90,
            "num_sequences": 20,
        },
        **loss_tensors(M_EMPTY, with_values=True),
    )
    loss_case(
        "entropy/token-mean",
        {"policy_loss": PPO("token-mean"), "entropy_bonus": {"coef": 0.01}},
        **loss_tensors(M_LOSS, with_entropy=True),
    )
    loss_case(
        "entropy/seq-mean-token-mean",
        {"policy_loss": PPO("seq-mean-token-mean", 0.2, 0.28), "entropy_bonus": {"coef": 0.005}},
        **loss_tensors(M_EMPTY, with_entropy=True),
    )

    # ---- rollout correction (IS weights)
    for level, mode, low, high, pol in [
        ("token", "truncate", None, 2.0, PPO("token-mean")),
        ("sequence", "truncate", None, 2.0, PPO("seq-mean-token-sum")),
        ("token", "mask", 0.5, 2.0, PL("cispo", "token-mean", 0.2, 0.28)),
        ("sequence", "mask", 0.5, 5.0, PL("gspo", "seq-mean-token-mean", 0.2, 0.2)),
    ]:
        rc = {"level": level, "mode": mode, "high": high}
        if low is not None:
            rc["low"] = low
        t = loss_tensors(M_LOSS, with_rollout=True)
        if level == "sequence":  # one sequence far off-policy: exercises the +-20 clamp on the summed log ratio
            t["rollout_logprobs"][2, 0] = t["old_logprobs"][2, 0] - 30.0
        loss_case(f"rollout_correction/{level}-{mode}-{pol['mode']}", {"policy_loss": pol, "rollout_correction": rc}, **t)

    # ---- everything at once
    t = loss_tensors(M_LOSS, with_ref=True, with_values=True, with_entropy=True, with_rollout=True, lp_scale=0.5)
    loss_case(
        "combined/all-terms-global",
        {
            "policy_loss": PPO("seq-mean-token-mean", 0.2, 0.28, 3.0),
            "kl_loss": {"coef": 0.01, "estimator": "k3"},
            "value_loss": {"coef": 0.5, "clip": 0.2},
            "entropy_bonus": {"coef": 0.001},
            "rollout_correction": {"level": "token", "mode": "truncate", "high": 2.0},
            "num_tokens": 150,
            "num_sequences": 18,
        },
        **t,
    )
    t = loss_tensors(M_EMPTY, with_ref=True, with_values=True, with_entropy=True, with_rollout=True, lp_scale=0.5)
    loss_case(
        "combined/all-terms-token-mean",
        {
            "policy_loss": PPO("token-mean"),
            "kl_loss": {"coef": 0.05, "estimator": "k2"},
            "value_loss": {"coef": 0.25, "clip": 0.5},
            "entropy_bonus": {"coef": 0.01},
            "rollout_correction": {"level": "sequence", "mode": "mask", "low": 0.25, "high": 4.0},
        },
        **t,
    )


# ----------------------------------------------------------------------------------------------- main
def finite(x):
    return x is None or np.isfinite(np.asarray(tolist(x) if isinstance(x, torch.Tensor) else x, dtype=float)).all()


def advantage_record(name, est, params, dtype, note, tensors, problems):
    """One advantage case of the golden file: verl's answer (and a check against the docs reference,
    appended to `problems`). Also used by tests/golden/fuzz_libraries.py."""
    adv, ret = verl_advantages(est, params, tensors, dtype)
    assert finite(adv) and finite(ret), name
    ra, rr = ref_advantages(est, params, tensors)
    tol = 1e-6 if dtype == "float64" else 1e-4
    if not (_close(adv, ra, tol) and _close(ret, rr, tol)):
        problems.append(f"{name}: verl differs from docs reference beyond {tol}")
    case = {
        "case": name,
        "estimator": est,
        "params": params,
        "dtype": dtype,
        "tensors": {k: (list(v) if k == "group_ids" else tolist(v)) for k, v in tensors.items()},
        "expected": {"advantages": tolist(adv), "returns": tolist(ret)},
    }
    if note:
        case["note"] = note
    return case


def loss_record(name, request, note, tensors, problems):
    """One loss case of the golden file (float64): verl's answer, checked against the docs reference."""
    got = verl_losses(request, tensors, "float64")
    ref = ref_losses(request, tensors)
    assert finite(got["loss"]) and finite(got["grad_logprobs"]), name
    ok = _close(got["loss"], ref["loss"], 1e-9) and _close(got["grad_logprobs"], ref["grad_logprobs"], 1e-9)
    for k in ("grad_values", "grad_entropy"):
        ok = ok and ((got[k] is None) == (ref[k] is None)) and (got[k] is None or _close(got[k], ref[k], 1e-9))
    for k, v in got["components"].items():
        ok = ok and ((v is None) == (ref["components"][k] is None)) and (v is None or _close(v, ref["components"][k], 1e-9))
    if not ok:
        problems.append(f"{name}: verl differs from docs reference beyond 1e-9")
    case = {
        "case": name,
        "dtype": "float64",
        "request": request,
        "tensors": {k: tolist(v) for k, v in tensors.items()},
        "expected": {
            "loss": got["loss"],
            "components": got["components"],
            "grad_logprobs": tolist(got["grad_logprobs"]),
            "grad_values": None if got["grad_values"] is None else tolist(got["grad_values"]),
            "grad_entropy": None if got["grad_entropy"] is None else tolist(got["grad_entropy"]),
        },
    }
    if note:
        case["note"] = note
    return case


def main():
    build_advantage_cases()
    build_loss_cases()
    problems = []

    adv_out = [advantage_record(*c, problems) for c in ADV_CASES]
    loss_out = [loss_record(*c, problems) for c in LOSS_CASES]

    names = [c["case"] for c in adv_out] + [c["case"] for c in loss_out]
    assert len(names) == len(set(names)), "duplicate case names"

    doc = {
        "library": "verl",
        "version": getattr(verl, "__version__", None) or importlib.metadata.version("verl"),
        "torch": torch.__version__,
        "generated": datetime.date.today().isoformat(),
        "generator": "tests/golden/make_verl_golden.py",
        "advantages": adv_out,
        "losses": loss_out,
    }
    assert doc["version"] == "0.9.1", doc["version"]
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {len(adv_out)} advantage cases, {len(loss_out)} loss cases, {os.path.getsize(OUT)} bytes")
    for p in problems:
        print("CHECK:", p)


if __name__ == "__main__":
    main()
