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
# advantages
# --------------------------------------------------------------------------------------------------

PRESETS = ("paper", "verl", "openrlhf", "trl")


def advantages(estimator, preset, params=None, **tensors):
    res = advserve.compute_advantages(estimator, preset=preset, params=params, dtype="float64", **tensors)
    return np.asarray(res.advantages), np.asarray(res.returns), res.params


def rows(a):
    """The per-row value of a broadcast advantage (first token of each row)."""
    return a[:, 0]


def test_advantages_groups_any_ids_in_every_preset():
    # OpenRLHF and TRL reshape rewards into (-1, n): contiguous, equal-sized groups. advserve takes any ids in
    # any order and any sizes in every preset; permuting the rows permutes the advantages
    r = np.array([1.0, 0.0, 3.0, 2.0, 0.5])
    ids = np.array(["b", "a", "b", "a", "a"])
    perm = np.array([1, 3, 4, 0, 2])  # contiguous blocks a, a, a, b, b
    m = np.ones((5, 1), bool)
    for preset in ("verl", "openrlhf", "trl"):
        a, _, _ = advantages("grpo", preset, {"kl_coef": 0.0}, rewards=r, response_mask=m, group_ids=ids)
        b, _, _ = advantages("grpo", preset, {"kl_coef": 0.0}, rewards=r[perm], response_mask=m, group_ids=ids[perm])
        np.testing.assert_allclose(a[perm], b, rtol=1e-15, err_msg=preset)


def test_advantages_size_1_groups_paper_0_verl_raw_openrlhf_error_trl_0():
    r, m, ids = np.array([2.0, 1.0, 3.0]), np.ones((3, 1), bool), np.array([0, 1, 1])  # row 0 alone
    got = {p: rows(advantages("grpo", p, {"kl_coef": 0.0}, rewards=r, response_mask=m, group_ids=ids)[0])[0]
           for p in ("paper", "verl", "trl")}
    assert got == {"paper": 0.0, "verl": pytest.approx(2.0 / (1 + 1e-6)), "trl": 0.0}
    with pytest.raises(advserve.InvalidArgument):  # OpenRLHF asserts n_samples_per_prompt > 1
        advantages("grpo", "openrlhf", {"kl_coef": 0.0}, rewards=r, response_mask=m, group_ids=ids)
    # RLOO: paper refuses, verl keeps R, TRL gives 0, OpenRLHF refuses
    with pytest.raises(advserve.InvalidArgument):
        advantages("rloo", "paper", rewards=r, response_mask=m, group_ids=ids)
    assert rows(advantages("rloo", "verl", rewards=r, response_mask=m, group_ids=ids)[0])[0] == 2.0
    assert rows(advantages("rloo", "trl", {"kl_coef": 0.0}, rewards=r, response_mask=m, group_ids=ids)[0])[0] == 0.0


def test_advantages_group_std_and_epsilon():
    # a pair (0, d), d = 1e-3: population std d/2 (paper), unbiased std d/√2 with ε 1e-6 (verl), 1e-9
    # (OpenRLHF), 1e-4 (TRL), always outside the sqrt
    d = 1e-3
    r, m, ids = np.array([0.0, d]), np.ones((2, 1), bool), np.array([0, 0])
    want = {"paper": 1.0, "verl": (d / 2) / (d / math.sqrt(2) + 1e-6),
            "openrlhf": (d / 2) / (d / math.sqrt(2) + 1e-9), "trl": (d / 2) / (d / math.sqrt(2) + 1e-4)}
    for preset, value in want.items():
        a = rows(advantages("grpo", preset, {"kl_coef": 0.0}, rewards=r, response_mask=m, group_ids=ids)[0])
        np.testing.assert_allclose(a, [-value, value], rtol=1e-12, err_msg=preset)
    assert want["trl"] < 0.88 * want["openrlhf"]  # noticeably different for near-equal rewards


def test_advantages_trl_batch_std_openrlhf_and_verl_group_std():
    # TRL's scale_rewards="batch": the group mean over the std of the whole batch (ddof 1)
    r, m, ids = np.array([0.0, 2.0, 10.0, 20.0]), np.ones((4, 1), bool), np.array([0, 0, 1, 1])
    batch_std = np.std(r, ddof=1)
    a = rows(advantages("grpo", "trl", {"std_scope": "batch"}, rewards=r, response_mask=m, group_ids=ids)[0])
    np.testing.assert_allclose(a, np.array([-1.0, 1.0, -5.0, 5.0]) / (batch_std + 1e-4), rtol=1e-12)
    # the default: each group's own std, sqrt(2) and 5·sqrt(2)
    group = rows(advantages("grpo", "trl", rewards=r, response_mask=m, group_ids=ids)[0])
    s2 = math.sqrt(2.0)
    np.testing.assert_allclose(group, [-1 / (s2 + 1e-4), 1 / (s2 + 1e-4), -5 / (5 * s2 + 1e-4), 5 / (5 * s2 + 1e-4)],
                               rtol=1e-12)


def test_advantages_all_equal_group_is_exactly_0_in_every_preset():
    # TRL divides the rounding residue of an inexact mean by 1e-4 (±1e-12 for 0.1s); advserve gives exactly 0
    r, m, ids = np.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7]), np.ones((6, 1), bool), np.array([0, 0, 0, 1, 1, 1])
    for preset in PRESETS:
        a = advantages("grpo", preset, {"kl_coef": 0.0}, rewards=r, response_mask=m, group_ids=ids)[0]
        assert np.all(a == 0.0), preset


def test_advantages_reward_clip_openrlhf_10_after_the_baseline():
    # RLOO of the pair (0, 30): ∓30; OpenRLHF clips the baseline-subtracted reward to ±10
    r, m, ids = np.array([0.0, 30.0]), np.ones((2, 1), bool), np.array([0, 0])
    for preset, want in (("paper", 30.0), ("verl", 30.0), ("trl", 30.0), ("openrlhf", 10.0)):
        a = rows(advantages("rloo", preset, {"kl_coef": 0.0}, rewards=r, response_mask=m, group_ids=ids)[0])
        np.testing.assert_allclose(a, [-want, want], rtol=1e-15, err_msg=preset)
    # after the baseline, not before: rewards (100, 101) are far beyond 10 but their advantages are ±1
    a = advantages("rloo", "openrlhf", {"kl_coef": 0.0}, rewards=np.array([100.0, 101.0]), response_mask=m,
                   group_ids=ids)[0]
    np.testing.assert_allclose(rows(a), [-1.0, 1.0], rtol=1e-15)


def _kl_batch():
    """Two rows of 3 tokens, group (1, 0); old − ref = (0.1, 0.2, 0.3) and (0.4, 0.5, 0.6)."""
    old = -np.ones((2, 3))
    return dict(rewards=np.array([1.0, 0.0]), response_mask=np.ones((2, 3), bool), group_ids=np.array([0, 0]),
                old_logprobs=old, ref_logprobs=old - np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]))


def test_advantages_kl_in_the_reward_is_on_by_default_only_in_openrlhf_and_trl_rloo():
    b = _kl_batch()
    beta = {p: advantages("rloo", p, params=None if p != "paper" else {"singleton_groups": "zero"},
                          **b)[2]["kl_coef"] for p in PRESETS}
    assert beta == {"paper": 0.0, "verl": 0.0, "openrlhf": 0.01, "trl": 0.05}
    # GRPO: TRL puts β in the loss only (GRPOConfig.beta is kl_loss.coef), OpenRLHF in the reward by default
    grpo = {p: advantages("grpo", p, **b)[2] for p in PRESETS}
    assert {p: g["kl_coef"] for p, g in grpo.items()} == {"paper": 0.0, "verl": 0.0, "openrlhf": 0.01, "trl": 0.0}
    assert grpo["openrlhf"]["kl_placement"] == "reward_to_go" and grpo["verl"]["kl_placement"] == "sequence"
    # TRL RLOO: R̃ = R − 0.05 Σ_t k1 = (1 − 0.03, 0 − 0.075), leave-one-out: ±1.045
    a = rows(advantages("rloo", "trl", **b)[0])
    np.testing.assert_allclose(a, [0.97 - (-0.075), -0.075 - 0.97], rtol=1e-12)


def test_advantages_where_kl_in_the_reward_lands():
    # β = 1, k1 per token (0.1, 0.2, 0.3 | 0.4, 0.5, 0.6), Dr.GRPO of (1, 0) = ±0.5
    b = _kl_batch()
    p = dict(kl_coef=1.0, kl_estimator="k1", kl_clamp=None)
    # verl: the KL is summed into R before the baseline: R̃ = (0.4, −1.5), ±0.95 on every token
    a = advantages("dr_grpo", "verl", p, **b)[0]
    np.testing.assert_allclose(a, [[0.95] * 3, [-0.95] * 3], rtol=1e-12)
    # OpenRLHF: after the baseline, as reward-to-go: 0.5 − (0.6, 0.5, 0.3), −0.5 − (1.5, 1.1, 0.6)
    a = advantages("dr_grpo", "openrlhf", p, **b)[0]
    np.testing.assert_allclose(a, [[-0.1, 0.0, 0.2], [-2.0, -1.6, -1.1]], rtol=1e-12, atol=1e-15)
    # paper GRPO: the seed's per-token term −β ∂kl/∂logπ = −β for k1, on the normalized ±1
    a = advantages("grpo", "paper", p, **b)[0]
    np.testing.assert_allclose(a, [[0.0] * 3, [-2.0] * 3], rtol=1e-12, atol=1e-15)


def test_advantages_kl_clamp_openrlhf_every_estimator_verl_k3_only():
    # k1 with old − ref = 30 on one token, β = 0.1: OpenRLHF clamps it to 10 (so −1 of R̃); verl and paper
    # take 30 (−3)
    b = _kl_batch()
    b["ref_logprobs"] = b["ref_logprobs"].copy()
    b["ref_logprobs"][0, 0] = b["old_logprobs"][0, 0] - 30.0
    p = dict(kl_coef=0.1, kl_estimator="k1", kl_placement="sequence", singleton_groups="zero")
    kl_rest = 0.1 * (0.2 + 0.3)
    tensors = dict(b)
    got = {preset: rows(advantages("rloo", preset, dict(p, kl_clamp=None) if preset == "paper" else p, **tensors)[0])
           for preset in ("paper", "verl", "openrlhf")}
    r1 = 0.0 - 0.1 * (0.4 + 0.5 + 0.6)
    for preset, k in (("paper", 30.0), ("verl", 30.0), ("openrlhf", 10.0)):
        r0 = 1.0 - 0.1 * k - kl_rest
        np.testing.assert_allclose(got[preset], [r0 - r1, r1 - r0], rtol=1e-12, err_msg=preset)


def test_advantages_whitening_which_estimators_and_how():
    # which: GAE is whitened in verl and OpenRLHF, not in the paper preset (nor in TRL, which has no GAE)
    for preset, whiten in (("paper", False), ("verl", True), ("openrlhf", True)):
        assert advantages("gae", preset, {"kl_coef": 0.0}, rewards=np.array([1.0]), response_mask=np.ones((1, 2), bool),
                          values=np.zeros((1, 2)))[2]["whiten"] is whiten
    # how: returns 1, 2, 3, 6 (one token each), mean 3, squared deviations 14
    r, m = np.array([1.0, 2.0, 3.0, 6.0]), np.ones((4, 1), bool)
    scale = {"paper": math.sqrt(14 / 4),                 # population variance, no ε
             "verl": math.sqrt(14 / 3 + 1e-8),           # unbiased, rsqrt(var + 1e-8)
             "openrlhf": math.sqrt(max(14 / 4, 1e-8))}   # population, rsqrt(max(var, 1e-8))
    for preset, d in scale.items():
        a = advantages("reinforce_pp", preset, {"kl_coef": 0.0}, rewards=r, response_mask=m)[0]
        np.testing.assert_allclose(a[:, 0], (r - 3.0) / d, rtol=1e-12, err_msg=preset)
    # max(var, ε) and var + ε part where var is small: values ±1e-5 (var 1e-10)
    tiny = np.array([-1e-5, 1e-5])
    a_verl = advantages("reinforce_pp", "verl", {"kl_coef": 0.0}, rewards=tiny, response_mask=np.ones((2, 1), bool))[0]
    a_orl = advantages("reinforce_pp", "openrlhf", {"kl_coef": 0.0}, rewards=tiny, response_mask=np.ones((2, 1), bool))[0]
    np.testing.assert_allclose(a_verl[:, 0], tiny / math.sqrt(2e-10 + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(a_orl[:, 0], tiny / math.sqrt(1e-8), rtol=1e-12)


def test_advantages_reinforce_pp_baseline_returns_and_kl_placement():
    # group (1, 3) of one-token rows: outcome advantages ∓1, whitened ∓1 (paper, OpenRLHF: population var 1);
    # OpenRLHF returns the unwhitened reward-to-go, paper and verl return A
    r, m, ids = np.array([1.0, 3.0]), np.ones((2, 1), bool), np.array([0, 0])
    eps = {"whiten_eps": 3.0, "kl_coef": 0.0}
    _, ret_paper, _ = advantages("reinforce_pp_baseline", "paper", eps, rewards=r, response_mask=m, group_ids=ids)
    _, ret_orl, p = advantages("reinforce_pp_baseline", "openrlhf", dict(eps, whiten_eps_mode="inside"), rewards=r,
                               response_mask=m, group_ids=ids)
    np.testing.assert_allclose(ret_paper[:, 0], [-0.5, 0.5], rtol=1e-12)  # ∓1/sqrt(1 + 3)
    np.testing.assert_allclose(ret_orl[:, 0], [-1.0, 1.0], rtol=1e-12)
    assert p["kl_placement"] == "reward_to_go"
    assert advantages("reinforce_pp_baseline", "verl", rewards=r, response_mask=m, group_ids=ids)[2]["kl_placement"] \
        == "sequence"


def test_advantages_interior_mask_gaps_verl_skips_openrlhf_steps():
    # one row, tokens 0 and 2 valid, reward 1, γ = 0.5: skipping the gap G_0 = 0.5, stepping through it 0.25
    # (before whitening: the returns of reinforce_pp)
    m = np.array([[1, 0, 1], [1, 1, 1]], dtype=bool)
    r = np.array([1.0, 0.0])
    _, skip, _ = advantages("reinforce_pp", "verl", {"gamma": 0.5}, rewards=r, response_mask=m)
    _, step, _ = advantages("reinforce_pp", "openrlhf", {"gamma": 0.5, "kl_coef": 0.0}, rewards=r, response_mask=m)
    assert skip[0, 0] == pytest.approx(0.5) and step[0, 0] == pytest.approx(0.25)


def test_advantages_gae_defaults():
    got = {p: advantages("gae", p, {"kl_coef": 0.0}, rewards=np.array([1.0]), response_mask=np.ones((1, 2), bool),
                         values=np.zeros((1, 2)))[2] for p in ("paper", "verl", "openrlhf")}
    assert {p: (g["gamma"], g["lam"]) for p, g in got.items()} == {"paper": (1.0, 0.95), "verl": (1.0, 1.0),
                                                                    "openrlhf": (1.0, 1.0)}


def test_advantages_trl_rloo_normalizes_over_sequences():
    # RLOO of (1, 3) and (0, 4): −2, 2, −4, 4; rows of 1 to 4 tokens. TRL (normalize_advantages) whitens the 4
    # sequence values (unbiased std + 1e-4); token whitening (whiten_scope "token") weights rows by length
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    t = dict(rewards=np.array([1.0, 3.0, 0.0, 4.0]), response_mask=mask, group_ids=np.array([0, 0, 1, 1]))
    seq = rows(advantages("rloo", "trl", {"kl_coef": 0.0, "whiten": True}, **t)[0])
    np.testing.assert_allclose(seq, np.array([-2.0, 2.0, -4.0, 4.0]) / (math.sqrt(40 / 3) + 1e-4), rtol=1e-12)
    tok = advantages("rloo", "trl", {"kl_coef": 0.0, "whiten": True, "whiten_scope": "token"}, **t)[0]
    vals = np.array([-2.0] * 4 + [2.0] + [-4.0] * 2 + [4.0] * 3)  # mean −0.2 over the 10 tokens
    np.testing.assert_allclose(tok[mask], (vals - vals.mean()) / (vals.std(ddof=1) + 1e-4), rtol=1e-12)


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
