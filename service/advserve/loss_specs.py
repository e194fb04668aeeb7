"""Parameters of the loss terms of `POST /v1/losses`; defaults come from the preset."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import InvalidArgument
from .functional.kl import KL_ESTIMATORS
from .functional.losses import BYPASS_IS_LEVELS, BYPASS_LOSSES, POLICY_LOSS_MODES, SEQUENCE_RATIO_GRADIENTS, VALUE_CLIP_FORMS
from .functional.masks import AGG_MODES
from .functional.rollout import ROLLOUT_GATINGS, ROLLOUT_LEVELS, ROLLOUT_WEIGHTS
from .params import ParamSpec, neutral

_POSITIVE = {"minimum": 0.0, "exclusive_minimum": True}
SEQ_DENOMINATORS = ("nonempty", "all")


def _term_agg(term: str) -> ParamSpec:
    return neutral("agg", str, f"aggregation of the {term} term; null: the policy term's agg", None,
                   choices=AGG_MODES, nullable=True)


def _term_normalizers(term: str) -> tuple[ParamSpec, ParamSpec]:
    """loss_scale_factor and seq_denominator of a term other than the policy's (null: the policy's)."""
    return (neutral("loss_scale_factor", float, f"constant divisor C of seq-mean-token-sum-norm for the {term} "
                    "term; null: the policy term's", None, nullable=True, **_POSITIVE),
            neutral("seq_denominator", str, f"S of the {term} term's seq-mean modes when num_sequences is not "
                    "given (nonempty or all); null: the policy term's", None, nullable=True,
                    choices=SEQ_DENOMINATORS))


# the parameters of verl 0.9.1's other policy losses (verl's names where they are its own: ActorConfig
# tau_pos/tau_neg, PolicyLossConfig clip_cov_*, kl_cov_ratio, dro_beta; ppo_kl_coef is kl_cov_coef here)
VERL_MODE_SPECS = (
    neutral("dro_beta", float, "dro: β of the quadratic log-ratio penalty ½β(lp − old)² (verl requires it: no "
            "default)", None, nullable=True, **_POSITIVE),
    neutral("tau_pos", float, "sapo: gate temperature τ where A > 0", 1.0, **_POSITIVE),
    neutral("tau_neg", float, "sapo: gate temperature τ where A ≤ 0", 1.05, **_POSITIVE),
    neutral("clip_cov_ratio", float, "clip_cov: share of the valid tokens whose gradient is cut (at least one)",
            0.0002, maximum=1.0, **_POSITIVE),
    neutral("clip_cov_lb", float, "clip_cov: a candidate's centred covariance (A − Ā)(lp − l̄) is > clip_cov_lb",
            1.0),
    neutral("clip_cov_ub", float, "clip_cov: ... and < clip_cov_ub", 5.0),
    neutral("clip_cov_seed", int, "clip_cov: seed of the draw among the candidates (torch.randperm on a CPU "
            "generator; verl draws from torch's global generator)", 0, minimum=0),
    neutral("kl_cov_ratio", float, "kl_cov: share of the valid tokens (the largest covariances, at least one) "
            "that get the |lp − old| penalty", 0.0002, maximum=1.0, **_POSITIVE),
    neutral("kl_cov_coef", float, "kl_cov: coefficient of |lp − old| on those tokens (verl's ppo_kl_coef)", 0.1,
            minimum=0.0),
    neutral("bypass_loss", str, "bypass_mode: the loss on the ratio to the rollout policy (old_logprobs are "
            "the rollout's): ppo_clip (the ratio is the correction) or reinforce (−A·lp·sg(w))", "ppo_clip",
            choices=BYPASS_LOSSES),
    neutral("bypass_is", str, "bypass_mode: importance weight w = π/π_rollout per token or per sequence "
            "(product), log clamped ±20, detached; null: none (w = 1)", "sequence", nullable=True,
            choices=BYPASS_IS_LEVELS),
    neutral("bypass_is_high", float, "bypass_mode: w truncated above at this bound (verl's "
            "rollout_is_threshold)", 2.0, **_POSITIVE),
    neutral("bypass_is_low", float, "bypass_mode: with a value, w is zeroed outside [low, high] instead of "
            "truncated (verl's 'low_high' threshold, IcePop); null: truncation", None, nullable=True, **_POSITIVE),
)

LOSS_TERMS: dict[str, dict[str, ParamSpec]] = {
    "policy_loss": {
        s.name: s
        for s in (
            ParamSpec("mode", str, "ppo_clip | gspo (sequence ratio) | cispo | reinforce (the seed's surrogate) | "
                      "verl's dro, sapo, gpg (−A·log π), clip_cov, kl_cov, geo_mean (GMPO), dppo_tv, dppo_kl, "
                      "bypass_mode (docs/semantics.md)", choices=POLICY_LOSS_MODES),
            ParamSpec("clip_low", float, "ε_low: the ratio is clipped below at 1 − clip_low", minimum=0.0, maximum=1.0),
            ParamSpec("clip_high", float, "ε_high: the ratio is clipped above at 1 + clip_high", minimum=0.0),
            ParamSpec("dual_clip", float, "dual-clip c (> 1) capping the loss at −c·A for A < 0 (ppo_clip, gspo); "
                      "null: off", nullable=True, minimum=1.0, exclusive_minimum=True),
            ParamSpec("ratio_clamp", float, "bound on log(ratio) before exp (gspo: upper bound only); null: none",
                      nullable=True, **_POSITIVE),
            neutral("ratio_cap", float, "δ: the unclipped branch of ppo_clip/gspo uses min(ρ, δ), for both signs "
                    "of A (TRL's delta); null: none", None, nullable=True, **_POSITIVE),
            neutral("cispo_cap", float, "absolute cap of the cispo weight, min(ρ, cap) with no floor (TRL's "
                    "epsilon_high); null: clip(ρ, 1 − clip_low, 1 + clip_high)", None, nullable=True, **_POSITIVE),
            neutral("cispo_level", str, "cispo's ratio per token, or the sequence ratio exp(mean_t(lp − old))",
                    "token", choices=("token", "sequence")),
            neutral("sequence_ratio_gradient", str, "how a sequence ratio passes its gradient: token_trick "
                    "(verl: sg(s)·exp(lp − sg(lp)), each token its own) or through_mean (OpenRLHF, TRL)",
                    "token_trick", choices=SEQUENCE_RATIO_GRADIENTS),
            *VERL_MODE_SPECS,
            ParamSpec("agg", str, "aggregation of per-token losses (also of the kl, value and entropy terms whose "
                      "agg is null)", choices=AGG_MODES),
            ParamSpec("loss_scale_factor", float, "constant divisor C of seq-mean-token-sum-norm; null: padded width T",
                      nullable=True, **_POSITIVE),
            neutral("seq_denominator", str, "S of the seq-mean modes when num_sequences is not given: rows with a "
                    "valid token (nonempty) or all rows (all: TRL)", "nonempty", choices=SEQ_DENOMINATORS),
        )
    },
    "kl_loss": {
        s.name: s
        for s in (
            ParamSpec("coef", float, "coefficient of the KL term in the loss", minimum=0.0),
            ParamSpec("estimator", str, "KL estimator of logprobs vs ref_logprobs", choices=KL_ESTIMATORS),
            ParamSpec("clamp", float, "clamp of the KL estimate to [−c, c]; null: none", nullable=True, **_POSITIVE),
            _term_agg("kl"),
            *_term_normalizers("kl"),
            neutral("unbiased_gradient", bool, "keep the estimator's value, use the gradient w·(lp − ref) with "
                    "w = sg(min(e^(lp − old), 10)) (OpenRLHF); needs old_logprobs", False),
            neutral("importance_weighted", bool, "multiply each kl_t by the policy's ratio ρ_t, differentiable "
                    "(TRL's use_bias_correction_kl); needs old_logprobs", False),
            neutral("gradient_estimator", str, "straight-through: keep the estimator's value, take the gradient "
                    "of this estimator's, unclamped (verl's 'k3+' = estimator k3, gradient_estimator k2); null: "
                    "the estimator's own gradient", None, nullable=True, choices=KL_ESTIMATORS),
        )
    },
    "value_loss": {
        s.name: s
        for s in (
            ParamSpec("coef", float, "coefficient of the value loss", minimum=0.0),
            ParamSpec("clip", float, "value clip range around old_values; null: unclipped", nullable=True, minimum=0.0),
            ParamSpec("clip_ties", str, "gradient where values sit exactly on a clip bound: 'pass' all of it "
                      "(torch.clamp, OpenRLHF), 'split' half per tied min/max (verl's clip_by_value: ¾ (v − G))",
                      choices=("pass", "split")),
            neutral("clip_form", str, "how the clipped value is computed: bounds, clip(v, v_old ± clip) (verl, "
                    "TRL); delta, v_old + clip(v − v_old, ±clip) (OpenRLHF: its rounding makes ties where v − v_old "
                    "exceeds clip by an ulp)", "bounds", choices=VALUE_CLIP_FORMS),
            _term_agg("value"),
            *_term_normalizers("value"),
        )
    },
    "entropy_bonus": {
        s.name: s
        for s in (
            ParamSpec("coef", float, "entropy coefficient (the loss subtracts coef·entropy)", minimum=0.0),
            _term_agg("entropy"),
            *_term_normalizers("entropy"),
        )
    },
    "token_loss": {
        s.name: s
        for s in (
            neutral("coef", float, "coefficient of the aggregated token_losses in the loss (any sign)", 1.0),
            _term_agg("token"),
            *_term_normalizers("token"),
        )
    },
    "rollout_correction": {
        s.name: s
        for s in (
            ParamSpec("level", str, "the unit weighed: a token, a sequence (product of token ratios) or a sequence "
                      "by its geometric mean (sequence_mean)", choices=ROLLOUT_LEVELS),
            ParamSpec("mode", str, "truncate: w ← clamp(w, low, high); mask: w ← 0 outside [low, high]",
                      choices=("truncate", "mask")),
            ParamSpec("low", float, "lower bound of the gated statistic; null: none", nullable=True, minimum=0.0),
            ParamSpec("high", float, "upper bound of the gated statistic; null: none", nullable=True, **_POSITIVE),
            neutral("log_clamp", float, "bound on the log-weight before exp (20: verl's SAFETY_BOUND); null: none",
                    20.0, nullable=True, **_POSITIVE),
            neutral("gating", str, "statistic compared with [low, high]: the ratio, or the sampled token's "
                    "binary_kl / tv between the rollout and old policies (mask mode, upper bound only)",
                    "ratio", choices=ROLLOUT_GATINGS),
            neutral("weight", str, "what a surviving token is multiplied by in mask mode: its unit's ratio, or its "
                    "own token ratio (OpenRLHF)", "unit", choices=ROLLOUT_WEIGHTS),
        )
    },
}

# The policy_loss parameters each mode reads, besides POLICY_COMMON_PARAMS (the aggregation's, read by
# every mode). A response echoes only these. Setting one of REFUSED_FOR_OTHER_MODES for a mode that
# does not read it is an error; the others are accepted and not read (a preset's clip_low under reinforce).
POLICY_COMMON_PARAMS = ("mode", "agg", "loss_scale_factor", "seq_denominator")
POLICY_MODE_PARAMS: dict[str, tuple[str, ...]] = {
    "ppo_clip": ("clip_low", "clip_high", "dual_clip", "ratio_clamp", "ratio_cap"),
    "gspo": ("clip_low", "clip_high", "dual_clip", "ratio_clamp", "ratio_cap", "sequence_ratio_gradient"),
    # sequence_ratio_gradient: at cispo_level "sequence"; clip_low/clip_high: without a cispo_cap
    "cispo": ("clip_low", "clip_high", "ratio_clamp", "cispo_cap", "cispo_level", "sequence_ratio_gradient"),
    "reinforce": ("ratio_clamp",),
    "dro": ("dro_beta",),
    "sapo": ("ratio_clamp", "tau_pos", "tau_neg"),
    "gpg": (),
    "clip_cov": ("clip_low", "clip_high", "ratio_clamp", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub",
                 "clip_cov_seed"),
    "kl_cov": ("ratio_clamp", "kl_cov_ratio", "kl_cov_coef"),
    "geo_mean": ("clip_low", "clip_high", "ratio_clamp"),  # bounds of lp − old (log space)
    "dppo_tv": ("clip_low", "clip_high", "ratio_clamp", "ratio_cap"),  # clip_*: the divergence thresholds
    "dppo_kl": ("clip_low", "clip_high", "ratio_clamp", "ratio_cap"),
    # clip_low/clip_high/dual_clip: bypass_loss ppo_clip; the weights are computed (metrics) for both
    "bypass_mode": ("clip_low", "clip_high", "dual_clip", "ratio_clamp", "bypass_loss", "bypass_is",
                    "bypass_is_high", "bypass_is_low"),
}
REFUSED_FOR_OTHER_MODES = ("cispo_cap", "ratio_cap")


def modes_reading(name: str) -> tuple[str, ...]:
    """The policy_loss modes that read parameter `name` (POLICY_MODE_PARAMS)."""
    return tuple(mode for mode, names in POLICY_MODE_PARAMS.items() if name in POLICY_COMMON_PARAMS + names)


def echoed_params(terms: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The resolved parameters a response reports: every term's, the policy term's reduced to those
    its mode reads (a reinforce loss reports no clip_low/clip_high, a ppo_clip loss no cispo_*)."""
    out = {term: dict(params) for term, params in terms.items()}
    policy = out.get("policy_loss")
    if policy is not None:
        used = POLICY_COMMON_PARAMS + POLICY_MODE_PARAMS[policy["mode"]]
        out["policy_loss"] = {name: value for name, value in policy.items() if name in used}
    return out


# tensors each term needs (besides response_mask); kl_loss also needs old_logprobs with
# unbiased_gradient or importance_weighted
TERM_TENSORS: dict[str, tuple[str, ...]] = {
    "policy_loss": ("logprobs", "old_logprobs", "advantages"),
    "kl_loss": ("logprobs", "ref_logprobs"),
    "value_loss": ("values", "old_values", "returns"),
    "entropy_bonus": ("entropy",),
    "token_loss": ("token_losses",),
    "rollout_correction": ("old_logprobs", "rollout_logprobs"),
}
# tensors a term takes when given (rollout_is_weights: precomputed importance weights of the policy term)
TERM_OPTIONAL_TENSORS: dict[str, tuple[str, ...]] = {"policy_loss": ("rollout_is_weights",)}
# terms whose agg null means the policy term's (and whose loss_scale_factor/seq_denominator null too)
AGGREGATED_TERMS = ("policy_loss", "kl_loss", "value_loss", "entropy_bonus", "token_loss")


def check_loss_terms(terms: Mapping[str, Mapping[str, Any]], given: Mapping[str, Mapping[str, Any]]) -> None:
    """Combinations that no single parameter's check catches; InvalidArgument naming the field.

    `terms`: the resolved parameters of each requested term; `given`: what the request set itself
    (a parameter that only applies to another mode is an error only when the request sets it).
    """
    policy, set_policy = terms.get("policy_loss"), given.get("policy_loss", {})
    if policy is not None:
        mode = policy["mode"]
        for name in REFUSED_FOR_OTHER_MODES:
            modes = modes_reading(name)
            if set_policy.get(name) is not None and mode not in modes:
                raise InvalidArgument(f"policy_loss.{name} applies to mode {' or '.join(modes)}, not {mode!r}",
                                      field=f"policy_loss.{name}")
        if mode == "dro" and policy["dro_beta"] is None:
            raise InvalidArgument("policy_loss.dro_beta must be set (> 0) for mode 'dro' (verl requires it too)",
                                  field="policy_loss.dro_beta")
        if mode == "bypass_mode":
            if policy["bypass_is_low"] is not None and policy["bypass_is_low"] > policy["bypass_is_high"]:
                raise InvalidArgument("policy_loss.bypass_is_low must be <= bypass_is_high",
                                      field="policy_loss.bypass_is_low")
            if "rollout_correction" in terms:
                raise InvalidArgument("bypass_mode computes its own importance weights against the rollout policy "
                                      "(old_logprobs are the rollout's: policy_loss.bypass_is); rollout_correction "
                                      "is for a separate old policy", field="rollout_correction")
        if set_policy.get("cispo_level") == "sequence" and mode != "cispo":
            raise InvalidArgument(f"policy_loss.cispo_level applies to mode 'cispo', not {mode!r} (gspo is the "
                                  "sequence-level ppo_clip)", field="policy_loss.cispo_level")
    kl = terms.get("kl_loss")
    if kl is not None and kl["unbiased_gradient"] and kl["importance_weighted"]:
        raise InvalidArgument("kl_loss.unbiased_gradient and kl_loss.importance_weighted are two different "
                              "corrections of the KL gradient; choose one", field="kl_loss.importance_weighted")
    if kl is not None and kl["unbiased_gradient"] and kl["gradient_estimator"] is not None:
        raise InvalidArgument("kl_loss.gradient_estimator and kl_loss.unbiased_gradient both replace the KL "
                              "gradient; choose one", field="kl_loss.gradient_estimator")
    rc = terms.get("rollout_correction")
    if rc is not None:
        if rc["low"] is not None and rc["high"] is not None and rc["low"] > rc["high"]:
            raise InvalidArgument("rollout_correction.low must be <= high", field="rollout_correction.low")
        if rc["gating"] != "ratio":
            if rc["mode"] != "mask":
                raise InvalidArgument(f"rollout_correction.gating {rc['gating']!r} is a filter: it needs mode 'mask'",
                                      field="rollout_correction.mode")
            if rc["low"]:
                raise InvalidArgument(f"rollout_correction.gating {rc['gating']!r} takes an upper bound only: set "
                                      "low to null", field="rollout_correction.low")
            if rc["weight"] != "token":
                raise InvalidArgument(f"rollout_correction.gating {rc['gating']!r} gives no unit ratio: survivors "
                                      "need weight 'token'", field="rollout_correction.weight")
        if rc["mode"] == "truncate" and rc["level"] != "token" and rc["weight"] == "token":
            raise InvalidArgument("rollout_correction.weight 'token' applies to mode 'mask'; truncate clamps the "
                                  "unit's own ratio (set weight to 'unit')", field="rollout_correction.weight")
