"""Golden values of the `paper` preset, worked out by hand from the seed document (its table
"Advantage Estimations of Popular Policy Gradient Methods") and docs/semantics.md, plus a differential
test of every estimator against the naive float64 reference in tests/reference.py.

The expected numbers below are literals derived in the comments (closed forms such as sqrt(3) are
written as such); none of them is produced by the engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import advserve

import reference as ref_impl

TOL = dict(rtol=1e-10, atol=1e-10)
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def adv(estimator, params=None, **tensors):
    res = advserve.compute_advantages(estimator, preset="paper", params=params, dtype="float64", **tensors)
    return np.asarray(res.advantages, dtype=np.float64), np.asarray(res.returns, dtype=np.float64)


def losses(**kw):
    kw.setdefault("preset", "paper")
    kw.setdefault("dtype", "float64")
    return advserve.compute_losses(**kw)


def mask_from_lengths(lengths, T):
    m = np.zeros((len(lengths), T), dtype=bool)
    for i, n in enumerate(lengths):
        m[i, :n] = True
    return m


def expect_rows(per_row, mask):
    """Broadcast a per-row scalar over the valid tokens; 0 elsewhere."""
    out = np.zeros(mask.shape)
    for i, v in enumerate(per_row):
        out[i, np.asarray(mask[i], bool)] = v
    return out


def assert_close(got, want):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), **TOL)


# --------------------------------------------------------------------------------------------------
# GRPO (R1 version): (r − mean(R_i)) / std(R_i), population std, no eps
# --------------------------------------------------------------------------------------------------


def test_grpo_binary_half():
    # rewards [1,0,0,1] in one group: p̂ = 0.5, std = sqrt(p̂(1−p̂)) = 0.5
    # A = (1 − 0.5)/0.5 = +1, (0 − 0.5)/0.5 = −1; ragged lengths, padding stays 0.
    m = mask_from_lengths([3, 2, 1, 3], 4)
    a, r = adv("grpo", rewards=np.array([1.0, 0, 0, 1]), response_mask=m, group_ids=np.array([7, 7, 7, 7]))
    assert_close(a, expect_rows([1, -1, -1, 1], m))
    assert_close(r, a)  # returns = advantages
    assert np.all(a[~m] == 0.0)


def test_grpo_binary_quarter():
    # [1,0,0,0]: p̂ = 1/4, std = sqrt(1/4 · 3/4) = sqrt(3)/4
    # A(1) = (3/4)/(sqrt(3)/4) = sqrt(3) = 1.7320508075688772; A(0) = −(1/4)/(sqrt(3)/4) = −1/sqrt(3)
    m = mask_from_lengths([2, 2, 2, 2], 2)
    a, _ = adv("grpo", rewards=np.array([1.0, 0, 0, 0]), response_mask=m, group_ids=np.zeros(4, int))
    s3 = 1.7320508075688772
    assert_close(a, expect_rows([s3, -1 / s3, -1 / s3, -1 / s3], m))


def test_grpo_scattered_string_groups():
    # ids b,a,b,a,c,c: group a = rows 1,3 (rewards 1, 0) → ±1; group b = rows 0,2 (1, 0) → ±1;
    # group c = rows 4,5 (0.5, 0.5): all equal → std 0 → 0 (not NaN).
    m = mask_from_lengths([1, 2, 3, 1, 2, 2], 3)
    a, _ = adv(
        "grpo",
        rewards=np.array([1.0, 1.0, 0.0, 0.0, 0.5, 0.5]),
        response_mask=m,
        group_ids=np.array(["b", "a", "b", "a", "c", "c"]),
    )
    assert_close(a, expect_rows([1, 1, -1, -1, 0, 0], m))
    assert np.all(np.isfinite(a))


def test_grpo_std_ddof_and_eps_overrides():
    m = mask_from_lengths([1, 1, 1, 1], 1)
    R = np.array([1.0, 0, 0, 1])
    # std_ddof = 1: std = sqrt(4·0.25/3) = sqrt(1/3); A = 0.5·sqrt(3) = 0.8660254037844386
    a, _ = adv("grpo", params=dict(std_ddof=1), rewards=R, response_mask=m, group_ids=np.zeros(4, int))
    assert_close(a[:, 0], [0.8660254037844386, -0.8660254037844386, -0.8660254037844386, 0.8660254037844386])
    # std_eps = 0.5 outside the sqrt: A = 0.5/(0.5 + 0.5) = ±0.5
    a, _ = adv("grpo", params=dict(std_eps=0.5), rewards=R, response_mask=m, group_ids=np.zeros(4, int))
    assert_close(a[:, 0], [0.5, -0.5, -0.5, 0.5])


def test_grpo_singletons_and_all_equal():
    m = mask_from_lengths([2, 1, 3], 3)
    R = np.array([0.75, 1.0, 1.0])
    g = np.array([0, 1, 1])
    # row 0 is a singleton ("zero": A = 0); rows 1, 2 all-equal (std 0 → 0)
    a, r = adv("grpo", rewards=R, response_mask=m, group_ids=g)
    assert_close(a, np.zeros((3, 3)))
    assert_close(r, np.zeros((3, 3)))
    # "raw" (verl's rule): mean 0, std 1 → A = R/(1 + eps) = 0.75
    a, _ = adv("grpo", params=dict(singleton_groups="raw"), rewards=R, response_mask=m, group_ids=g)
    assert_close(a, expect_rows([0.75, 0, 0], m))
    with pytest.raises(advserve.AdvserveError):
        adv("grpo", params=dict(singleton_groups="error"), rewards=R, response_mask=m, group_ids=g)


def test_singleton_raw_divisor_float64():
    # "raw": mean 0, std 1 → A = R/(1 + eps), with 1 + eps rounded to float32 as verl's torch.tensor(1.0)
    # makes it: float32(1 + 1e-6) = 1.00000095367431640625 (docs/semantics.md)
    m = np.ones((1, 1), dtype=bool)
    a, _ = adv("grpo", params=dict(std_eps=1e-6, singleton_groups="raw"), rewards=np.array([0.5]),
               response_mask=m, group_ids=np.array([0]))
    assert_close(a, [[0.5 / 1.00000095367431640625]])



@pytest.mark.parametrize(
    "estimator,lr,want",
    [
        # GRPO KL term in the advantage (seed's table, R1 version): β(π_ref/π_old − 1) for k3.
        # β = 0.1, log(π_ref/π_old) = ln 2 → +0.1; group [1, 0] → ±1 → [1.1, −0.9].
        ("k3", LN2, [1.1, -0.9]),
        # k1: −β → [0.9, −1.1]
        ("k1", LN2, [0.9, -1.1]),
        # k2: −β(old − ref) with old − ref = −(ref − old) = −0.5 → +0.05 → [1.05, −0.95]
        ("k2", 0.5, [1.05, -0.95]),
        # abs: −β sign(old − ref) with old − ref = +0.3 → −0.1 → [0.9, −1.1]
        ("abs", -0.3, [0.9, -1.1]),
    ],
)
def test_grpo_token_kl_term(estimator, lr, want):
    m = mask_from_lengths([2, 2], 2)
    old = np.full((2, 2), -1.0)
    ref = old + lr  # lr = ref − old
    a, _ = adv(
        "grpo",
        params=dict(kl_coef=0.1, kl_estimator=estimator, kl_placement="token"),
        rewards=np.array([1.0, 0.0]),
        response_mask=m,
        group_ids=np.array([3, 3]),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    assert_close(a, expect_rows(want, m))


def test_grpo_kl_sequence_placement():
    # kl_placement = "sequence": R̃ = R − β Σ_t kl_t before the group statistics.
    # rewards [1,0,0], k1 per token (old − ref): [.3,.1], [−.1,−.1], [.1,.1] → sums [.4, −.2, .2]
    # β = 0.5 → R̃ = [0.8, 0.1, −0.1]; mean = 0.8/3; deviations = [1.6, −0.5, −1.1]/3
    # var = (1.6² + 0.5² + 1.1²)/9/3 = 4.02/27 → A = (d·3)/(3·std) = [1.6, −0.5, −1.1]/sqrt(1.34)
    m = mask_from_lengths([2, 2, 2], 2)
    old = np.array([[0.3, 0.1], [-0.1, -0.1], [0.1, 0.1]]) - 1.0
    ref = np.full((3, 2), -1.0)
    a, _ = adv(
        "grpo",
        params=dict(kl_coef=0.5, kl_estimator="k1", kl_placement="sequence"),
        rewards=np.array([1.0, 0, 0]),
        response_mask=m,
        group_ids=np.array([0, 0, 0]),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    s = math.sqrt(1.34)
    assert_close(a, expect_rows([1.6 / s, -0.5 / s, -1.1 / s], m))


def test_grpo_original_divides_by_own_length():
    # GRPO original: [(r − mean)/std]/T_ij; group [1, 0], L = [2, 4] → [1/2, −1/4]
    m = mask_from_lengths([2, 4], 4)
    a, _ = adv("grpo_original", rewards=np.array([1.0, 0.0]), response_mask=m, group_ids=np.array([0, 0]))
    assert_close(a, expect_rows([0.5, -0.25], m))


def test_grpo_original_with_token_kl():
    # [±1 + β(π_ref/π_old − 1)]/L with β = 0.1, π_ref/π_old = 2, L = [2, 4] → [1.1/2, −0.9/4]
    m = mask_from_lengths([2, 4], 4)
    old = np.full((2, 4), -2.0)
    a, _ = adv(
        "grpo_original",
        params=dict(kl_coef=0.1, kl_estimator="k3"),
        rewards=np.array([1.0, 0.0]),
        response_mask=m,
        group_ids=np.array([0, 0]),
        old_logprobs=old,
        ref_logprobs=old + LN2,
    )
    assert_close(a, expect_rows([0.55, -0.225], m))


# --------------------------------------------------------------------------------------------------
# DAPO: GRPO / mean group length
# --------------------------------------------------------------------------------------------------


def test_dapo_divides_by_mean_group_length():
    # group 0: rewards [1, 0], L = [2, 4] → GRPO ±1, T̂ = 3 → [1/3, −1/3]
    # group 1: rewards [1, 0, 0], L = [1, 1, 4] → p̂ = 1/3, std = sqrt(2)/3
    #   A = [(2/3)/(sqrt2/3), −(1/3)/(sqrt2/3)] = [sqrt2, −1/sqrt2]; T̂ = 2 → [sqrt2/2, −sqrt2/4, −sqrt2/4]
    m = mask_from_lengths([2, 1, 4, 1, 4], 4)
    a, r = adv(
        "dapo",
        rewards=np.array([1.0, 1.0, 0.0, 0.0, 0.0]),
        response_mask=m,
        group_ids=np.array([0, 1, 0, 1, 1]),
    )
    s2 = math.sqrt(2.0)
    assert_close(a, expect_rows([1 / 3, s2 / 2, -1 / 3, -s2 / 4, -s2 / 4], m))
    assert_close(r, a)


# --------------------------------------------------------------------------------------------------
# Dr.GRPO and RLOO
# --------------------------------------------------------------------------------------------------


def test_dr_grpo():
    # r − mean: [1,0,0] → [2/3, −1/3, −1/3]; [1,0,0,1] → ±1/2 (scattered, int ids)
    m = mask_from_lengths([1, 2, 3, 1, 1, 2, 3], 3)
    R = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    g = np.array([5, 9, 5, 9, 5, 9, 9])
    a, r = adv("dr_grpo", rewards=R, response_mask=m, group_ids=g)
    assert_close(a, expect_rows([2 / 3, 0.5, -1 / 3, -0.5, -1 / 3, -0.5, 0.5], m))
    assert_close(r, a)


def test_rloo_binary():
    # R_j − mean of the others: [1,0,0] → [1 − 0, 0 − 1/2, 0 − 1/2] = [1, −0.5, −0.5]
    m = mask_from_lengths([3, 1, 2], 3)
    a, r = adv("rloo", rewards=np.array([1.0, 0, 0]), response_mask=m, group_ids=np.array(["p", "p", "p"]))
    assert_close(a, expect_rows([1, -0.5, -0.5], m))
    assert_close(r, a)
    # identity of the seed: RLOO = M/(M−1)·Dr.GRPO: 3/2 · [2/3, −1/3, −1/3] = [1, −1/2, −1/2]


def test_rloo_with_kl():
    # R̃ = R − β Σ kl: rewards [1,0,0], Σ k1 = [.4, −.2, .2], β = .5 → R̃ = [0.8, 0.1, −0.1]
    # A = [0.8 − (0.1 − 0.1)/2, 0.1 − (0.8 − 0.1)/2, −0.1 − (0.8 + 0.1)/2] = [0.8, −0.25, −0.55]
    m = mask_from_lengths([2, 2, 2], 2)
    old = np.array([[0.3, 0.1], [-0.1, -0.1], [0.1, 0.1]]) - 1.0
    ref = np.full((3, 2), -1.0)
    a, _ = adv(
        "rloo",
        params=dict(kl_coef=0.5, kl_estimator="k1"),
        rewards=np.array([1.0, 0, 0]),
        response_mask=m,
        group_ids=np.array([0, 0, 0]),
        old_logprobs=old,
        ref_logprobs=ref,
    )
    assert_close(a, expect_rows([0.8, -0.25, -0.55], m))


def test_rloo_singleton_is_an_error():
    m = mask_from_lengths([1, 1, 1], 1)
    with pytest.raises(advserve.AdvserveError):
        adv("rloo", rewards=np.array([1.0, 0, 0]), response_mask=m, group_ids=np.array([0, 0, 1]))


# --------------------------------------------------------------------------------------------------
# REINFORCE family
# --------------------------------------------------------------------------------------------------

# One row of 3 tokens, R = 1, β = 0.1, k1 per token old − ref = [0.2, −0.1, 0.3] (Σ = 0.4)
_OLD = np.array([[0.2, -0.1, 0.3]]) - 1.0
_REF = np.full((1, 3), -1.0)
_M3 = np.ones((1, 3), dtype=bool)


def test_reinforce_whole_trajectory_kl():
    # REINFORCE: r − β Σ_{t'=0}^{T−1} kl = 1 − 0.1·0.4 = 0.96 at every token
    a, r = adv(
        "reinforce",
        params=dict(kl_coef=0.1, kl_estimator="k1"),
        rewards=np.array([1.0]),
        response_mask=_M3,
        old_logprobs=_OLD,
        ref_logprobs=_REF,
    )
    assert_close(a, [[0.96, 0.96, 0.96]])
    assert_close(r, a)


def test_reinforce_rtg_kl_trick():
    # REINFORCE w/ KL trick: r − β Σ_{t'≥t} kl: t=0: 1 − .1(.4) = .96; t=1: 1 − .1(.2) = .98;
    # t=2: 1 − .1(.3) = .97
    a, r = adv(
        "reinforce_rtg",
        params=dict(kl_coef=0.1, kl_estimator="k1"),
        rewards=np.array([1.0]),
        response_mask=_M3,
        old_logprobs=_OLD,
        ref_logprobs=_REF,
    )
    assert_close(a, [[0.96, 0.98, 0.97]])
    assert_close(r, a)


def test_reinforce_rtg_gamma_and_interior_gap():
    # γ = 0.5, R = 1 on the last valid token, mask [1, 0, 1, 1, 0]: valid tokens k = 0, 1, 2
    # rtg = [γ², γ, 1] = [0.25, 0.5, 1] at positions 0, 2, 3; the gap (pos 1) and padding are 0.
    m = np.array([[1, 0, 1, 1, 0]], dtype=np.int64)
    a, _ = adv("reinforce_rtg", params=dict(gamma=0.5), rewards=np.array([1.0]), response_mask=m)
    assert_close(a, [[0.25, 0.0, 0.5, 1.0, 0.0]])


def test_reinforce_pp_population_whitening():
    # rows: L=1, R=1 → rtg [1]; L=3, R=0 → rtg [0,0,0]. Tokens {1,0,0,0}: μ = 1/4,
    # σ² = (0.75² + 3·0.25²)/4 = 0.1875 = 3/16 → σ = sqrt(3)/4
    # A = 0.75/(sqrt3/4) = sqrt3 ; −0.25/(sqrt3/4) = −1/sqrt3. returns = rtg (before whitening).
    m = mask_from_lengths([1, 3], 3)
    a, r = adv("reinforce_pp", rewards=np.array([1.0, 0.0]), response_mask=m)
    s3 = math.sqrt(3.0)
    assert_close(a, [[s3, 0, 0], [-1 / s3, -1 / s3, -1 / s3]])
    assert_close(r, [[1, 0, 0], [0, 0, 0]])


def test_reinforce_pp_baseline():
    # group a: R = [1, 0] → R − mean = [0.5, −0.5]; group b: R = [1, 1] → [0, 0]; all L = 1
    # tokens {0.5, −0.5, 0, 0}: μ = 0, σ² = 0.5/4 = 1/8 → A = 0.5·sqrt(8) = sqrt(2)
    m = mask_from_lengths([1, 1, 1, 1], 2)
    a, r = adv(
        "reinforce_pp_baseline",
        rewards=np.array([1.0, 1.0, 0.0, 1.0]),
        response_mask=m,
        group_ids=np.array(["a", "b", "a", "b"]),
    )
    s2 = math.sqrt(2.0)
    assert_close(a, expect_rows([s2, 0, -s2, 0], m))
    assert_close(r, a)


def test_remax():
    # ReMax: r − r(x, ŷ_greedy): rewards [1, 0], greedy [0.5, 0.5] → [0.5, −0.5]; returns = rtg = R
    m = mask_from_lengths([2, 3], 3)
    a, r = adv("remax", rewards=np.array([1.0, 0.0]), greedy_rewards=np.array([0.5, 0.5]), response_mask=m)
    assert_close(a, expect_rows([0.5, -0.5], m))
    assert_close(r, expect_rows([1.0, 0.0], m))


def test_remax_with_kl():
    # r − r(ŷ) − β Σ_{t'≥t} kl with r = 1, r(ŷ) = 1, β = 0.1: [−.04, −.02, −.03]; returns [.96,.98,.97]
    a, r = adv(
        "remax",
        params=dict(kl_coef=0.1, kl_estimator="k1"),
        rewards=np.array([1.0]),
        greedy_rewards=np.array([1.0]),
        response_mask=_M3,
        old_logprobs=_OLD,
        ref_logprobs=_REF,
    )
    assert_close(a, [[-0.04, -0.02, -0.03]])
    assert_close(r, [[0.96, 0.98, 0.97]])


# --------------------------------------------------------------------------------------------------
# GAE / ORZ
# --------------------------------------------------------------------------------------------------

_V = np.array([[0.5, 0.25, 0.75]])


def test_gae_by_hand():
    # γ = 0.9, λ = 0.8 (γλ = 0.72), R = 1 on the last token, V = [0.5, 0.25, 0.75], V_3 = 0
    # δ2 = 1 + 0 − 0.75 = 0.25; δ1 = 0.9·0.75 − 0.25 = 0.425; δ0 = 0.9·0.25 − 0.5 = −0.275
    # A2 = 0.25; A1 = 0.425 + 0.72·0.25 = 0.605; A0 = −0.275 + 0.72·0.605 = 0.1606
    # returns = A + V = [0.6606, 0.855, 1.0]
    a, r = adv("gae", params=dict(gamma=0.9, lam=0.8), rewards=np.array([1.0]), values=_V, response_mask=_M3)
    assert_close(a, [[0.1606, 0.605, 0.25]])
    assert_close(r, [[0.6606, 0.855, 1.0]])


def test_gae_interior_gap_carries_values():
    # the same row with an observation token at position 1 (its V = 123 is never read) and padding
    m = np.array([[1, 0, 1, 1, 0]], dtype=bool)
    v = np.array([[0.5, 123.0, 0.25, 0.75, -7.0]])
    a, r = adv("gae", params=dict(gamma=0.9, lam=0.8), rewards=np.array([1.0]), values=v, response_mask=m)
    assert_close(a, [[0.1606, 0.0, 0.605, 0.25, 0.0]])
    assert_close(r, [[0.6606, 0.0, 0.855, 1.0, 0.0]])


def test_gae_with_kl_in_reward():
    # δ_t −= β kl_t with β = 0.1, kl = [0.2, −0.1, 0.3]:
    # δ2 = 0.25 − 0.03 = 0.22; δ1 = 0.425 + 0.01 = 0.435; δ0 = −0.275 − 0.02 = −0.295
    # A2 = 0.22; A1 = 0.435 + 0.72·0.22 = 0.5934; A0 = −0.295 + 0.72·0.5934 = 0.132248
    a, r = adv(
        "gae",
        params=dict(gamma=0.9, lam=0.8, kl_coef=0.1, kl_estimator="k1"),
        rewards=np.array([1.0]),
        values=_V,
        response_mask=_M3,
        old_logprobs=_OLD,
        ref_logprobs=_REF,
    )
    assert_close(a, [[0.132248, 0.5934, 0.22]])
    assert_close(r, [[0.632248, 0.8434, 0.97]])


def test_gae_lambda_limits():
    # λ = 1, γ = 1: A_t = R − V_t = [0.5, 0.75, 0.25]; λ = 0: A_t = δ_t (γ = 0.9) = [−0.275, 0.425, 0.25]
    a, _ = adv("gae", params=dict(gamma=1.0, lam=1.0), rewards=np.array([1.0]), values=_V, response_mask=_M3)
    assert_close(a, [[0.5, 0.75, 0.25]])
    a, _ = adv("gae", params=dict(gamma=0.9, lam=0.0), rewards=np.array([1.0]), values=_V, response_mask=_M3)
    assert_close(a, [[-0.275, 0.425, 0.25]])


def test_gae_paper_default_lambda():
    # paper defaults γ = 1, λ = 0.95: δ2 = 1 − .75 = .25, δ1 = .75 − .25 = .5, δ0 = .25 − .5 = −.25
    # A2 = .25; A1 = .5 + .95·.25 = .7375; A0 = −.25 + .95·.7375 = 0.450625
    a, r = adv("gae", rewards=np.array([1.0]), values=_V, response_mask=_M3)
    assert_close(a, [[0.450625, 0.7375, 0.25]])
    assert_close(r, [[0.950625, 0.9875, 1.0]])


def test_orz():
    # ORZ = PPO with γ = λ = 1, β = 0: A_t = r − V_t = [0.5, 0.75, 0.25]; returns = A + V = R
    a, r = adv("orz", rewards=np.array([1.0]), values=_V, response_mask=_M3)
    assert_close(a, [[0.5, 0.75, 0.25]])
    assert_close(r, [[1.0, 1.0, 1.0]])


def test_token_rewards_input():
    # token_rewards [B, T] instead of rewards: r = [0.5, 0, 0.25] → R = 0.75
    # reinforce_rtg (γ = 1): [0.75, 0.25, 0.25]; reinforce: 0.75 everywhere
    tr = np.array([[0.5, 0.0, 0.25, 9.0]])  # the padded 9 is never read
    m = np.array([[1, 1, 1, 0]], dtype=bool)
    a, _ = adv("reinforce_rtg", token_rewards=tr, response_mask=m)
    assert_close(a, [[0.75, 0.25, 0.25, 0.0]])
    a, _ = adv("reinforce", token_rewards=tr, response_mask=m)
    assert_close(a, [[0.75, 0.75, 0.75, 0.0]])


# --------------------------------------------------------------------------------------------------
# Losses (hand-worked; the autograd comparison lives in test_loss_autograd.py)
# --------------------------------------------------------------------------------------------------


def test_loss_reinforce_seq_mean_token_sum():
    # mode reinforce: ℓ = −Aρ (surrogate (5)), the paper preset's seq-mean-token-sum (eq. (14)).
    # ρ = 1, A = [[1, 1, ·], [−1, ·, ·]] → ℓ = [[−1, −1], [1]]; S = 2 → loss = (−1 − 1 + 1)/2 = −0.5
    # grad = −Aρ/S = [[−0.5, −0.5, 0], [0.5, 0, 0]]
    m = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
    lp = np.full((2, 3), -1.0)
    A = np.array([[1.0, 1.0, 5.0], [-1.0, 5.0, 5.0]])
    res = losses(policy_loss=dict(mode="reinforce"), logprobs=lp, old_logprobs=lp.copy(), advantages=A,
                 response_mask=m)
    assert res.loss == pytest.approx(-0.5, abs=1e-12)
    assert_close(res.grad_logprobs, [[-0.5, -0.5, 0], [0.5, 0, 0]])


def test_loss_ppo_clip_dual_clip_by_hand():
    # clip 0.2/0.2, dual clip c = 3, token-mean over N = 4 tokens:
    #  A = 1,  lp−old = 0.5: ρ = e^.5 = 1.6487 > 1.2 → ℓ = −1.2, grad 0
    #  A = −1, lp−old = 0.5: ℓ = max(1.6487, 1.2) = 1.6487212707001282, grad = −Aρ = +1.6487
    #  A = −1, lp−old = 1.5: ℓ = min(max(4.4817, 1.2), 3) = 3 (dual clip), grad 0
    #  A = 1,  lp−old = −0.1: ρ = 0.9048374180359595 inside → ℓ = −0.9048, grad −0.9048
    # loss = (−1.2 + 1.6487212707001282 + 3 − 0.9048374180359595)/4 = 0.6359709631660422
    m = np.ones((1, 4), dtype=bool)
    old = np.full((1, 4), -2.0)
    lp = old + np.array([[0.5, 0.5, 1.5, -0.1]])
    A = np.array([[1.0, -1.0, -1.0, 1.0]])
    res = losses(
        policy_loss=dict(mode="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=3.0, agg="token-mean"),
        logprobs=lp,
        old_logprobs=old,
        advantages=A,
        response_mask=m,
    )
    assert res.loss == pytest.approx(0.6359709631660422, abs=1e-12)
    assert_close(res.grad_logprobs, [[0.0, 1.6487212707001282 / 4, 0.0, -0.9048374180359595 / 4]])


@pytest.mark.parametrize(
    "agg,extra,want",
    [
        # ℓ = −A (ρ = 1), A = [[1,2,3,·],[4,·,·,·]] → ℓ = [[−1,−2,−3],[−4]], Σ = −10, T = 4
        ("token-mean", {}, -2.5),  # −10/4
        ("token-sum", {}, -10.0),
        ("seq-mean-token-mean", {}, -3.0),  # (−6/3 − 4/1)/2
        ("seq-mean-token-sum", {}, -5.0),  # −10/2
        ("seq-mean-token-sum-norm", {}, -1.25),  # −10/(2·4), C = padded width T = 4
        ("seq-mean-token-sum-norm", dict(loss_scale_factor=5.0), -1.0),  # −10/(2·5)
        ("token-mean", dict(num_tokens=8), -1.25),  # global N = 8
        ("seq-mean-token-sum", dict(num_sequences=4), -2.5),  # global S = 4
        ("seq-mean-token-mean", dict(num_sequences=4), -1.5),  # (−2 − 4)/4
    ],
)
def test_loss_aggregation_modes_by_hand(agg, extra, want):
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=bool)
    lp = np.full((2, 4), -1.0)
    A = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    pl = dict(mode="reinforce", agg=agg)
    kw = {}
    if "loss_scale_factor" in extra:
        pl["loss_scale_factor"] = extra["loss_scale_factor"]
    if "num_tokens" in extra:
        kw["num_tokens"] = extra["num_tokens"]
    if "num_sequences" in extra:
        kw["num_sequences"] = extra["num_sequences"]
    res = losses(policy_loss=pl, logprobs=lp, old_logprobs=lp.copy(), advantages=A, response_mask=m, **kw)
    assert res.loss == pytest.approx(want, abs=1e-12)


def test_loss_seq_mean_token_mean_large_global_denominator_float64():
    # w = m/(S·L_i) must be exact in float64 even when S·L_i > 2^24 (e.g. a global S = 100003 and a
    # row of L = 333: S·L = 33,300,999, not representable in float32). ℓ = −A ρ = −1 per token:
    # grad = −1/(100003·333) = −1/33300999 = −3.002912915615534e-08
    T = 333
    m = np.ones((1, T), dtype=bool)
    lp = np.zeros((1, T))
    res = losses(policy_loss=dict(mode="reinforce", agg="seq-mean-token-mean"), num_sequences=100003,
                 logprobs=lp, old_logprobs=lp.copy(), advantages=np.ones((1, T)), response_mask=m)
    np.testing.assert_allclose(res.grad_logprobs, np.full((1, T), -1.0 / 33300999.0), rtol=1e-12, atol=0)
    assert res.loss == pytest.approx(-T / 33300999.0, rel=1e-12)


def test_loss_value_clip_by_hand():
    # ℓ = ½ max((v − G)², (clip(v, v_old ± 0.2) − G)²), token-sum:
    #  v=1.0, v_old=0.5, G=0: max(1, 0.7²=0.49) → ℓ = 0.5, grad = v − G = 1
    #  v=0.0, v_old=0.5, G=1: max(1, (0.3−1)²=0.49) → ℓ = 0.5, grad = −1
    #  v=0.9, v_old=0.5, G=2: max(1.21, (0.7−2)²=1.69) → ℓ = 0.845, clipped branch → grad 0
    # loss = coef · (0.5 + 0.5 + 0.845) = 0.5 · 1.845 = 0.9225
    m = np.ones((1, 3), dtype=bool)
    res = losses(
        policy_loss=dict(mode="reinforce", agg="token-sum"),
        value_loss=dict(coef=0.5, clip=0.2),
        logprobs=np.zeros((1, 3)),
        old_logprobs=np.zeros((1, 3)),
        advantages=np.zeros((1, 3)),
        values=np.array([[1.0, 0.0, 0.9]]),
        old_values=np.array([[0.5, 0.5, 0.5]]),
        returns=np.array([[0.0, 1.0, 2.0]]),
        response_mask=m,
    )
    assert res.components["value"] == pytest.approx(1.845, abs=1e-12)
    assert res.loss == pytest.approx(0.9225, abs=1e-12)
    assert_close(res.grad_values, [[0.5, -0.5, 0.0]])


def test_loss_kl_k3_and_entropy_by_hand():
    # kl_loss k3(lp, ref) with ref − lp = −ln2: e^{−ln2} + ln2 − 1 = ln2 − 0.5 = 0.1931471805599453
    # ∂k3/∂lp = 1 − e^{ref − lp} = 0.5. coef 0.1, token-sum, one token; policy A = 0 contributes 0.
    # entropy H = 2.0, coef 0.01: loss −= 0.01·2 → total = 0.01931471805599453 − 0.02
    m = np.ones((1, 1), dtype=bool)
    lp = np.array([[-1.0]])
    res = losses(
        policy_loss=dict(mode="reinforce", agg="token-sum"),
        kl_loss=dict(coef=0.1, estimator="k3"),
        entropy_bonus=dict(coef=0.01),
        logprobs=lp,
        old_logprobs=lp.copy(),
        advantages=np.zeros((1, 1)),
        ref_logprobs=lp - LN2,
        entropy=np.array([[2.0]]),
        response_mask=m,
    )
    assert res.components["kl"] == pytest.approx(LN2 - 0.5, abs=1e-12)
    assert res.components["entropy"] == pytest.approx(2.0, abs=1e-12)
    assert res.loss == pytest.approx(0.1 * (LN2 - 0.5) - 0.02, abs=1e-12)
    assert_close(res.grad_logprobs, [[0.05]])
    assert_close(res.grad_entropy, [[-0.01]])


def test_loss_cispo_gspo_by_hand():
    m = np.ones((1, 2), dtype=bool)
    old = np.array([[-1.5, -1.5]])
    # CISPO: ρ = e^{0.5} → clip to 1.2; ℓ = −1.2·A·lp with A = 1, lp = −1.0 → 1.2; ∂ = −1.2
    # token-sum over tokens [lp − old = 0.5, 0.5]
    lp = old + 0.5
    res = losses(
        policy_loss=dict(mode="cispo", clip_low=0.2, clip_high=0.2, agg="token-sum"),
        logprobs=lp,
        old_logprobs=old,
        advantages=np.ones((1, 2)),
        response_mask=m,
    )
    assert res.loss == pytest.approx(2.4, abs=1e-12)
    assert_close(res.grad_logprobs, [[-1.2, -1.2]])
    # GSPO: lp − old = [0.1, 0.3] → s = e^{0.2} = 1.2214027581601699 (inside [0.7, 1.3])
    # ℓ_t = −A s, token-mean over 2 → loss = −1.2214027581601699, ∂ℓ/∂lp_t = −s/2
    lp = old + np.array([[0.1, 0.3]])
    res = losses(
        policy_loss=dict(mode="gspo", clip_low=0.3, clip_high=0.3, agg="token-mean"),
        logprobs=lp,
        old_logprobs=old,
        advantages=np.ones((1, 2)),
        response_mask=m,
    )
    assert res.loss == pytest.approx(-1.2214027581601699, abs=1e-12)
    assert_close(res.grad_logprobs, [[-0.6107013790800849, -0.6107013790800849]])


def test_loss_rollout_correction_by_hand():
    # token-level IS weight w = exp(old − rollout) = 3 (old − rollout = ln 3); ℓ = −Aρ = −1 (ρ = 1)
    # truncate at high 2: w = 2 → loss = −2, grad −2; mask [0.5, 2]: w = 3 outside → 0
    m = np.ones((1, 1), dtype=bool)
    lp = np.array([[-1.0]])
    common = dict(logprobs=lp, old_logprobs=lp.copy(), advantages=np.ones((1, 1)), response_mask=m)
    common["rollout_logprobs"] = lp - math.log(3.0)
    pl = dict(mode="reinforce", agg="token-sum")
    res = losses(policy_loss=pl, rollout_correction=dict(level="token", mode="truncate", high=2.0), **common)
    assert res.loss == pytest.approx(-2.0, abs=1e-12)
    assert_close(res.grad_logprobs, [[-2.0]])
    res = losses(policy_loss=pl, rollout_correction=dict(level="token", mode="mask", low=0.5, high=2.0), **common)
    assert res.loss == pytest.approx(0.0, abs=1e-12)
    assert_close(res.grad_logprobs, [[0.0]])


# --------------------------------------------------------------------------------------------------
# Differential test against tests/reference.py on random batches
# --------------------------------------------------------------------------------------------------


def random_batch(rng, *, str_ids=False, ties=False, gaps=True, singletons=True, token_rewards=False, min_group=1,
                 far_kl=False):
    """Scattered ragged groups, optional singletons, ties (dyadic rewards), length-1 rows, interior
    mask gaps, right padding with garbage in the padded inputs."""
    n_groups = int(rng.integers(1, 5))
    sizes = []
    for _ in range(n_groups):
        lo = max(min_group, 1 if singletons else 2)
        sizes.append(int(rng.integers(lo, 6)))
    if singletons and min_group <= 1 and rng.random() < 0.7:
        sizes.append(1)
    ids = []
    for g, s in enumerate(sizes):
        ids += [g] * s
    ids = np.array(ids)
    rng.shuffle(ids)  # scattered groups
    B = len(ids)
    T = int(rng.integers(1, 9))
    mask = np.zeros((B, T), dtype=bool)
    for i in range(B):
        end = int(rng.integers(1, T + 1)) if rng.random() < 0.8 else 1  # length-1 rows are common
        mask[i, :end] = True
        if gaps and end > 2:
            for t in range(1, end - 1):
                if rng.random() < 0.3:
                    mask[i, t] = False
    if ties:
        rewards = rng.choice([0.0, 0.25, 0.5, 1.0], size=B)
    else:
        rewards = rng.normal(size=B)
    garbage = lambda x: np.where(mask, x, 1e3 * rng.normal(size=(B, T)))  # noqa: E731
    old = -np.abs(rng.normal(1.0, 0.5, size=(B, T)))
    batch = dict(
        response_mask=mask if rng.random() < 0.5 else mask.astype(np.int64),
        group_ids=np.array([f"prompt-{g}" for g in ids]) if str_ids else ids,
        values=garbage(rng.normal(size=(B, T))),
        old_logprobs=garbage(old),
        ref_logprobs=garbage(old + rng.normal(0, 0.3, size=(B, T))),
        greedy_rewards=rng.normal(size=B) if not ties else rng.choice([0.0, 1.0], size=B),
    )
    if far_kl:  # log-ratios where the KL clamps (value ±c, k3 input ±20) bind
        far = rng.choice([-30.0, -25.0, -5.0, 5.0, 25.0, 30.0], size=(B, T))
        batch["ref_logprobs"] = garbage(np.where(rng.random((B, T)) < 0.3, old + far, batch["ref_logprobs"]))
    if token_rewards:
        tr = rng.normal(size=(B, T)) * (rng.random((B, T)) < 0.5)
        batch["token_rewards"] = garbage(tr)
    else:
        batch["rewards"] = rewards
    return batch



KL_ESTS = ("k1", "k2", "k3", "abs")

# (estimator, params, batch options).
CASES = [
    ("reinforce", {}, dict(ties=True)),
    ("reinforce", dict(kl_coef=0.1, kl_estimator="k3"), {}),
    ("reinforce", dict(kl_coef=0.2, kl_estimator="k3", kl_clamp=0.05), {}),
    ("reinforce", {}, dict(token_rewards=True)),
    ("reinforce_rtg", dict(gamma=0.9, kl_coef=0.1, kl_estimator="k1"), {}),
    ("reinforce_rtg", dict(kl_coef=0.3, kl_estimator="k2"), dict(token_rewards=True)),
    ("reinforce_rtg", dict(gamma=0.7, kl_coef=0.3, kl_estimator="abs", kl_clamp=0.2), {}),
    ("reinforce_pp", {}, dict(ties=True)),
    ("reinforce_pp", dict(gamma=0.95, kl_coef=0.05, kl_estimator="k3"), {}),
    ("reinforce_pp", dict(kl_coef=0.05, kl_estimator="k1"), dict(token_rewards=True)),
    ("reinforce_pp_baseline", {}, dict(ties=True, singletons=False)),
    ("reinforce_pp_baseline", dict(kl_coef=0.1, kl_estimator="k1"), dict(singletons=False)),
    ("reinforce_pp_baseline", dict(kl_coef=0.1, kl_estimator="k3", kl_placement="sequence"), dict(singletons=False)),
    # singletons: "zero" keeps the literal group mean (own score), "raw" uses mean 0
    ("reinforce_pp_baseline", dict(kl_coef=0.1, kl_estimator="k1"), dict(ties=True)),
    ("reinforce_pp_baseline", dict(kl_coef=0.1, kl_estimator="k1", singleton_groups="raw"), {}),
    ("reinforce_pp_baseline", dict(kl_coef=0.1, kl_estimator="k2", kl_placement="sequence"), dict(ties=True)),
    ("rloo", {}, dict(ties=True, singletons=False, str_ids=True)),
    ("rloo", dict(kl_coef=0.1, kl_estimator="k2"), dict(singletons=False)),
    ("remax", {}, dict(ties=True)),
    ("remax", dict(kl_coef=0.1, kl_estimator="k3"), {}),
    ("gae", {}, {}),
    ("gae", dict(gamma=0.9, lam=0.7, kl_coef=0.1, kl_estimator="k1"), {}),
    ("gae", dict(gamma=0.99, lam=0.5), dict(token_rewards=True)),
    ("orz", {}, {}),
    ("orz", {}, dict(token_rewards=True)),
    ("grpo", {}, dict(ties=True, str_ids=True)),
    ("grpo", {}, {}),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k3"), dict(singletons=False)),
    ("grpo", dict(kl_coef=0.1, kl_estimator="abs"), dict(singletons=False)),
    # token KL term on flat / singleton groups: the normalised part is 0, the KL term stays
    ("grpo", dict(kl_coef=0.1, kl_estimator="k3"), dict(ties=True)),
    ("grpo_original", dict(kl_coef=0.1, kl_estimator="k1"), dict(ties=True)),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k1", kl_placement="sequence"), {}),
    # eps = 2^-10 so that 1 + eps is exact in float32 too (see test_singleton_raw_divisor_float64)
    ("grpo", dict(std_ddof=1, std_eps=2.0**-10, singleton_groups="raw"), dict(ties=True)),
    ("dapo", dict(std_eps=2.0**-10, singleton_groups="raw"), {}),
    ("dr_grpo", dict(singleton_groups="raw"), {}),
    ("grpo_original", {}, dict(ties=True)),
    ("grpo_original", dict(kl_coef=0.2, kl_estimator="k2"), dict(singletons=False)),
    ("grpo_original", dict(kl_coef=0.2, kl_estimator="k3", kl_placement="sequence"), {}),
    ("dapo", {}, dict(ties=True, str_ids=True)),
    ("dapo", {}, {}),
    ("dr_grpo", {}, dict(ties=True)),
    ("dr_grpo", {}, dict(str_ids=True)),
    # KL clamps binding (value clamp ±c; k3 log-ratio clamp ±20); GRPO's token term is then the
    # derivative of the clamped estimator (0 where the clamp binds)
    ("reinforce", dict(kl_coef=0.01, kl_estimator="k3", kl_clamp=10.0), dict(far_kl=True)),
    ("reinforce_rtg", dict(kl_coef=0.01, kl_estimator="k1", kl_clamp=3.0), dict(far_kl=True)),
    ("reinforce_pp", dict(kl_coef=0.01, kl_estimator="k2", kl_clamp=5.0), dict(far_kl=True)),
    ("reinforce_pp_baseline", dict(kl_coef=0.01, kl_estimator="k3", kl_clamp=10.0), dict(far_kl=True)),
    ("rloo", dict(kl_coef=0.01, kl_estimator="abs", kl_clamp=4.0), dict(far_kl=True, singletons=False)),
    ("remax", dict(kl_coef=0.01, kl_estimator="k3", kl_clamp=10.0), dict(far_kl=True)),
    ("gae", dict(gamma=0.9, lam=0.8, kl_coef=0.01, kl_estimator="k3", kl_clamp=10.0), dict(far_kl=True)),
    ("grpo", dict(kl_coef=0.01, kl_estimator="k3", kl_clamp=10.0), dict(far_kl=True)),
    ("grpo", dict(kl_coef=0.01, kl_estimator="k2", kl_clamp=3.0), dict(far_kl=True, ties=True)),
    ("grpo", dict(kl_coef=0.01, kl_estimator="k3", kl_clamp=10.0, kl_placement="sequence"), dict(far_kl=True)),
    ("grpo_original", dict(kl_coef=0.01, kl_estimator="abs", kl_clamp=0.5), dict(far_kl=True)),
]

SEEDS = range(12)


def _call_both(estimator, params, batch):
    tensors = {k: batch[k] for k in ("response_mask",) + ref_impl.NEEDS[estimator]}
    tensors.update({k: batch[k] for k in ("rewards", "token_rewards") if k in batch})
    if params.get("kl_coef"):
        tensors["old_logprobs"] = batch["old_logprobs"]
        tensors["ref_logprobs"] = batch["ref_logprobs"]
    want_a, want_r = ref_impl.compute_advantages(estimator, **tensors, **params)
    got_a, got_r = adv(estimator, params=dict(params) or None, **tensors)
    return (got_a, got_r), (want_a, want_r), np.asarray(batch["response_mask"]) != 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "estimator,params,opts", CASES, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(CASES)]
)
def test_differential_against_reference(estimator, params, opts, seed):
    rng = np.random.default_rng(1000 * seed + 17)
    batch = random_batch(rng, **opts)
    (ga, gr), (wa, wr), mask = _call_both(estimator, params, batch)
    assert ga.shape == mask.shape and gr.shape == mask.shape
    assert ga.dtype == np.float64
    np.testing.assert_allclose(ga, wa, **TOL, err_msg="advantages")
    np.testing.assert_allclose(gr, wr, **TOL, err_msg="returns")
    assert np.all(ga[~mask] == 0.0) and np.all(gr[~mask] == 0.0)


def test_reference_self_check_identities():
    """Guards the reference itself (independent of the engine): RLOO = M/(M−1)·Dr.GRPO."""
    rng = np.random.default_rng(5)
    b = random_batch(rng, singletons=False)
    a_rloo, _ = ref_impl.compute_advantages("rloo", response_mask=b["response_mask"], rewards=b["rewards"], group_ids=b["group_ids"])
    a_dr, _ = ref_impl.compute_advantages("dr_grpo", response_mask=b["response_mask"], rewards=b["rewards"], group_ids=b["group_ids"])
    sizes = ref_impl.groups_of(b["group_ids"])
    for _, rows in sizes.items():
        M = len(rows)
        for i in rows:
            np.testing.assert_allclose(a_rloo[i], M / (M - 1) * a_dr[i], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# API contract of the paper preset: resolved defaults, errors, dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator,extra,want",
    [
        ("grpo", dict(group_ids=np.array([0, 0])), dict(std_ddof=0, std_eps=0.0, singleton_groups="zero", kl_placement="token")),
        ("grpo_original", dict(group_ids=np.array([0, 0])), dict(std_ddof=0, std_eps=0.0, kl_placement="token")),
        ("dapo", dict(group_ids=np.array([0, 0])), dict(std_ddof=0, std_eps=0.0, singleton_groups="zero")),
        ("rloo", dict(group_ids=np.array([0, 0])), dict(singleton_groups="error")),
        ("gae", dict(values=np.zeros((2, 2))), dict(gamma=1.0, lam=0.95)),
        ("reinforce_pp", {}, dict(whiten=True, whiten_ddof=0, whiten_eps=0.0)),
        ("reinforce_pp_baseline", dict(group_ids=np.array([0, 0])), dict(whiten=True, whiten_ddof=0, whiten_eps=0.0,
                                                                       kl_placement="reward_to_go")),
    ],
)
def test_paper_resolved_defaults(estimator, extra, want):
    res = advserve.compute_advantages(
        estimator, rewards=np.array([1.0, 0.0]), response_mask=np.ones((2, 2), dtype=bool), **extra
    )
    for k, v in want.items():
        assert res.params[k] == v, k


@pytest.mark.parametrize(
    "estimator,params,field_part",
    [
        ("grpo", dict(bogus=1.0), "bogus"),
        ("grpo", dict(gamma=0.9), "gamma"),  # inapplicable: no reward-to-go in GRPO
        ("reinforce", dict(lam=0.9), "lam"),
        ("dr_grpo", dict(whiten=True), "whiten"),
        ("grpo", dict(kl_estimator="k9"), "kl_estimator"),
        ("grpo", dict(singleton_groups="maybe"), "singleton_groups"),
    ],
)
def test_unknown_or_inapplicable_params(estimator, params, field_part):
    tensors = dict(rewards=np.array([1.0, 0.0]), response_mask=np.ones((2, 2), dtype=bool))
    if estimator != "reinforce":
        tensors["group_ids"] = np.array([0, 0])
    with pytest.raises(advserve.InvalidArgument) as ei:
        advserve.compute_advantages(estimator, params=params, **tensors)
    assert isinstance(ei.value, advserve.AdvserveError)
    assert ei.value.field is not None and field_part in ei.value.field


def test_dtypes_and_torch_in_torch_out():
    import torch

    m = np.ones((2, 2), dtype=bool)
    res = advserve.compute_advantages("grpo", rewards=np.array([1.0, 0.0]), response_mask=m, group_ids=np.array([0, 0]))
    assert isinstance(res.advantages, np.ndarray) and res.advantages.dtype == np.float32  # default float32
    assert_close(res.advantages, [[1, 1], [-1, -1]])
    res = advserve.compute_advantages(
        "grpo", rewards=torch.tensor([1.0, 0.0]), response_mask=torch.tensor(m), group_ids=torch.tensor([0, 0]),
        dtype="float64",
    )
    assert isinstance(res.advantages, torch.Tensor) and res.advantages.dtype == torch.float64
    assert_close(res.advantages.numpy(), [[1, 1], [-1, -1]])


# --------------------------------------------------------------------------------------------------
# Long rows: recursions across many tokens (crossing any chunking an implementation may use)
# --------------------------------------------------------------------------------------------------

LONG_CASES = [
    ("reinforce_rtg", dict(gamma=0.97, kl_coef=0.05, kl_estimator="k1")),
    ("reinforce_pp", dict(gamma=0.99, kl_coef=0.05, kl_estimator="k3")),
    ("reinforce_pp_baseline", dict(kl_coef=0.05, kl_estimator="k2")),
    ("remax", dict(kl_coef=0.05, kl_estimator="k1")),
    ("gae", dict(gamma=0.995, lam=0.9, kl_coef=0.05, kl_estimator="k1")),
    ("gae", {}),
    ("orz", {}),
    ("reinforce", dict(kl_coef=0.05, kl_estimator="abs")),
]


@pytest.mark.parametrize("T", (31, 32, 33, 64, 97, 1030, 1100))
@pytest.mark.parametrize("estimator,params", LONG_CASES, ids=[f"{e}-{i}" for i, (e, _) in enumerate(LONG_CASES)])
def test_differential_long_rows(estimator, params, T):
    rng = np.random.default_rng(T)
    B = 4
    mask = np.zeros((B, T), dtype=bool)
    ends = [T, T - 1, max(1, T // 2), int(rng.integers(1, T + 1))]
    for i, e in enumerate(ends):
        mask[i, :e] = True
        if i % 2 == 1:  # interior observation gaps in every other row
            gap = rng.random(e) < 0.2
            gap[e - 1] = False
            mask[i, :e] &= ~gap
    old = -np.abs(rng.normal(1.0, 0.5, size=(B, T)))
    tensors = dict(response_mask=mask)
    if rng.random() < 0.5 or estimator in ("reinforce", "remax", "reinforce_pp_baseline"):
        tensors["rewards"] = rng.normal(size=B)
    else:
        tensors["token_rewards"] = rng.normal(size=(B, T)) * (rng.random((B, T)) < 0.1)
    if estimator in ("gae", "orz"):
        tensors["values"] = rng.normal(size=(B, T))
    if estimator == "remax":
        tensors["greedy_rewards"] = rng.normal(size=B)
    if estimator == "reinforce_pp_baseline":
        tensors["group_ids"] = np.array([0, 1, 0, 1])
    if params.get("kl_coef"):
        tensors["old_logprobs"] = old
        tensors["ref_logprobs"] = old + rng.normal(0, 0.3, size=(B, T))
    want_a, want_r = ref_impl.compute_advantages(estimator, **tensors, **params)
    got_a, got_r = adv(estimator, params=dict(params) or None, **tensors)
    np.testing.assert_allclose(got_a, want_a, rtol=1e-10, atol=1e-9, err_msg="advantages")
    np.testing.assert_allclose(got_r, want_r, rtol=1e-10, atol=1e-9, err_msg="returns")
    # float32 stays within 1e-5 (relative to the scale of the row values) over long recursions
    res = advserve.compute_advantages(estimator, preset="paper", params=dict(params) or None, dtype="float32", **tensors)
    scale = max(1.0, float(np.abs(want_a).max()))
    np.testing.assert_allclose(np.asarray(res.advantages, np.float64), want_a, rtol=1e-5, atol=1e-5 * scale)
