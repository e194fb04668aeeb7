"""The estimator catalog: one entry per advantage estimator, mapping a validated batch and resolved
parameters to (advantages, returns). Formulas live in `functional/`; presets (defaults) in
`presets.py`. Adding an estimator = one function here + one `Estimator` entry + its preset defaults.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .functional.groups import (STD_SCOPES, Groups, batch_score_std, centered_scores, group_normalized_advantages,
                                group_std, leave_one_out_advantages)
from .functional.kl import KL_ESTIMATORS, kl_and_grad
from .functional.masks import WHITEN_EPS_MODES, Whitening, place_on_last_token, whiten, whitening_statistics
from .functional.scan import MASK_GAPS, gae, reward_to_go
from .params import ParamSpec, neutral

MASKED_TOKEN_REWARDS = ("ignore", "sum")


@dataclass
class AdvantageInputs:
    """A validated batch on the compute device. [B, T] tensors are 0 at masked positions.

    mask [B, T] bool and `valid`, the same as 0/1 in the compute dtype (multiplying by it is the
    fast way to zero masked positions); scores [B] = R (the outcome reward, or Σ_t token_rewards, or
    Σ_k reward_components [B, K] when those replace the rewards); lengths [B] valid
    tokens per row (compute dtype); token_rewards [B, T] is built on first use (an outcome reward
    sits on the row's last valid token), so outcome-only estimators never materialize it.
    `unmasked_token_rewards` [B, T]: the token rewards as given, masked positions included; set only
    under params.masked_token_rewards = 'sum' (verl sums them into R), and then R = Σ over all T.
    `statistics`: the batch-wide statistics of the estimator (`Estimator.statistics`) of a larger batch
    that this one is a shard of (advserve.ray.sharding), used instead of this batch's own; None: its own.
    `scan`: (advantages, returns) [B, T] of the estimator's `Estimator.scan` over these rewards (and
    values, log-probs), whitened as its ScanSpec says: the estimator's result, when a kernel computed
    it while validating the batch (`advserve.kernels.cpu`; the values and log-probs are then not given
    here); None: the estimator computes it.
    """

    mask: Tensor
    valid: Tensor
    lengths: Tensor
    given_rewards: Tensor | None = None
    given_token_rewards: Tensor | None = None
    groups: Groups | None = None
    values: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    greedy_rewards: Tensor | None = None
    sum_pi_squared: Tensor | None = None
    rollout_is_weights: Tensor | None = None
    unmasked_token_rewards: Tensor | None = None
    reward_components: Tensor | None = None
    statistics: Mapping[str, Tensor] | None = None
    scan: tuple[Tensor, Tensor] | None = None

    @functools.cached_property
    def scores(self) -> Tensor:
        if self.given_rewards is not None:
            return self.given_rewards
        if self.unmasked_token_rewards is not None:
            return self.unmasked_token_rewards.sum(dim=1)
        if self.given_token_rewards is None:  # gdpo's reward_components: their sum, for the stats
            return self.reward_components.sum(dim=1)
        return self.given_token_rewards.sum(dim=1)

    @functools.cached_property
    def token_rewards(self) -> Tensor:
        if self.given_token_rewards is not None:
            return self.given_token_rewards
        return place_on_last_token(self.scores, self.mask)


Params = Mapping[str, Any]
EstimatorFn = Callable[[AdvantageInputs, Params], tuple[Tensor, Tensor]]
StatisticsFn = Callable[[AdvantageInputs, Params], dict[str, Tensor]]

PARAMS: dict[str, ParamSpec] = {
    spec.name: spec
    for spec in (
        ParamSpec("gamma", float, "discount γ", minimum=0.0, maximum=1.0),
        ParamSpec("lam", float, "GAE λ", minimum=0.0, maximum=1.0),
        ParamSpec("kl_coef", float, "β of the KL penalty (needs old_logprobs and ref_logprobs when > 0)", minimum=0.0),
        ParamSpec("kl_estimator", str, "KL estimator of old vs ref log-probs", choices=KL_ESTIMATORS),
        ParamSpec("kl_clamp", float, "clamp of the KL estimate to [−c, c] (k3: log-ratio to ±20 first); null: none",
                  nullable=True, minimum=0.0, exclusive_minimum=True),
        ParamSpec("kl_placement", str, "where β·KL enters the advantage (see docs/semantics.md)",
                  choices=("token", "sequence", "reward_to_go")),
        ParamSpec("std_ddof", int, "delta degrees of freedom of the group std (0 population, 1 unbiased)",
                  choices=(0, 1)),
        ParamSpec("std_eps", float, "ε added to the group std", minimum=0.0),
        ParamSpec("singleton_groups", str, "size-1 groups: 'zero' advantage, 'raw' (mean 0, std 1), or 'error'",
                  choices=("zero", "raw", "error")),
        ParamSpec("std_scope", str, "where the GRPO std is taken: the 'group' or the whole 'batch' (TRL "
                  "scale_rewards='batch'); the mean is always the group's", choices=STD_SCOPES),
        ParamSpec("whiten", bool, "whiten advantages over all valid tokens of the batch"),
        ParamSpec("whiten_std", bool, "divide by the std when whitening; false: only subtract the mean "
                  "(OpenRLHF no_std_norm)"),
        ParamSpec("whiten_ddof", int, "delta degrees of freedom of the whitening variance", choices=(0, 1)),
        ParamSpec("whiten_eps", float, "ε of the whitening scale (where: whiten_eps_mode)", minimum=0.0),
        ParamSpec("whiten_eps_mode", str, "whitening scale: 'inside' sqrt(var + ε), 'floor' sqrt(max(var, ε)) "
                  "(OpenRLHF), 'outside' std + ε (TRL)", choices=WHITEN_EPS_MODES),
        ParamSpec("whiten_scope", str, "whiten over the batch's valid 'token's, or over its B 'sequence' "
                  "advantages (TRL RLOO normalize_advantages)", choices=("token", "sequence")),
        ParamSpec("returns_whitened", bool, "returns = the whitened advantages (true), or the advantages before "
                  "whitening (false, OpenRLHF)"),
        neutral("reward_clip_low", float, "lower bound of the outcome reward after its baseline (OpenRLHF "
                "--reward.clip_range); null: none", None, nullable=True),
        neutral("reward_clip_high", float, "upper bound of the outcome reward after its baseline; null: none",
                None, nullable=True),
        neutral("masked_token_rewards", str, "token_rewards on masked positions: 'ignore' them, or 'sum' them into "
                "the outcome score R = Σ over all T positions (verl's outcome estimators)", "ignore",
                choices=MASKED_TOKEN_REWARDS),
        ParamSpec("scale_by_std", bool, "divide by the group std + std_eps (verl norm_adv_by_std_in_grpo)"),
        ParamSpec("handle_zero_tail", bool, "optimal token baseline: the part of a group's single longest "
                  "response beyond the second longest gets baseline 0 (verl handle_zero_tail)"),
        ParamSpec("reward_weights", list, "gdpo: weight w_k of each reward component's normalized advantage "
                  "(verl gdpo_reward_weights; rounded to float32 as verl does); null: all 1", nullable=True),
        ParamSpec("baseline_eps", float, "ε added to the optimal token baseline's denominator Σ W_t", minimum=0.0),
        neutral("mask_gaps", str, "zeros inside a row's mask: 'skip' (the recursion carries across them) or "
                "'step' (zero-valued steps that still discount, OpenRLHF)", "skip", choices=MASK_GAPS),
    )
}

KL_PARAMS = ("kl_coef", "kl_estimator", "kl_clamp")
WHITEN_PARAMS = ("whiten", "whiten_std", "whiten_ddof", "whiten_eps", "whiten_eps_mode")
GROUP_STD_PARAMS = ("std_ddof", "std_eps", "std_scope", "singleton_groups")
REWARD_CLIP_PARAMS = ("reward_clip_low", "reward_clip_high")
MASKED = ("masked_token_rewards",)


@dataclass(frozen=True)
class ScanSpec:
    """The scan an estimator's advantages start from: GAE with γ and λ over the values, or without them
    the reward-to-go with γ; `gaps` the mask_gaps convention; over the rewards clipped to `clip` (low,
    high; None: no bound) minus kl_coef·kl(old_logprobs, ref_logprobs) (`kl_estimator`, `kl_clamp`);
    the advantages then whitened over the batch's tokens in the form `whiten` (None: not whitened),
    the returns not. The estimator's (advantages, returns) are then the scan's."""

    gamma: float
    lam: float
    gaps: str
    values: bool
    clip: tuple[float | None, float | None] = (None, None)
    kl_coef: float = 0.0
    kl_estimator: str = "k1"
    kl_clamp: float | None = None
    whiten: Whitening | None = None


@dataclass(frozen=True)
class Estimator:
    """A catalog entry. `requires`: tensors always needed besides response_mask and the rewards;
    `optional`: tensors accepted (KL inputs, needed when kl_coef > 0); `batch_baseline`: the
    baseline is a statistic of the whole batch; `exact_rows`: with kl_coef = 0 and outcome rewards
    [B], a row's advantage is computed from its own reward and length and its group's sums only, by
    operations whose every element rounds the same wherever the row sits (see `coalescible`);
    `statistics`: the batch-wide statistics its rows depend on besides token whitening (a batch std
    or mean, sequence whitening), as 0-d or [K] tensors by name ({} when the parameters need none):
    a shard of the batch computed with the whole batch's (`AdvantageInputs.statistics`) gets its rows
    of the whole batch's result. `scan`: the scan (a ScanSpec of the parameters) over the batch's
    rewards, shaped (clip, KL), and values that the advantages start from, which a kernel may compute
    while validating the batch and hand over in `AdvantageInputs.scan`; None: the estimator has none."""

    name: str
    fn: EstimatorFn
    params: tuple[str, ...]
    summary: str
    formula: str
    reference: str
    requires: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    batch_baseline: bool = False
    exact_rows: bool = False
    statistics: StatisticsFn | None = None
    scan: Callable[[Params], ScanSpec] | None = None

    @property
    def uses_groups(self) -> bool:
        return "group_ids" in self.requires

    def uses_whole_batch(self, params: Params) -> bool:
        """A row's result depends on rows outside its group (whitening, a batch std or a batch mean),
        so the request cannot share a device batch with another."""
        return self.whitens_tokens(params) or self.has_batch_statistics(params)

    @staticmethod
    def whitens_tokens(params: Params) -> bool:
        """The advantages are whitened over the batch's valid tokens, last."""
        return bool(params.get("whiten")) and params.get("whiten_scope", "token") == "token"

    def has_batch_statistics(self, params: Params) -> bool:
        """A statistic of the whole batch other than token whitening enters the rows: a batch baseline,
        GRPO's batch std or the whitening of one value per sequence."""
        return (self.batch_baseline or params.get("std_scope") == "batch"
                or (bool(params.get("whiten")) and params.get("whiten_scope") == "sequence"))

    def coalescible(self, params: Params) -> bool:
        """True when a request's rows computed in one device batch with other requests' rows give the
        same bits as computed alone (the caller also requires outcome rewards [B]): `exact_rows`, no
        KL term and nothing batch-wide. Why each part holds:

        * + − × ÷ √, comparisons, clamps and where are exactly rounded, the same in vector and scalar
          code at any offset; a group's sums (index_add_ on the CPU) add its members in row order,
          and other requests' rows are in other groups;
        * R placed on the last valid token and summed over the row (reinforce, rloo) adds R to
          zeros: exactly R (+0 for ±0) in any order and at any width;
        * excluded: exp (the KL estimators, k3) rounds differently in vector and scalar code, i.e.
          by offset; the scans' matrix products differ with the number of rows (a single row of 16
          tokens takes another BLAS path: 1 ulp); whitening and batch means or stds use every row.
        """
        return self.exact_rows and params.get("kl_coef", 0) == 0 and not self.uses_whole_batch(params)

    def param_specs(self) -> dict[str, ParamSpec]:
        specs = {name: PARAMS[name] for name in self.params}
        for name, choices in self.choices.items():
            specs[name] = dataclasses.replace(specs[name], choices=choices)
        return specs


# --- shared pieces -----------------------------------------------------------------------------


def _token_kl(x: AdvantageInputs, p: Params) -> Tensor | None:
    """β·kl_t [B, T] of the behaviour policy against the reference (0 at masked positions); None if β = 0."""
    if p["kl_coef"] == 0:
        return None
    kl, _ = kl_and_grad(x.old_logprobs, x.ref_logprobs, p["kl_estimator"], p["kl_clamp"])
    return (p["kl_coef"] * kl).mul_(x.valid)  # inputs are 0 on masked positions, so kl is finite there


def _shaped_rewards(x: AdvantageInputs, p: Params, token_rewards: Tensor | None = None) -> Tensor:
    """r̃_t = r_t − β kl_t [B, T]; r: `token_rewards`, by default the batch's."""
    rewards = x.token_rewards if token_rewards is None else token_rewards
    penalty = _token_kl(x, p)
    return rewards if penalty is None else rewards - penalty


def _shaped_scores(x: AdvantageInputs, p: Params) -> Tensor:
    """R̃ = Σ_t (r_t − β kl_t) [B]: over every position when masked token rewards count (verl sums
    token_level_rewards over all T), else over the valid ones."""
    return _shaped_rewards(x, p, x.unmasked_token_rewards).sum(dim=1)


def _outcome_scores(x: AdvantageInputs, p: Params) -> Tensor:
    """R [B], minus β Σ_t kl_t when kl_coef > 0 (verl's KL in the reward, summed with the rewards)."""
    return x.scores if p.get("kl_coef", 0) == 0 else _shaped_scores(x, p)


def _reward_clip(p: Params) -> tuple[float | None, float | None] | None:
    """(low, high) of the reward clip, or None when the estimator has none or both bounds are null."""
    low, high = p.get("reward_clip_low"), p.get("reward_clip_high")
    return None if low is None and high is None else (low, high)


def _clip(outcome: Tensor, p: Params) -> Tensor:
    """The outcome advantage [B] (after its baseline) clamped to [reward_clip_low, reward_clip_high]."""
    bounds = _reward_clip(p)
    return outcome if bounds is None else outcome.clamp(*bounds)


def _clipped_token_rewards(x: AdvantageInputs, p: Params) -> Tensor:
    """r_t [B, T] with the reward clip: on the outcome score R before it is placed on the last token
    (`rewards`), or on every valid token's reward (`token_rewards`)."""
    bounds = _reward_clip(p)
    if bounds is None:
        return x.token_rewards
    if x.given_rewards is not None:
        return place_on_last_token(x.scores.clamp(*bounds), x.mask)
    return x.given_token_rewards.clamp(*bounds).mul_(x.valid)


def _minus_kl_to_go(adv: Tensor, x: AdvantageInputs, p: Params) -> Tensor:
    """adv [B, T] − β Σ_{t' ≥ t} kl_t' (KL placed as reward-to-go, γ = 1: gaps add nothing either way)."""
    penalty = _token_kl(x, p)
    return adv if penalty is None else adv - reward_to_go(penalty, x.mask, 1.0, "step")


def _broadcast(per_sequence: Tensor, valid: Tensor) -> Tensor:
    """[B] -> [B, T], 0 at masked positions (`valid`: the 0/1 mask in the compute dtype)."""
    return per_sequence.unsqueeze(1) * valid


def _whitening(p: Params) -> Whitening:
    return Whitening(p["whiten_ddof"], p["whiten_eps"], p["whiten_eps_mode"], p["whiten_std"])


def _whiten(adv: Tensor, valid: Tensor, p: Params, statistics: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
    return whiten(adv, valid, **vars(_whitening(p)), statistics=statistics)


def _maybe_whiten(adv: Tensor, x: AdvantageInputs, p: Params) -> Tensor:
    return _whiten(adv, x.valid, p) if p["whiten"] else adv


def _group_mean_baseline(scores: Tensor, x: AdvantageInputs, p: Params) -> Tensor:
    """mean_g(scores) per row [B]; a size-1 group has mean 0 under singleton_groups='raw' (verl)."""
    groups = x.groups
    # an all-equal group's mean is its common value exactly (no rounding to amplify later)
    mean = torch.where(groups.is_constant(scores)[groups.index], scores, groups.mean(scores)[groups.index])
    if p["singleton_groups"] == "raw":
        mean = torch.where(groups.sizes[groups.index] == 1, 0, mean)
    return mean


# --- estimators --------------------------------------------------------------------------------


def reinforce(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A_t = R − β Σ_{all t'} kl_t' (whole trajectory)."""
    adv = _broadcast(_shaped_rewards(x, p).sum(dim=1), x.valid)
    return adv, adv


def _shaping(p: Params) -> dict[str, Any]:
    """A ScanSpec's reward shaping from the parameters: the reward clip (if the estimator has one) and
    the KL penalty."""
    return {"clip": (p.get("reward_clip_low"), p.get("reward_clip_high")), "kl_coef": p["kl_coef"],
            "kl_estimator": p["kl_estimator"], "kl_clamp": p["kl_clamp"]}


def _scan_whitening(p: Params) -> Whitening | None:
    return _whitening(p) if p.get("whiten") else None


def reward_to_go_scan(p: Params) -> ScanSpec:
    return ScanSpec(p["gamma"], 1.0, p["mask_gaps"], values=False, **_shaping(p), whiten=_scan_whitening(p))


def gae_scan(p: Params) -> ScanSpec:
    return ScanSpec(p["gamma"], p["lam"], p["mask_gaps"], values=True, **_shaping(p), whiten=_scan_whitening(p))


def orz_scan(p: Params) -> ScanSpec:
    return ScanSpec(1.0, 1.0, "skip", values=True, whiten=_scan_whitening(p))


def reinforce_rtg(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A_t = Σ_{t' ≥ t} γ^(t'−t) (r_t' − β kl_t') (REINFORCE with the KL trick)."""
    if x.scan is not None:
        return x.scan
    adv = reward_to_go(_shaped_rewards(x, p), x.mask, p["gamma"], p["mask_gaps"])
    return adv, adv


def reinforce_pp(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A = whiten(reward-to-go of clip(r) − β kl) over the batch; returns = the reward-to-go."""
    if x.scan is not None:
        return x.scan
    returns = reward_to_go(_shaped_rewards(x, p, _clipped_token_rewards(x, p)), x.mask, p["gamma"], p["mask_gaps"])
    return _maybe_whiten(returns, x, p), returns


def reinforce_pp_baseline(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A = whiten(clip(G_t − mean_g R) − β Σ_{t'≥t} kl_t') ('reward_to_go') or whiten(clip(R̃ − mean_g R̃))
    broadcast ('sequence'); returns = A, or the advantage before whitening (`returns_whitened` false)."""
    if p["kl_placement"] == "sequence":
        total = _shaped_scores(x, p)
        adv = _broadcast(_clip(total - _group_mean_baseline(total, x, p), p), x.valid)
    elif _reward_clip(p) is None:
        baseline = _group_mean_baseline(x.scores, x, p)
        adv = (reward_to_go(_shaped_rewards(x, p), x.mask, 1.0) - baseline.unsqueeze(1)).mul_(x.valid)
    else:  # the clip acts on the outcome part only, before the KL reward-to-go (OpenRLHF's compute_reward)
        baseline = _group_mean_baseline(x.scores, x, p)
        if x.given_rewards is not None:  # R sits on the last valid token: its reward-to-go is R on every token
            outcome = _broadcast((x.scores - baseline).clamp(*_reward_clip(p)), x.valid)
        else:
            outcome = (reward_to_go(x.token_rewards, x.mask, 1.0) - baseline.unsqueeze(1)).clamp(*_reward_clip(p))
            outcome.mul_(x.valid)
        adv = _minus_kl_to_go(outcome, x, p)
    whitened = _maybe_whiten(adv, x, p)
    return whitened, (whitened if p["returns_whitened"] else adv)


def _rloo_sequence_advantages(x: AdvantageInputs, p: Params) -> Tensor:
    """RLOO's clip(R̃_i − mean_{l≠i} R̃_l) [B], before any whitening."""
    scores = _shaped_scores(x, p) if p["kl_placement"] == "sequence" else x.scores
    return _clip(leave_one_out_advantages(scores, x.groups, singleton_groups=p["singleton_groups"]), p)


def _sequence_whitening_statistics(per_seq: Tensor, p: Params) -> dict[str, Tensor]:
    """{"sequence_mean": μ, "sequence_scale": d (with whiten_std)} of the whitening of per_seq [B]."""
    mean, scale = whitening_statistics(per_seq, torch.ones_like(per_seq), ddof=p["whiten_ddof"], eps=p["whiten_eps"],
                                       eps_mode=p["whiten_eps_mode"], use_std=p["whiten_std"])
    return {"sequence_mean": mean} | ({} if scale is None else {"sequence_scale": scale})


def rloo_statistics(x: AdvantageInputs, p: Params) -> dict[str, Tensor]:
    """RLOO's batch-wide statistics: the whitening of its B sequence values (whiten_scope 'sequence')."""
    if not (p["whiten"] and p["whiten_scope"] == "sequence"):
        return {}
    return _sequence_whitening_statistics(_rloo_sequence_advantages(x, p), p)


def rloo(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A = clip(R̃_i − mean_{l≠i} R̃_l) with R̃ = R − β Σ_t kl_t ('sequence'), or
    clip(R_i − mean_{l≠i} R_l) − β Σ_{t'≥t} kl_t' ('reward_to_go'); then optionally whitened over
    the batch's tokens or its B sequence values."""
    placement = p["kl_placement"]
    per_seq = _rloo_sequence_advantages(x, p)
    if p["whiten"] and p["whiten_scope"] == "sequence":
        given = x.statistics
        statistics = None if given is None else (given["sequence_mean"], given.get("sequence_scale"))
        per_seq = _whiten(per_seq, torch.ones_like(per_seq), p, statistics)
    adv = _broadcast(per_seq, x.valid)
    if placement == "reward_to_go":
        adv = _minus_kl_to_go(adv, x, p)
    if p["whiten"] and p["whiten_scope"] == "token":
        adv = _whiten(adv, x.valid, p)
    return adv, adv


def flash_reinforce_statistics(x: AdvantageInputs, p: Params) -> dict[str, Tensor]:
    """FlashREINFORCE's baseline: the batch's mean score, and its largest and smallest (equal: no signal)."""
    scores = x.scores
    return {"score_mean": scores.mean(), "score_max": scores.amax(), "score_min": scores.amin()}


def flash_reinforce(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A_t = clip(R_i − mean_batch R) − β Σ_{t'≥t} kl_t' (OpenRLHF's FlashREINFORCE: the mean score of
    the whole batch as baseline, no groups, no whitening). An all-equal batch gives exactly 0."""
    scores = x.scores
    batch = flash_reinforce_statistics(x, p) if x.statistics is None else x.statistics
    centered = torch.where(batch["score_max"] == batch["score_min"], 0, scores - batch["score_mean"])
    adv = _minus_kl_to_go(_broadcast(_clip(centered, p), x.valid), x, p)
    return adv, adv


def remax(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A_t = Σ_{t' ≥ t} (r_t' − β kl_t') − r(x, ŷ_greedy); returns = the reward-to-go."""
    returns = reward_to_go(_shaped_rewards(x, p), x.mask, 1.0)
    return (returns - x.greedy_rewards.unsqueeze(1)).mul_(x.valid), returns


def gae_estimator(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """GAE with δ_t = clip(r_t) − β kl_t + γ V_{t+1} − V_t; returns = A + V (before whitening)."""
    if x.scan is not None:
        return x.scan
    adv, returns = gae(_shaped_rewards(x, p, _clipped_token_rewards(x, p)), x.values, x.mask, p["gamma"], p["lam"],
                       p["mask_gaps"])
    return _maybe_whiten(adv, x, p), returns


def orz(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """GAE with γ = λ = 1 and no KL: A_t = R − V_t."""
    if x.scan is not None:
        return x.scan
    adv, returns = gae(x.token_rewards, x.values, x.mask, 1.0, 1.0)
    return _maybe_whiten(adv, x, p), returns


def _grpo_scores(x: AdvantageInputs, p: Params) -> Tensor:
    """The scores [B] GRPO's group statistics are taken over: R, or R − β Σ_t kl_t ('sequence')."""
    penalty = _token_kl(x, p) if p.get("kl_placement", "sequence") == "sequence" else None
    return x.scores if penalty is None else x.scores - penalty.sum(dim=1)


def grpo_statistics(x: AdvantageInputs, p: Params) -> dict[str, Tensor]:
    """GRPO's batch-wide statistics: with std_scope 'batch', the std of all B scores ("score_std")."""
    if p.get("std_scope") != "batch":
        return {}
    return {"score_std": batch_score_std(_grpo_scores(x, p), p["std_ddof"])}


def _grpo_family(x: AdvantageInputs, p: Params, *, scale_by_std: bool) -> Tensor:
    """Group-normalized advantage [B, T], clipped, with the KL term of `kl_placement` (before length
    factors): 'sequence' R − β Σ_t kl_t before the statistics, 'token' GRPO's per-token term,
    'reward_to_go' − β Σ_{t'≥t} kl_t' after them (OpenRLHF)."""
    placement = p.get("kl_placement", "sequence")
    scores = _grpo_scores(x, p)
    per_seq = group_normalized_advantages(
        scores, x.groups, scale_by_std=scale_by_std, std_ddof=p.get("std_ddof", 0), std_eps=p.get("std_eps", 0.0),
        singleton_groups=p["singleton_groups"], std_scope=p.get("std_scope", "group"),
        batch_std=None if x.statistics is None else x.statistics.get("score_std"),
    )
    adv = _broadcast(_clip(per_seq, p), x.valid)
    if placement == "token" and p["kl_coef"] != 0:
        # −β ∂kl/∂logπ at the behaviour policy: β(π_ref/π_old − 1) for k3, the seed's GRPO column
        _, grad = kl_and_grad(x.old_logprobs, x.ref_logprobs, p["kl_estimator"], p["kl_clamp"])
        adv = adv - (p["kl_coef"] * grad).mul_(x.valid)
    elif placement == "reward_to_go":
        adv = _minus_kl_to_go(adv, x, p)
    return adv


def grpo(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A = (R − mean_g R)/(std_g R + ε) (+ KL term)."""
    adv = _grpo_family(x, p, scale_by_std=True)
    return adv, adv


def grpo_original(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A = [(R − mean_g R)/(std_g R + ε) + KL term] / L_i (1/|o| length normalization)."""
    adv = _grpo_family(x, p, scale_by_std=True) / x.lengths.clamp_min(1).unsqueeze(1)
    return adv, adv


def dapo(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A = (R − mean_g R)/(std_g R + ε) / mean_g(L) (token-mean over the group's tokens)."""
    mean_length = x.groups.mean(x.lengths)[x.groups.index]
    adv = _grpo_family(x, p, scale_by_std=True) / mean_length.clamp_min(1).unsqueeze(1)
    return adv, adv


def dr_grpo(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """A = R − mean_g R (Dr.GRPO: no std, no length normalization)."""
    adv = _grpo_family(x, p, scale_by_std=False)
    return adv, adv


# --- verl 0.9.1's other estimators ---------------------------------------------------------------


def grpo_passk(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """Pass@k: only a group's best response gets an advantage, (R_max − R_second)/(std_g R + ε)
    (`scale_by_std`; else R_max − R_second); every other response 0. A tie for the best gives 0 to all
    (R_max − R_second = 0, whichever of them verl's topk picks). Groups need 2 responses or more."""
    groups, scores = x.groups, _outcome_scores(x, p)
    top = scores.new_full((groups.count,), -torch.inf).scatter_reduce_(0, groups.index, scores, "amax")
    is_top = scores == top[groups.index]
    n_top = groups.sum(is_top.to(scores.dtype))
    second = scores.new_full((groups.count,), -torch.inf).scatter_reduce_(
        0, groups.index, torch.where(is_top, -torch.inf, scores), "amax")
    gap = torch.where(n_top == 1, top - second, 0)  # a tie for the best: no unique winner, 0
    if p["scale_by_std"]:
        centered, _ = centered_scores(scores, groups)
        gap = gap / (group_std(centered, groups, p["std_ddof"]) + p["std_eps"])
    winner = is_top & (n_top == 1)[groups.index] & (groups.sizes[groups.index] > 1)  # size 1: 'zero'
    per_seq = torch.where(winner, gap[groups.index], 0)
    adv = _broadcast(per_seq, x.valid)
    return adv, adv


def opo(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """OPO: A = R_i − b_g, b_g = Σ_j L_j R_j / Σ_j L_j, the length-weighted group mean (L: valid
    tokens). Size-1 groups by `singleton_groups` ('raw': b = 0, A = R, verl; 'zero': the formula, A = 0).
    A group whose responses are all empty has no valid token to carry an advantage: 0."""
    groups, scores, lengths = x.groups, _outcome_scores(x, p), x.lengths
    total = groups.sum(lengths)
    baseline = groups.sum(lengths * scores) / torch.where(total > 0, total, 1)
    per_seq = torch.where(groups.is_constant(scores)[groups.index], 0, scores - baseline[groups.index])
    if p["singleton_groups"] == "raw":
        per_seq = torch.where(groups.sizes[groups.index] == 1, scores, per_seq)
    adv = _broadcast(per_seq, x.valid)
    return adv, adv


def _gpg_factor(scores: Tensor) -> Tensor:
    """α = B / max(#{i: R_i ≠ 0}, 1) over scores [B] -> 0-d, in float32 as verl, as the scores' dtype."""
    nonzero = (scores != 0).sum().clamp_min(1)
    alpha = torch.tensor(scores.shape[0], dtype=torch.float32, device=scores.device) / nonzero.to(torch.float32)
    return alpha.to(scores.dtype)


def gpg_statistics(x: AdvantageInputs, p: Params) -> dict[str, Tensor]:
    """GPG's batch-wide factor α ("alpha")."""
    return {"alpha": _gpg_factor(_outcome_scores(x, p))}


def gpg(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """GPG: A = α (R_i − mean_g R), α = B / max(#{i: R_i ≠ 0}, 1) over the whole batch (verl computes
    α in float32: B / m rounded there, as here); F_norm = 1 (verl's trainer passes no other). Size-1
    groups have mean 0 (verl) under singleton_groups 'raw', A = 0 under 'zero'."""
    scores = _outcome_scores(x, p)
    alpha = _gpg_factor(scores) if x.statistics is None else x.statistics["alpha"]
    centered = scores - _group_mean_baseline(scores, x, p)
    if p["singleton_groups"] == "zero":
        centered = torch.where(x.groups.sizes[x.groups.index] == 1, 0, centered)
    adv = _broadcast(alpha * centered, x.valid)
    return adv, adv


def _gdpo_columns(x: AdvantageInputs, p: Params) -> tuple[Tensor, ...]:
    """The reward components [B] each, or the one outcome score."""
    return x.reward_components.unbind(dim=1) if x.reward_components is not None else (_outcome_scores(x, p),)


def gdpo_statistics(x: AdvantageInputs, p: Params) -> dict[str, Tensor]:
    """GDPO's batch-wide statistics besides its token whitening: with std_scope 'batch', the std of all
    B values of each component ("component_std" [K])."""
    if p["std_scope"] != "batch":
        return {}
    return {"component_std": torch.stack([batch_score_std(c, p["std_ddof"]) for c in _gdpo_columns(x, p)])}


def gdpo(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """GDPO: each reward component r_k [B] (`reward_components` [B, K]; without it the one score R)
    normalized in its group on its own, A_k = (r_k − mean_g r_k)/(std_g r_k + ε) (`scale_by_std`; with
    std_scope 'batch' the std of r_k over the batch), summed with the weights w_k (`reward_weights`, float32-rounded as verl's torch.tensor(..., float32);
    null: 1), broadcast over the valid tokens and whitened over the batch's valid tokens
    (verl_F.masked_whiten: unbiased variance, rsqrt(var + 1e-8)). The loop is over the K components."""
    columns = _gdpo_columns(x, p)
    weights = p.get("reward_weights") or (1.0,) * len(columns)
    weights = torch.tensor(weights, dtype=torch.float32).tolist()  # verl's float32 weights, exactly
    given = None if x.statistics is None else x.statistics.get("component_std")
    per_seq = None
    for k, (weight, column) in enumerate(zip(weights, columns)):
        normalized = weight * group_normalized_advantages(
            column, x.groups, scale_by_std=p["scale_by_std"], std_ddof=p["std_ddof"], std_eps=p["std_eps"],
            singleton_groups=p["singleton_groups"], std_scope=p["std_scope"],
            batch_std=None if given is None else given[k])
        per_seq = normalized if per_seq is None else per_seq + normalized
    adv = _maybe_whiten(_broadcast(per_seq, x.valid), x, p)
    return adv, adv


def _token_baseline(x: AdvantageInputs, p: Params, *, compact: bool) -> tuple[Tensor, Tensor]:
    """The optimal token baseline (verl's OTB): returns G_t = Σ_{t'≥t} (r_t' − β kl_t') over valid tokens;
    w_t = (1 − 2 π_t + Σπ²_t) ρ_t² (π_t = exp(old_logprobs), ρ: rollout_is_weights when given, else 1),
    W_t = Σ_{j≤t} w_j over valid tokens; per group and position k, b_k = Σ_i G_ik W_ik / (Σ_i W_ik + ε)
    over the group's valid tokens at k, A_t = G_t − b_k(t). Position k: the column t (`compact` False),
    or the token's rank among its row's valid tokens (`compact` True: verl's multi-turn variant, which
    also leaves rows with no valid token out of their group). Groups of one get b = 0.
    `handle_zero_tail`: in a group whose longest response is unique, its positions k at or beyond the
    second longest length get b = 0; so does a (group, position) whose weights sum to 0 with ε = 0
    (where verl divides 0 by 0). One index_add_ over (group, position) pairs: no loop."""
    mask, valid, groups = x.mask, x.valid, x.groups
    rows, width = mask.shape
    returns = _shaped_rewards(x, p).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1]) * valid
    w = 1 - 2 * x.old_logprobs.exp() + x.sum_pi_squared
    if x.rollout_is_weights is not None:
        w = w * x.rollout_is_weights.square()
    w_cum = (w * valid).cumsum(dim=-1)
    lengths = x.lengths
    if compact:
        position = (mask.cumsum(dim=-1) - 1).clamp_min(0)
        member = lengths > 0
    else:
        position = torch.arange(width, device=mask.device).expand(rows, width)
        member = torch.ones_like(lengths, dtype=torch.bool)
    size = groups.sum(member.to(valid.dtype))[groups.index]  # [B] the row's group size (members only)
    cell = (groups.index.unsqueeze(1) * width + position).reshape(-1)  # [B·T] the (group, position) slot
    weighted = (w_cum * valid).reshape(-1)
    num = weighted.new_zeros(groups.count * width).index_add_(0, cell, (returns.reshape(-1) * weighted))
    den = weighted.new_zeros(groups.count * width).index_add_(0, cell, weighted)
    denominator = den + p["baseline_eps"]
    # a (group, position) with no weight and ε = 0: 0/0, no baseline (verl gives NaN there)
    baseline = torch.where(denominator != 0, num / denominator, 0)[cell].reshape(rows, width)
    keep = (size > 1).unsqueeze(1)
    if p["handle_zero_tail"]:
        length = torch.where(member, lengths, -1)
        longest = length.new_full((groups.count,), -1).scatter_reduce_(0, groups.index, length, "amax")
        is_longest = (length == longest[groups.index]) & member
        n_longest = groups.sum(is_longest.to(valid.dtype))
        second = length.new_full((groups.count,), -1).scatter_reduce_(
            0, groups.index, torch.where(is_longest, -1, length), "amax")
        unique = (is_longest & (n_longest == 1)[groups.index]).unsqueeze(1)
        keep = keep & ~(unique & (position >= second[groups.index].unsqueeze(1)))
    advantages = (returns - torch.where(keep, baseline, 0)) * valid
    return advantages, returns


def optimal_token_baseline(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """Optimal token baseline (verl 'optimal_token_baseline'): A_t = G_t − Σ_i G_it W_it / (Σ_i W_it + ε)
    per group and column t (see `_token_baseline`)."""
    return _token_baseline(x, p, compact=False)


def tir_optimal_token_baseline(x: AdvantageInputs, p: Params) -> tuple[Tensor, Tensor]:
    """The multi-turn optimal token baseline (verl 'tir_optimal_token_baseline'): the same statistics
    per group and k-th valid token of each response, interior mask gaps (tool observations) skipped."""
    return _token_baseline(x, p, compact=True)


KL_TENSORS = frozenset({"old_logprobs", "ref_logprobs"})
GROUPED = frozenset({"group_ids"})

ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("reinforce", reinforce, KL_PARAMS, "REINFORCE, KL over the whole trajectory",
                  "A_t = r − β Σ_{t'=0}^{T−1} log π_old/π_ref", "Williams 1992; seed eq. (7)",
                  optional=KL_TENSORS, exact_rows=True),
        Estimator("reinforce_rtg", reinforce_rtg, ("gamma", "mask_gaps", *KL_PARAMS),
                  "REINFORCE with the KL trick (reward-to-go KL)",
                  "A_t = r − β Σ_{t'=t}^{T−1} log π_old/π_ref", "seed eq. (9), Theorem 3", optional=KL_TENSORS,
                  scan=reward_to_go_scan),
        Estimator("reinforce_pp", reinforce_pp, ("gamma", "mask_gaps", *KL_PARAMS, *REWARD_CLIP_PARAMS, *WHITEN_PARAMS),
                  "REINFORCE++: reward-to-go KL, global batch normalization",
                  "A_t = whiten_batch(r − β Σ_{t'≥t} kl_t')", "arXiv:2501.03262", optional=KL_TENSORS,
                  scan=reward_to_go_scan),
        Estimator("reinforce_pp_baseline", reinforce_pp_baseline,
                  (*KL_PARAMS, "kl_placement", *REWARD_CLIP_PARAMS, "singleton_groups", *WHITEN_PARAMS,
                   "returns_whitened", *MASKED),
                  "REINFORCE++-baseline: group-mean baseline, then batch whitening",
                  "A_t = whiten_batch(r − β Σ_{t'≥t} kl_t' − mean_g r)", "arXiv:2501.03262",
                  requires=GROUPED, optional=KL_TENSORS, choices={"kl_placement": ("reward_to_go", "sequence")}),
        Estimator("rloo", rloo, (*KL_PARAMS, "kl_placement", *REWARD_CLIP_PARAMS, "singleton_groups", *WHITEN_PARAMS,
                                 "whiten_scope", *MASKED), "REINFORCE leave-one-out",
                  "A = R_ij − 1/(M−1) Σ_{l≠j} R_il, R = r − β Σ_t kl_t", "arXiv:2402.14740",
                  requires=GROUPED, optional=KL_TENSORS, choices={"kl_placement": ("sequence", "reward_to_go")},
                  exact_rows=True, statistics=rloo_statistics),
        Estimator("remax", remax, KL_PARAMS, "ReMax: greedy-decode reward as baseline",
                  "A_t = r − r(x, ŷ_greedy) − β Σ_{t'≥t} kl_t'", "arXiv:2310.10505",
                  requires=frozenset({"greedy_rewards"}), optional=KL_TENSORS),
        Estimator("gae", gae_estimator, ("gamma", "lam", "mask_gaps", *KL_PARAMS, *REWARD_CLIP_PARAMS, *WHITEN_PARAMS),
                  "PPO with GAE",
                  "A_t = Σ_{t'≥t} (γλ)^{t'−t} δ_t', δ_t = 1{t=T−1} r − β kl_t + γ V_{t+1} − V_t",
                  "arXiv:1506.02438; arXiv:1707.06347", requires=frozenset({"values"}), optional=KL_TENSORS,
                  scan=gae_scan),
        Estimator("orz", orz, WHITEN_PARAMS, "Open-Reasoner-Zero: PPO with γ = λ = 1, no KL",
                  "A_t = r − V_t", "arXiv:2503.24290", requires=frozenset({"values"}), scan=orz_scan),
        Estimator("grpo", grpo, (*KL_PARAMS, "kl_placement", *REWARD_CLIP_PARAMS, *GROUP_STD_PARAMS, *MASKED),
                  "GRPO (R1 version)",
                  "A = (r − mean(R_i))/std(R_i) + β(π_ref/π_old − 1)", "arXiv:2501.12948",
                  requires=GROUPED, optional=KL_TENSORS,
                  choices={"kl_placement": ("token", "sequence", "reward_to_go")}, exact_rows=True,
                  statistics=grpo_statistics),
        Estimator("grpo_original", grpo_original, (*KL_PARAMS, "kl_placement", *GROUP_STD_PARAMS),
                  "GRPO (original, 1/|o| length normalization)",
                  "A = 1/T_ij [(r − mean(R_i))/std(R_i) + β(π_ref/π_old − 1)]", "arXiv:2402.03300",
                  requires=GROUPED, optional=KL_TENSORS, choices={"kl_placement": ("token", "sequence")},
                  exact_rows=True, statistics=grpo_statistics),
        Estimator("dapo", dapo, (*KL_PARAMS, *GROUP_STD_PARAMS), "DAPO (token-mean within the group)",
                  "A = 1/mean_j(T_ij) · (r − mean(R_i))/std(R_i)", "arXiv:2503.14476",
                  requires=GROUPED, optional=KL_TENSORS, exact_rows=True, statistics=grpo_statistics),
        Estimator("dr_grpo", dr_grpo, (*KL_PARAMS, "kl_placement", *REWARD_CLIP_PARAMS, "singleton_groups", *MASKED),
                  "Dr.GRPO (no std, no length normalization)", "A = r − mean(R_i)", "arXiv:2503.20783",
                  requires=GROUPED, optional=KL_TENSORS, choices={"kl_placement": ("sequence", "reward_to_go")},
                  exact_rows=True),
        Estimator("flash_reinforce", flash_reinforce, (*KL_PARAMS, *REWARD_CLIP_PARAMS),
                  "FlashREINFORCE: the batch's mean score as baseline, reward-to-go KL (OpenRLHF)",
                  "A_t = r − mean_batch(r) − β Σ_{t'≥t} kl_t'", "OpenRLHF 0.11 (--algo.advantage.estimator "
                  "flash_reinforce)", optional=KL_TENSORS, batch_baseline=True,
                  statistics=flash_reinforce_statistics),
        Estimator("grpo_passk", grpo_passk, ("scale_by_std", "std_ddof", "std_eps", "singleton_groups", *KL_PARAMS,
                                             *MASKED),
                  "Pass@k GRPO: only each group's best response is reinforced",
                  "A_best = (R_max − R_second)/(std_g R + ε), 0 for every other response",
                  "arXiv:2503.19595; verl 0.9.1 compute_grpo_passk_outcome_advantage", requires=GROUPED,
                  optional=KL_TENSORS, choices={"singleton_groups": ("error", "zero")}),
        Estimator("opo", opo, ("singleton_groups", *KL_PARAMS, *MASKED), "OPO: length-weighted group-mean baseline",
                  "A = R_i − Σ_j L_j R_j / Σ_j L_j", "arXiv:2505.23585", requires=GROUPED, optional=KL_TENSORS),
        Estimator("gpg", gpg, ("singleton_groups", *KL_PARAMS, *MASKED), "GPG: group-mean baseline scaled by the batch's "
                  "share of nonzero rewards", "A = B/#{R ≠ 0} · (R − mean_g R)",
                  "arXiv:2504.02546; verl 0.9.1 compute_gpg_outcome_advantage", requires=GROUPED,
                  optional=KL_TENSORS, batch_baseline=True, statistics=gpg_statistics),
        Estimator("gdpo", gdpo, ("scale_by_std", "reward_weights", *GROUP_STD_PARAMS, *WHITEN_PARAMS, *KL_PARAMS,
                                 *MASKED),
                  "GDPO: each reward component normalized in its group, weighted, summed, batch-whitened",
                  "A = whiten_batch(Σ_k w_k (r_k − mean_g r_k)/(std_g r_k + ε))", "arXiv:2601.05242",
                  requires=GROUPED, optional=KL_TENSORS | {"reward_components"}, statistics=gdpo_statistics),
        Estimator("optimal_token_baseline", optimal_token_baseline, ("handle_zero_tail", "baseline_eps", *KL_PARAMS),
                  "Optimal token baseline: a per-position group baseline weighted by the path variance",
                  "A_t = G_t − Σ_i G_it W_it / Σ_i W_it, W_t = Σ_{j≤t} (1 − 2π_j + Σπ²_j) ρ_j²",
                  "verl 0.9.1 compute_optimal_token_baseline_advantage",
                  requires=frozenset({"group_ids", "old_logprobs", "sum_pi_squared"}),
                  optional=frozenset({"rollout_is_weights", "ref_logprobs"})),
        Estimator("tir_optimal_token_baseline", tir_optimal_token_baseline, ("handle_zero_tail", "baseline_eps", *KL_PARAMS),
                  "Optimal token baseline over each response's valid tokens (multi-turn: observation gaps "
                  "skipped)", "A_k = G_k − Σ_i G_ik W_ik / Σ_i W_ik over the k-th valid tokens",
                  "verl 0.9.1 compute_multi_turn_optimal_token_baseline_advantage",
                  requires=frozenset({"group_ids", "old_logprobs", "sum_pi_squared"}),
                  optional=frozenset({"rollout_is_weights", "ref_logprobs"})),
    )
}
