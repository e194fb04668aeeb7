"""Property tests (hypothesis, bounded) of the `paper` preset: the seed's identities and the layout
invariances that docs/semantics.md promises.

Batches are drawn with scattered ragged groups, singleton groups, length-1 rows, interior mask gaps
and right padding. Rewards live on a dyadic grid (multiples of 1/8) so that ties are exact and a
group's std is either exactly 0 or well away from 0 (no catastrophic 0/tiny divisions).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import advserve
import reference as ref_impl

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = dict(rtol=1e-10, atol=1e-10)

ALL_ESTIMATORS = ref_impl.ESTIMATORS
GROUP_ONLY = ("rloo", "grpo", "grpo_original", "dapo", "dr_grpo")  # no batch-global statistic
AGG_MODES = ref_impl.AGG_MODES


# --------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------


@st.composite
def batches(draw, min_group_size=1, max_groups=4, max_T=7, str_ids=None, zero_rows=False):
    sizes = draw(st.lists(st.integers(min_group_size, 5), min_size=1, max_size=max_groups))
    ids = [g for g, s in enumerate(sizes) for _ in range(s)]
    ids = draw(st.permutations(ids))  # scattered groups
    B = len(ids)
    T = draw(st.integers(1, max_T))
    lo = 0 if zero_rows else 1
    ends = draw(st.lists(st.integers(lo, T), min_size=B, max_size=B))
    gap_bits = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
    mask = np.zeros((B, T), dtype=bool)
    for i, e in enumerate(ends):
        mask[i, :e] = True
        for t in range(1, e - 1):  # interior gaps only (the last valid token stays)
            if gap_bits[i * T + t] and draw(st.booleans()):
                mask[i, t] = False
    rewards = np.array(draw(st.lists(st.integers(-16, 16), min_size=B, max_size=B)), dtype=np.float64) / 8.0
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(1.0, 0.5, size=(B, T)))
    use_str = draw(st.booleans()) if str_ids is None else str_ids
    return dict(
        response_mask=mask,
        rewards=rewards,
        group_ids=np.array([f"q{g}" for g in ids]) if use_str else np.array(ids),
        values=np.round(rng.normal(size=(B, T)) * 64) / 64,
        old_logprobs=old,
        ref_logprobs=old + rng.normal(0, 0.3, size=(B, T)),
        greedy_rewards=np.array(draw(st.lists(st.integers(-8, 8), min_size=B, max_size=B)), dtype=np.float64) / 8.0,
    )



# a KL configuration per estimator that takes one (paper preset)
KL = dict(kl_coef=0.1, kl_estimator="k3")
WITH_KL = ("reinforce", "reinforce_rtg", "reinforce_pp", "reinforce_pp_baseline", "rloo", "remax", "gae")


def tensors_for(estimator, b, kl=False):
    t = {k: b[k] for k in ("response_mask", "rewards") + ref_impl.NEEDS[estimator]}
    if kl:
        t["old_logprobs"], t["ref_logprobs"] = b["old_logprobs"], b["ref_logprobs"]
    return t


def run_adv(estimator, params=None, dtype="float64", **tensors):
    res = advserve.compute_advantages(estimator, preset="paper", params=params, dtype=dtype, **tensors)
    return np.asarray(res.advantages, dtype=np.float64), np.asarray(res.returns, dtype=np.float64)


def row_scalar(a, mask):
    """The per-row value of a broadcast (outcome-level) advantage."""
    out = []
    for i in range(a.shape[0]):
        vp = np.flatnonzero(mask[i])
        out.append(a[i, vp[0]] if len(vp) else 0.0)
    return np.array(out)


def has_singleton(ids):
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    return bool((counts == 1).any())


# --------------------------------------------------------------------------------------------------
# identities of the seed
# --------------------------------------------------------------------------------------------------


@SETTINGS
@given(b=batches(min_group_size=2))
def test_rloo_is_scaled_dr_grpo(b):
    # RLOO: r − mean of others = M/(M−1)·(r − mean) = M/(M−1)·Dr.GRPO, for every group of size M ≥ 2
    a_rloo, _ = run_adv("rloo", **tensors_for("rloo", b))
    a_dr, _ = run_adv("dr_grpo", **tensors_for("dr_grpo", b))
    ids = b["group_ids"]
    for g in np.unique(ids):
        rows = np.flatnonzero(ids == g)
        M = len(rows)
        np.testing.assert_allclose(a_rloo[rows], M / (M - 1) * a_dr[rows], **TOL)


@SETTINGS
@given(b=batches())
def test_orz_is_gae_with_gamma_lam_one(b):
    a_orz, r_orz = run_adv("orz", **tensors_for("orz", b))
    a_gae, r_gae = run_adv("gae", params=dict(gamma=1.0, lam=1.0, kl_coef=0.0), **tensors_for("gae", b))
    np.testing.assert_allclose(a_orz, a_gae, **TOL)
    np.testing.assert_allclose(r_orz, r_gae, **TOL)
    # and ORZ's A_t = r − V_t on every valid token (seed's table)
    m = b["response_mask"]
    want = np.where(m, b["rewards"][:, None] - b["values"], 0.0)
    np.testing.assert_allclose(a_orz, want, **TOL)


@SETTINGS
@given(b=batches())
def test_grpo_sums_to_zero_per_group(b):
    a, _ = run_adv("grpo", **tensors_for("grpo", b))
    per_row = row_scalar(a, b["response_mask"])
    ids = b["group_ids"]
    for g in np.unique(ids):
        rows = np.flatnonzero(ids == g)
        assert abs(per_row[rows].sum()) < 1e-10
        # population std: the normalised advantages have unit mean square unless the group is flat
        ms = np.mean(per_row[rows] ** 2)
        assert ms == pytest.approx(1.0, abs=1e-10) or ms == 0.0


@SETTINGS
@given(b=batches(), gamma=st.sampled_from([1.0, 0.9, 0.5]))
def test_gae_lambda_limits(b, gamma):
    m = b["response_mask"]
    t = tensors_for("gae", b)
    r_tok = ref_impl.token_reward_matrix(m, b["rewards"])
    # λ = 1: A = discounted return − V
    a1, _ = run_adv("gae", params=dict(gamma=gamma, lam=1.0), **t)
    G = ref_impl.reward_to_go(m, r_tok, gamma)
    np.testing.assert_allclose(a1, np.where(m, G - b["values"], 0.0), **TOL)
    # λ = 0: A = TD error δ_t = r_t + γ V_next − V_t (next valid token, V after the last = 0)
    a0, _ = run_adv("gae", params=dict(gamma=gamma, lam=0.0), **t)
    want = np.zeros_like(a0)
    for i in range(m.shape[0]):
        vp = list(np.flatnonzero(m[i]))
        for k, tt in enumerate(vp):
            v_next = b["values"][i, vp[k + 1]] if k + 1 < len(vp) else 0.0
            want[i, tt] = r_tok[i, tt] + gamma * v_next - b["values"][i, tt]
    np.testing.assert_allclose(a0, want, **TOL)


# --------------------------------------------------------------------------------------------------
# layout invariances
# --------------------------------------------------------------------------------------------------


def fix_for(estimator, b):
    """RLOO needs groups of size >= 2 in the paper preset: regroup (or drop) batches with singletons."""
    if estimator == "rloo" and has_singleton(b["group_ids"]):
        B = len(b["rewards"])
        assume(B >= 2)
        return dict(b, group_ids=np.zeros(B, dtype=int))
    return b


@SETTINGS
@given(b=batches(), extra=st.integers(1, 4), estimator=st.sampled_from(ALL_ESTIMATORS), kl=st.booleans())
def test_right_padding_changes_nothing(b, extra, estimator, kl):
    b = fix_for(estimator, b)
    kl = kl and estimator in WITH_KL
    params = dict(KL) if kl else None
    t = tensors_for(estimator, b, kl)
    a, r = run_adv(estimator, params=params, **t)
    B, T = b["response_mask"].shape
    padded = {}
    for k, v in t.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            fill = False if k == "response_mask" else 7.5  # garbage in the new masked columns
            padded[k] = np.concatenate([v, np.full((B, extra), fill, dtype=v.dtype)], axis=1)
        else:
            padded[k] = v
    a2, r2 = run_adv(estimator, params=params, **padded)
    np.testing.assert_allclose(a2[:, :T], a, **TOL)
    np.testing.assert_allclose(r2[:, :T], r, **TOL)
    assert np.all(a2[:, T:] == 0.0) and np.all(r2[:, T:] == 0.0)


@SETTINGS
@given(b=batches(), estimator=st.sampled_from(ALL_ESTIMATORS), data=st.data())
def test_row_permutation_permutes_outputs(b, estimator, data):
    b = fix_for(estimator, b)
    kl = estimator in WITH_KL
    params = dict(KL) if kl else None
    t = tensors_for(estimator, b, kl)
    B = len(b["rewards"])
    perm = np.array(data.draw(st.permutations(range(B))), dtype=int)
    a, r = run_adv(estimator, params=params, **t)
    tp = {k: v[perm] for k, v in t.items()}
    ap, rp = run_adv(estimator, params=params, **tp)
    np.testing.assert_allclose(ap, a[perm], **TOL)
    np.testing.assert_allclose(rp, r[perm], **TOL)


@SETTINGS
@given(b=batches(), estimator=st.sampled_from(GROUP_ONLY), data=st.data())
def test_batching_is_invisible_for_group_estimators(b, estimator, data):
    b = fix_for(estimator, b)
    ids = b["group_ids"]
    groups = list(np.unique(ids))
    chosen = data.draw(st.sets(st.sampled_from(groups)))
    in_first = np.array([g in chosen for g in ids])
    if in_first.all() or not in_first.any():
        return
    kl = estimator in ("rloo", "grpo", "grpo_original") and data.draw(st.booleans())
    params = None
    if kl:
        params = dict(KL, kl_placement="sequence") if estimator != "rloo" else dict(KL)
    t = tensors_for(estimator, b, kl)
    a, r = run_adv(estimator, params=params, **t)
    for sel in (in_first, ~in_first):
        idx = np.flatnonzero(sel)
        a_s, r_s = run_adv(estimator, params=params, **{k: v[idx] for k, v in t.items()})
        np.testing.assert_allclose(a_s, a[idx], **TOL)
        np.testing.assert_allclose(r_s, r[idx], **TOL)


@SETTINGS
@given(b=batches(max_T=6), estimator=st.sampled_from(ALL_ESTIMATORS))
def test_float32_close_to_float64(b, estimator):
    b = fix_for(estimator, b)
    kl = estimator in WITH_KL
    params = dict(KL) if kl else None
    t = tensors_for(estimator, b, kl)
    a64, r64 = run_adv(estimator, params=params, dtype="float64", **t)
    res = advserve.compute_advantages(estimator, preset="paper", params=params, dtype="float32", **t)
    assert np.asarray(res.advantages).dtype == np.float32
    a32, r32 = np.asarray(res.advantages, np.float64), np.asarray(res.returns, np.float64)
    # whitening divides by the batch std: float32 rounding of values near their mean is amplified by
    # the condition number max|x| / std(x) of the values before whitening
    condition = 1.0
    if res.params.get("whiten"):
        pre, _ = run_adv(estimator, params={**(params or {}), "whiten": False}, dtype="float64", **t)
        valid = pre[np.asarray(t["response_mask"], bool)]
        if valid.size and valid.std() > 0:
            condition = float(np.abs(valid).max() / valid.std())
    for x32, x64 in ((a32, a64), (r32, r64)):
        scale = max(1.0, float(np.abs(x64).max(initial=0.0)))
        tol = 1e-5 + 1e-6 * condition
        np.testing.assert_allclose(x32, x64, rtol=tol, atol=tol * scale)


# --------------------------------------------------------------------------------------------------
# losses: sharding with the global num_tokens / num_sequences, padding, float32
# --------------------------------------------------------------------------------------------------


@st.composite
def loss_batches(draw, zero_rows=True):
    B = draw(st.integers(2, 8))
    T = draw(st.integers(1, 6))
    lo = 0 if zero_rows else 1
    ends = draw(st.lists(st.integers(lo, T), min_size=B, max_size=B))
    mask = np.zeros((B, T), dtype=bool)
    for i, e in enumerate(ends):
        mask[i, :e] = True
    if not mask.any():
        mask[0, 0] = True
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    old = -np.abs(rng.normal(1.0, 0.5, size=(B, T)))
    lp = old + rng.normal(0, 0.3, size=(B, T))  # ratios on both sides of [0.8, 1.2]
    v_old = rng.normal(size=(B, T))
    return dict(
        response_mask=mask,
        logprobs=lp,
        old_logprobs=old,
        advantages=rng.normal(size=(B, T)),
        ref_logprobs=old + rng.normal(0, 0.3, size=(B, T)),
        values=v_old + rng.normal(0, 0.3, size=(B, T)),
        old_values=v_old,
        returns=rng.normal(size=(B, T)),
        entropy=np.abs(rng.normal(size=(B, T))),
        rollout_logprobs=old + rng.normal(0, 0.3, size=(B, T)),
    )


def loss_kwargs(mode, agg, lsf=None):
    pl = dict(mode=mode, agg=agg)
    if mode in ("ppo_clip", "gspo", "cispo"):
        pl.update(clip_low=0.2, clip_high=0.2)
    if mode == "ppo_clip":
        pl["dual_clip"] = 3.0
    if lsf is not None:
        pl["loss_scale_factor"] = lsf
    return dict(
        policy_loss=pl,
        kl_loss=dict(coef=0.05, estimator="k3"),
        value_loss=dict(coef=0.5, clip=0.2),
        entropy_bonus=dict(coef=0.01),
        rollout_correction=dict(level="token", mode="truncate", high=2.0),
    )


def read_normalizers(kw, preset, N, S):
    """The global counts the request's aggregations read: num_tokens (token-mean), num_sequences (the
    seq-mean modes); advserve refuses one that no term reads (verl's agg_loss ignores it)."""
    losses = advserve.catalog()["losses"]
    policy = kw["policy_loss"]["agg"]
    aggs = {policy}
    for term in ("kl_loss", "value_loss", "entropy_bonus"):
        if term in kw:
            aggs.add(kw[term].get("agg", losses[term]["defaults"][preset]["agg"]) or policy)
    out = {}
    if "token-mean" in aggs:
        out["num_tokens"] = N
    if any(agg.startswith("seq-mean") for agg in aggs):
        out["num_sequences"] = S
    return out


def run_loss(kw, tensors, dtype="float64", **extra):
    res = advserve.compute_losses(preset="paper", dtype=dtype, **kw, **extra, **tensors)
    return res


MODES = ("ppo_clip", "gspo", "cispo", "reinforce")


@pytest.mark.parametrize("agg", AGG_MODES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=loss_batches(), mode=st.sampled_from(MODES), data=st.data())
def test_loss_sharding_adds_up(agg, b, mode, data):
    m = b["response_mask"]
    B = m.shape[0]
    N = int(m.sum())
    S = int((m.sum(1) > 0).sum())
    kw = loss_kwargs(mode, agg)
    full = run_loss(kw, b)
    k = data.draw(st.integers(1, B - 1))
    parts = [slice(0, k), slice(k, B)]
    loss_sum = 0.0
    grads = {"grad_logprobs": [], "grad_values": [], "grad_entropy": []}
    for sl in parts:
        shard = {key: v[sl] for key, v in b.items()}
        res = run_loss(kw, shard, **read_normalizers(kw, "paper", N, S))
        loss_sum += res.loss
        for g in grads:
            grads[g].append(np.asarray(getattr(res, g)))
    assert loss_sum == pytest.approx(full.loss, rel=1e-10, abs=1e-10)
    for g, pieces in grads.items():
        np.testing.assert_allclose(np.concatenate(pieces, 0), np.asarray(getattr(full, g)), **TOL, err_msg=g)


@SETTINGS
@given(b=loss_batches(), mode=st.sampled_from(MODES), agg=st.sampled_from(AGG_MODES), extra=st.integers(1, 3))
def test_loss_right_padding_changes_nothing(b, mode, agg, extra):
    B, T = b["response_mask"].shape
    # seq-mean-token-sum-norm divides by the padded width unless C is given: pin C
    kw = loss_kwargs(mode, agg, lsf=5.0 if agg == "seq-mean-token-sum-norm" else None)
    full = run_loss(kw, b)
    padded = {
        k: np.concatenate([v, np.full((B, extra), False if k == "response_mask" else 0.25, dtype=v.dtype)], 1)
        for k, v in b.items()
    }
    res = run_loss(kw, padded)
    assert res.loss == pytest.approx(full.loss, rel=1e-10, abs=1e-10)
    for g in ("grad_logprobs", "grad_values", "grad_entropy"):
        gp = np.asarray(getattr(res, g))
        np.testing.assert_allclose(gp[:, :T], np.asarray(getattr(full, g)), **TOL)
        assert np.all(gp[:, T:] == 0.0)


@SETTINGS
@given(b=loss_batches(), mode=st.sampled_from(MODES), agg=st.sampled_from(AGG_MODES))
def test_loss_float32_close_to_float64(b, mode, agg):
    kw = loss_kwargs(mode, agg)
    r64 = run_loss(kw, b, dtype="float64")
    r32 = run_loss(kw, b, dtype="float32")
    assert r32.loss == pytest.approx(r64.loss, rel=1e-5, abs=1e-5)
    for g in ("grad_logprobs", "grad_values", "grad_entropy"):
        x64 = np.asarray(getattr(r64, g), np.float64)
        x32 = np.asarray(getattr(r32, g), np.float64)
        scale = max(1e-3, float(np.abs(x64).max(initial=0.0)))
        np.testing.assert_allclose(x32, x64, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------------------
# losses of the openrlhf and trl presets: identities between parameters
# --------------------------------------------------------------------------------------------------


def _grads_equal(a, b):
    for g in ("grad_logprobs", "grad_values", "grad_entropy"):
        x, y = getattr(a, g), getattr(b, g)
        assert (x is None) == (y is None), g
        if x is not None:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL, err_msg=g)


def _policy_only(b):
    return {k: b[k] for k in ("response_mask", "logprobs", "old_logprobs", "advantages")}


@SETTINGS
@given(b=loss_batches(), agg=st.sampled_from(AGG_MODES), dual=st.sampled_from([None, 1.1]))
def test_gspo_gradient_through_the_mean_equals_the_token_trick_for_row_constant_advantages(b, agg, dual):
    # ∂/∂lp_u Σ_t w_t ℓ(s_i) = (1/L_i) Σ_t w_t ℓ'(s_i) s_i = w_u ℓ'(s_i) s_i when A and w are constant per row
    b = _policy_only(b)
    b["advantages"] = np.repeat(b["advantages"][:, :1], b["advantages"].shape[1], 1)
    pol = dict(mode="gspo", clip_low=0.05, clip_high=0.05, dual_clip=dual, agg=agg)
    trick = run_loss(dict(policy_loss={**pol, "sequence_ratio_gradient": "token_trick"}), b)
    mean = run_loss(dict(policy_loss={**pol, "sequence_ratio_gradient": "through_mean"}), b)
    assert trick.loss == mean.loss
    _grads_equal(trick, mean)


@SETTINGS
@given(b=loss_batches(), agg=st.sampled_from(AGG_MODES), delta=st.floats(1.3, 4.0), high=st.floats(0.0, 0.28))
def test_ratio_cap_above_the_clip_is_the_dual_clip(b, agg, delta, high):
    # TRL: min(ρ, δ) in the unclipped branch equals dual clip c = δ whenever δ > 1 + clip_high
    pol = dict(mode="ppo_clip", clip_low=0.2, clip_high=high, agg=agg)
    cap = run_loss(dict(policy_loss={**pol, "ratio_cap": delta, "dual_clip": None}), _policy_only(b))
    dual = run_loss(dict(policy_loss={**pol, "ratio_cap": None, "dual_clip": delta}), _policy_only(b))
    assert cap.loss == pytest.approx(dual.loss, rel=1e-12, abs=1e-12)
    _grads_equal(cap, dual)


@SETTINGS
@given(b=loss_batches(), agg=st.sampled_from(["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]))
def test_seq_denominator_all_is_num_sequences_b(b, agg):
    B = b["response_mask"].shape[0]
    kw = loss_kwargs("ppo_clip", agg)
    kw["policy_loss"]["seq_denominator"] = "all"
    everything = run_loss(kw, b)
    kw["policy_loss"]["seq_denominator"] = "nonempty"
    given_b = run_loss(kw, b, num_sequences=B)
    assert everything.loss == pytest.approx(given_b.loss, rel=1e-12, abs=1e-12)
    _grads_equal(everything, given_b)


@SETTINGS
@given(b=loss_batches(), high=st.floats(0.0, 4.0))
def test_cispo_cap_is_the_relative_clip_without_a_floor(b, high):
    rel = run_loss(dict(policy_loss=dict(mode="cispo", clip_low=1.0, clip_high=high)), _policy_only(b))
    cap = run_loss(dict(policy_loss=dict(mode="cispo", cispo_cap=1.0 + high)), _policy_only(b))
    assert rel.loss == pytest.approx(cap.loss, rel=1e-12, abs=1e-12)
    _grads_equal(rel, cap)


@SETTINGS
@given(b=loss_batches(), estimator=st.sampled_from(["k1", "k2", "k3", "abs"]))
def test_importance_weighted_kl_on_policy_is_the_kl_value(b, estimator):
    # at ρ = 1 (logprobs = old_logprobs) the value kl·ρ is kl; the gradient gains kl·∂ρ = kl per token
    b = dict(b, old_logprobs=b["logprobs"])
    tensors = {k: b[k] for k in ("response_mask", "logprobs", "old_logprobs", "ref_logprobs")}
    kl = dict(coef=1.0, estimator=estimator, clamp=None)
    plain = advserve.compute_losses(preset="paper", policy_loss=False, kl_loss=kl, dtype="float64",
                                    **{k: v for k, v in tensors.items() if k != "old_logprobs"})
    weighted = advserve.compute_losses(preset="paper", policy_loss=False, kl_loss={**kl, "importance_weighted": True},
                                       dtype="float64", **tensors)
    assert weighted.components["kl"] == pytest.approx(plain.components["kl"], rel=1e-12, abs=1e-12)
    m = b["response_mask"]
    w = ref_impl.agg_weights(m, "seq-mean-token-sum")  # the paper preset's policy aggregation
    kl_t = np.array([[ref_impl.kl_value(float(a), float(r), estimator) for a, r in zip(la, lr)]
                     for la, lr in zip(b["logprobs"], b["ref_logprobs"])])
    gained = np.asarray(weighted.grad_logprobs) - np.asarray(plain.grad_logprobs)
    np.testing.assert_allclose(gained, np.where(m, w * kl_t, 0.0), **TOL)


@pytest.mark.parametrize("preset", ["openrlhf", "trl"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=loss_batches(), agg=st.sampled_from(AGG_MODES), mode=st.sampled_from(["ppo_clip", "gspo", "cispo"]),
       data=st.data())
def test_library_loss_sharding_adds_up(preset, b, agg, mode, data):
    # the library presets' own aggregations (kl, entropy, value per token), sequence ratios through the
    # mean and importance-weighted KL still split over rows with the global counts
    m = b["response_mask"]
    B, N, S = m.shape[0], int(m.sum()), int((m.sum(1) > 0).sum())
    kw = dict(policy_loss=dict(mode=mode, agg=agg), kl_loss=dict(coef=0.05), value_loss={},
              entropy_bonus=dict(coef=0.01), rollout_correction=dict(level="token", mode="truncate", weight="unit",
                                                                      low=None, high=2.0))
    if agg == "seq-mean-token-sum-norm":
        kw["policy_loss"]["loss_scale_factor"] = 5.0
    counts = read_normalizers(kw, preset, N, S)
    full = advserve.compute_losses(preset=preset, dtype="float64", **counts, **kw, **b)
    k = data.draw(st.integers(1, B - 1))
    total, pieces = 0.0, {"grad_logprobs": [], "grad_values": [], "grad_entropy": []}
    for sl in (slice(0, k), slice(k, B)):
        res = advserve.compute_losses(preset=preset, dtype="float64", **counts, **kw,
                                      **{key: v[sl] for key, v in b.items()})
        total += res.loss
        for g in pieces:
            pieces[g].append(np.asarray(getattr(res, g)))
    assert total == pytest.approx(full.loss, rel=1e-10, abs=1e-10)
    for g, parts in pieces.items():
        np.testing.assert_allclose(np.concatenate(parts, 0), np.asarray(getattr(full, g)), **TOL, err_msg=g)
