"""Parameters of the loss terms of `POST /v1/losses`; defaults come from the preset."""

from __future__ import annotations

from .functional.kl import KL_ESTIMATORS
from .functional.losses import POLICY_LOSS_MODES
from .functional.masks import AGG_MODES
from .params import ParamSpec

_POSITIVE = {"minimum": 0.0, "exclusive_minimum": True}

LOSS_TERMS: dict[str, dict[str, ParamSpec]] = {
    "policy_loss": {
        s.name: s
        for s in (
            ParamSpec("mode", str, "ppo_clip | gspo (sequence ratio) | cispo | reinforce (the seed's surrogate)",
                      choices=POLICY_LOSS_MODES),
            ParamSpec("clip_low", float, "ε_low: the ratio is clipped below at 1 − clip_low", minimum=0.0, maximum=1.0),
            ParamSpec("clip_high", float, "ε_high: the ratio is clipped above at 1 + clip_high", minimum=0.0),
            ParamSpec("dual_clip", float, "dual-clip c (> 1) capping the loss at −c·A for A < 0 (ppo_clip); null: off",
                      nullable=True, minimum=1.0, exclusive_minimum=True),
            ParamSpec("ratio_clamp", float, "bound on log(ratio) before exp (gspo: upper bound only); null: none",
                      nullable=True, **_POSITIVE),
            ParamSpec("agg", str, "aggregation of per-token losses (also used by the kl and entropy terms)",
                      choices=AGG_MODES),
            ParamSpec("loss_scale_factor", float, "constant divisor C of seq-mean-token-sum-norm; null: padded width T",
                      nullable=True, **_POSITIVE),
        )
    },
    "kl_loss": {
        s.name: s
        for s in (
            ParamSpec("coef", float, "coefficient of the KL term in the loss", minimum=0.0),
            ParamSpec("estimator", str, "KL estimator of logprobs vs ref_logprobs", choices=KL_ESTIMATORS),
            ParamSpec("clamp", float, "clamp of the KL estimate to [−c, c]; null: none", nullable=True, **_POSITIVE),
        )
    },
    "value_loss": {
        s.name: s
        for s in (
            ParamSpec("coef", float, "coefficient of the value loss", minimum=0.0),
            ParamSpec("clip", float, "value clip range around old_values; null: unclipped", nullable=True, minimum=0.0),
        )
    },
    "entropy_bonus": {
        s.name: s for s in (ParamSpec("coef", float, "entropy coefficient (the loss subtracts coef·entropy)", minimum=0.0),)
    },
    "rollout_correction": {
        s.name: s
        for s in (
            ParamSpec("level", str, "importance weight per token, or per sequence (product of token ratios)",
                      choices=("token", "sequence")),
            ParamSpec("mode", str, "truncate: w ← clamp(w, low, high); mask: w ← 0 outside [low, high]",
                      choices=("truncate", "mask")),
            ParamSpec("low", float, "lower bound of the weight; null: none (required by mask)", nullable=True, minimum=0.0),
            ParamSpec("high", float, "upper bound of the weight", **_POSITIVE),
        )
    },
}

# tensors each term needs (besides response_mask)
TERM_TENSORS: dict[str, tuple[str, ...]] = {
    "policy_loss": ("logprobs", "old_logprobs", "advantages"),
    "kl_loss": ("logprobs", "ref_logprobs"),
    "value_loss": ("values", "old_values", "returns"),
    "entropy_bonus": ("entropy",),
    "rollout_correction": ("old_logprobs", "rollout_logprobs"),
}
