"""The estimator behaviours the openrlhf and trl presets brought (docs/semantics.md, "Library parameters"):
reward clip after the baseline, interior mask zeros as steps, KL as reward-to-go for grpo/dr_grpo/rloo,
the batch std of GRPO, whitening by max(var, ε) or std + ε, mean-only whitening, whitening over
sequences, unwhitened returns, and the flash_reinforce estimator.

Three kinds of checks: the engine against the naive float64 loops of tests/reference.py on random
batches (every preset, the parameters resolved by the engine passed to the loop), hand-derived values,
and hypothesis identities. The libraries' own numbers are in test_openrlhf_golden.py / test_trl_golden.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advserve
import reference as ref_impl
from advserve.engine import Engine
from advserve.model import AdvantageRequest

TOL = dict(rtol=1e-10, atol=1e-10)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def adv(estimator, preset="paper", params=None, dtype="float64", **tensors):
    res = advserve.compute_advantages(estimator, preset=preset, params=params, dtype=dtype, **tensors)
    return np.asarray(res.advantages, np.float64), np.asarray(res.returns, np.float64), res.params


# --------------------------------------------------------------------------------------------------
# differential: engine against the reference loops
# --------------------------------------------------------------------------------------------------


def random_batch(rng, *, singletons=False, gaps=True, token_rewards=False, scale=1.0, far_kl=False):
    """Scattered groups of 2-5 (plus singletons), ragged lengths with length-1 rows, interior mask gaps,
    garbage at masked positions."""
    sizes = [int(rng.integers(2, 6)) for _ in range(int(rng.integers(1, 4)))] + ([1] if singletons else [])
    ids = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(ids)
    B, T = len(ids), int(rng.integers(1, 9))
    mask = np.zeros((B, T), dtype=bool)
    for i in range(B):
        end = int(rng.integers(1, T + 1)) if rng.random() < 0.8 else 1
        mask[i, :end] = True
        if gaps and end > 2:
            mask[i, 1:end - 1] &= rng.random(end - 2) >= 0.3
    garbage = lambda x: np.where(mask, x, 1e3 * rng.normal(size=(B, T)))  # noqa: E731
    old = -np.abs(rng.normal(1.0, 0.5, size=(B, T)))
    ref = old + rng.normal(0, 0.3, size=(B, T))
    if far_kl:  # log-ratios where the ±10 clamp binds
        ref = np.where(rng.random((B, T)) < 0.3, old + rng.choice([-30.0, -12.0, 12.0, 30.0], size=(B, T)), ref)
    batch = dict(response_mask=mask, group_ids=ids, values=garbage(rng.normal(size=(B, T))),
                 old_logprobs=garbage(old), ref_logprobs=garbage(ref))
    if token_rewards:
        batch["token_rewards"] = garbage(scale * rng.normal(size=(B, T)) * (rng.random((B, T)) < 0.5))
    else:
        batch["rewards"] = scale * rng.normal(size=B)
    return batch


NEEDS = {"gae": ("values",), "orz": ("values",)}
UNGROUPED = ("reinforce", "reinforce_rtg", "reinforce_pp", "remax", "gae", "orz", "flash_reinforce")

# (preset, estimator, params, batch options)
CASES = [
    # openrlhf at its defaults (KL in the reward, ±10 clamps, reward clip) and with what its options change
    *[("openrlhf", e, {}, {}) for e in ("gae", "reinforce_pp", "reinforce_pp_baseline", "rloo", "grpo", "dr_grpo",
                                        "flash_reinforce")],
    *[("openrlhf", e, {}, dict(far_kl=True, scale=8.0)) for e in ("reinforce_pp", "rloo", "grpo", "flash_reinforce")],
    ("openrlhf", "gae", dict(gamma=0.9, lam=0.8, kl_estimator="k3"), {}),
    ("openrlhf", "gae", dict(gamma=0.95, lam=0.9, whiten_std=False), dict(token_rewards=True)),
    ("openrlhf", "reinforce_pp", dict(gamma=0.7, kl_estimator="k2", reward_clip_low=-0.3, reward_clip_high=0.5), {}),
    ("openrlhf", "reinforce_pp", dict(gamma=0.8, reward_clip_low=-0.2, reward_clip_high=0.2), dict(token_rewards=True)),
    ("openrlhf", "reinforce_pp_baseline", dict(reward_clip_low=-0.4, reward_clip_high=0.3, kl_estimator="k3"), {}),
    ("openrlhf", "reinforce_pp_baseline", dict(reward_clip_low=-0.4, reward_clip_high=None), dict(token_rewards=True)),
    ("openrlhf", "reinforce_pp_baseline", dict(whiten_std=False, kl_placement="sequence", reward_clip_low=-0.2), {}),
    ("openrlhf", "rloo", dict(reward_clip_low=-0.5, reward_clip_high=0.5, whiten=True), {}),
    ("openrlhf", "grpo", dict(reward_clip_low=-0.5, reward_clip_high=0.7, kl_estimator="k3"), {}),
    ("openrlhf", "grpo", dict(kl_placement="token", kl_estimator="k3", reward_clip_high=0.5), {}),
    ("openrlhf", "dr_grpo", dict(reward_clip_low=-0.3, kl_placement="sequence"), dict(token_rewards=True)),
    ("openrlhf", "flash_reinforce", dict(reward_clip_low=-0.5, reward_clip_high=0.5), dict(token_rewards=True)),
    # trl at its defaults and with its options
    ("trl", "grpo", {}, dict(singletons=True)),
    ("trl", "grpo", dict(std_scope="batch"), dict(singletons=True)),
    ("trl", "dr_grpo", {}, dict(singletons=True)),
    ("trl", "rloo", {}, dict(singletons=True)),
    ("trl", "rloo", dict(whiten=True), dict(singletons=True)),
    ("trl", "rloo", dict(whiten=True, whiten_scope="token", kl_coef=0.0), {}),
    # the new parameters in the other presets
    ("paper", "reinforce_rtg", dict(gamma=0.9, mask_gaps="step", kl_coef=0.1), {}),
    ("paper", "gae", dict(gamma=0.9, lam=0.7, mask_gaps="step", reward_clip_low=-0.2), dict(token_rewards=True)),
    ("paper", "reinforce_pp", dict(whiten_eps_mode="outside", whiten_eps=1e-3, whiten_ddof=1), {}),
    ("paper", "reinforce_pp", dict(whiten_eps_mode="floor", whiten_eps=0.5), {}),
    ("paper", "reinforce_pp_baseline", dict(returns_whitened=False, kl_coef=0.1), dict(singletons=True)),
    ("paper", "grpo", dict(std_scope="batch", std_ddof=1, reward_clip_high=0.8), dict(singletons=True)),
    ("paper", "grpo_original", dict(std_scope="batch", kl_coef=0.1, kl_estimator="k3"), dict(singletons=True)),
    ("paper", "dapo", dict(std_scope="batch", std_eps=0.01), dict(singletons=True)),
    ("paper", "dr_grpo", dict(kl_placement="reward_to_go", kl_coef=0.1, kl_estimator="k2"), dict(singletons=True)),
    ("verl", "rloo", dict(kl_placement="reward_to_go", kl_coef=0.1, whiten=True), dict(singletons=True)),
    # (no singletons: verl's raw divisor 1 + 1e-6 is rounded to float32, see test_paper_golden)
    ("verl", "grpo", dict(kl_placement="reward_to_go", kl_coef=0.1, kl_estimator="k3"), {}),
]
SEEDS = range(8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset,estimator,params,opts", CASES,
                         ids=[f"{p}-{e}-{i}" for i, (p, e, _, _) in enumerate(CASES)])
def test_engine_equals_reference(preset, estimator, params, opts, seed):
    batch = random_batch(np.random.default_rng(100 * seed + 7), **opts)
    tensors = {k: batch[k] for k in ("response_mask", "rewards", "token_rewards", *NEEDS.get(estimator, ()))
               if k in batch}
    if estimator not in UNGROUPED:
        tensors["group_ids"] = batch["group_ids"]
    kl_coef = params.get("kl_coef", advserve.presets.PRESETS[preset].estimators[estimator].get("kl_coef", 0.0))
    if kl_coef:
        tensors.update(old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"])
    got_a, got_r, resolved = adv(estimator, preset, params, **tensors)
    want_a, want_r = ref_impl.compute_advantages(estimator, **tensors, **resolved)
    np.testing.assert_allclose(got_a, want_a, **TOL, err_msg="advantages")
    np.testing.assert_allclose(got_r, want_r, **TOL, err_msg="returns")
    mask = batch["response_mask"]
    assert np.all(got_a[~mask] == 0.0) and np.all(got_r[~mask] == 0.0)


# --------------------------------------------------------------------------------------------------
# by hand
# --------------------------------------------------------------------------------------------------


def test_mask_gaps_step_by_hand():
    # one row, tokens 0 and 2 valid, a gap at 1, reward 1 on token 2, γ = 0.5:
    # skip: G_0 = γ·1 = 0.5; step: the gap is a step, G_0 = γ²·1 = 0.25
    mask = np.array([[1, 0, 1]], dtype=bool)
    r = np.array([1.0])
    skip, _, _ = adv("reinforce_rtg", params=dict(gamma=0.5), rewards=r, response_mask=mask)
    step, _, _ = adv("reinforce_rtg", params=dict(gamma=0.5, mask_gaps="step"), rewards=r, response_mask=mask)
    np.testing.assert_allclose(skip, [[0.5, 0.0, 1.0]], **TOL)
    np.testing.assert_allclose(step, [[0.25, 0.0, 1.0]], **TOL)
    # GAE, γ = 0.5, λ = 1, V = (2, ·, 4): skip δ_0 = 0.5·4 − 2 = 0, δ_2 = 1 − 4 = −3, A_0 = 0 + 0.5·(−3) = −1.5.
    # step: V at the gap is 0, δ_0 = 0.5·0 − 2 = −2, δ_1 = 0.5·4 − 0 = 2, δ_2 = −3;
    # A_1 = 2 + 0.5·(−3) = 0.5, A_0 = −2 + 0.5·0.5 = −1.75
    values = np.array([[2.0, 99.0, 4.0]])
    skip, _, _ = adv("gae", params=dict(gamma=0.5, lam=1.0), rewards=r, response_mask=mask, values=values)
    step, ret, _ = adv("gae", params=dict(gamma=0.5, lam=1.0, mask_gaps="step"), rewards=r, response_mask=mask,
                       values=values)
    np.testing.assert_allclose(skip, [[-1.5, 0.0, -3.0]], **TOL)
    np.testing.assert_allclose(step, [[-1.75, 0.0, -3.0]], **TOL)
    np.testing.assert_allclose(ret, [[0.25, 0.0, 1.0]], **TOL)


def test_reward_clip_acts_after_the_baseline_and_before_the_kl():
    # group (4, 0): GRPO (population std 2) gives ±1; clip to [−0.5, 0.25]; KL k1 β = 1 as reward-to-go:
    # row 0 (2 tokens, kl 0.1 and 0.2): 0.25 − 0.3, 0.25 − 0.2; row 1 (1 token, kl 0.4): −0.5 − 0.4
    mask = np.array([[1, 1], [1, 0]], dtype=bool)
    old = np.array([[0.1, 0.2], [0.4, 0.0]]) - 1.0
    a, _, _ = adv("grpo", params=dict(reward_clip_low=-0.5, reward_clip_high=0.25, kl_coef=1.0, kl_estimator="k1",
                                      kl_placement="reward_to_go"),
                  rewards=np.array([4.0, 0.0]), response_mask=mask, group_ids=np.array([0, 0]),
                  old_logprobs=old, ref_logprobs=np.full((2, 2), -1.0))
    np.testing.assert_allclose(a, [[0.25 - 0.3, 0.25 - 0.2], [-0.5 - 0.4, 0.0]], **TOL)
    # token_rewards: every valid token's reward is clipped (gae with V = 0, γ = λ = 1: A_t = Σ_{t'≥t} clip(r_t'))
    a, _, _ = adv("gae", params=dict(lam=1.0, reward_clip_low=-1.0, reward_clip_high=1.0),
                  token_rewards=np.array([[3.0, -0.5, -7.0]]), response_mask=np.ones((1, 3), bool),
                  values=np.zeros((1, 3)))
    np.testing.assert_allclose(a, [[-0.5, -1.5, -1.0]], **TOL)


def test_std_scope_batch_by_hand():
    # groups {1, 3} and {0, 0, 6}: group means 2 and 2; the batch (1, 3, 0, 0, 6) has mean 2 and squared
    # deviations 1 + 1 + 4 + 4 + 16 = 26, so its std (ddof 1) is sqrt(26/4); the group stds would be
    # sqrt(2) and sqrt(12)
    r = np.array([1.0, 3.0, 0.0, 0.0, 6.0])
    a, _, _ = adv("grpo", params=dict(std_scope="batch", std_ddof=1), rewards=r, response_mask=np.ones((5, 1), bool),
                  group_ids=np.array([0, 0, 1, 1, 1]))
    np.testing.assert_allclose(a[:, 0], (r - 2.0) / math.sqrt(6.5), **TOL)


def test_whitening_eps_modes_and_mean_only_by_hand():
    # reward-to-go values (one token each) 1, 2, 3, 6: mean 3, population var 3.5
    r, m = np.array([1.0, 2.0, 3.0, 6.0]), np.ones((4, 1), bool)
    centered = r - 3.0
    for params, scale in [(dict(whiten_eps=0.5), math.sqrt(4.0)),
                          (dict(whiten_eps=0.5, whiten_eps_mode="floor"), math.sqrt(3.5)),
                          (dict(whiten_eps=5.0, whiten_eps_mode="floor"), math.sqrt(5.0)),
                          (dict(whiten_eps=0.5, whiten_eps_mode="outside"), math.sqrt(3.5) + 0.5),
                          (dict(whiten_std=False), 1.0)]:
        a, ret, _ = adv("reinforce_pp", params=params, rewards=r, response_mask=m)
        np.testing.assert_allclose(a[:, 0], centered / scale, **TOL, err_msg=str(params))
        np.testing.assert_allclose(ret[:, 0], r, **TOL)


def test_rloo_sequence_whitening_by_hand():
    # RLOO of the pairs (1, 3) and (0, 4): −2, 2, −4, 4; over the 4 sequences (not tokens: the rows have
    # 1 to 4 tokens): mean 0, std (ddof 1) sqrt(40/3), + ε outside
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    a, _, _ = adv("rloo", preset="trl", params=dict(kl_coef=0.0, whiten=True), rewards=np.array([1.0, 3.0, 0.0, 4.0]),
                  response_mask=mask, group_ids=np.array([0, 0, 1, 1]))
    want = np.array([-2.0, 2.0, -4.0, 4.0]) / (math.sqrt(40.0 / 3.0) + 1e-4)
    np.testing.assert_allclose(a, want[:, None] * mask, **TOL)


def test_returns_whitened_false_by_hand():
    # REINFORCE++-baseline, groups (1, 3): outcome advantages −1, 1 on one token each; whitened ±1
    r, m, g = np.array([1.0, 3.0]), np.ones((2, 1), bool), np.array([0, 0])
    a, ret, _ = adv("reinforce_pp_baseline", params=dict(returns_whitened=False), rewards=r, response_mask=m,
                    group_ids=g)
    np.testing.assert_allclose(a[:, 0], [-1.0, 1.0], **TOL)
    a2, ret2, _ = adv("reinforce_pp_baseline", params=dict(whiten_eps=3.0), rewards=r, response_mask=m, group_ids=g)
    np.testing.assert_allclose(ret2[:, 0], [-0.5, 0.5], **TOL)  # returns = A (paper): (∓1)/sqrt(1 + 3)
    a3, ret3, _ = adv("reinforce_pp_baseline", params=dict(whiten_eps=3.0, returns_whitened=False), rewards=r,
                      response_mask=m, group_ids=g)
    np.testing.assert_allclose(ret3[:, 0], [-1.0, 1.0], **TOL)


def test_flash_reinforce_by_hand():
    # batch mean of (1, 2, 6) is 3: A = −2, −1, 3 (no groups, no whitening); β k1 = 0.5·(old − ref) as
    # reward-to-go on row 0's two tokens (0.2, 0.4): −2 − 0.5·0.6, −2 − 0.5·0.4
    mask = np.array([[1, 1], [1, 0], [1, 0]], dtype=bool)
    old = np.array([[-1.0, -1.0], [-1.0, 0.0], [-1.0, 0.0]])
    ref = np.array([[-1.2, -1.4], [-1.0, 0.0], [-1.0, 0.0]])
    a, ret, _ = adv("flash_reinforce", preset="openrlhf", params=dict(kl_coef=0.5), rewards=np.array([1.0, 2.0, 6.0]),
                    response_mask=mask, old_logprobs=old, ref_logprobs=ref)
    np.testing.assert_allclose(a, [[-2.3, -2.2], [-1.0, 0.0], [3.0, 0.0]], **TOL)
    np.testing.assert_allclose(ret, a, **TOL)
    a, _, _ = adv("flash_reinforce", preset="openrlhf", params=dict(kl_coef=0.0),
                  rewards=np.array([0.1, 0.1, 0.1]), response_mask=mask)
    assert np.all(a == 0.0)  # an all-equal batch is exactly 0 (0.1's mean is inexact)


# --------------------------------------------------------------------------------------------------
# identities (hypothesis)
# --------------------------------------------------------------------------------------------------


@st.composite
def batches(draw, gaps=True):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    b = random_batch(rng, gaps=gaps, singletons=draw(st.booleans()))
    b["rewards"] = np.array(draw(st.lists(st.integers(-16, 16), min_size=len(b["rewards"]),
                                          max_size=len(b["rewards"]))), dtype=float) / 8.0
    return b


def pick(b, *names):
    return {k: b[k] for k in names}


@SETTINGS
@given(b=batches(), estimator=st.sampled_from(["reinforce_pp", "reinforce_rtg", "gae"]))
def test_gap_semantics_agree_when_nothing_decays(b, estimator):
    """With γ = 1 (and λ = 1) a gap adds 0 and decays nothing: "step" equals "skip"."""
    names = ("response_mask", "rewards", "old_logprobs", "ref_logprobs") + (("values",) if estimator == "gae" else ())
    params = dict(gamma=1.0, kl_coef=0.1, **({"lam": 1.0} if estimator == "gae" else {}))
    skip = adv(estimator, params=dict(params, mask_gaps="skip"), **pick(b, *names))
    step = adv(estimator, params=dict(params, mask_gaps="step"), **pick(b, *names))
    np.testing.assert_allclose(step[0], skip[0], **TOL)
    np.testing.assert_allclose(step[1], skip[1], **TOL)


@SETTINGS
@given(b=batches(gaps=False), gamma=st.sampled_from([0.5, 0.9]), lam=st.sampled_from([0.0, 0.7]))
def test_gap_semantics_agree_without_interior_gaps(b, gamma, lam):
    names = ("response_mask", "rewards", "values")
    skip = adv("gae", params=dict(gamma=gamma, lam=lam), **pick(b, *names))
    step = adv("gae", params=dict(gamma=gamma, lam=lam, mask_gaps="step"), **pick(b, *names))
    np.testing.assert_allclose(step[0], skip[0], **TOL)
    np.testing.assert_allclose(step[1], skip[1], **TOL)


@SETTINGS
@given(b=batches(), c=st.sampled_from([0.125, 0.5, 1.0]), estimator=st.sampled_from(["grpo", "dr_grpo", "rloo"]))
def test_reward_clip_bounds_the_outcome_advantage(b, c, estimator):
    names = ("response_mask", "rewards", "group_ids")
    params = dict(kl_coef=0.0, singleton_groups="zero")
    free, _, _ = adv(estimator, "openrlhf", dict(params, reward_clip_low=None, reward_clip_high=None), **pick(b, *names))
    clipped, _, _ = adv(estimator, "openrlhf", dict(params, reward_clip_low=-c, reward_clip_high=c), **pick(b, *names))
    np.testing.assert_allclose(clipped, np.clip(free, -c, c), **TOL)


@SETTINGS
@given(b=batches(), beta=st.sampled_from([0.05, 0.5]), estimator=st.sampled_from(["grpo", "dr_grpo", "rloo"]))
def test_kl_reward_to_go_steps_by_the_token_kl(b, beta, estimator):
    """kl_placement "reward_to_go": consecutive valid tokens differ by β·kl_t, the last one is the outcome
    advantage − β·kl_last."""
    t = pick(b, "response_mask", "rewards", "group_ids", "old_logprobs", "ref_logprobs")
    params = dict(kl_coef=beta, kl_estimator="k1", kl_clamp=None, singleton_groups="zero")
    a, _, _ = adv(estimator, "openrlhf", dict(params, kl_placement="reward_to_go"), **t)
    base, _, _ = adv(estimator, "openrlhf", dict(params, kl_coef=0.0), **pick(b, "response_mask", "rewards", "group_ids"))
    kl = beta * (b["old_logprobs"] - b["ref_logprobs"])
    for i, row in enumerate(b["response_mask"]):
        vp = np.flatnonzero(row)
        for t0, t1 in zip(vp[:-1], vp[1:]):
            np.testing.assert_allclose(a[i, t0] - a[i, t1], -kl[i, t0], rtol=1e-9, atol=1e-9)
        if len(vp):
            np.testing.assert_allclose(a[i, vp[-1]], base[i, vp[-1]] - kl[i, vp[-1]], rtol=1e-9, atol=1e-9)


@SETTINGS
@given(b=batches())
def test_batch_std_of_one_group_is_the_group_std(b):
    t = pick(b, "response_mask", "rewards")
    t["group_ids"] = np.zeros(len(b["rewards"]), dtype=int)
    for ddof in (0, 1):
        group, _, _ = adv("grpo", params=dict(std_ddof=ddof), **t)
        batch, _, _ = adv("grpo", params=dict(std_ddof=ddof, std_scope="batch"), **t)
        np.testing.assert_allclose(batch, group, **TOL)


@SETTINGS
@given(b=batches())
def test_flash_reinforce_is_dr_grpo_of_one_group(b):
    t = pick(b, "response_mask", "rewards")
    flash, _, _ = adv("flash_reinforce", "openrlhf", dict(kl_coef=0.0, reward_clip_low=None, reward_clip_high=None), **t)
    one, _, _ = adv("dr_grpo", params=dict(singleton_groups="zero"), group_ids=np.zeros(len(b["rewards"]), int), **t)
    np.testing.assert_allclose(flash, one, **TOL)


@SETTINGS
@given(b=batches(), ddof=st.sampled_from([0, 1]))
def test_sequence_whitening_standardizes_the_rows(b, ddof):
    """whiten_scope "sequence": the B row values (every row has its first token valid here) get mean 0 and
    std 1, whatever the rows' lengths."""
    t = pick(b, "response_mask", "rewards", "group_ids")
    raw, _, _ = adv("rloo", "trl", dict(kl_coef=0.0), **t)
    a, _, _ = adv("rloo", "trl", dict(kl_coef=0.0, whiten=True, whiten_ddof=ddof, whiten_eps=0.0), **t)
    rows = raw[:, 0]
    if len(rows) <= ddof or np.all(rows == rows[0]):  # no spread (one row, or all equal): 0, as TRL gives
        assert np.all(a == 0.0)
        return
    np.testing.assert_allclose(a[:, 0], (rows - rows.mean()) / rows.std(ddof=ddof), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a, a[:, :1] * b["response_mask"], **TOL)


@SETTINGS
@given(b=batches(), eps=st.sampled_from([1e-8, 1e-2]))
def test_floor_is_inside_without_eps_when_the_variance_is_above_it(b, eps):
    t = pick(b, "response_mask", "rewards")
    floor, _, _ = adv("reinforce_pp", params=dict(whiten_eps=eps, whiten_eps_mode="floor"), **t)
    plain, _, _ = adv("reinforce_pp", params=dict(whiten_eps=0.0), **t)
    m = b["response_mask"]
    returns, _, _ = adv("reinforce_pp", params=dict(whiten=False), **t)
    if returns[m].var() >= eps:
        np.testing.assert_allclose(floor, plain, **TOL)


# --------------------------------------------------------------------------------------------------
# errors and batching
# --------------------------------------------------------------------------------------------------

GRPO_BATCH = dict(rewards=np.array([1.0, 0.0]), response_mask=np.ones((2, 2), bool), group_ids=np.array([0, 0]))


@pytest.mark.parametrize("estimator,preset,params,field", [
    ("grpo", "paper", dict(reward_clip_low=1.0, reward_clip_high=0.5), "params.reward_clip_low"),
    ("rloo", "trl", dict(whiten=True, kl_placement="reward_to_go", kl_coef=0.1), "params.whiten_scope"),
    ("gae", "paper", dict(mask_gaps="jump"), "params.mask_gaps"),
    ("grpo", "paper", dict(std_scope="prompt"), "params.std_scope"),
    ("reinforce_pp", "paper", dict(whiten_eps_mode="outer"), "params.whiten_eps_mode"),
    ("dr_grpo", "paper", dict(std_scope="batch"), "params.std_scope"),  # dr_grpo has no std
    ("rloo", "paper", dict(kl_placement="token"), "params.kl_placement"),
    ("grpo", "paper", dict(whiten_scope="sequence"), "params.whiten_scope"),  # only rloo whitens sequences
    ("grpo", "paper", dict(reward_clip_high="big"), "params.reward_clip_high"),
])
def test_bad_parameters_name_the_field(estimator, preset, params, field):
    tensors = dict(GRPO_BATCH, values=np.zeros((2, 2))) if estimator == "gae" else dict(GRPO_BATCH)
    if estimator in ("gae", "reinforce_pp"):
        del tensors["group_ids"]
    if params.get("kl_coef"):
        tensors.update(old_logprobs=np.zeros((2, 2)), ref_logprobs=np.zeros((2, 2)))
    with pytest.raises(advserve.InvalidArgument) as e:
        advserve.compute_advantages(estimator, preset=preset, params=params, **tensors)
    assert e.value.field == field, e.value


def test_kl_in_the_reward_by_default_says_so():
    # OpenRLHF's default puts k1 (β = 0.01) in the reward: without log-probs the error says how to turn it off
    with pytest.raises(advserve.InvalidArgument) as e:
        advserve.compute_advantages("grpo", preset="openrlhf", **GRPO_BATCH)
    assert e.value.field == "tensors.old_logprobs" and "kl_coef 0.01 > 0" in str(e.value)
    advserve.compute_advantages("grpo", preset="openrlhf", params={"kl_coef": 0.0}, **GRPO_BATCH)


def test_flash_reinforce_is_openrlhf_only():
    for preset in ("paper", "verl", "trl"):
        with pytest.raises(advserve.NotFound) as e:
            advserve.compute_advantages("flash_reinforce", preset=preset, rewards=np.array([1.0, 0.0]),
                                        response_mask=np.ones((2, 2), bool))
        assert "openrlhf" in str(e.value)


@pytest.mark.parametrize("estimator,preset,params,alone", [
    ("flash_reinforce", "openrlhf", dict(kl_coef=0.0), True),   # the batch mean
    ("grpo", "trl", dict(std_scope="batch"), True),             # the batch std
    ("rloo", "trl", dict(kl_coef=0.0, whiten=True), True),      # whitening over sequences
    ("grpo", "trl", {}, False),
    ("rloo", "trl", dict(kl_coef=0.0), False),
])
def test_batch_wide_statistics_are_never_coalesced(estimator, preset, params, alone):
    tensors = dict(GRPO_BATCH)
    if estimator == "flash_reinforce":
        del tensors["group_ids"]
    job = Engine("cpu").prepare_advantages(AdvantageRequest(estimator=estimator, preset=preset, params=params,
                                                            tensors=tensors))
    assert (job.coalescing_key is None) == alone


# --------------------------------------------------------------------------------------------------
# layout invariances under the library presets (hypothesis)
# --------------------------------------------------------------------------------------------------

LIBRARY_CASES = [(p, e) for p in ("openrlhf", "trl") for e in advserve.presets.PRESETS[p].estimators]


def library_request(b, preset, estimator, kl):
    params = {"kl_coef": 0.1 if kl else 0.0, "singleton_groups": "zero"}
    if estimator == "gae":
        params.update(gamma=0.9, lam=0.8)  # γ < 1: the gap steps matter
    if estimator in ("flash_reinforce", "gae", "reinforce_pp"):
        del params["singleton_groups"]
    names = ["response_mask", "rewards", *NEEDS.get(estimator, ())]
    if estimator not in UNGROUPED:
        names.append("group_ids")
    if kl:
        names += ["old_logprobs", "ref_logprobs"]
    return params, {k: b[k] for k in names}


@SETTINGS
@given(b=batches(), case=st.sampled_from(LIBRARY_CASES), kl=st.booleans(), extra=st.integers(1, 3))
def test_library_presets_right_padding_changes_nothing(b, case, kl, extra):
    preset, estimator = case
    params, t = library_request(b, preset, estimator, kl)
    a, r, _ = adv(estimator, preset, params, **t)
    padded = {k: (np.pad(v, ((0, 0), (0, extra))) if isinstance(v, np.ndarray) and v.ndim == 2 else v)
              for k, v in t.items()}
    a2, r2, _ = adv(estimator, preset, params, **padded)
    np.testing.assert_allclose(a2[:, :a.shape[1]], a, **TOL)
    np.testing.assert_allclose(r2[:, :r.shape[1]], r, **TOL)
    assert np.all(a2[:, a.shape[1]:] == 0.0)


@SETTINGS
@given(b=batches(), case=st.sampled_from(LIBRARY_CASES), kl=st.booleans(), data=st.data())
def test_library_presets_row_permutation_permutes_outputs(b, case, kl, data):
    preset, estimator = case
    params, t = library_request(b, preset, estimator, kl)
    perm = np.array(data.draw(st.permutations(range(len(b["rewards"])))))
    a, r, _ = adv(estimator, preset, params, **t)
    a2, r2, _ = adv(estimator, preset, params, **{k: v[perm] for k, v in t.items()})
    np.testing.assert_allclose(a2, a[perm], **TOL)
    np.testing.assert_allclose(r2, r[perm], **TOL)


@SETTINGS
@given(b=batches(), case=st.sampled_from(LIBRARY_CASES), kl=st.booleans())
def test_library_presets_float32_close_to_float64(b, case, kl):
    preset, estimator = case
    params, t = library_request(b, preset, estimator, kl)
    a64, _, _ = adv(estimator, preset, params, **t)
    a32, _, _ = adv(estimator, preset, params, dtype="float32", **t)
    scale = max(1.0, float(np.abs(a64).max()))
    np.testing.assert_allclose(a32, a64, rtol=1e-4, atol=1e-4 * scale)
