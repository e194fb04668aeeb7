"""Per-token policy and value losses with their analytic gradients.

Each function returns the per-token loss ℓ [B, T] and ∂ℓ/∂input [B, T]; the caller aggregates with
weights w (`masks.aggregation_weights`): loss = Σ w ℓ, gradient = w · ∂ℓ. Where a branch is chosen by
max/min, the gradient follows torch's rule (the chosen branch; half each on an exact tie), so the
result equals torch autograd of the same expression.

A sequence ratio s_i (gspo, CISPO at sequence level) can pass its gradient two ways
(`sequence_ratio_gradient`): "token_trick" (verl: token t's ratio is sg(s_i)·exp(lp_t − sg(lp_t)), so
∂ℓ_t reaches lp_t only) or "through_mean" (OpenRLHF, TRL: s_i = exp(mean_t(lp − old)), so every
token's loss reaches every token of its row, each getting 1/L_i of the row's sum). `Ratio.spread`
marks the second case: the caller weights the per-token gradient and passes it to `spread_over_row`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .kl import kl_and_grad
from .rollout import rollout_weights

POLICY_LOSS_MODES = ("ppo_clip", "gspo", "cispo", "reinforce",
                     # verl 0.9.1's other registered losses (`policy_term`)
                     "dro", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dppo_tv", "dppo_kl", "bypass_mode")
SEQUENCE_RATIO_GRADIENTS = ("token_trick", "through_mean")


def _maximum_grad(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> Tensor:
    """Gradient of torch.maximum(a, b) given the gradients of a and b."""
    return torch.where(a > b, da, torch.where(b > a, db, 0.5 * (da + db)))


def _tie_split(x: Tensor, bound: Tensor, below: bool) -> Tensor:
    """∂/∂x of torch.minimum(x, bound) (below=True) or torch.maximum(x, bound): 1 where x is the
    strict winner, ½ at a tie, 0 where the bound wins."""
    wins = x < bound if below else x > bound
    return torch.where(wins, 1.0, torch.where(x == bound, 0.5, 0.0)).to(x.dtype)


def _clamped(x: Tensor, low: float | None, high: float | None) -> tuple[Tensor, Tensor | None]:
    """(clamp(x, low, high), 1 where the clamp passes the gradient else 0; None without bounds)."""
    if low is None and high is None:
        return x, None
    passes = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        passes &= x >= low
    if high is not None:
        passes &= x <= high
    return x.clamp(low, high), passes.to(x.dtype)


@dataclass(frozen=True)
class Ratio:
    """An importance ratio ρ [B, T] and its derivative.

    value: ρ_t; for a sequence ratio s_i on every position of row i. grad: ∂ρ_t/∂lp_t for token ratios
    and for sequence ratios under "token_trick"; ∂s_i/∂(log s_i) (= s_i where no clamp binds) when
    `spread`, the caller then passing Σ over the row through the mean (`spread_over_row`).
    """

    value: Tensor
    grad: Tensor
    spread: bool = False


def importance_ratio(logp: Tensor, old: Tensor, log_clamp: float | None) -> tuple[Tensor, Tensor]:
    """ρ = exp(clamp(logp − old, ±log_clamp)) and ∂ρ/∂logp, both [B, T]."""
    log_ratio, passes = _clamped(logp - old, -log_clamp if log_clamp is not None else None, log_clamp)
    ratio = log_ratio.exp()
    return ratio, ratio if passes is None else ratio * passes  # (read only: the two may be one tensor)


def _row_lengths(mask: Tensor, lengths: Tensor | None, dtype: torch.dtype) -> Tensor:
    """max(L_i, 1) [B, 1] in `dtype`, from `lengths` [B] when the caller has them, else from mask."""
    counts = mask.sum(dim=1) if lengths is None else lengths
    return counts.to(dtype).clamp_min(1).unsqueeze(1)


def sequence_log_ratio(logp: Tensor, old: Tensor, mask: Tensor, lengths: Tensor | None = None) -> Tensor:
    """GSPO's log s_i = mean over valid tokens of (logp − old), [B, T] -> [B] (0 for empty rows).
    lengths [B]: valid tokens per row, if known (else counted from mask)."""
    return torch.where(mask, logp - old, 0).sum(dim=1) / _row_lengths(mask, lengths, logp.dtype).squeeze(1)


def spread_over_row(x: Tensor, mask: Tensor, lengths: Tensor | None = None) -> Tensor:
    """The gradient through a row mean: m_u · Σ_t x_t / max(L_i, 1) for every token u, [B, T] -> [B, T].

    x [B, T] is 0 at masked positions (the caller's weights are), mask [B, T] bool, lengths [B] the
    valid tokens per row if known (else counted from mask).
    """
    return torch.where(mask, x.sum(dim=1, keepdim=True) / _row_lengths(mask, lengths, x.dtype), 0)


def policy_ratio(
    mode: str,
    logp: Tensor,
    old: Tensor,
    mask: Tensor,
    *,
    ratio_clamp: float | None,
    cispo_level: str = "token",
    sequence_ratio_gradient: str = "token_trick",
    lengths: Tensor | None = None,
) -> Ratio:
    """The ratio a policy mode uses, [B, T].

    Token ratio ρ_t = exp(clamp(lp − old, ±ratio_clamp)) for ppo_clip, reinforce and token-level cispo;
    sequence ratio s_i = exp(min(mean_t(lp − old), ratio_clamp)) (upper bound only) for gspo and
    sequence-level cispo, its gradient passed per `sequence_ratio_gradient`.
    """
    if mode == "gspo" or (mode == "cispo" and cispo_level == "sequence"):
        log_s = sequence_log_ratio(logp, old, mask, lengths).unsqueeze(1).expand_as(logp)
        log_s, passes = _clamped(log_s, None, ratio_clamp)
        s = log_s.exp()
        return Ratio(s, s if passes is None else s * passes, spread=sequence_ratio_gradient == "through_mean")
    ratio, dratio = importance_ratio(logp, old, ratio_clamp)
    return Ratio(ratio, dratio)


def clipped_surrogate(
    ratio: Tensor,
    dratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    ratio_cap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (with optional dual clip, arXiv:1912.09729) given ρ and ∂ρ/∂logp.

    ℓ = max(−A min(ρ, δ), −A clip(ρ, 1 − clip_low, 1 + clip_high)) with δ = `ratio_cap` (TRL's
    `delta`; None: no cap); for A < 0 with dual clip c: ℓ = min(ℓ, −cA). Returns (ℓ, ∂ℓ/∂logp):
    −A ∂ρ where the branch taken passes the ratio unclipped and uncapped, else 0. (Without a cap the
    clipped branch wins strictly only where the clip binds, and there it has no gradient; on a tie
    both branches have the same gradient. A tie with the dual-clip cap, ρ = c exactly, takes the
    uncapped branch's gradient where autograd would take half of it.)
    """
    neg_adv = -advantages
    unclipped = neg_adv * ratio
    clipped = neg_adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    if ratio_cap is None:
        loss = torch.maximum(unclipped, clipped)
        grad = (neg_adv * dratio).mul_(clipped <= unclipped)
    else:  # the capped branch may lose to an unclipped ratio inside [1 − clip_low, 1 + clip_high]
        unclipped = neg_adv * ratio.clamp(max=ratio_cap)
        loss = torch.maximum(unclipped, clipped)
        inside = (ratio >= 1 - clip_low) & (ratio <= 1 + clip_high)
        grad = torch.where(clipped <= unclipped, neg_adv * dratio * (ratio <= ratio_cap), neg_adv * dratio * inside)
    if dual_clip is not None:
        cap = neg_adv * dual_clip
        dual = (advantages < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
        grad.mul_(~dual)
    return loss, grad


def policy_loss(
    mode: str,
    ratio: Ratio,
    logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    ratio_cap: float | None = None,
    cispo_cap: float | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """Per-token policy loss for `mode` on `ratio` (`policy_ratio`); returns (ℓ, g, spread) [B, T].

    g is ∂ℓ_t/∂lp_t, or, when `spread`, ∂ℓ_t/∂log s_i to be passed through the row mean.
    ppo_clip and gspo (arXiv:2507.18071): the clipped surrogate (dual clip, ratio cap). cispo
    (arXiv:2506.13585): −sg(ŵ) A logp with ŵ = clip(ρ, 1 − clip_low, 1 + clip_high), or min(ρ, cispo_cap)
    (TRL: an absolute cap, no floor). reinforce: −Aρ (the seed's surrogate (5)).
    """
    if mode in ("ppo_clip", "gspo"):
        loss, grad = clipped_surrogate(ratio.value, ratio.grad, advantages, clip_low, clip_high, dual_clip, ratio_cap)
        return loss, grad, ratio.spread
    if mode == "cispo":
        if cispo_cap is None:
            weight = ratio.value.clamp(1 - clip_low, 1 + clip_high)
        else:
            weight = ratio.value.clamp(max=cispo_cap)
        return -weight * advantages * logp, -weight * advantages, False
    if mode == "reinforce":
        return -advantages * ratio.value, -advantages * ratio.grad, ratio.spread
    raise ValueError(f"unknown policy loss mode {mode!r}; valid: {', '.join(POLICY_LOSS_MODES)}")


# --- verl 0.9.1's other policy losses (verl.trainer.ppo.core_algos) --------------------------------
# Each returns ℓ [B, T] and ∂ℓ_t/∂lp_t [B, T] (0 where nothing passes), written so that the values are
# verl's own arithmetic, operation for operation (its clamps, epsilons and detach points), and the
# gradients equal torch autograd of that arithmetic.

BYPASS_LOSSES = ("ppo_clip", "reinforce")
BYPASS_IS_LEVELS = ("token", "sequence")
BYPASS_LOG_CLAMP = 20.0  # rollout_corr_helper.SAFETY_BOUND


@dataclass(frozen=True)
class PolicyTerm:
    """A policy mode's per-token loss and gradient, [B, T] each, and what its metrics need.

    grad: ∂ℓ_t/∂lp_t; with `spread`, ∂ℓ_t/∂log s_i to pass through the row mean (`spread_over_row`);
    with `through` [B, T], ∂ℓ_i/∂log r_i of a row-level ratio r_i: lp_u's gradient is then
    through_u · Σ_t (w g)_t over its row (geo_mean). dropped [B, T] bool: valid tokens whose loss the
    mode cut by a batch-level rule (clip_cov, kl_cov: the selected tokens; dppo: outside the trust
    region). is_weights [B, T]: bypass_mode's importance weights (for the metrics), None elsewhere.
    """

    loss: Tensor
    grad: Tensor
    spread: bool = False
    through: Tensor | None = None
    dropped: Tensor | None = None
    is_weights: Tensor | None = None
    is_outside: Tensor | None = None


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """verl_F.masked_mean with a bool mask: Σ_valid x / (N + 1e-8), the 1e-8 added to an integer count
    in float32 (where N + 1e-8 is N for N ≥ 1): Σ_valid x / N, 0 without valid tokens."""
    return torch.where(mask, x, 0).sum() / mask.sum().clamp_min(1)


def dro_loss(logp: Tensor, old: Tensor, advantages: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """verl's `dro`: ℓ = −(A·lp − ½β (lp − old)²), ∂ℓ/∂lp = −A + β (lp − old), [B, T] each.

    A policy gradient with a quadratic log-ratio penalty in place of clipping (Richemond et al. 2024,
    arXiv:2405.19107, "Direct Reward Optimization", in verl's per-token form); no log-ratio clamp.
    """
    log_ratio = logp - old
    return -(logp * advantages - 0.5 * beta * log_ratio.square()), beta * log_ratio - advantages


def sapo_loss(ratio: Ratio, advantages: Tensor, tau_pos: float, tau_neg: float) -> tuple[Tensor, Tensor]:
    """verl's `sapo` (Soft Adaptive Policy Optimization, arXiv:2511.20347): a smooth gate in place of
    the clip. ℓ = −f_τ(ρ)·A with f_τ(ρ) = (4/τ)·σ(τ(ρ − 1)), τ = tau_pos where A > 0, else tau_neg;
    ∂ℓ/∂lp = −A·4σ(1 − σ)·∂ρ/∂lp. ratio: the token ratio (verl: log-ratio clamped to ±20). [B, T] each.
    """
    tau = torch.where(advantages > 0, advantages.new_tensor(tau_pos), advantages.new_tensor(tau_neg))
    sig = torch.sigmoid(tau * (ratio.value - 1.0))
    gates = sig * (4.0 / tau)
    return -gates * advantages, -advantages * (4.0 * sig * (1 - sig)) * ratio.grad


def gpg_loss(logp: Tensor, advantages: Tensor) -> tuple[Tensor, Tensor]:
    """verl's `gpg` (GPG, arXiv:2504.02546), REINFORCE's surrogate without a ratio: ℓ = −A·lp,
    ∂ℓ/∂lp = −A, [B, T] each. (The seed's surrogate −A·ρ is mode `reinforce`: same gradient at ρ = 1.)"""
    return -logp * advantages, -advantages


def covariance_scores(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """clip_cov's centred covariance of each valid token, (A − Ā)(lp − l̄) [B, T], the means over the
    batch's valid tokens as verl_F.masked_mean takes them (no gradient flows through it)."""
    return (advantages - _masked_mean(advantages, mask)) * (logp - _masked_mean(logp, mask))


def clip_cov_loss(
    ratio: Tensor,
    dratio: Tensor,
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    cov_ratio: float,
    cov_low: float,
    cov_high: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """verl's `clip_cov` (Cui et al. 2025, arXiv:2505.22617): PPO's clipped surrogate (no dual clip),
    with the gradient of a few high-covariance tokens cut. Returns (ℓ, ∂ℓ/∂lp, selected), [B, T] each.

    Candidates: valid tokens that the clip leaves alone (−A·clip(ρ) ≤ −A·ρ) whose covariance
    (`covariance_scores`) lies strictly inside (cov_low, cov_high); k = max(⌊cov_ratio·N⌋, 1) of them
    (N: valid tokens) are drawn at random and get ℓ = 0 (verl: corr = 0). The draw is verl's:
    torch.randperm over the candidates in row-major order, from a CPU generator seeded with `seed`
    (verl draws from torch's global generator: the same tokens when it was seeded with `seed` just
    before the call). ratio [B, T] and its derivative dratio: the token ratio (verl: no log-ratio clamp).
    """
    loss, grad = clipped_surrogate(ratio, dratio, advantages, clip_low, clip_high, None)
    clipped_by_origin = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high) > -advantages * ratio
    cov = covariance_scores(logp, advantages, mask)
    candidates = (mask & ~clipped_by_origin & (cov < cov_high) & (cov > cov_low)).reshape(-1).nonzero()[:, 0]
    count = max(int(cov_ratio * int(mask.sum())), 1)
    perm = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))
    chosen = candidates[perm[:count].to(candidates.device)]
    selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device).index_fill_(0, chosen, True)
    selected = selected.view_as(mask)
    return loss.masked_fill(selected, 0.0), grad.masked_fill(selected, 0.0), selected


def kl_cov_loss(
    ratio: Tensor,
    dratio: Tensor,
    logp: Tensor,
    old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cov_ratio: float,
    coef: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """verl's `kl_cov` (Cui et al. 2025, arXiv:2505.22617): the unclipped surrogate −A·ρ, plus
    coef·|lp − old| on the k = max(1, ⌊cov_ratio·N⌋) valid tokens of largest covariance
    (A − Ā)(lp − l̄) (means over the N valid tokens, torch.topk's choice among ties). Returns
    (ℓ, ∂ℓ/∂lp, selected), [B, T] each; ∂|x| = sign(x) (0 at 0). ratio: verl's has no log-ratio clamp.
    """
    loss, grad = -advantages * ratio, -advantages * dratio
    valid = mask.reshape(-1).nonzero()[:, 0]
    selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if valid.numel():
        a, lp = advantages.reshape(-1)[valid], logp.reshape(-1)[valid]
        cov = (a - a.mean()) * (lp - lp.mean())
        top = torch.topk(cov, max(1, int(valid.numel() * cov_ratio)), largest=True).indices
        selected.index_fill_(0, valid[top], True)
    selected = selected.view_as(mask)
    log_ratio = logp - old
    loss = torch.where(selected, loss + coef * log_ratio.abs(), loss)
    grad = torch.where(selected, grad + coef * log_ratio.sign(), grad)
    return loss, grad, selected


def _minimum_grads(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """∂ torch.minimum(a, b) / ∂a and / ∂b: 1 to the strict winner, ½ each at a tie."""
    tie = (a == b).to(a.dtype)
    return (a < b).to(a.dtype) + 0.5 * tie, (b < a).to(a.dtype) + 0.5 * tie


def geo_mean_loss(
    logp: Tensor,
    old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    ratio_clamp: float | None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """verl's `geo_mean` (GMPO, Zhao et al. 2025, arXiv:2507.20673): a sequence ratio from the
    geometric mean of token ratios, each clipped in log space on the side the advantage's sign selects.

    d_t = lp − old (clamped to ±ratio_clamp first if given; verl: none), d̃_t = sgn(A)·min(sgn(A)·d,
    sgn(A)·clip(d, −clip_low, clip_high)); r_i = exp(Σ_t d̃_t / L_i), Ā_i = Σ_t A_t / L_i over valid
    tokens (verl's L_i + 1e-8, taken in float32: L_i), ℓ_i = −Ā_i·r_i. Returns (ℓ, g, through, clipped),
    [B, T] each: ℓ_i and g = ∂ℓ_i/∂log r_i = ℓ_i on every valid token of row i; through_u = ∂ log r_i /
    ∂lp_u = m_u·∂d̃_u/∂d_u / L_i, as autograd takes it (torch.minimum: ½ each at a tie; 0 where A = 0);
    clipped: d_t outside [−clip_low, clip_high] (verl's clip fractions). With weights w = 1/(B·L_i)
    (seq-mean-token-mean over all B rows) Σ w ℓ is verl's mean over rows of ℓ_i.
    """
    log_ratio, passes = _clamped(logp - old, -ratio_clamp if ratio_clamp is not None else None, ratio_clamp)
    sign = torch.sign(advantages)
    bounded, inside = _clamped(log_ratio, -clip_low, clip_high)
    signed, signed_bounded = sign * log_ratio, sign * bounded
    chosen = sign * torch.minimum(signed, signed_bounded)
    d_signed, d_bounded = _minimum_grads(signed, signed_bounded)
    d_chosen = sign.square() * (d_signed + d_bounded * inside)
    if passes is not None:
        d_chosen = d_chosen * passes
    count = _row_lengths(mask, lengths, logp.dtype)
    ratio = (torch.where(mask, chosen, 0).sum(dim=1, keepdim=True) / count).exp()
    adv = torch.where(mask, advantages, 0).sum(dim=1, keepdim=True) / count
    seq_loss = torch.where(mask, -adv * ratio, 0)
    return seq_loss, seq_loss, torch.where(mask, d_chosen / count, 0), (log_ratio != bounded) & mask


def geometric_mean_weight(weights: Tensor, mask: Tensor, lengths: Tensor | None = None) -> Tensor:
    """geo_mean's sequence importance weight from token weights w [B, T]: exp(Σ_t log(w_t + 1e-10) / L_i)
    over valid tokens (verl), on every valid token of the row, [B, T]."""
    log_w = torch.where(mask, (weights + 1e-10).log(), 0).sum(dim=1, keepdim=True)
    return torch.where(mask, (log_w / _row_lengths(mask, lengths, weights.dtype)).exp(), 0)


DPPO_DIVERGENCES = {"dppo_tv": "tv", "dppo_kl": "binary_kl"}


def dppo_loss(
    divergence: str,
    ratio: Tensor,
    logp: Tensor,
    old: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    ratio_cap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """verl's `dppo_tv` / `dppo_kl` (DPPO, arXiv:2602.04879): a truncated-IS policy gradient restricted
    to a trust region on the sampled token's probability. Returns (ℓ, ∂ℓ/∂lp, outside), [B, T] each.

    ℓ = −A·sg(min(ρ, ratio_cap))·lp·v, ∂ℓ/∂lp = −A·sg(min(ρ, ratio_cap))·v, with v the (detached)
    trust mask chosen by the sign of A, p = e^lp, q = e^old:
    tv: A > 0: p − q ≤ clip_high; A ≤ 0: p − q ≥ −clip_low.
    binary_kl: D = q(old − lp) + (1 − q)·log((1 − q + 1e-8)/(1 − p + 1e-8)); A > 0: D ≤ clip_high or
    p ≤ q; A ≤ 0: D ≤ clip_low or p ≥ q. ratio: the token ratio (verl: log-ratio clamped to ±20);
    ratio_cap None: no truncation. outside: where v = 0.
    """
    weight = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
    prob, old_prob = logp.exp(), old.exp()
    if divergence == "tv":
        positive = (prob - old_prob) <= clip_high
        negative = (prob - old_prob) >= -clip_low
    elif divergence == "binary_kl":
        binary_kl = old_prob * (old - logp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        positive = (binary_kl <= clip_high) | (prob <= old_prob)
        negative = (binary_kl <= clip_low) | (prob >= old_prob)
    else:
        raise ValueError(f"unknown DPPO divergence {divergence!r}; valid: tv, binary_kl")
    inside = torch.where(advantages > 0, positive, negative)
    valid = inside.to(logp.dtype)
    scaled = -advantages * weight
    return scaled * logp * valid, scaled * valid, ~inside


def bypass_weights(logp: Tensor, old: Tensor, mask: Tensor, *, level: str | None, high: float,
                   low: float | None, lengths: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """bypass_mode's importance weights of the current policy against the rollout's (old = rollout):
    verl's compute_rollout_correction_weights on log r = lp − old, detached: the token ratio or the
    sequence's product exp(Σ_t log r), log clamped to ±20; truncated above at `high` (TIS) or, with a
    `low`, zeroed outside [low, high] (IcePop); 0 at masked positions. Returns (w, outside) [B, T], or
    (None, None) for level None (verl's rollout_is None: no weights)."""
    if level is None:
        return None, None
    return rollout_weights(logp, old, mask, level=level, mode="truncate" if low is None else "mask", low=low,
                           high=high, log_clamp=BYPASS_LOG_CLAMP, lengths=lengths)


def policy_term(p: Mapping[str, Any], ratio: Ratio, logp: Tensor, old: Tensor, advantages: Tensor, mask: Tensor,
                lengths: Tensor | None = None) -> PolicyTerm:
    """The per-token loss and gradient of policy mode p["mode"] with its resolved parameters `p`
    (loss_specs.POLICY_MODE_PARAMS), `ratio` from `policy_ratio`; logp, old, advantages [B, T] (0 at
    masked positions), mask [B, T] bool, lengths [B] valid tokens per row if known."""
    mode = p["mode"]
    if mode in ("ppo_clip", "gspo", "cispo", "reinforce"):
        loss, grad, spread = policy_loss(mode, ratio, logp, advantages, clip_low=p["clip_low"],
                                         clip_high=p["clip_high"], dual_clip=p["dual_clip"], ratio_cap=p["ratio_cap"],
                                         cispo_cap=p["cispo_cap"])
        return PolicyTerm(loss, grad, spread)
    if mode == "dro":
        return PolicyTerm(*dro_loss(logp, old, advantages, p["dro_beta"]))
    if mode == "sapo":
        return PolicyTerm(*sapo_loss(ratio, advantages, p["tau_pos"], p["tau_neg"]))
    if mode == "gpg":
        return PolicyTerm(*gpg_loss(logp, advantages))
    if mode == "clip_cov":
        loss, grad, selected = clip_cov_loss(
            ratio.value, ratio.grad, logp, advantages, mask, clip_low=p["clip_low"], clip_high=p["clip_high"],
            cov_ratio=p["clip_cov_ratio"], cov_low=p["clip_cov_lb"], cov_high=p["clip_cov_ub"], seed=p["clip_cov_seed"])
        return PolicyTerm(loss, grad, dropped=selected)
    if mode == "kl_cov":
        loss, grad, selected = kl_cov_loss(ratio.value, ratio.grad, logp, old, advantages, mask,
                                           cov_ratio=p["kl_cov_ratio"], coef=p["kl_cov_coef"])
        return PolicyTerm(loss, grad, dropped=selected)
    if mode == "geo_mean":
        loss, grad, through, clipped = geo_mean_loss(logp, old, advantages, mask, clip_low=p["clip_low"],
                                                     clip_high=p["clip_high"], ratio_clamp=p["ratio_clamp"],
                                                     lengths=lengths)
        return PolicyTerm(loss, grad, through=through, dropped=clipped)
    if mode in DPPO_DIVERGENCES:
        loss, grad, outside = dppo_loss(DPPO_DIVERGENCES[mode], ratio.value, logp, old, advantages,
                                        clip_low=p["clip_low"], clip_high=p["clip_high"], ratio_cap=p["ratio_cap"])
        return PolicyTerm(loss, grad, dropped=outside & mask)
    if mode == "bypass_mode":
        weights, outside = bypass_weights(logp, old, mask, level=p["bypass_is"], high=p["bypass_is_high"],
                                          low=p["bypass_is_low"], lengths=lengths)
        if p["bypass_loss"] == "ppo_clip":  # the ratio to the rollout policy is the correction: weights unused
            loss, grad = clipped_surrogate(ratio.value, ratio.grad, advantages, p["clip_low"], p["clip_high"],
                                           p["dual_clip"])
        elif weights is None:
            loss, grad = gpg_loss(logp, advantages)
        else:  # verl's compute_policy_loss_reinforce: −A·lp·sg(w)
            loss, grad = -advantages * logp * weights, -advantages * weights
        return PolicyTerm(loss, grad, is_weights=weights, is_outside=outside)
    raise ValueError(f"unknown policy loss mode {mode!r}; valid: {', '.join(POLICY_LOSS_MODES)}")


KL_IS_WEIGHT_CAP = 10.0  # OpenRLHF's KL_IS_WEIGHT_CLIP: bound on w of the unbiased KL gradient


def kl_loss(
    logp: Tensor,
    ref: Tensor,
    estimator: str,
    clamp: float | None,
    *,
    old: Tensor | None = None,
    unbiased_gradient: bool = False,
    ratio: Ratio | None = None,
    gradient_estimator: str | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token KL loss ℓ [B, T] of logp vs ref with its gradient: (ℓ, g, g_spread).

    ℓ = kl_t (`functional.kl`, with `clamp`); g = ∂ℓ_t/∂lp_t. Variants:
    * `gradient_estimator` (straight-through, verl's "k3+" = k3 with gradient_estimator "k2"): the
      value stays, the gradient is that of `gradient_estimator`'s estimate, unclamped (verl's
      backward_score − sg(backward_score) + sg(forward_score)).
    * `unbiased_gradient` (OpenRLHF `algo.kl.unbiased_gradient`): the value stays, the gradient is
      w (lp − ref) with w = sg(min(e^{lp − old}, 10)) for every estimator, no clamp on it.
    * `ratio` (TRL `use_bias_correction_kl`): ℓ = kl_t · ρ_t with the policy's ratio, differentiable:
      g = ρ ∂kl + kl ∂ρ; when the ratio spreads (a sequence ratio through the mean) the kl ∂ρ part is
      returned as g_spread, to be weighted and passed to `spread_over_row` by the caller.
    """
    value, grad = kl_and_grad(logp, ref, estimator, clamp)
    if gradient_estimator is not None:
        grad = kl_and_grad(logp, ref, gradient_estimator, None)[1]
    if unbiased_gradient:
        grad = (logp - old).exp().clamp(max=KL_IS_WEIGHT_CAP) * (logp - ref)
    if ratio is None:
        return value, grad, None
    through_ratio = value * ratio.grad
    grad = grad * ratio.value
    if ratio.spread:
        return value * ratio.value, grad, through_ratio
    return value * ratio.value, grad + through_ratio, None


VALUE_CLIP_FORMS = ("bounds", "delta")


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None,
               clip_ties: str = "pass", clip_form: str = "bounds") -> tuple[Tensor, Tensor, Tensor | None]:
    """½ max((v − G)², (v_c − G)²) per token, its gradient in v, and where the clipped branch is the
    larger (the clip fraction's numerator; None without a clip), all [B, T].

    `clip` None: ½ (v − G)². `clip_form`, how the clipped value v_c is computed: "bounds"
    clip(v, v_old − c, v_old + c) (verl, TRL); "delta" v_old + clip(v − v_old, −c, c) (OpenRLHF), whose
    rounding differs: v − v_old may exceed c by an ulp where v_c still equals v, a tie of the outer
    max that torch.max splits while the clamp passes no gradient (OpenRLHF's dL/dv is then half of
    v − G). `clip_ties`: the gradient the clip passes where v (bounds) or v − v_old (delta) sits exactly
    on a bound: "pass" all of it (torch.clamp), "split" half at each tied min/max, as verl's
    max(min(v, v_old + c), v_old − c) under autograd (with the tied outer max: ¾ (v − G) there).
    """
    unclipped = (values - returns).square()
    d_unclipped = values - returns
    if clip is None:
        return 0.5 * unclipped, d_unclipped, None
    if clip_form == "delta":
        x, low, high = values - old_values, torch.full_like(values, -clip), torch.full_like(values, clip)
    elif clip_form == "bounds":
        x, low, high = values, old_values - clip, old_values + clip
    else:
        raise ValueError(f"unknown value clip form {clip_form!r}; valid: {', '.join(VALUE_CLIP_FORMS)}")
    capped = torch.minimum(x, high)
    clipped_x = torch.maximum(capped, low)
    if clip_ties == "split":
        passes = _tie_split(x, high, below=True) * _tie_split(capped, low, below=False)
    else:
        passes = ((x >= low) & (x <= high)).to(values.dtype)
    clipped_v = old_values + clipped_x if clip_form == "delta" else clipped_x
    clipped = (clipped_v - returns).square()
    d_clipped = (clipped_v - returns) * passes
    loss = 0.5 * torch.maximum(unclipped, clipped)
    return loss, _maximum_grad(unclipped, clipped, d_unclipped, d_clipped), clipped > unclipped
