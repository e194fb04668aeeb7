"""Every difference between presets that the research notes list (docs/research/openrlhf.md and trl.md,
section 4; ../shared/design/anchors-algorithms.md, section 3), shown on one small batch: the same
request gives each preset's number, and the difference is the one the notes predict. One section per
engine layer: advantages (estimator rows) and losses (loss rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import advserve
import reference as ref_impl

# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------

MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=bool)  # an empty row, a gap


def loss_batch(log_ratio=None, advantages=None, ref_shift=0.3, rollout_shift=None):
    """Row-wise data on MASK: log-ratios lp − old, advantages (per row unless [B, T]), ref and rollout."""
    B, T = MASK.shape
    old = -np.linspace(0.3, 2.0, B * T).reshape(B, T)
    d = np.full((B, T), 0.1) if log_ratio is None else np.broadcast_to(np.asarray(log_ratio, float), (B, T))
    a = np.array([[1.0], [-1.0], [0.5], [-0.5]]) if advantages is None else np.asarray(advantages, float)
    rollout = old - (0.05 if rollout_shift is None else np.broadcast_to(np.asarray(rollout_shift, float), (B, T)))
    return dict(response_mask=MASK, logprobs=old + d, old_logprobs=old, advantages=np.broadcast_to(a, (B, T)).copy(),
                ref_logprobs=old + ref_shift, rollout_logprobs=rollout, entropy=np.full((B, T), 0.7))


def pick(b, *names):
    return {k: b[k] for k in ("response_mask", "logprobs", "old_logprobs", "advantages", *names)}


def losses(preset, b, **request):
    return advserve.compute_losses(preset=preset, dtype="float64", **request, **b)


def test_losses_dual_clip_default_verl_3_openrlhf_and_trl_none():
    # A < 0 and ρ = e^1.5 ≈ 4.48 > 3: verl caps the loss at 3|A|; OpenRLHF and TRL take ρ|A|
    b = pick(loss_batch(log_ratio=1.5, advantages=-1.0))
    assert losses("verl", b).loss == pytest.approx(3.0)
    for preset in ("openrlhf", "trl"):
        assert losses(preset, b).loss == pytest.approx(math.exp(1.5))


def test_losses_log_ratio_clamp_verl_and_openrlhf_20_trl_none():
    b = pick(loss_batch(log_ratio=25.0, advantages=-1.0))
    for preset, ratio in (("verl", math.exp(20.0)), ("openrlhf", math.exp(20.0)), ("trl", math.exp(25.0))):
        res = losses(preset, b, policy_loss={"dual_clip": None})
        assert res.metrics["ratio_max"] == pytest.approx(ratio, rel=1e-12), preset


def test_losses_kl_value_and_entropy_aggregation_openrlhf_token_mean_verl_the_policy_agg():
    b = pick(loss_batch(advantages=[[1.0, -1.0, 2.0, 0.5]]), "ref_logprobs", "entropy")
    request = dict(policy_loss={"agg": "seq-mean-token-mean"}, kl_loss={"coef": 0.1, "estimator": "k1", "clamp": None},
                   entropy_bonus={"coef": 0.01})
    k1 = -0.2  # lp − ref = (old + 0.1) − (old + 0.3)
    b["ref_logprobs"] = b["ref_logprobs"] + np.where(np.arange(4) < 2, 0.0, 0.4)  # not constant: the means differ
    kl_t = np.where(np.arange(4) < 2, k1, k1 - 0.4) * MASK
    L = MASK.sum(1)
    token_mean = kl_t.sum() / MASK.sum()
    seq_mean = np.mean([kl_t[i].sum() / L[i] for i in range(len(L)) if L[i]])
    assert losses("openrlhf", b, **request).components["kl"] == pytest.approx(token_mean)
    assert losses("verl", b, **request).components["kl"] == pytest.approx(seq_mean)
    assert token_mean != pytest.approx(seq_mean)


def test_losses_kl_clamp_verl_k3_only_openrlhf_every_estimator_trl_none():
    b = pick(loss_batch(ref_shift=-12.0), "ref_logprobs")  # lp − ref = 12.1 on every token
    kl = {"coef": 1.0, "estimator": "k1"}
    assert losses("openrlhf", b, kl_loss=kl).components["kl"] == pytest.approx(10.0)  # clamped to 10
    assert losses("verl", b, kl_loss=kl).components["kl"] == pytest.approx(12.1)  # verl clamps k3 only
    assert losses("trl", b, kl_loss={**kl, "importance_weighted": False}).components["kl"] == pytest.approx(12.1)
    k3 = {"coef": 1.0, "estimator": "k3"}
    assert losses("verl", b, kl_loss=k3).components["kl"] == pytest.approx(10.0)
    trl = losses("trl", b, kl_loss={**k3, "importance_weighted": False}).components["kl"]
    assert trl == pytest.approx(math.exp(-12.1) + 12.1 - 1.0)  # no clamp


def test_losses_trl_kl_is_importance_weighted():
    # kl_t·ρ_t: the value gains the factor ρ = e^0.1, the gradient the term kl·ρ
    b = pick(loss_batch(), "ref_logprobs")
    kl = {"coef": 1.0, "estimator": "k3", "clamp": None}
    plain = losses("trl", b, kl_loss={**kl, "importance_weighted": False})
    weighted = losses("trl", b, kl_loss=kl)
    assert weighted.components["kl"] == pytest.approx(plain.components["kl"] * math.exp(0.1))
    assert losses("verl", b, kl_loss=kl).components["kl"] == pytest.approx(plain.components["kl"])


def test_losses_seq_mean_denominator_trl_all_rows_verl_nonempty():
    b = pick(loss_batch())
    request = dict(policy_loss={"agg": "seq-mean-token-mean"})
    nonempty, rows = int((MASK.sum(1) > 0).sum()), MASK.shape[0]
    verl, trl = losses("verl", b, **request).loss, losses("trl", b, **request).loss
    assert trl == pytest.approx(verl * nonempty / rows)


def test_losses_dr_grpo_divisor_trl_512_verl_padded_width():
    b = pick(loss_batch())
    request = dict(policy_loss={"agg": "seq-mean-token-sum-norm", "seq_denominator": "nonempty"})
    verl, trl = losses("verl", b, **request).loss, losses("trl", b, **request).loss
    assert trl == pytest.approx(verl * MASK.shape[1] / 512.0)


def test_losses_cispo_trl_absolute_cap_verl_relative_clip():
    b = pick(loss_batch(log_ratio=0.1, advantages=1.0))  # ρ = e^0.1 ≈ 1.105
    lp = b["logprobs"][MASK]
    verl = losses("verl", b, policy_loss={"mode": "cispo"}).loss  # ŵ = clip(ρ, 0.8, 1.2) = ρ
    trl = losses("trl", b, policy_loss={"mode": "cispo"}).loss  # ŵ = min(ρ, 0.2) = 0.2 (TRL's default epsilon_high)
    assert verl == pytest.approx(-math.exp(0.1) * lp.mean())
    assert trl == pytest.approx(-0.2 * lp.mean())


def test_losses_gspo_gradient_verl_token_trick_openrlhf_and_trl_through_the_mean():
    adv = np.array([[1.0, -2.0, 0.5, 1.5]] * 4)  # per-token advantages: the two gradients part
    b = pick(loss_batch(log_ratio=0.01, advantages=adv))
    pol = {"mode": "gspo", "clip_low": 0.2, "clip_high": 0.2, "agg": "seq-mean-token-mean", "ratio_clamp": None,
           "dual_clip": None, "seq_denominator": "nonempty"}
    res = {p: losses(p, b, policy_loss=pol) for p in ("verl", "openrlhf", "trl")}
    assert res["verl"].loss == pytest.approx(res["openrlhf"].loss) == pytest.approx(res["trl"].loss)
    np.testing.assert_allclose(res["openrlhf"].grad_logprobs, res["trl"].grad_logprobs, rtol=1e-12)
    s = math.exp(0.01)
    L = MASK.sum(1)
    for i in np.nonzero(L)[0]:  # through the mean: every token of row i gets −s mean_t(A)/(S L_i)
        want = -s * adv[i][MASK[i]].mean() / (3 * L[i])
        np.testing.assert_allclose(res["openrlhf"].grad_logprobs[i][MASK[i]], want, rtol=1e-12)
        np.testing.assert_allclose(res["verl"].grad_logprobs[i][MASK[i]], -s * adv[i][MASK[i]] / (3 * L[i]), rtol=1e-12)


def test_losses_gspo_dual_clip_openrlhf_applies_it_verl_does_not():
    b = pick(loss_batch(log_ratio=1.5, advantages=-1.0))  # s = e^1.5 > 3
    assert losses("openrlhf", b, policy_loss={"mode": "gspo", "dual_clip": 3.0}).loss == pytest.approx(3.0)
    assert losses("verl", b, policy_loss={"mode": "gspo"}).loss == pytest.approx(math.exp(1.5))  # verl: no dual clip


def test_losses_trl_delta_caps_both_signs():
    # δ = 1.1 inside the clip range: A > 0 tokens are capped at 1.1 too (no dual clip can do that)
    b = pick(loss_batch(log_ratio=0.15, advantages=1.0))  # ρ = e^0.15 ≈ 1.16 < 1.2
    assert losses("trl", b, policy_loss={"ratio_cap": 1.1}).loss == pytest.approx(-1.1)
    assert losses("trl", b).loss == pytest.approx(-math.exp(0.15))


def test_losses_entropy_trl_local_token_mean_whatever_the_policy_agg():
    b = pick(loss_batch(), "entropy")
    b["entropy"] = b["entropy"] * np.arange(1, 5)
    request = dict(policy_loss={"agg": "seq-mean-token-mean"}, entropy_bonus={"coef": 0.01})
    token_mean = b["entropy"][MASK].mean()
    assert losses("trl", b, **request).components["entropy"] == pytest.approx(token_mean)
    assert losses("verl", b, **request).components["entropy"] != pytest.approx(token_mean)


def test_losses_rollout_correction_defaults():
    # log w = old − rollout per token: 0.05 except 0.9 on token (0, 1) and 2.0 on token (3, 3)
    shift = np.full(MASK.shape, 0.05)
    shift[0, 1], shift[3, 3] = 0.9, 2.0
    b = pick(loss_batch(rollout_shift=shift), "rollout_logprobs")
    got = {p: losses(p, b, rollout_correction={}).metrics for p in ("verl", "openrlhf", "trl")}
    expected = {
        # verl: token, truncate at 2 (e^2 → 2), ±20 log clamp
        "verl": ref_impl.rollout_weights(MASK, b["old_logprobs"], b["rollout_logprobs"], "token", "truncate", None, 2.0),
        # OpenRLHF: token, mask on [0.5, 5] (e^2 ≈ 7.39 dropped), no log clamp
        "openrlhf": ref_impl.rollout_weights(MASK, b["old_logprobs"], b["rollout_logprobs"], "token", "mask", 0.5, 5.0,
                                             log_clamp=None, weight="token"),
        # TRL: sequence product, mask above 3 (row 0: e^1.05 kept; row 3: e^2.1 > 3 dropped), no log clamp
        "trl": ref_impl.rollout_weights(MASK, b["old_logprobs"], b["rollout_logprobs"], "sequence", "mask", None, 3.0,
                                        log_clamp=None),
    }
    for preset, w in expected.items():
        assert got[preset]["rollout_is_weight_mean"] == pytest.approx(w[MASK].mean()), preset
    assert got["verl"]["rollout_is_weight_max"] == pytest.approx(2.0)
    assert got["openrlhf"]["rollout_is_weight_max"] == pytest.approx(math.exp(0.9))
    assert got["trl"]["rollout_is_weight_max"] == pytest.approx(math.exp(1.05))
    assert got["trl"]["rollout_is_fraction_outside"] == pytest.approx(3 / MASK.sum())


def test_losses_openrlhf_sequence_gate_is_the_geometric_mean_and_survivors_keep_their_token_ratio():
    shift = np.full(MASK.shape, 0.05)
    shift[0, 1] = 0.6  # row 0: product e^0.75 ≈ 2.1, geometric mean e^0.1875 ≈ 1.21
    b = pick(loss_batch(rollout_shift=shift), "rollout_logprobs")
    rc = {"level": "sequence_mean", "low": 0.8, "high": 1.25}
    w = losses("openrlhf", b, rollout_correction=rc).metrics
    assert w["rollout_is_weight_max"] == pytest.approx(math.exp(0.6))  # token (0, 1) keeps e^0.6
    product = losses("verl", b, rollout_correction={"level": "sequence", "mode": "mask", "low": 0.8, "high": 1.25})
    assert product.metrics["rollout_is_fraction_outside"] == pytest.approx(4 / MASK.sum())  # row 0 dropped
