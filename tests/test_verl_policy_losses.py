"""verl 0.9.1's other policy losses (dro, sapo, gpg, clip_cov, kl_cov, geo_mean, dppo_tv, dppo_kl,
bypass_mode) under advserve's `verl` preset.

1. Golden vectors from the real verl 0.9.1 (tests/golden/verl_0.9.1_policy_losses.json, written by
   tests/golden/make_verl_policy_losses.py from verl's own registered functions): the loss, d loss/d logprobs
   and the metrics that map onto advserve's.
2. The analytic gradients of every mode against torch autograd of the same formula, written here from
   docs/semantics.md (float64, random batches drawn by hypothesis).
3. Parameter validation: every error names its field.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advserve
import golden_cases
from advserve.errors import InvalidArgument

DATA = json.loads((golden_cases.GOLDEN_DIR / "verl_0.9.1_policy_losses.json").read_text())
assert DATA["library"] == "verl" and DATA["version"] == "0.9.1" and DATA["losses"]
TOL = 1e-9  # float64; verl's masked means divide by N + 1e-8 taken in float32 (= N): agreement is ~1e-15
NEW_MODES = ("dro", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dppo_tv", "dppo_kl", "bypass_mode")


def _close(got, want, tol=TOL):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=tol, atol=tol)


# verl's metric -> advserve's (a list: their sum), per mode
METRIC_MAP = {
    "clip_cov": {"actor/pg_clipfrac": ["cov_selected_fraction"]},
    "geo_mean": {"actor/pg_clipfrac": ["clip_fraction_high"], "actor/pg_clipfrac_lower": ["clip_fraction_low"]},
    "dppo_tv": {"actor/pg_clipfrac": ["clip_fraction_high", "clip_fraction_low"],
                "actor/pg_clipfrac_lower": ["ratio_cap_fraction"]},
    "dppo_kl": {"actor/pg_clipfrac": ["clip_fraction_high", "clip_fraction_low"],
                "actor/pg_clipfrac_lower": ["ratio_cap_fraction"]},
    "dro": {"actor/ppo_kl": ["approx_kl"]},
}


@pytest.mark.parametrize("case", DATA["losses"], ids=[c["case"] for c in DATA["losses"]])
def test_verl_policy_losses_match_verl(case):
    res = advserve.compute_losses(preset="verl", dtype="float64", **case["request"],
                                  **golden_cases.inputs(case["tensors"]))
    _close(res.loss, case["expected"]["loss"])
    _close(res.grad_logprobs, case["expected"]["grad_logprobs"])
    assert res.components["policy"] == pytest.approx(case["expected"]["loss"], rel=TOL, abs=TOL)
    for theirs, ours in METRIC_MAP.get(case["request"]["policy_loss"]["mode"], {}).items():
        _close(sum(res.metrics[name] for name in ours), case["verl_metrics"][theirs], 1e-7)


def test_the_golden_file_covers_every_mode():
    counts = {mode: 0 for mode in NEW_MODES}
    for case in DATA["losses"]:
        counts[case["request"]["policy_loss"]["mode"]] += 1
    assert all(n >= 10 for n in counts.values()), counts


# --- 2. gradients against torch autograd of the formula (written here from docs/semantics.md) ----------


def _agg(loss: torch.Tensor, m: torch.Tensor, agg: str) -> torch.Tensor:
    if agg == "token-mean":
        return (loss * m).sum() / m.sum().clamp_min(1)
    rows = m.sum(1)
    seq = (loss * m).sum(1) / rows.clamp_min(1)
    return seq[rows > 0].sum() / (rows > 0).sum().clamp_min(1)


def reference(mode: str, p: dict, lp: torch.Tensor, old: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The aggregated loss of `mode` as a differentiable function of lp (float64)."""
    mb = m.bool()
    d = lp - old
    r20 = torch.exp(d.clamp(-20, 20))
    lo, hi = p.get("clip_low", 0.2), p.get("clip_high", 0.2)
    if mode == "dro":
        loss = -(lp * a - 0.5 * p["dro_beta"] * d**2)
    elif mode == "sapo":
        tau = torch.where(a > 0, torch.tensor(p.get("tau_pos", 1.0), dtype=lp.dtype),
                          torch.tensor(p.get("tau_neg", 1.05), dtype=lp.dtype))
        return _agg(-torch.sigmoid(tau * (r20 - 1)) * 4 / tau * a, m, "seq-mean-token-mean")
    elif mode == "gpg":
        loss = -lp * a
    elif mode == "clip_cov":
        r = torch.exp(d)
        pg1, pg2 = -a * r, -a * r.clamp(1 - lo, 1 + hi)
        n = m.sum()
        cov = (a - (a * m).sum() / n) * (lp.detach() - (lp.detach() * m).sum() / n)
        cand = mb & ~(pg2 > pg1) & (cov > p.get("clip_cov_lb", 1.0)) & (cov < p.get("clip_cov_ub", 5.0))
        idx = torch.nonzero(cand)
        k = max(int(p.get("clip_cov_ratio", 2e-4) * int(n)), 1)
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(p.get("clip_cov_seed", 0)))
        corr = torch.ones_like(a)
        chosen = idx[perm[:k]]
        corr[chosen[:, 0], chosen[:, 1]] = 0
        loss = torch.maximum(pg1, pg2) * corr
    elif mode == "kl_cov":
        r = torch.exp(d)
        av, lv = a[mb], lp.detach()[mb]
        cov = (av - av.mean()) * (lv - lv.mean())
        top = torch.topk(cov, max(1, int(len(cov) * p.get("kl_cov_ratio", 2e-4)))).indices
        sel = torch.zeros(len(cov), dtype=torch.bool)
        sel[top] = True
        full = torch.zeros_like(mb)
        full[mb] = sel
        loss = -a * r + torch.where(full, p.get("kl_cov_coef", 0.1) * d.abs(), 0)
    elif mode == "geo_mean":
        s = torch.sign(a)
        dm = s * torch.minimum(s * d, s * d.clamp(-lo, hi))
        n = m.sum(1).clamp_min(1)
        ratio = torch.exp((dm * m).sum(1) / n)
        return (-(a * m).sum(1) / n * ratio).mean()
    elif mode in ("dppo_tv", "dppo_kl"):
        w = r20.clamp(max=p.get("ratio_cap", 3.0)).detach()
        pr, q = lp.exp(), old.exp()
        if mode == "dppo_tv":
            v = torch.where(a > 0, pr - q <= hi, pr - q >= -lo)
        else:
            kl = q * (old - lp) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - pr + 1e-8))
            v = torch.where(a > 0, (kl <= hi) | (pr <= q), (kl <= lo) | (pr >= q))
        loss = -a * w * lp * v.detach()
    elif mode == "bypass_mode":
        if p.get("bypass_loss", "ppo_clip") == "ppo_clip":
            l1 = torch.maximum(-a * r20, -a * r20.clamp(1 - lo, 1 + hi))
            loss = torch.where(a < 0, torch.minimum(-a * 3.0, l1), l1)
        else:
            level = p.get("bypass_is", "sequence")
            logw = d if level == "token" else (d * m).sum(1, keepdim=True).expand_as(d)
            w = (torch.exp(logw.clamp(-20, 20)) * m).clamp(max=p.get("bypass_is_high", 2.0)).detach()
            loss = -a * lp * w
    return _agg(loss, m, p.get("agg", "token-mean"))


MODE_PARAMS = {
    "dro": st.fixed_dictionaries({"dro_beta": st.floats(1e-3, 3.0)}),
    "sapo": st.fixed_dictionaries({"tau_pos": st.floats(0.1, 4.0), "tau_neg": st.floats(0.1, 4.0)}),
    "gpg": st.just({}),
    "clip_cov": st.fixed_dictionaries({"clip_low": st.floats(0.0, 0.5), "clip_high": st.floats(0.0, 0.5),
                                       "clip_cov_ratio": st.sampled_from([1e-4, 0.1, 0.5, 1.0]),
                                       "clip_cov_lb": st.sampled_from([-1.0, 0.0, 0.1]),
                                       "clip_cov_ub": st.sampled_from([0.5, 5.0]),
                                       "clip_cov_seed": st.integers(0, 2**31)}),
    "kl_cov": st.fixed_dictionaries({"kl_cov_ratio": st.sampled_from([1e-4, 0.2, 1.0]),
                                     "kl_cov_coef": st.floats(0.0, 2.0)}),
    "geo_mean": st.fixed_dictionaries({"clip_low": st.floats(0.01, 1.0), "clip_high": st.floats(0.01, 1.0)}),
    "dppo_tv": st.fixed_dictionaries({"clip_low": st.floats(0.0, 1.0), "clip_high": st.floats(0.0, 1.0),
                                      "ratio_cap": st.floats(1.0, 5.0)}),
    "dppo_kl": st.fixed_dictionaries({"clip_low": st.floats(0.0, 1.0), "clip_high": st.floats(0.0, 1.0),
                                      "ratio_cap": st.floats(1.0, 5.0)}),
    "bypass_mode": st.fixed_dictionaries({"bypass_loss": st.sampled_from(["ppo_clip", "reinforce"]),
                                          "bypass_is": st.sampled_from(["token", "sequence"]),
                                          "bypass_is_high": st.floats(0.5, 4.0)}),
}


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    m = rng.uniform(size=(b, t)) < 0.75
    m[0, 0] = True  # at least one valid token
    lp = np.log(rng.uniform(0.02, 0.98, size=(b, t)))
    old = np.minimum(lp + rng.normal(0, draw(st.sampled_from([0.0, 0.1, 0.5, 1.5])), size=(b, t)), -1e-3)
    a = rng.normal(size=(b, t)) * (rng.uniform(size=(b, t)) < 0.9)
    return m, lp, old, a


@pytest.mark.parametrize("mode", NEW_MODES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_gradients_equal_autograd_of_the_formula(mode, data):
    m, lp, old, a = data.draw(batches())
    p = {"mode": mode, **data.draw(MODE_PARAMS[mode])}
    if mode not in ("sapo", "geo_mean"):
        p["agg"] = data.draw(st.sampled_from(["token-mean", "seq-mean-token-mean"]))
    res = advserve.compute_losses(preset="verl", dtype="float64", policy_loss=p, logprobs=lp, old_logprobs=old,
                                  advantages=a, response_mask=m)
    mt = torch.tensor(m, dtype=torch.float64)
    lpt = torch.tensor(lp).requires_grad_(True)
    loss = reference(mode, p, lpt, torch.tensor(old), torch.tensor(a) * mt, mt)
    (grad,) = torch.autograd.grad(loss, [lpt])
    _close(res.loss, loss.item(), 1e-10)
    _close(res.grad_logprobs, (grad * mt).numpy(), 1e-10)


@settings(max_examples=30, deadline=None)
@given(batch=batches())
def test_identities_between_modes(batch):
    """gpg is −A·lp: bypass_mode's reinforce without weights is gpg, and at ρ = 1 gpg's gradient is the
    seed's reinforce's; dppo_tv with thresholds ≥ 1 (every token inside) and no cap is −A·sg(ρ)·lp, whose
    gradient is ppo_clip's without clipping (reinforce's −A·ρ)."""
    m, lp, old, a = batch
    kw = {"preset": "verl", "dtype": "float64", "logprobs": lp, "advantages": a, "response_mask": m}
    gpg = advserve.compute_losses(policy_loss={"mode": "gpg"}, old_logprobs=old, **kw)
    plain = advserve.compute_losses(policy_loss={"mode": "bypass_mode", "bypass_loss": "reinforce", "bypass_is": None},
                                    old_logprobs=old, **kw)
    _close(plain.loss, gpg.loss, 0)
    _close(plain.grad_logprobs, gpg.grad_logprobs, 0)
    at_one = advserve.compute_losses(policy_loss={"mode": "reinforce"}, old_logprobs=lp, **kw)
    gpg_at_one = advserve.compute_losses(policy_loss={"mode": "gpg"}, old_logprobs=lp, **kw)
    _close(gpg_at_one.grad_logprobs, at_one.grad_logprobs, 1e-15)
    wide = advserve.compute_losses(policy_loss={"mode": "dppo_tv", "clip_low": 1.0, "clip_high": 1.0, "ratio_cap": None},
                                   old_logprobs=old, **kw)
    unclipped = advserve.compute_losses(policy_loss={"mode": "reinforce"}, old_logprobs=old, **kw)
    _close(wide.grad_logprobs, unclipped.grad_logprobs, 1e-12)


# --- 3. validation: each error names its field ---------------------------------------------------------

RNG = np.random.default_rng(3)
M = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
LP = np.log(RNG.uniform(0.1, 0.9, size=M.shape))
TENSORS = {"logprobs": LP, "old_logprobs": LP + 0.1, "advantages": RNG.normal(size=M.shape), "response_mask": M}

INVALID = [
    ({"mode": "dro"}, "policy_loss.dro_beta"),
    ({"mode": "dro", "dro_beta": 0.0}, "policy_loss.dro_beta"),
    ({"mode": "dro", "dro_beta": -1.0}, "policy_loss.dro_beta"),
    ({"mode": "sapo", "tau_pos": 0.0}, "policy_loss.tau_pos"),
    ({"mode": "sapo", "tau_neg": -1.0}, "policy_loss.tau_neg"),
    ({"mode": "sapo", "tau_neg": "x"}, "policy_loss.tau_neg"),
    ({"mode": "clip_cov", "clip_cov_ratio": 0.0}, "policy_loss.clip_cov_ratio"),
    ({"mode": "clip_cov", "clip_cov_ratio": 1.5}, "policy_loss.clip_cov_ratio"),
    ({"mode": "clip_cov", "clip_cov_seed": -1}, "policy_loss.clip_cov_seed"),
    ({"mode": "clip_cov", "clip_cov_seed": 1.5}, "policy_loss.clip_cov_seed"),
    ({"mode": "clip_cov", "clip_cov_lb": None}, "policy_loss.clip_cov_lb"),
    ({"mode": "clip_cov", "clip_cov_ub": float("nan")}, "policy_loss.clip_cov_ub"),
    ({"mode": "kl_cov", "kl_cov_ratio": 0.0}, "policy_loss.kl_cov_ratio"),
    ({"mode": "kl_cov", "kl_cov_coef": -0.1}, "policy_loss.kl_cov_coef"),
    ({"mode": "geo_mean", "clip_low": 1.5}, "policy_loss.clip_low"),
    ({"mode": "dppo_tv", "ratio_cap": 0.0}, "policy_loss.ratio_cap"),
    ({"mode": "dppo_kl", "clip_high": -0.1}, "policy_loss.clip_high"),
    ({"mode": "bypass_mode", "bypass_loss": "vanilla"}, "policy_loss.bypass_loss"),
    ({"mode": "bypass_mode", "bypass_is": "geometric"}, "policy_loss.bypass_is"),
    ({"mode": "bypass_mode", "bypass_is_high": 0.0}, "policy_loss.bypass_is_high"),
    ({"mode": "bypass_mode", "bypass_is_low": 3.0, "bypass_is_high": 2.0}, "policy_loss.bypass_is_low"),
    ({"mode": "vanilla_reinforce"}, "policy_loss.mode"),
]


@pytest.mark.parametrize("policy,field", INVALID, ids=[f"{p['mode']}-{f}" for p, f in INVALID])
def test_parameter_errors_name_the_field(policy, field):
    with pytest.raises(InvalidArgument) as err:
        advserve.compute_losses(preset="verl", policy_loss=policy, **TENSORS)
    assert err.value.field == field, err.value


def test_bypass_mode_refuses_a_second_correction():
    with pytest.raises(InvalidArgument) as err:
        advserve.compute_losses(preset="verl", policy_loss={"mode": "bypass_mode"}, rollout_correction={},
                                rollout_logprobs=LP, **TENSORS)
    assert err.value.field == "rollout_correction"
    with pytest.raises(InvalidArgument) as err:
        advserve.compute_losses(preset="verl", policy_loss={"mode": "bypass_mode"},
                                rollout_is_weights=np.ones(M.shape), **TENSORS)
    assert err.value.field == "tensors.rollout_is_weights"


def test_clip_cov_seed_is_the_draw():
    """Where more tokens qualify than are cut, the seed picks which: two seeds give two answers, one seed
    one answer (a pure function of the request)."""
    rng = np.random.default_rng(0)
    m = np.ones((8, 16), dtype=bool)
    lp = np.log(rng.uniform(0.02, 0.98, size=m.shape))
    t = {"logprobs": lp, "old_logprobs": lp, "advantages": rng.normal(size=m.shape) * 3, "response_mask": m}
    pol = {"mode": "clip_cov", "clip_cov_lb": 0.0, "clip_cov_ub": 100.0, "clip_cov_ratio": 0.05}
    runs = [advserve.compute_losses(preset="verl", dtype="float64", policy_loss={**pol, "clip_cov_seed": s}, **t)
            for s in (0, 0, 1)]
    assert runs[0].loss == runs[1].loss and np.array_equal(runs[0].grad_logprobs, runs[1].grad_logprobs)
    assert not np.array_equal(runs[0].grad_logprobs, runs[2].grad_logprobs)
    assert runs[0].metrics["cov_selected_fraction"] == pytest.approx(6 / 128)


# --- the `paper` preset: the objectives as SAPO's and GMPO's papers write them (hand-derived, float64) ------


def test_paper_geo_mean_is_gmpos_objective_by_hand():
    """GMPO (arXiv:2507.20673): token log-ratios clipped to (−0.4, 0.4) on the advantage's side, the
    geometric mean per response, the mean over all G responses. Row 0 (A = 1): d = (0.5, 0.1) → (0.4, 0.1),
    r₀ = e^0.25, ℓ₀ = −e^0.25. Row 1 (A = −2): d = (−0.5, 0.25, 0) → (−0.4, 0.25, 0), r₁ = e^−0.05,
    ℓ₁ = 2e^−0.05. Loss (ℓ₀ + ℓ₁)/2; the gradient reaches a row's unclipped tokens: ℓ_i/(L_i·2)."""
    m = np.array([[1, 1, 0], [1, 1, 1]], dtype=bool)
    old = np.array([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    lp = old + np.array([[0.5, 0.1, 0.0], [-0.5, 0.25, 0.0]])
    a = np.array([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]])
    res = advserve.compute_losses(preset="paper", dtype="float64", policy_loss={"mode": "geo_mean"}, logprobs=lp,
                                  old_logprobs=old, advantages=a, response_mask=m)
    l0, l1 = -np.exp(0.25), 2 * np.exp(-0.05)
    _close(res.loss, (l0 + l1) / 2, 1e-15)
    _close(res.grad_logprobs, [[0.0, l0 / 4, 0.0], [0.0, l1 / 6, l1 / 6]], 1e-15)
    assert res.params["policy_loss"]["clip_low"] == res.params["policy_loss"]["clip_high"] == 0.4


def test_paper_sapo_averages_token_means_by_hand():
    """SAPO (arXiv:2511.20347): f = (4/τ)σ(τ(ρ − 1)), τ 1 where A > 0 and 1.05 elsewhere, each response's
    token mean averaged. One response: A = (1, −1), ρ = (1, 2): ℓ = (−2, (4/1.05)σ(1.05)), loss their mean;
    ∂ℓ/∂lp = −A·4σ(1 − σ)ρ: (−1, 8σ(1.05)(1 − σ(1.05))), halved."""
    sig = 1 / (1 + np.exp(-1.05))
    res = advserve.compute_losses(preset="paper", dtype="float64", policy_loss={"mode": "sapo"},
                                  logprobs=np.array([[-1.0, -1.0 + np.log(2.0)]]), old_logprobs=np.array([[-1.0, -1.0]]),
                                  advantages=np.array([[1.0, -1.0]]), response_mask=np.ones((1, 2), dtype=bool))
    _close(res.loss, (-2 + 4 / 1.05 * sig) / 2, 1e-15)
    _close(res.grad_logprobs, [[-0.5, 4 * sig * (1 - sig)]], 1e-14)
    assert res.params["policy_loss"]["agg"] == "seq-mean-token-mean"
