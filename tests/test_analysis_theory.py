"""The closed forms of `advserve.analysis.theory` against brute force, in float64.

The brute-force model is the smallest policy with a score function: a Bernoulli "policy" π(y = 1) =
p = sigmoid(θ) whose reward is r = y, so ∇_θ log π(y) = r − p and the unbiased per-prompt gradient is
g = E[(r − p) r] = p(1 − p). An estimator's implied weight is E[(r_j − p) A_j] / (p(1 − p)), where
the expectation runs over every outcome of the group (all 2^M reward vectors, each with its
probability), and the advantages A_j come from the engine: the same code a trainer calls, so these
tests tie the closed forms to what advserve actually computes.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advserve
from advserve.analysis import ESTIMATOR_BIAS, EXACT_GROUP_ESTIMATORS, asymptotic_prompt_weight, exact_group_weight
from advserve.estimators import ESTIMATORS

F64 = torch.float64
PASS_RATES = (0.05, 1 / 16, 0.25, 0.5, 0.7, 0.93)


def outcomes(m: int) -> np.ndarray:
    """All 2^M binary reward vectors of a group, [2^M, M]."""
    return np.array(list(itertools.product((0.0, 1.0), repeat=m)))


def engine_weight(estimator: str, p: float, m: int, preset: str = "paper", lengths: np.ndarray | None = None,
                  length_probs: np.ndarray | None = None) -> float:
    """E[(r_j − p) A_j] / (p(1−p)) over all outcomes of a group of M (and, if given, all length
    assignments with their probabilities), the advantages computed by the engine in one call."""
    rewards = outcomes(m)  # [K, M]
    prob = np.prod(np.where(rewards == 1, p, 1 - p), axis=1)  # [K]
    if lengths is None:
        lengths, length_probs = np.ones((1, m), dtype=int), np.ones(1)
    k, n_len = len(rewards), len(lengths)
    r = np.repeat(rewards, n_len, axis=0)  # [K·L, M]: every reward vector with every length vector
    length = np.tile(lengths, (k, 1))
    weight = np.repeat(prob, n_len) * np.tile(length_probs, k)
    t_max = int(length.max())
    mask = np.arange(t_max)[None, None, :] < length[:, :, None]  # [K·L, M, T]
    groups = np.repeat(np.arange(k * n_len), m)
    out = advserve.compute_advantages(estimator, preset=preset, dtype="float64", rewards=r.reshape(-1),
                                      response_mask=mask.reshape(-1, t_max), group_ids=groups)
    per_token = out.advantages.reshape(k * n_len, m, t_max)
    # the outcome is decided by the last token (the others are forced, score 0): Σ_t ∇log π(a_t) A_t is
    # (r − p) times the advantage on the last valid token
    last = np.arange(t_max)[None, None, :] == (length - 1)[:, :, None]
    score = (r - p)[:, :, None] * last
    expected = float((weight[:, None, None] * score * per_token).sum()) / m
    return expected / (p * (1 - p))


# --- the exact finite-M weight ---------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 4, 6, 9])
@pytest.mark.parametrize("estimator", EXACT_GROUP_ESTIMATORS)
def test_exact_group_weight_matches_enumeration_through_the_engine(estimator, m):
    p = torch.tensor(PASS_RATES, dtype=F64)
    expected = [engine_weight(estimator, float(q), m) for q in PASS_RATES]
    torch.testing.assert_close(exact_group_weight(estimator, p, m), torch.tensor(expected, dtype=F64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 5, 8])
def test_exact_grpo_weight_with_verl_std_matches_the_verl_preset(m):
    """verl: unbiased std (ddof 1) + 1e-6 outside the sqrt."""
    p = torch.tensor(PASS_RATES, dtype=F64)
    expected = [engine_weight("grpo", float(q), m, preset="verl") for q in PASS_RATES]
    got = exact_group_weight("grpo", p, m, std_ddof=1, std_eps=1e-6)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    # and it differs from the population-std weight by about sqrt((M−1)/M), not by rounding
    assert not torch.allclose(got, exact_group_weight("grpo", p, m), rtol=1e-3)


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.0, 1.0), m=st.integers(2, 512))
def test_rloo_is_exactly_unbiased_and_dr_grpo_exactly_scaled(p, m):
    """The seed's table: RLOO's expectation is Q − V (weight 1); Dr.GRPO's is (M−1)/M (Q − V)."""
    pt = torch.tensor([p], dtype=F64)
    assert exact_group_weight("rloo", pt, m).item() == pytest.approx(1.0, abs=1e-12)
    assert exact_group_weight("dr_grpo", pt, m).item() == pytest.approx((m - 1) / m, abs=1e-12)
    assert asymptotic_prompt_weight("dr_grpo", pt, m).item() == pytest.approx((m - 1) / m, abs=1e-15)


@settings(max_examples=40, deadline=None)
@given(p=st.floats(0.01, 0.99), m=st.integers(2, 256))
def test_exact_grpo_weight_is_symmetric_in_p_and_at_least_dr_grpo(p, m):
    """Swapping successes and failures negates every advantage and the score: same weight. Dividing
    the Dr.GRPO advantage by a std ≤ 1/2 can only enlarge it: weight ≥ 2(M−1)/M."""
    w = exact_group_weight("grpo", torch.tensor([p, 1 - p], dtype=F64), m)
    assert w[0].item() == pytest.approx(w[1].item(), rel=1e-9)
    assert w[0].item() >= 2 * (m - 1) / m - 1e-12


@pytest.mark.parametrize("p", [0.05, 1 / 16, 0.3, 0.5, 0.8])
def test_exact_grpo_weight_converges_to_the_seed_asymptote(p):
    """1/sqrt(p(1−p)) as M → ∞, the error shrinking with M (the seed's "as M is large enough")."""
    asymptote = 1 / math.sqrt(p * (1 - p))
    assert asymptotic_prompt_weight("grpo", torch.tensor([p], dtype=F64), 16).item() == pytest.approx(asymptote,
                                                                                                     rel=1e-15)
    errors = [abs(exact_group_weight("grpo", torch.tensor([p], dtype=F64), m).item() - asymptote) / asymptote
              for m in (16, 256, 4096, 65536)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3


def test_exact_weight_of_size_one_groups_is_zero_and_rloo_needs_two():
    p = torch.tensor(PASS_RATES, dtype=F64)
    assert torch.equal(exact_group_weight("grpo", p, 1), torch.zeros_like(p))
    assert torch.equal(exact_group_weight("dr_grpo", p, 1), torch.zeros_like(p))
    with pytest.raises(ValueError, match="group_size"):
        exact_group_weight("rloo", p, 1)
    with pytest.raises(ValueError, match="dapo"):
        exact_group_weight("dapo", p, 8)


# --- the asymptotic weights ------------------------------------------------------------------------


def test_issue_example_grpo_weights_one_in_sixteen_about_twice_eight_in_sixteen():
    w = asymptotic_prompt_weight("grpo", torch.tensor([1 / 16, 8 / 16], dtype=F64), 16)
    # by hand: 1/sqrt(1/16 · 15/16) = 16/sqrt(15), 1/sqrt(1/4) = 2
    assert w.tolist() == pytest.approx([16 / math.sqrt(15), 2.0], rel=1e-15)
    assert (w[0] / w[1]).item() == pytest.approx(8 / math.sqrt(15), rel=1e-15)  # 2.0656


@pytest.mark.parametrize("t", [1, 4, 7])
@pytest.mark.parametrize("m", [3, 6])
def test_dapo_with_equal_lengths_is_grpo_over_the_length(m, t):
    p = torch.tensor(PASS_RATES, dtype=F64)
    lengths = np.full((1, m), t)
    brute = [engine_weight("dapo", float(q), m, lengths=lengths, length_probs=np.ones(1)) for q in PASS_RATES]
    torch.testing.assert_close(torch.tensor(brute, dtype=F64), exact_group_weight("grpo", p, m) / t,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(asymptotic_prompt_weight("dapo", p, m, mean_length=torch.full_like(p, t)),
                               asymptotic_prompt_weight("grpo", p, m) / t, rtol=1e-15, atol=0)


def test_grpo_original_with_lengths_independent_of_the_reward_weights_by_the_harmonic_mean():
    """Each response's length is 1 or 3 with probability 1/2 each, independently of its reward: the
    weight is E[1/T] times GRPO's, i.e. GRPO's over the harmonic mean length T_h = 1/E[1/T] = 1.5."""
    m = 3
    lengths = np.array(list(itertools.product((1, 3), repeat=m)))
    probs = np.full(len(lengths), 0.5**m)
    p = torch.tensor(PASS_RATES, dtype=F64)
    brute = [engine_weight("grpo_original", float(q), m, lengths=lengths, length_probs=probs) for q in PASS_RATES]
    torch.testing.assert_close(torch.tensor(brute, dtype=F64), exact_group_weight("grpo", p, m) / 1.5,
                               rtol=1e-12, atol=1e-12)
    harmonic = torch.full_like(p, 1.5)
    torch.testing.assert_close(asymptotic_prompt_weight("grpo_original", p, m, mean_length=harmonic),
                               asymptotic_prompt_weight("grpo", p, m) / 1.5, rtol=1e-15, atol=0)


def replicated_batch(pass_rates: dict[str, tuple[int, int]], m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch in which each prompt's groups of M appear with their exact probabilities: p = a/b is
    realised by repeating an outcome with k successes a^k (b − a)^(M−k) times. rows [R] rewards, prompt
    labels [R], group ids [R]."""
    rewards, prompts, groups, gid = [], [], [], 0
    for name, (a, b) in pass_rates.items():
        for outcome in outcomes(m):
            k = int(outcome.sum())
            for _ in range(a**k * (b - a) ** (m - k)):
                rewards.append(outcome)
                prompts += [name] * m
                groups += [gid] * m
                gid += 1
    return np.concatenate(rewards), np.array(prompts), np.array(groups)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_whitened_estimators_scale_by_the_batch_std(estimator):
    """REINFORCE++: weight 1/σ with σ the batch's token-level std of the whitened quantity (the
    rewards; for the baseline version the group-centered rewards, whose group mean includes the
    sample itself: (M−1)/M · 1/σ). Exact on a batch that holds each outcome with its probability."""
    m = 3
    rates = {"a": (1, 4), "b": (1, 2), "c": (2, 3)}
    r, prompt, groups = replicated_batch(rates, m)
    mask = np.ones((len(r), 1), dtype=bool)
    out = advserve.compute_advantages(estimator, dtype="float64", rewards=r, response_mask=mask, group_ids=groups) \
        if estimator == "reinforce_pp_baseline" else \
        advserve.compute_advantages(estimator, dtype="float64", rewards=r, response_mask=mask)
    adv = out.advantages[:, 0]
    if estimator == "reinforce_pp":
        sigma = r.std()
    else:
        means = np.bincount(groups, weights=r) / np.bincount(groups)
        sigma = (r - means[groups]).std()
    for name, (a, b) in rates.items():
        p = a / b
        rows = prompt == name
        brute = float(np.mean((r[rows] - p) * adv[rows])) / (p * (1 - p))
        closed = asymptotic_prompt_weight(estimator, torch.tensor([p], dtype=F64), m, reward_std=sigma).item()
        assert brute == pytest.approx(closed, rel=1e-12)
    expected_scale = 1 / sigma if estimator == "reinforce_pp" else (m - 1) / m / sigma
    assert closed == pytest.approx(expected_scale, rel=1e-15)


@pytest.mark.parametrize("p", PASS_RATES)
def test_unbiased_outcome_estimators_through_the_engine(p):
    """reinforce, reinforce_rtg, remax (greedy reward: 1 if p > 1/2), orz and gae with the exact critic
    V = p on a one-token response: E[(r − p) A] = p(1 − p), weight 1."""
    r = np.array([0.0, 1.0])
    prob = np.array([1 - p, p])
    mask = np.ones((2, 1), dtype=bool)
    extra = {
        "remax": {"greedy_rewards": np.full(2, float(p > 0.5))},
        "orz": {"values": np.full((2, 1), p)},
        "gae": {"values": np.full((2, 1), p)},
    }
    for estimator in ("reinforce", "reinforce_rtg", "remax", "orz", "gae"):
        out = advserve.compute_advantages(estimator, dtype="float64", rewards=r, response_mask=mask,
                                          **extra.get(estimator, {}))
        brute = float((prob * (r - p) * out.advantages[:, 0]).sum()) / (p * (1 - p))
        assert brute == pytest.approx(1.0, rel=1e-12), estimator
        assert asymptotic_prompt_weight(estimator, torch.tensor([p], dtype=F64), 1).item() == 1.0


# --- the table ------------------------------------------------------------------------------------


def test_the_bias_table_covers_every_estimator_of_the_engine():
    # verl 0.9.1's other estimators are not in the seed's table: the analysis leaves them out (and refuses
    # them by name, test below)
    assert set(ESTIMATORS) - set(ESTIMATOR_BIAS) == {"grpo_passk", "opo", "gpg", "gdpo", "optimal_token_baseline",
                                                     "tir_optimal_token_baseline"}
    assert set(ESTIMATOR_BIAS.values()) == {"unbiased", "scaled", "reweighted"}
    assert {e for e, kind in ESTIMATOR_BIAS.items() if kind == "reweighted"} == {"grpo", "grpo_original", "dapo"}
    assert {e for e, kind in ESTIMATOR_BIAS.items() if kind == "scaled"} == {"dr_grpo", "reinforce_pp",
                                                                            "reinforce_pp_baseline"}


@pytest.mark.parametrize("estimator", sorted(ESTIMATOR_BIAS))
def test_each_kind_means_what_it_says(estimator):
    """unbiased: weight 1 for every p; scaled: one weight for every p (and M, σ fixed); reweighted: the
    weight changes with p. Std-normalised estimators give 0 where p ∈ {0, 1} (no signal)."""
    p = torch.linspace(0, 1, 21, dtype=F64)
    w = asymptotic_prompt_weight(estimator, p, 8, mean_length=torch.full_like(p, 5.0), reward_std=0.4)
    inner = w[1:-1]
    kind = ESTIMATOR_BIAS[estimator]
    if kind == "unbiased":
        assert torch.equal(w, torch.ones_like(p))
    elif kind == "scaled":
        assert torch.equal(w, torch.full_like(p, w[0].item())) and w[0].item() not in (0.0, 1.0)
    else:
        assert inner.max() / inner.min() > 2
        assert w[0].item() == 0.0 and w[-1].item() == 0.0
        # U-shaped in p: the seed's conclusion (3), easy and hard prompts weigh most
        assert torch.all(inner[:9].diff() < 0) and torch.all(inner[10:].diff() > 0)


def test_group_reward_std_replaces_the_binary_std():
    p = torch.tensor([0.25, 0.5], dtype=F64)
    std = torch.tensor([0.5, 0.25], dtype=F64)
    assert asymptotic_prompt_weight("grpo", p, 4, group_reward_std=std).tolist() == [2.0, 4.0]
    assert asymptotic_prompt_weight("dapo", p, 4, mean_length=torch.tensor([2.0, 4.0], dtype=F64),
                                    group_reward_std=std).tolist() == [1.0, 1.0]
    assert asymptotic_prompt_weight("grpo", p, 4, group_reward_std=torch.zeros(2, dtype=F64)).tolist() == [0.0, 0.0]


def test_missing_inputs_and_unknown_names_are_errors():
    p = torch.tensor([0.5], dtype=F64)
    with pytest.raises(ValueError, match="mean_length"):
        asymptotic_prompt_weight("dapo", p, 4)
    with pytest.raises(ValueError, match="reward_std"):
        asymptotic_prompt_weight("reinforce_pp", p, 4)
    with pytest.raises(ValueError, match="unknown estimator"):
        asymptotic_prompt_weight("ppo", p, 4)
    assert asymptotic_prompt_weight("reinforce_pp", p, 4, reward_std=0.0).item() == 0.0
    assert asymptotic_prompt_weight("grpo", torch.tensor([0, 1]), 4).dtype == F64
