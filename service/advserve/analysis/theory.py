"""Closed forms of the seed's bias analysis: what each estimator's expected gradient is, per prompt,
relative to the unbiased policy gradient.

For a prompt x with binary reward r(x, y) ∈ {0, 1}, pass rate p = E[r], the unbiased per-prompt policy
gradient is g(x) = E_y[∇log π(y|x) · r(x, y)] (REINFORCE; any baseline independent of y leaves it
unchanged). An estimator whose token advantage Â has E[Â | s_t, a_t] = w(x) (Q(s_t, a_t) − b(x)) has
expected gradient w(x) · g(x) for that prompt: w is the prompt's *implied weight*, the seed's
"expectation of token advantage" column (section "Bias Analysis") divided by the unbiased one.

| estimator | kind | w(x) |
|---|---|---|
| reinforce, reinforce_rtg, rloo, remax | unbiased | 1 |
| gae, orz | unbiased with an exact critic (V_φ = V^π, γ = 1) | 1 |
| reinforce_pp | scaled | 1/σ (σ the batch's token-level reward std, the whitening denominator) |
| reinforce_pp_baseline | scaled | (M−1)/M · 1/σ (group-mean baseline including the sample itself, then whitening; σ the std of R − mean_g R) |
| dr_grpo | scaled | (M−1)/M |
| grpo | reweighted | 1/sqrt(p(1−p)) |
| grpo_original | reweighted | 1/(T_h sqrt(p(1−p))), T_h the harmonic mean of the prompt's lengths |
| dapo | reweighted | 1/(T̄ sqrt(p(1−p))), T̄ the prompt's mean length |

"scaled" estimators multiply every prompt by the same number (an implicit learning rate); "reweighted"
ones change the direction of the gradient by weighting prompts differently. Per-prompt weights are
asymptotic (M → ∞ for the group statistics, NM → ∞ for the batch whitening), as in the seed;
`exact_group_weight` gives the finite-M value of the length-free group estimators.

Conventions (the engine's): a std-normalised estimator (grpo, grpo_original, dapo) on a prompt with
p ∈ {0, 1} (all rewards equal, std 0) gives advantage 0, so its weight is 0 there ("no signal"); the
unbiased gradient of such a prompt is itself 0 (E[∇log π · r] = 0 when r is constant). A zero σ gives
weight 0 for the whitened estimators (the engine whitens a constant batch to 0). A group of size 1 has
(M−1)/M = 0 (the `paper` preset's singleton policy: advantage 0).

The seed's original GRPO has 1/T_ij per response; its expected gradient E[(r − p) ∇log π / T] =
E[r ∇log π / T] − p ∇E[1/T] is not a multiple of g(x) unless all lengths are equal (the seed's last
step drops the p ∇E[1/T] term, which is not 0 when the policy controls the length). It is summarised
per prompt by the mean per-response factor mean_j(1/T_ij) = 1/T_h (the harmonic mean length): exact
for equal lengths, an approximation otherwise (see docs/analysis.md, the exact-gradient study).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ESTIMATOR_BIAS",
    "EXACT_GROUP_ESTIMATORS",
    "WEIGHT_FORMULAS",
    "asymptotic_prompt_weight",
    "exact_group_weight",
]

ESTIMATOR_BIAS: dict[str, str] = {
    "reinforce": "unbiased",
    "reinforce_rtg": "unbiased",
    "reinforce_pp": "scaled",
    "reinforce_pp_baseline": "scaled",
    "rloo": "unbiased",
    "remax": "unbiased",
    "gae": "unbiased",  # with an exact critic V_φ = V^π and γ = 1 (the seed's PPO row)
    "orz": "unbiased",  # with an exact critic
    "grpo": "reweighted",
    "grpo_original": "reweighted",
    "dapo": "reweighted",
    "dr_grpo": "scaled",
    # not in the seed's table: OpenRLHF's batch-mean baseline; the mean includes the sample itself,
    # (B−1)/B → 1 as the batch grows (the seed's NM → ∞ for REINFORCE++)
    "flash_reinforce": "unbiased",
}
"""Estimator name -> "unbiased" | "scaled" | "reweighted": the seed's bias table."""

WEIGHT_FORMULAS: dict[str, str] = {
    "reinforce": "1",
    "reinforce_rtg": "1",
    "reinforce_pp": "1/σ",
    "reinforce_pp_baseline": "(M−1)/M · 1/σ",
    "rloo": "1",
    "remax": "1",
    "gae": "1 (exact critic, γ = 1)",
    "orz": "1 (exact critic)",
    "grpo": "1/std_g(R) = 1/sqrt(p(1−p)) for 0/1 rewards",
    "grpo_original": "1/(T_h std_g(R)), T_h the harmonic mean length",
    "dapo": "1/(T̄ std_g(R)), T̄ the mean length",
    "dr_grpo": "(M−1)/M",
    "flash_reinforce": "1 (as the batch grows; exactly (B−1)/B)",
}
"""Estimator name -> its implied weight w(x) in words (the table above)."""

EXACT_GROUP_ESTIMATORS = ("rloo", "dr_grpo", "grpo")
"""The estimators `exact_group_weight` covers: outcome-reward group baselines without a length term."""

_UNIT = frozenset({"reinforce", "reinforce_rtg", "rloo", "remax", "gae", "orz", "flash_reinforce"})
_STD_NORMALISED = frozenset({"grpo", "grpo_original", "dapo"})


def _as_float(x: Tensor | float | int, like: Tensor | None = None) -> Tensor:
    if like is not None:  # (a Python float must not pass through float32 on its way)
        return torch.as_tensor(x, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(x, dtype=torch.float64) if isinstance(x, (int, float)) else torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.float64)


def _inverse(x: Tensor) -> Tensor:
    """1/x where x > 0, else 0 (no signal)."""
    positive = x > 0
    return torch.where(positive, 1 / torch.where(positive, x, 1), 0)


def asymptotic_prompt_weight(
    estimator: str,
    pass_rate: Tensor,
    group_size: Tensor | int,
    mean_length: Tensor | None = None,
    reward_std: Tensor | float | None = None,
    *,
    group_reward_std: Tensor | None = None,
) -> Tensor:
    """The implied weight w(x) of each prompt relative to the unbiased policy gradient (table above).

    pass_rate [P] (any shape; p ∈ [0, 1]); group_size M, an int or a tensor broadcastable to it;
    mean_length [P]: T̄ for dapo, the harmonic mean length T_h for grpo_original (required by both);
    reward_std σ: the batch's token-level std of the whitened quantity (required by reinforce_pp and
    reinforce_pp_baseline). group_reward_std [P], optional: replaces sqrt(p(1−p)) as the group's std
    (non-binary rewards, or the engine's std with ddof/ε: std_g + ε); for binary rewards and the
    population std it equals sqrt(p(1−p)). Returns [P] in pass_rate's float dtype (float64 for
    integer input). A std of 0 (p ∈ {0, 1}) gives weight 0 for grpo, grpo_original and dapo.
    """
    p = _as_float(pass_rate)
    ones = torch.ones_like(p)
    m = _as_float(group_size, p)
    if estimator in _UNIT:
        return ones
    if estimator == "dr_grpo":
        return ones * (m - 1) / m
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        if reward_std is None:
            raise ValueError(f"{estimator}: reward_std (the batch's σ) is required")
        scale = _inverse(_as_float(reward_std, p))
        return ones * (scale if estimator == "reinforce_pp" else scale * (m - 1) / m)
    if estimator in _STD_NORMALISED:
        std = (p * (1 - p)).clamp_min(0).sqrt() if group_reward_std is None else _as_float(group_reward_std, p)
        weight = ones * _inverse(std)
        if estimator == "grpo":
            return weight
        if mean_length is None:
            raise ValueError(f"{estimator}: mean_length is required")
        return weight * _inverse(_as_float(mean_length, p))
    raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATOR_BIAS)}")


def _binomial_pmf(p: Tensor, n: int) -> Tensor:
    """P(K = k) for K ~ Bin(n, p): [..., n + 1] over k = 0..n, in log space (exact at p ∈ {0, 1}: 0·log 0 = 0)."""
    k = torch.arange(n + 1, dtype=p.dtype, device=p.device)
    log_comb = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    q = p.unsqueeze(-1)
    return (log_comb + torch.xlogy(k, q) + torch.xlogy(n - k, 1 - q)).exp()


def _group_advantage(estimator: str, r: float, k: Tensor, m: int, std_ddof: int, std_eps: float) -> Tensor:
    """The token advantage A(r, K) [M] of a response with reward r when K = k of the other M − 1
    responses in its group succeeded (binary rewards), as the engine computes it."""
    if estimator == "rloo":
        return r - k / (m - 1)
    q = (r + k) / m  # the group's pass rate p̂
    centered = r - q
    if estimator == "dr_grpo":
        return centered
    # population (ddof 0) or unbiased (ddof 1) std of M binary rewards: sqrt(M q(1−q)/(M − ddof))
    var = m * q * (1 - q) / max(m - std_ddof, 1) if m > std_ddof else torch.zeros_like(q)
    denom = var.clamp_min(0).sqrt() + std_eps
    constant = (q == 0) | (q == 1)  # all rewards equal: exactly 0 (the engine's convention)
    return torch.where(constant | (denom <= 0), 0, centered / torch.where(denom > 0, denom, 1))


def exact_group_weight(
    estimator: str, pass_rate: Tensor, group_size: int, *, std_ddof: int = 0, std_eps: float = 0.0
) -> Tensor:
    """The exact finite-M implied weight of a group estimator with binary rewards, pass_rate [P] -> [P].

    The advantage of response j is A(r_j, K) with K ~ Bin(M − 1, p) successes among the others,
    independent of y_j. With g(r) = E_K[A(r, K)] and r ∈ {0, 1}, g(r_j) = g(0) + (g(1) − g(0)) r_j, and
    E[∇log π(y_j)] = 0, so E[∇log π(y_j) A_j] = (g(1) − g(0)) E[r ∇log π]: the weight is g(1) − g(0).

    rloo: 1 exactly (M ≥ 2); dr_grpo: (M−1)/M exactly; grpo: a finite-M value that tends to
    1/sqrt(p(1−p)) as M → ∞ (with `std_ddof` 0 or 1 and `std_eps` as in the engine's params). A group
    of size 1 has advantage 0 (weight 0) for dr_grpo and grpo; rloo needs M ≥ 2.
    """
    if estimator not in EXACT_GROUP_ESTIMATORS:
        raise ValueError(f"exact_group_weight covers {', '.join(EXACT_GROUP_ESTIMATORS)}, not {estimator!r}")
    if group_size < 1 or (estimator == "rloo" and group_size < 2):
        raise ValueError(f"{estimator}: group_size must be >= {2 if estimator == 'rloo' else 1}, got {group_size}")
    if std_ddof not in (0, 1) or std_eps < 0:
        raise ValueError("std_ddof must be 0 or 1 and std_eps >= 0")
    p = _as_float(pass_rate)
    m = group_size
    if m == 1:
        return torch.zeros_like(p)
    pmf = _binomial_pmf(p, m - 1)  # [..., M] over k = 0..M−1
    k = torch.arange(m, dtype=p.dtype, device=p.device)
    g1 = (pmf * _group_advantage(estimator, 1.0, k, m, std_ddof, std_eps)).sum(-1)
    g0 = (pmf * _group_advantage(estimator, 0.0, k, m, std_ddof, std_eps)).sum(-1)
    return g1 - g0
