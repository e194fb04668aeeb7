"""The engine's analytic loss gradients against torch.autograd of an independent torch implementation
of the losses, written here from docs/semantics.md ("Losses", aggregation weights, rollout correction).

Float64 throughout. Batches spread the log-ratios so that the PPO clip binds on both sides, the dual
clip and the ratio clamp bind, A has both signs, the value clip binds on both sides, KL clamps bind,
and IS weights fall below, inside and above the truncation bounds. Some rows are fully masked
(L_i = 0), which must contribute nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import advserve

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------------------------------
# independent torch implementation (autograd does the calculus)
# --------------------------------------------------------------------------------------------------


def agg_weights(mask, agg, num_tokens=None, num_sequences=None, loss_scale_factor=None, seq_denominator="nonempty"):
    m = mask.to(DT)
    B, T = m.shape
    L = m.sum(-1)
    N = float(num_tokens) if num_tokens is not None else m.sum()
    if num_sequences is not None:
        S = float(num_sequences)
    else:
        S = float(B) if seq_denominator == "all" else (L > 0).to(DT).sum()
    C = float(loss_scale_factor) if loss_scale_factor is not None else float(T)
    if agg == "token-mean":
        return m / N
    if agg == "token-sum":
        return m
    if agg == "seq-mean-token-mean":
        return m / (S * torch.where(L > 0, L, torch.ones_like(L)))[:, None]
    if agg == "seq-mean-token-sum":
        return m / S
    if agg == "seq-mean-token-sum-norm":
        return m / (S * C)
    raise ValueError(agg)


def kl_torch(lp, ref, estimator, clamp):
    if estimator == "k1":
        v = lp - ref
    elif estimator == "k2":
        v = 0.5 * (lp - ref) ** 2
    elif estimator == "k3":
        x = ref - lp
        if clamp is not None:
            x = torch.clamp(x, -20.0, 20.0)
        v = torch.exp(x) - x - 1.0
    elif estimator == "abs":
        v = torch.abs(lp - ref)
    else:
        raise ValueError(estimator)
    if clamp is not None:
        v = torch.clamp(v, -clamp, clamp)
    return v


def is_weights(mask, old, roll, level, mode, low, high, log_clamp=20.0, gating="ratio", weight="unit"):
    def bexp(x):
        return torch.exp(x if log_clamp is None else torch.clamp(x, -log_clamp, log_clamp))

    with torch.no_grad():
        m = mask.to(DT)
        d = (old - roll) * m
        if gating == "ratio":
            x = d
        else:
            p = torch.clamp(torch.exp(roll), 1e-6, 1 - 1e-6)
            q = torch.clamp(torch.exp(old), 1e-6, 1 - 1e-6)
            x = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))) if gating == "binary_kl" else (p - q).abs()
            x = x * m
        if level != "token":
            x = x.sum(-1, keepdim=True)
            if level == "sequence_mean":
                x = x / m.sum(-1, keepdim=True).clamp(min=1.0)
            x = x.expand_as(old)
        stat = bexp(x) if gating == "ratio" else x
        keep = torch.ones_like(mask)
        if high is not None:
            keep &= stat <= high
        if low is not None:
            keep &= stat >= low
        if mode == "truncate":
            w = stat
            if high is not None:
                w = torch.clamp(w, max=high)
            if low is not None:
                w = torch.clamp(w, min=low)
        else:
            w = torch.where(keep, bexp(d) if weight == "token" else stat, torch.zeros_like(stat))
    return w


def torch_losses(t, pol, kl, value, ent_coef, rc, num_tokens=None, num_sequences=None, ent_agg=None):
    """t: dict of float64 torch tensors (mask bool). pol: fully resolved policy dict or None (mode None:
    no policy term). A term's "agg" (None: the policy's) picks its weights.
    Returns (loss, components, grads dict)."""
    mask = t["response_mask"]
    m = mask.to(DT)
    lp = t["logprobs"].clone().requires_grad_(True)
    v = t["values"].clone().requires_grad_(True) if value is not None else None
    H = t["entropy"].clone().requires_grad_(True) if ent_coef is not None else None
    agg = pol["agg"]

    def weights(term_agg=None):
        return agg_weights(mask, term_agg or agg, num_tokens, num_sequences, pol.get("loss_scale_factor"),
                           pol.get("seq_denominator", "nonempty"))

    loss = torch.zeros((), dtype=DT)
    comps = {}
    ratio = None
    mode = pol.get("mode")
    if "old_logprobs" in t:
        old = t["old_logprobs"]
        rcl = pol.get("ratio_clamp")
        if mode == "gspo" or (mode == "cispo" and pol.get("cispo_level") == "sequence"):
            L = m.sum(-1).clamp(min=1.0)
            seq = ((lp - old) * m).sum(-1) / L
            if pol.get("sequence_ratio_gradient") == "through_mean":
                logr = seq[:, None].expand_as(lp)  # s_i = exp(mean_t(lp − old)): autograd through the mean
            else:
                logr = lp - lp.detach() + seq.detach()[:, None]  # sg(s_i)·exp(lp − sg(lp))
            if rcl is not None:
                logr = torch.clamp(logr, max=rcl)  # a sequence ratio: upper bound only
        else:
            logr = lp - old
            if rcl is not None:
                logr = torch.clamp(logr, -rcl, rcl)
        ratio = torch.exp(logr)
    if mode is not None:
        A = t["advantages"]
        if mode in ("ppo_clip", "gspo"):
            lo, hi = 1.0 - pol["clip_low"], 1.0 + pol["clip_high"]
            capped = ratio if pol.get("ratio_cap") is None else torch.clamp(ratio, max=pol["ratio_cap"])
            ell = torch.maximum(-A * capped, -A * torch.clamp(ratio, lo, hi))
            if pol.get("dual_clip") is not None:
                ell = torch.where(A < 0, torch.minimum(ell, -pol["dual_clip"] * A), ell)
        elif mode == "cispo":
            if pol.get("cispo_cap") is not None:
                ell = -torch.clamp(ratio, max=pol["cispo_cap"]).detach() * A * lp
            else:
                lo, hi = 1.0 - pol["clip_low"], 1.0 + pol["clip_high"]
                ell = -torch.clamp(ratio, lo, hi).detach() * A * lp
        elif mode == "reinforce":
            ell = -A * ratio
        else:
            raise ValueError(mode)
        if rc is not None:
            ell = ell * is_weights(mask, old, t["rollout_logprobs"], **rc)
        comps["policy"] = (weights() * ell).sum()
        loss = loss + comps["policy"]
    if kl is not None:
        k = kl_torch(lp, t["ref_logprobs"], kl["estimator"], kl.get("clamp"))
        if kl.get("unbiased_gradient"):  # OpenRLHF's straight-through surrogate
            w_is = torch.clamp(torch.exp(lp - t["old_logprobs"]), max=10.0).detach()
            surrogate = w_is * (lp - t["ref_logprobs"]) ** 2 / 2.0
            k = k.detach() + surrogate - surrogate.detach()
        if kl.get("importance_weighted"):
            k = k * ratio
        comps["kl"] = (weights(kl.get("agg")) * k).sum()
        loss = loss + kl["coef"] * comps["kl"]
    if value is not None:
        G = t["returns"]
        l1 = (v - G) ** 2
        if value.get("clip") is not None:
            vo, c = t["old_values"], value["clip"]
            vc = torch.clamp(v, vo - c, vo + c)
            ell_v = 0.5 * torch.maximum(l1, (vc - G) ** 2)
        else:
            ell_v = 0.5 * l1
        comps["value"] = (weights(value.get("agg")) * ell_v).sum()
        loss = loss + value["coef"] * comps["value"]
    if ent_coef is not None:
        comps["entropy"] = (weights(ent_agg) * H).sum()
        loss = loss - ent_coef * comps["entropy"]
    wrt = [x for x in (lp, v, H) if x is not None]
    gs = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = {}
    it = iter(gs)
    grads["grad_logprobs"] = next(it)
    grads["grad_values"] = next(it) if v is not None else None
    grads["grad_entropy"] = next(it) if H is not None else None
    return float(loss.detach()), {k: float(x.detach()) for k, x in comps.items()}, grads


# --------------------------------------------------------------------------------------------------
# random batches
# --------------------------------------------------------------------------------------------------


def make_batch(seed, B=None, T=None, zero_rows=True, big=False, far_kl=False):
    rng = np.random.default_rng(seed)
    B = B or int(rng.integers(3, 9))
    T = T or int(rng.integers(1, 8))
    mask = np.zeros((B, T), dtype=bool)
    for i in range(B):
        e = int(rng.integers(0 if zero_rows else 1, T + 1))
        mask[i, :e] = True
        for t in range(1, max(e - 1, 1)):
            if rng.random() < 0.2:
                mask[i, t] = False
    if not mask.any():
        mask[0, 0] = True
    old = -np.abs(rng.normal(1.0, 0.6, size=(B, T)))
    d = rng.normal(0.0, 0.35, size=(B, T))
    # some tokens far out: ρ > 3 (dual clip binds for A < 0) and ρ < 0.3
    far = rng.random((B, T))
    d = np.where(far < 0.1, rng.uniform(1.2, 2.0, size=(B, T)), d)
    d = np.where(far > 0.92, rng.uniform(-2.0, -1.2, size=(B, T)), d)
    if big:  # beyond verl's ±20 log-ratio clamp
        d = np.where(rng.random((B, T)) < 0.2, rng.choice([-25.0, 25.0], size=(B, T)), d)
    v_old = rng.normal(size=(B, T))
    ref = old + d + rng.normal(0.0, 0.6, size=(B, T))
    roll = old + rng.normal(0.0, 0.7, size=(B, T))
    if far_kl:  # KL clamps (k3 log-ratio ±20, value ±c) and the IS log-weight clamp ±20 bind
        ref = np.where(rng.random((B, T)) < 0.3, old + d + rng.choice([-30.0, -22.0, 8.0, 22.0, 30.0], size=(B, T)), ref)
        roll = np.where(rng.random((B, T)) < 0.4, old + rng.choice([-12.0, -8.0, 8.0, 12.0], size=(B, T)), roll)
    return dict(
        response_mask=mask,
        logprobs=old + d,
        old_logprobs=old,
        advantages=rng.normal(size=(B, T)),
        ref_logprobs=ref,
        values=v_old + rng.normal(0.0, 0.3, size=(B, T)),
        old_values=v_old,
        returns=v_old + rng.normal(0.0, 0.5, size=(B, T)),
        entropy=np.abs(rng.normal(size=(B, T))),
        rollout_logprobs=roll,
    )


def to_torch(b):
    return {k: torch.as_tensor(v) if k == "response_mask" else torch.as_tensor(v, dtype=DT) for k, v in b.items()}


def check(res, want_loss, want_comps, want_grads):
    assert res.loss == pytest.approx(want_loss, rel=1e-10, abs=1e-12)
    for k, x in want_comps.items():
        assert res.components[k] == pytest.approx(x, rel=1e-10, abs=1e-12), k
    for k in ("policy", "kl", "value", "entropy"):
        if k not in want_comps:
            assert res.components.get(k) is None, k
    for k, g in want_grads.items():
        got = getattr(res, k)
        if g is None:
            assert got is None, k
            continue
        got = np.asarray(got, dtype=np.float64)
        np.testing.assert_allclose(got, g.numpy(), **TOL, err_msg=k)
        assert np.all(np.isfinite(got)), k


def needed(b, policy=True, kl=False, value=False, ent=False, rc=False):
    """Only the tensors the requested terms read (the engine rejects unused tensors)."""
    keys = {"response_mask"}
    if policy:
        keys |= {"logprobs", "old_logprobs", "advantages"}
    if kl:
        keys |= {"logprobs", "ref_logprobs"}
    if value:
        keys |= {"values", "old_values", "returns"}
    if ent:
        keys |= {"entropy"}
    if rc:
        keys |= {"old_logprobs", "rollout_logprobs"}
    return {k: v for k, v in b.items() if k in keys}


def run_case(preset, seed, pol, kl=None, value=None, ent=None, rc=None, num_tokens=None, num_sequences=None, big=False,
             engine_policy=None, torch_pol=None, far=False):
    b = make_batch(seed, big=big, far_kl=far)
    t = to_torch(b)
    want_loss, want_comps, want_grads = torch_losses(
        t, torch_pol or pol, kl, value, ent, rc, num_tokens=num_tokens, num_sequences=num_sequences
    )
    res = advserve.compute_losses(
        preset=preset,
        policy_loss=engine_policy if engine_policy is not None else pol,
        kl_loss=kl,
        value_loss=value,
        entropy_bonus=None if ent is None else dict(coef=ent),
        rollout_correction=rc,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        dtype="float64",
        **needed(b, True, kl is not None, value is not None, ent is not None, rc is not None),
    )
    check(res, want_loss, want_comps, want_grads)
    return res


PRESETS = ("paper", "verl")
SEEDS = (0, 1, 2, 3)


def full_policy(mode, agg="token-mean", clip_low=0.2, clip_high=0.28, dual_clip=None, ratio_clamp=None, lsf=None):
    pl = dict(mode=mode, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, ratio_clamp=ratio_clamp,
              agg=agg, loss_scale_factor=lsf)
    if mode == "gspo":
        pl.pop("dual_clip")  # no dual clip in GSPO
    return pl


# --------------------------------------------------------------------------------------------------
# policy modes (every parameter explicit: the formula is preset-independent)
# --------------------------------------------------------------------------------------------------

POLICY_CASES = [
    full_policy("ppo_clip"),
    full_policy("ppo_clip", dual_clip=3.0),
    full_policy("ppo_clip", dual_clip=2.0, ratio_clamp=1.0, clip_low=0.1, clip_high=0.3),
    full_policy("gspo", clip_low=0.1, clip_high=0.15),
    full_policy("gspo", clip_low=0.1, clip_high=0.15, ratio_clamp=0.05, agg="seq-mean-token-mean"),
    full_policy("cispo", clip_low=0.2, clip_high=0.5),
    full_policy("cispo", ratio_clamp=0.5, agg="token-sum"),
    full_policy("reinforce"),
    full_policy("reinforce", ratio_clamp=0.4, agg="seq-mean-token-sum"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("pol", POLICY_CASES, ids=lambda p: f"{p['mode']}-{p.get('dual_clip')}-{p['ratio_clamp']}")
def test_policy_modes(pol, preset, seed):
    run_case(preset, seed, pol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", ("ppo_clip", "gspo", "cispo", "reinforce"))
def test_aggregation_modes(mode, agg, seed):
    pol = full_policy(mode, agg=agg, dual_clip=3.0 if mode == "ppo_clip" else None)
    if mode == "gspo":
        pol.pop("dual_clip", None)
    run_case("paper", seed, pol, kl=dict(coef=0.1, estimator="k2", clamp=None), value=dict(coef=0.5, clip=0.2), ent=0.01)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "agg,extra",
    [
        ("token-mean", dict(num_tokens=37)),
        ("seq-mean-token-mean", dict(num_sequences=11)),
        ("seq-mean-token-sum", dict(num_sequences=11)),
        ("seq-mean-token-sum-norm", dict(num_sequences=11)),
        ("seq-mean-token-sum-norm", dict(num_sequences=11, lsf=64.0)),
        ("seq-mean-token-sum-norm", dict(lsf=3.0)),
    ],
)
def test_global_denominators(agg, extra, seed):
    extra = dict(extra)
    lsf = extra.pop("lsf", None)
    pol = full_policy("ppo_clip", agg=agg, dual_clip=3.0, lsf=lsf)
    run_case("verl", seed, pol, kl=dict(coef=0.2, estimator="k1", clamp=None), ent=0.05, **extra)


# --------------------------------------------------------------------------------------------------
# KL, value, entropy, rollout correction
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("clamp", (None, 0.05))
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3", "abs"))
def test_kl_loss(estimator, clamp, preset, seed):
    pol = full_policy("ppo_clip", dual_clip=3.0)
    run_case(preset, seed, pol, kl=dict(coef=0.3, estimator=estimator, clamp=clamp))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clamp", (None, 10.0, 2.0))
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3", "abs"))
def test_kl_loss_far_from_reference(estimator, clamp, seed):
    # |lp − ref| up to 30: k3's ±20 log-ratio clamp and the ±c value clamp bind
    pol = full_policy("reinforce", agg="seq-mean-token-mean")
    run_case("paper", seed, pol, kl=dict(coef=0.01, estimator=estimator, clamp=clamp), far=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("clip", (None, 0.2))
def test_value_loss(clip, preset, seed):
    pol = full_policy("reinforce", agg="seq-mean-token-mean")
    run_case(preset, seed, pol, value=dict(coef=0.7, clip=clip))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_entropy_bonus(preset, seed):
    pol = full_policy("cispo", agg="seq-mean-token-sum-norm")
    run_case(preset, seed, pol, ent=0.03)


RC_CASES = [
    dict(level="token", mode="truncate", low=None, high=2.0),
    dict(level="token", mode="truncate", low=0.5, high=1.5),
    dict(level="token", mode="mask", low=0.5, high=2.0),
    dict(level="sequence", mode="truncate", low=None, high=2.0),
    dict(level="sequence", mode="truncate", low=0.5, high=1.5),
    dict(level="sequence", mode="mask", low=0.3, high=3.0),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("rc", RC_CASES, ids=lambda r: f"{r['level']}-{r['mode']}-{r['low']}")
@pytest.mark.parametrize("mode", ("ppo_clip", "reinforce", "gspo"))
def test_rollout_correction(mode, rc, preset, seed):
    pol = full_policy(mode, dual_clip=3.0 if mode == "ppo_clip" else None)
    if mode == "gspo":
        pol.pop("dual_clip", None)
    run_case(preset, seed, pol, rc=rc, kl=dict(coef=0.1, estimator="k3", clamp=None))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rc", RC_CASES[:1] + RC_CASES[3:], ids=lambda r: f"{r['level']}-{r['mode']}-{r['low']}")
def test_rollout_correction_log_weight_clamp(rc, seed):
    # |old − rollout| up to 12 per token: sequence sums pass ±20 and the log-weight clamp binds
    pol = full_policy("ppo_clip", dual_clip=3.0, agg="seq-mean-token-sum")
    run_case("verl", seed, pol, rc=rc, far=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_everything_together(seed):
    pol = full_policy("ppo_clip", agg="seq-mean-token-mean", dual_clip=3.0, ratio_clamp=20.0)
    run_case(
        "verl",
        seed,
        pol,
        kl=dict(coef=0.05, estimator="k3", clamp=10.0),
        value=dict(coef=0.5, clip=0.2),
        ent=0.01,
        rc=dict(level="sequence", mode="truncate", low=None, high=2.0),
        big=True,
    )


def test_no_policy_term():
    # policy_loss=False: only the other terms (aggregated with the preset's agg: paper seq-mean-token-sum)
    b = make_batch(7)
    t = to_torch(b)
    pol = dict(mode=None, agg="seq-mean-token-sum")
    want = torch_losses(t, pol, dict(coef=0.1, estimator="k1", clamp=None), dict(coef=1.0, clip=None), 0.02, None)
    res = advserve.compute_losses(
        preset="paper",
        policy_loss=False,
        kl_loss=dict(coef=0.1, estimator="k1", clamp=None),
        value_loss=dict(coef=1.0, clip=None),
        entropy_bonus=dict(coef=0.02),
        dtype="float64",
        **needed(b, False, True, True, True),
    )
    check(res, *want)


# --------------------------------------------------------------------------------------------------
# preset defaults (documented in docs/semantics.md, "Presets")
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_paper_default_policy_is_ppo_clip_seq_mean_token_sum(seed):
    # paper: PPO's clipped surrogate, clip 0.2/0.2, no dual clip, no ratio clamp, aggregated as the
    # seed's eq. (14) (seq-mean-token-sum); the batch has ratios far outside [0.8, 1.2]
    want = dict(mode="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=None, ratio_clamp=None,
                agg="seq-mean-token-sum")
    run_case("paper", seed, None, engine_policy=None, torch_pol=want)


@pytest.mark.parametrize("seed", SEEDS)
def test_paper_reinforce_by_name_seq_mean_token_sum(seed):
    # the seed's unclipped surrogate (5), ℓ = −Aρ, is mode 'reinforce'; no ratio clamp binds for these
    # small log-ratios
    run_case("paper", seed, None, engine_policy=dict(mode="reinforce"),
             torch_pol=dict(mode="reinforce", agg="seq-mean-token-sum"))


@pytest.mark.parametrize("seed", SEEDS)
def test_verl_default_policy(seed):
    # verl: ppo_clip 0.2/0.2, dual clip c = 3, token-mean, log-ratio clamp ±20 (log-ratios of ±25 here)
    want = dict(mode="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=3.0, ratio_clamp=20.0, agg="token-mean")
    run_case("verl", seed, None, torch_pol=want, big=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_verl_ratio_clamp_without_dual_clip(seed):
    # only the defaults that are not overridden: dual clip off makes the ±20 clamp visible in the loss
    want = dict(mode="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=None, ratio_clamp=20.0, agg="token-mean")
    run_case("verl", seed, None, engine_policy=dict(dual_clip=None), torch_pol=want, big=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_verl_reinforce_mode_uses_ratio_clamp(seed):
    want = dict(mode="reinforce", ratio_clamp=20.0, agg="token-mean")
    run_case("verl", seed, None, engine_policy=dict(mode="reinforce"), torch_pol=want, big=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_paper_vs_verl_same_formula_when_all_explicit(seed):
    pol = full_policy("ppo_clip", agg="seq-mean-token-mean", dual_clip=3.0, ratio_clamp=20.0)
    b = make_batch(100 + seed, big=True)
    kw = dict(policy_loss=pol, kl_loss=dict(coef=0.1, estimator="k3", clamp=10.0), value_loss=dict(coef=0.5, clip=0.5),
              entropy_bonus=dict(coef=0.01), dtype="float64")
    b = needed(b, True, True, True, True)
    r1 = advserve.compute_losses(preset="paper", **kw, **b)
    r2 = advserve.compute_losses(preset="verl", **kw, **b)
    assert r1.loss == r2.loss
    for k in ("grad_logprobs", "grad_values", "grad_entropy"):
        np.testing.assert_array_equal(np.asarray(getattr(r1, k)), np.asarray(getattr(r2, k)))


def test_torch_in_torch_out():
    b = needed(make_batch(3))
    t = {k: torch.as_tensor(v) for k, v in b.items()}
    res = advserve.compute_losses(preset="paper", dtype="float64", **t)
    assert isinstance(res.grad_logprobs, torch.Tensor)
    assert math.isfinite(res.loss)


# --------------------------------------------------------------------------------------------------
# the openrlhf and trl presets' loss behaviours (every parameter explicit)
# --------------------------------------------------------------------------------------------------


def library_policy(mode="ppo_clip", lsf=None, **kw):
    p = dict(mode=mode, clip_low=0.2, clip_high=0.28, dual_clip=None, ratio_clamp=None, agg="token-mean",
             loss_scale_factor=lsf, ratio_cap=None, cispo_cap=None, cispo_level="token",
             sequence_ratio_gradient="token_trick", seq_denominator="nonempty")
    p.update(kw)
    return p


LIBRARY_POLICIES = [
    library_policy("gspo", clip_low=0.1, clip_high=0.1, sequence_ratio_gradient="through_mean"),
    library_policy("gspo", clip_low=0.1, clip_high=0.1, agg="seq-mean-token-mean", dual_clip=1.2,
                   sequence_ratio_gradient="through_mean"),
    library_policy("gspo", ratio_cap=1.1, ratio_clamp=0.3, agg="seq-mean-token-sum", sequence_ratio_gradient="through_mean"),
    library_policy("gspo", dual_clip=1.3, ratio_cap=1.1),
    library_policy("ppo_clip", ratio_cap=1.1),
    library_policy("ppo_clip", ratio_cap=2.5, dual_clip=3.0, ratio_clamp=20.0),
    library_policy("cispo", cispo_cap=1.4),
    library_policy("cispo", cispo_cap=0.2, agg="seq-mean-token-mean", seq_denominator="all"),
    library_policy("cispo", cispo_level="sequence", cispo_cap=1.1, sequence_ratio_gradient="through_mean"),
    library_policy("ppo_clip", agg="seq-mean-token-sum-norm", lsf=7.0, seq_denominator="all"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pol", LIBRARY_POLICIES, ids=lambda p: "-".join(
    str(p[k]) for k in ("mode", "agg", "dual_clip", "ratio_cap", "cispo_cap", "cispo_level", "sequence_ratio_gradient")))
def test_library_policy_modes(pol, seed):
    run_case("paper", seed, pol)


LIBRARY_KL = [
    (library_policy("ppo_clip", agg="seq-mean-token-mean"), dict(coef=0.1, estimator="k3", clamp=10.0, agg="token-mean")),
    (library_policy("ppo_clip"), dict(coef=0.1, estimator="k1", clamp=10.0, unbiased_gradient=True)),
    (library_policy("ppo_clip", agg="seq-mean-token-sum"), dict(coef=0.1, estimator="k3", clamp=0.5,
                                                                unbiased_gradient=True)),
    (library_policy("ppo_clip", ratio_clamp=0.5), dict(coef=0.2, estimator="k3", clamp=None, importance_weighted=True)),
    (library_policy("gspo", agg="seq-mean-token-mean", sequence_ratio_gradient="through_mean"),
     dict(coef=0.2, estimator="k3", clamp=None, importance_weighted=True)),
    (library_policy("gspo", sequence_ratio_gradient="token_trick"),
     dict(coef=0.2, estimator="k2", clamp=None, importance_weighted=True)),
    (library_policy("cispo", cispo_level="sequence", sequence_ratio_gradient="through_mean"),
     dict(coef=0.2, estimator="k3", clamp=None, importance_weighted=True, agg="token-sum")),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pol,kl", LIBRARY_KL, ids=lambda x: str(x.get("estimator") or x["mode"]))
def test_library_kl(pol, kl, seed):
    # far from the reference only without the ratio: k3·ρ's gradient ρ(1 − e^x) + ρ(e^x − x − 1) cancels
    # catastrophically at |x| ~ 30 in any evaluation order
    run_case("paper", seed, pol, kl=kl, far=not kl.get("importance_weighted"))


LIBRARY_RC = [
    dict(level="token", mode="mask", low=None, high=1.3, log_clamp=None, gating="ratio", weight="unit"),
    dict(level="sequence", mode="truncate", low=None, high=3.0, log_clamp=None, gating="ratio", weight="unit"),
    dict(level="sequence_mean", mode="mask", low=0.8, high=1.25, log_clamp=None, gating="ratio", weight="token"),
    dict(level="sequence_mean", mode="truncate", low=0.8, high=1.25, log_clamp=5.0, gating="ratio", weight="unit"),
    dict(level="token", mode="mask", low=None, high=0.1, log_clamp=None, gating="tv", weight="token"),
    dict(level="sequence_mean", mode="mask", low=None, high=0.05, log_clamp=None, gating="binary_kl", weight="token"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rc", LIBRARY_RC, ids=lambda r: f"{r['level']}-{r['mode']}-{r['gating']}-{r['weight']}")
@pytest.mark.parametrize("mode", ("ppo_clip", "gspo"))
def test_library_rollout_correction(mode, rc, seed):
    pol = library_policy(mode, sequence_ratio_gradient="through_mean")
    run_case("paper", seed, pol, rc=rc, kl=dict(coef=0.1, estimator="k3", clamp=None, importance_weighted=True))


@pytest.mark.parametrize("seed", SEEDS)
def test_library_value_and_entropy_aggregation(seed):
    b = make_batch(seed)
    t = to_torch(b)
    pol = library_policy("ppo_clip", agg="seq-mean-token-mean", seq_denominator="all")
    value = dict(coef=0.5, clip=0.2, agg="token-mean")
    want = torch_losses(t, pol, None, value, 0.02, None, ent_agg="seq-mean-token-sum")
    res = advserve.compute_losses(preset="paper", policy_loss=pol, value_loss=value,
                                  entropy_bonus=dict(coef=0.02, agg="seq-mean-token-sum"), dtype="float64",
                                  **needed(b, True, False, True, True))
    check(res, *want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset", ("openrlhf", "trl"))
def test_library_preset_defaults_everything_on(preset, seed):
    # every term with the preset's defaults (kl, entropy coefficients set so the terms count); far from
    # the reference only for OpenRLHF's clamped KL (TRL's k3·ρ cancels catastrophically there)
    b = make_batch(seed, far_kl=preset == "openrlhf")
    t = to_torch(b)
    if preset == "openrlhf":
        pol = library_policy("ppo_clip", clip_high=0.2, ratio_clamp=20.0, sequence_ratio_gradient="through_mean")
        kl = dict(coef=0.01, estimator="k1", clamp=10.0, agg="token-mean")
        value = dict(coef=1.0, clip=0.5, agg="token-mean")
        rc = dict(level="token", mode="mask", low=0.5, high=5.0, log_clamp=None, gating="ratio", weight="token")
        ent_agg = "token-mean"
    else:
        pol = library_policy("ppo_clip", clip_high=0.2, lsf=512.0, seq_denominator="all",
                             sequence_ratio_gradient="through_mean")
        kl = dict(coef=0.04, estimator="k3", clamp=None, importance_weighted=True)
        value = dict(coef=1.0, clip=None)
        rc = dict(level="sequence", mode="mask", low=None, high=3.0, log_clamp=None, gating="ratio", weight="unit")
        ent_agg = "token-mean"
    want = torch_losses(t, pol, kl, value, 0.01, rc, ent_agg=ent_agg)
    res = advserve.compute_losses(preset=preset, kl_loss={"coef": kl["coef"]}, value_loss={},
                                  entropy_bonus={"coef": 0.01}, rollout_correction={}, dtype="float64",
                                  **needed(b, True, True, True, True, True))
    check(res, *want)


@pytest.mark.parametrize("clip_ties", ["pass", "split"])
def test_value_clip_ties_match_autograd_of_each_convention(clip_ties):
    """Values exactly on old_values ± clip (as bf16-rounded predictions often are): 'split' is autograd of
    verl's clip_by_value, torch.max(torch.min(v, v_old + c), v_old − c); 'pass' autograd of torch.clamp."""
    rng = np.random.default_rng(7)
    B, T, c = 6, 9, 0.5
    old = np.round(rng.normal(size=(B, T)) * 4) / 4
    step = rng.choice([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0], size=(B, T))  # ±0.5: exactly on ±c
    values, returns = old + step, old + rng.normal(size=(B, T))
    mask = rng.random((B, T)) < 0.9
    tie = (np.abs(step) == c) & mask
    assert tie.sum() >= 5
    res = advserve.compute_losses(preset="verl", dtype="float64", policy_loss=False,
                                  value_loss={"coef": 1.0, "clip": c, "clip_ties": clip_ties, "agg": "token-mean"},
                                  values=values, old_values=old, returns=returns, response_mask=mask)
    v = torch.tensor(values, requires_grad=True)
    vo, G, m = torch.tensor(old), torch.tensor(returns), torch.tensor(mask, dtype=torch.float64)
    if clip_ties == "split":
        vc = torch.max(torch.min(v, vo + c), vo - c)
    else:
        vc = torch.clamp(v, vo - c, vo + c)
    ell = 0.5 * torch.max((v - G) ** 2, (vc - G) ** 2)
    loss = (ell * m).sum() / m.sum()
    loss.backward()
    assert res.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    np.testing.assert_allclose(res.grad_values, v.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_value_clip_fraction_counts_the_valid_tokens_where_the_clipped_branch_is_larger():
    rng = np.random.default_rng(11)
    B, T, c = 5, 8, 0.2
    old, values, returns = rng.normal(size=(3, B, T))
    mask = rng.random((B, T)) < 0.8
    res = advserve.compute_losses(policy_loss=False, value_loss={"coef": 1.0, "clip": c}, dtype="float64",
                                  values=values, old_values=old, returns=returns, response_mask=mask)
    clipped = np.clip(values, old - c, old + c)
    beyond = ((clipped - returns) ** 2 > (values - returns) ** 2) & mask
    assert 0 < beyond.sum() < mask.sum()
    assert res.metrics["value_clip_fraction"] == pytest.approx(beyond.sum() / mask.sum(), rel=1e-12)
