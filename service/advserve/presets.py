"""Presets: tables of defaults, one per library whose numbers advserve reproduces.

A preset maps each estimator it offers to a complete set of parameter defaults, and gives the
defaults of every loss term. Estimators a library does not have are listed with a hint instead.
Adding a preset (OpenRLHF, TRL) is adding one `Preset` here plus its golden tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .params import DependsOn


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    estimators: Mapping[str, Mapping[str, Any]]
    losses: Mapping[str, Mapping[str, Any]]
    unavailable: Mapping[str, str] = field(default_factory=dict)
    library: str | None = None  # "name version" of the library whose numbers the preset reproduces
    options: Mapping[str, str] = field(default_factory=dict)  # library option -> the advserve request that matches it


def _merge(*tables: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table in tables:
        out.update(table)
    return out


# values of the loss parameters that only the library presets change: the behaviour before them
_NEUTRAL_POLICY = {"ratio_cap": None, "cispo_cap": None, "cispo_level": "token", "sequence_ratio_gradient": "token_trick",
                   "seq_denominator": "nonempty"}
_NEUTRAL_KL = {"agg": None, "unbiased_gradient": False, "importance_weighted": False}
_NEUTRAL_ROLLOUT = {"log_clamp": 20.0, "gating": "ratio", "weight": "unit"}  # 20: verl's SAFETY_BOUND

# --- paper: the seed's table of token advantages, to the letter ---------------------------------

_PAPER_KL = {"kl_coef": 0.0, "kl_estimator": "k1", "kl_clamp": None}
_PAPER_WHITEN = {"whiten": True, "whiten_ddof": 0, "whiten_eps": 0.0}
_PAPER_STD = {"std_ddof": 0, "std_eps": 0.0, "singleton_groups": "zero"}
_PAPER_GRPO = _merge(_PAPER_KL, {"kl_estimator": "k3", "kl_placement": "token"}, _PAPER_STD)

PAPER = Preset(
    name="paper",
    description="The seed document's formulas to the letter: population std, no epsilons, "
    "KL where the seed's table puts it; undefined values (std 0) give 0.",
    estimators={
        "reinforce": _PAPER_KL,
        "reinforce_rtg": _merge({"gamma": 1.0}, _PAPER_KL),
        "reinforce_pp": _merge({"gamma": 1.0}, _PAPER_KL, _PAPER_WHITEN),
        "reinforce_pp_baseline": _merge(_PAPER_KL, {"kl_placement": "reward_to_go", "singleton_groups": "zero"},
                                        _PAPER_WHITEN),
        "rloo": _merge(_PAPER_KL, {"singleton_groups": "error"}),
        "remax": _PAPER_KL,
        "gae": _merge({"gamma": 1.0, "lam": 0.95}, _PAPER_KL, _PAPER_WHITEN, {"whiten": False}),
        "orz": _merge(_PAPER_WHITEN, {"whiten": False}),
        "grpo": _PAPER_GRPO,
        "grpo_original": _PAPER_GRPO,
        "dapo": _merge(_PAPER_KL, _PAPER_STD),
        "dr_grpo": _merge(_PAPER_KL, {"singleton_groups": "zero"}),
    },
    losses={
        "policy_loss": _merge({"mode": "reinforce", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None,
                               "ratio_clamp": None, "agg": "seq-mean-token-sum", "loss_scale_factor": None},
                              _NEUTRAL_POLICY),
        "kl_loss": _merge({"coef": 0.001, "estimator": "k3", "clamp": None}, _NEUTRAL_KL),
        "value_loss": {"coef": 1.0, "clip": None, "agg": None},
        "entropy_bonus": {"coef": 0.0, "agg": None},
        "rollout_correction": _merge({"level": "token", "mode": "truncate", "low": None, "high": 2.0},
                                     _NEUTRAL_ROLLOUT),
    },
)

# --- verl 0.9.1 (verl.trainer.ppo.core_algos) ---------------------------------------------------

_VERL_K3_CLAMP = DependsOn("kl_estimator", {"k3": 10.0}, None)  # kl_penalty clamps low_var_kl only
_VERL_KL = {"kl_coef": 0.0, "kl_estimator": "k1", "kl_clamp": _VERL_K3_CLAMP}  # use_kl_in_reward, kl_penalty="kl"
_VERL_WHITEN = {"whiten": True, "whiten_ddof": 1, "whiten_eps": 1e-8}  # verl_F.masked_whiten
_VERL_STD = {"std_ddof": 1, "std_eps": 1e-6, "singleton_groups": "raw"}  # torch.std; mean 0, std 1 for n = 1

VERL = Preset(
    name="verl",
    description="verl 0.9.1 (verl.trainer.ppo.core_algos): unbiased group std + 1e-6, size-1 groups keep "
    "the raw score, whitened GAE and REINFORCE++, KL-in-reward on token rewards, dual-clip PPO (c = 3).",
    estimators={
        "gae": _merge({"gamma": 1.0, "lam": 1.0}, _VERL_KL, _VERL_WHITEN),
        "orz": _VERL_WHITEN,
        "grpo": _merge(_VERL_KL, {"kl_placement": "sequence"}, _VERL_STD),
        "dr_grpo": _merge(_VERL_KL, {"singleton_groups": "raw"}),
        "rloo": _merge(_VERL_KL, {"singleton_groups": "raw"}),
        "reinforce_pp": _merge({"gamma": 1.0}, _VERL_KL, _VERL_WHITEN),
        "reinforce_pp_baseline": _merge(_VERL_KL, {"kl_placement": "sequence", "singleton_groups": "raw"},
                                        _VERL_WHITEN),
        "remax": _VERL_KL,
    },
    losses={
        # verl's gspo has no dual clip (compute_policy_loss_gspo ignores clip_ratio_c)
        "policy_loss": _merge({"mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2,
                               "dual_clip": DependsOn("mode", {"gspo": None}, 3.0),
                               "ratio_clamp": DependsOn("mode", {"gspo": 10.0}, 20.0), "agg": "token-mean",
                               "loss_scale_factor": None}, _NEUTRAL_POLICY),
        "kl_loss": _merge({"coef": 0.001, "estimator": "k3", "clamp": DependsOn("estimator", {"k3": 10.0}, None)},
                          _NEUTRAL_KL),
        "value_loss": {"coef": 1.0, "clip": 0.5, "agg": None},
        "entropy_bonus": {"coef": 0.0, "agg": None},
        "rollout_correction": _merge({"level": "token", "mode": "truncate", "low": None, "high": 2.0},
                                     _NEUTRAL_ROLLOUT),
    },
    unavailable={
        "reinforce": "verl has no plain REINFORCE estimator; use reinforce_pp with whiten=false for the "
        "reward-to-go form",
        "reinforce_rtg": "verl has no unwhitened reward-to-go estimator; use reinforce_pp with whiten=false",
        "grpo_original": "in verl the 1/|o| factor is the loss aggregation: use grpo with "
        "policy_loss.agg='seq-mean-token-mean'",
        "dapo": "in verl DAPO is grpo with policy_loss.agg='token-mean' and clip_high=0.28",
    },
)

# --- OpenRLHF 0.11.2 (docs/research/openrlhf.md) --------------------------------------------------

OPENRLHF = Preset(
    name="openrlhf",
    description="OpenRLHF 0.11.2 (openrlhf.trainer.ppo_utils.experience_maker, openrlhf.models.loss).",
    library="openrlhf 0.11.2",
    estimators={},
    losses={
        # PolicyLoss: ±20 log-ratio clamp for ppo, none for gspo, which also forces per-sequence
        # aggregation and passes its gradient through the mean; dual clip applies to both
        "policy_loss": _merge(_NEUTRAL_POLICY, {
            "mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None,
            "ratio_clamp": DependsOn("mode", {"gspo": None}, 20.0),
            "agg": DependsOn("mode", {"gspo": "seq-mean-token-mean"}, "token-mean"), "loss_scale_factor": None,
            "sequence_ratio_gradient": "through_mean"}),
        # compute_approx_kl clamps every estimator to ±10; the actor aggregates the KL and entropy
        # terms per token (aggregate_loss's default), the critic its value loss too
        "kl_loss": _merge(_NEUTRAL_KL, {"coef": 0.01, "estimator": "k1", "clamp": 10.0, "agg": "token-mean"}),
        "value_loss": {"coef": 1.0, "clip": 0.5, "agg": "token-mean"},
        "entropy_bonus": {"coef": 0.0, "agg": "token-mean"},
        # is_correction_*: mode mask, threshold [0.5, 5.0], no log clamp; survivors keep their token ratio
        "rollout_correction": {"level": "token", "mode": "mask", "low": 0.5, "high": 5.0, "log_clamp": None,
                               "gating": "ratio", "weight": "token"},
    },
)

# --- TRL 1.16.0 (docs/research/trl.md) ----------------------------------------------------------

TRL = Preset(
    name="trl",
    description="TRL 1.16.0 (trl.trainer.grpo_trainer.GRPOTrainer, trl.trainer.rloo_trainer.RLOOTrainer).",
    library="trl 1.16.0",
    estimators={},
    losses={
        # GRPOTrainer._compute_loss: loss_type "dapo" (token mean), epsilon 0.2, no log-ratio clamp,
        # Dr. GRPO's C = max_completion_length (512), grpo/dr_grpo divide by all B rows; cispo caps
        # min(ρ, epsilon_high) with epsilon_high = epsilon = 0.2; sequence level through the mean
        "policy_loss": _merge(_NEUTRAL_POLICY, {
            "mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None, "ratio_clamp": None,
            "agg": "token-mean", "loss_scale_factor": 512.0, "seq_denominator": "all",
            "cispo_cap": DependsOn("mode", {"cispo": 0.2}, None), "sequence_ratio_gradient": "through_mean"}),
        # β·k3 inside the per-token loss (the policy's aggregation), × ρ (use_bias_correction_kl)
        "kl_loss": _merge(_NEUTRAL_KL, {"coef": 0.0, "estimator": "k3", "clamp": None, "importance_weighted": True}),
        "value_loss": {"coef": 1.0, "clip": None, "agg": None},
        # the entropy bonus is a local token mean whatever loss_type says
        "entropy_bonus": {"coef": 0.0, "agg": "token-mean"},
        # vllm_importance_sampling_mode "sequence_mask", clip_min None, clip_max 3.0, no log clamp
        "rollout_correction": _merge(_NEUTRAL_ROLLOUT, {"level": "sequence", "mode": "mask", "low": None,
                                                        "high": 3.0, "log_clamp": None}),
    },
)

PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, VERL, OPENRLHF, TRL)}
DEFAULT_PRESET = "paper"
