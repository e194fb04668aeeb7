"""Presets: tables of defaults, one per library whose numbers advserve reproduces.

A preset maps each estimator it offers to its parameter defaults, and gives the defaults of every
loss term; a parameter with a default of its own (`params.neutral`: what only a library preset
changes, e.g. reward clipping) may be left out of a table. Estimators a library does not have are listed with a hint instead.
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


# library options -> the loss request that reproduces them (shown by GET /v1/estimators; the estimator
# rows are in each preset's estimator table of options)
_ORLHF_LOSS_OPTIONS = {
    "--actor.policy_loss_type ppo": "policy_loss.mode='ppo_clip' (log-ratio clamp ±20: ratio_clamp=20)",
    "--actor.policy_loss_type gspo": "policy_loss.mode='gspo' (the preset then defaults to agg "
    "'seq-mean-token-mean', no ratio_clamp, sequence_ratio_gradient='through_mean'); with IS correction on, "
    "send rollout_logprobs as old_logprobs and no rollout_correction",
    "--actor.eps_clip E": "policy_loss.clip_low=E, policy_loss.clip_high=E",
    "--actor.eps_clip_low_high LO HI": "policy_loss.clip_low=LO, policy_loss.clip_high=HI",
    "--actor.dual_clip C": "policy_loss.dual_clip=C (ppo and gspo)",
    "--actor.loss_agg_mode token-mean": "policy_loss.agg='token-mean'; batch_num_tokens: num_tokens",
    "--actor.loss_agg_mode seq-mean-token-mean": "policy_loss.agg='seq-mean-token-mean'; global_batch_size: "
    "num_sequences (the kl, value and entropy terms stay token-mean: their own agg)",
    "--algo.kl.use_loss": "kl_loss={} (kl_loss.coef = --algo.kl.init_coef 0.01, kl_loss.estimator = "
    "--algo.kl.estimator k1, kl_loss.clamp 10, kl_loss.agg 'token-mean'), and params.kl_coef=0 for the advantages",
    "--algo.kl.unbiased_gradient": "kl_loss.unbiased_gradient=true (needs old_logprobs)",
    "--critic.value_clip C": "value_loss.clip=C (0.5; value_loss.agg 'token-mean'; value_loss.clip_form 'delta': "
    "old + (v − old).clamp(±C), as ValueLoss computes it)",
    "--actor.entropy_coef C": "entropy_bonus={'coef': C} (entropy_bonus.agg 'token-mean')",
    "--algo.advantage.is_correction_level token": "rollout_correction.level='token' (with rollout_logprobs)",
    "--algo.advantage.is_correction_level seq": "rollout_correction.level='sequence_mean' (the geometric mean "
    "of the ratio, the mean of a divergence; mask mode only)",
    "--algo.advantage.is_correction_mode mask": "rollout_correction.mode='mask' (survivors keep their token "
    "ratio: rollout_correction.weight='token')",
    "--algo.advantage.is_correction_mode clip": "rollout_correction.mode='truncate' (token level, ratio gating)",
    "--algo.advantage.is_correction_gating G": "rollout_correction.gating=G (ratio, binary_kl, tv)",
    "--algo.advantage.is_correction_threshold LO HI": "rollout_correction.low=LO, rollout_correction.high=HI",
    "--algo.advantage.is_correction_threshold HI": "rollout_correction.low=null, rollout_correction.high=HI",
}
_TRL_LOSS_OPTIONS = {
    "GRPOConfig.loss_type='dapo'": "policy_loss.agg='token-mean' (the default) with num_tokens = "
    "num_items_in_batch / num_processes × gradient_accumulation_steps / steps_per_generation",
    "GRPOConfig.loss_type='bnpo'": "policy_loss.agg='token-mean' over the local micro-batch (no num_tokens); "
    "TRL's ÷ gradient_accumulation_steps G: num_tokens = G × the local token count",
    "GRPOConfig.loss_type='grpo'": "policy_loss.agg='seq-mean-token-mean' (all B rows count: "
    "policy_loss.seq_denominator 'all'); TRL's ÷ G: num_sequences = G × B",
    "GRPOConfig.loss_type='dr_grpo'": "policy_loss.agg='seq-mean-token-sum-norm', policy_loss.loss_scale_factor = "
    "max_completion_length (512); TRL's ÷ G: num_sequences = G × B",
    "GRPOConfig.loss_type='cispo'": "policy_loss.mode='cispo' with policy_loss.cispo_cap = epsilon_high "
    "(TRL's default epsilon_high = epsilon = 0.2 is the preset's cap), num_tokens as dapo",
    "GRPOConfig.epsilon=E": "policy_loss.clip_low=E, policy_loss.clip_high=E",
    "GRPOConfig.epsilon_high=H": "policy_loss.clip_high=H; with loss_type='cispo': policy_loss.cispo_cap=H",
    "GRPOConfig.delta=D": "policy_loss.ratio_cap=D",
    "GRPOConfig.importance_sampling_level='sequence'": "policy_loss.mode='gspo' (cispo: "
    "policy_loss.cispo_level='sequence'); the gradient through the mean is the preset's default",
    "GRPOConfig.beta=B": "kl_loss={'coef': B} (k3, no clamp, the policy's aggregation, kl_loss.importance_weighted)",
    "GRPOConfig.use_bias_correction_kl=False": "kl_loss.importance_weighted=false",
    "GRPOConfig.entropy_coef=C": "entropy_bonus={'coef': C} (a local token mean: with a global num_tokens "
    "send it in a call of its own)",
    "GRPOConfig.max_completion_length=L": "policy_loss.loss_scale_factor=L (dr_grpo)",
    "GRPOConfig.vllm_importance_sampling_correction=True": "rollout_correction={} with rollout_logprobs "
    "(sequence_mask, clip_max 3.0)",
    "GRPOConfig.vllm_importance_sampling_mode='LEVEL_MODE'": "rollout_correction.level=LEVEL ('token', "
    "'sequence'), rollout_correction.mode=MODE ('truncate', 'mask')",
    "GRPOConfig.vllm_importance_sampling_clip_min=L": "rollout_correction.low=L (None: null)",
    "GRPOConfig.vllm_importance_sampling_clip_max=H": "rollout_correction.high=H (None: null)",
}

# --- paper: the seed's table of token advantages, to the letter ---------------------------------

_PAPER_KL = {"kl_coef": 0.0, "kl_estimator": "k1", "kl_clamp": None}
_PAPER_WHITEN = {"whiten": True, "whiten_std": True, "whiten_ddof": 0, "whiten_eps": 0.0, "whiten_eps_mode": "inside"}
_PAPER_STD = {"std_ddof": 0, "std_eps": 0.0, "std_scope": "group", "singleton_groups": "zero"}
_PAPER_GRPO = _merge(_PAPER_KL, {"kl_estimator": "k3", "kl_placement": "token"}, _PAPER_STD)

_GMPO_CLIP = DependsOn("mode", {"geo_mean": 0.4}, 0.2)

PAPER = Preset(
    name="paper",
    description="The seed document's formulas to the letter: population std, no epsilons, "
    "KL where the seed's table puts it; undefined values (std 0) give 0. Policy loss: PPO clip 0.2/0.2 "
    "summed over a response's tokens and averaged over responses (the seed's eq. (14)).",
    estimators={
        "reinforce": _PAPER_KL,
        "reinforce_rtg": _merge({"gamma": 1.0}, _PAPER_KL),
        "reinforce_pp": _merge({"gamma": 1.0}, _PAPER_KL, _PAPER_WHITEN),
        "reinforce_pp_baseline": _merge(_PAPER_KL, {"kl_placement": "reward_to_go", "singleton_groups": "zero"},
                                        _PAPER_WHITEN, {"returns_whitened": True}),
        "rloo": _merge(_PAPER_KL, {"kl_placement": "sequence", "singleton_groups": "error"},
                       _PAPER_WHITEN, {"whiten": False, "whiten_scope": "token"}),
        "remax": _PAPER_KL,
        "gae": _merge({"gamma": 1.0, "lam": 0.95}, _PAPER_KL, _PAPER_WHITEN,
                      {"whiten": False}),
        "orz": _merge(_PAPER_WHITEN, {"whiten": False}),
        "grpo": _PAPER_GRPO,
        "grpo_original": _PAPER_GRPO,
        "dapo": _merge(_PAPER_KL, _PAPER_STD),
        "dr_grpo": _merge(_PAPER_KL, {"kl_placement": "sequence", "singleton_groups": "zero"}),
        "opo": _merge({"singleton_groups": "zero"}, _PAPER_KL),  # b = Σ L R / Σ L, as the OPO paper defines it
    },
    losses={
        # PPO's clipped surrogate (clip 0.2/0.2) aggregated as the seed's eq. (14) prescribes for every
        # method of its table: the tokens of a response summed, the responses averaged (docs/semantics.md);
        # the seed's unclipped surrogate (5) is mode 'reinforce'. Where an algorithm's paper defines its own
        # objective: SAPO (arXiv:2511.20347) and GMPO (arXiv:2507.20673) average their responses' token
        # means; GMPO clips lp − old to (−0.4, 0.4) (its Sec. 4) and means over all G responses
        "policy_loss": {"mode": "ppo_clip", "clip_low": _GMPO_CLIP, "clip_high": _GMPO_CLIP, "dual_clip": None,
                        "ratio_clamp": None, "loss_scale_factor": None,
                        "agg": DependsOn("mode", {"sapo": "seq-mean-token-mean", "geo_mean": "seq-mean-token-mean"},
                                         "seq-mean-token-sum"),
                        "seq_denominator": DependsOn("mode", {"geo_mean": "all"}, "nonempty")},
        "kl_loss": {"coef": 0.001, "estimator": "k3", "clamp": None},
        "value_loss": {"coef": 1.0, "clip": None, "clip_ties": "pass", "agg": None},
        "entropy_bonus": {"coef": 0.0, "agg": None},
        "token_loss": {"coef": 1.0, "agg": None},  # any per-token loss matrix (verl's agg_loss)
        "rollout_correction": {"level": "token", "mode": "truncate", "low": None, "high": 2.0},
    },
    unavailable={
        "flash_reinforce": "not in the seed's table (OpenRLHF's batch-mean baseline): use preset 'openrlhf'",
        **dict.fromkeys(("grpo_passk", "gpg", "gdpo", "optimal_token_baseline", "tir_optimal_token_baseline"),
                        "not in the seed's table (verl 0.9.1's estimator): use preset 'verl'"),
    },
)

# --- verl 0.9.1 (verl.trainer.ppo.core_algos) ---------------------------------------------------

_VERL_K3_CLAMP = DependsOn("kl_estimator", {"k3": 10.0}, None)  # kl_penalty clamps low_var_kl only
_VERL_KL = {"kl_coef": 0.0, "kl_estimator": "k1", "kl_clamp": _VERL_K3_CLAMP}  # use_kl_in_reward, kl_penalty="kl"
_VERL_WHITEN = {"whiten": True, "whiten_std": True, "whiten_ddof": 1, "whiten_eps": 1e-8,
                "whiten_eps_mode": "inside"}  # verl_F.masked_whiten
_VERL_STD = {"std_ddof": 1, "std_eps": 1e-6, "std_scope": "group",
             "singleton_groups": "raw"}  # torch.std; mean 0, std 1 for n = 1
# the outcome estimators sum token_level_rewards over every position, masked ones included
_VERL_MASKED = {"masked_token_rewards": "sum"}
_VERL_ONLY = ("grpo_passk", "opo", "gpg", "gdpo", "optimal_token_baseline", "tir_optimal_token_baseline")

# verl 0.9.1 config keys (the ones tests/golden/make_verl_golden.py drives the library with) -> advserve
_VERL_OPTIONS = {
    "algorithm.adv_estimator=gae": "estimator='gae' (with values); γ = λ = 1 without a critic is 'orz'",
    "algorithm.adv_estimator=grpo": "estimator='grpo'",
    "algorithm.adv_estimator=grpo, algorithm.norm_adv_by_std_in_grpo=False": "estimator='dr_grpo'",
    "algorithm.adv_estimator=rloo": "estimator='rloo'",
    "algorithm.adv_estimator=reinforce_plus_plus": "estimator='reinforce_pp'",
    "algorithm.adv_estimator=reinforce_plus_plus_baseline": "estimator='reinforce_pp_baseline'",
    "algorithm.adv_estimator=remax": "estimator='remax' (with greedy_rewards)",
    "algorithm.adv_estimator=rloo_vectorized": "estimator='rloo', params.singleton_groups='zero' (a group of one "
    "gets 0)",
    "algorithm.adv_estimator=grpo_passk / opo / gpg / gdpo": "the estimator of that name (gdpo: one reward "
    "dimension; grpo_passk with norm_adv_by_std_in_grpo=False: params.scale_by_std=false)",
    "algorithm.adv_estimator=optimal_token_baseline / tir_optimal_token_baseline": "the estimator of that name "
    "with old_logprobs, sum_pi_squared (actor.calculate_sum_pi_squared) and optionally rollout_is_weights",
    "algorithm.gamma, algorithm.lam": "params.gamma, params.lam (1.0, 1.0)",
    "algorithm.use_kl_in_reward=True, algorithm.kl_ctrl.kl_coef=B": "params.kl_coef=B (send old_logprobs, ref_logprobs)",
    "algorithm.kl_penalty=kl / mse / low_var_kl / abs": "params.kl_estimator='k1' / 'k2' / 'k3' / 'abs' (k3 clamped ±10)",
    "actor.clip_ratio, actor.clip_ratio_low, actor.clip_ratio_high": "policy_loss.clip_low, clip_high (0.2, 0.2)",
    "actor.clip_ratio_c=C": "policy_loss.dual_clip=C (3.0)",
    "actor.loss_agg_mode=M": "policy_loss.agg=M (token-mean; the kl and entropy terms follow it)",
    "actor.loss_scale_factor=C": "policy_loss.loss_scale_factor=C (seq-mean-token-sum-norm)",
    "actor.policy_loss.loss_mode=vanilla / gspo / cispo": "policy_loss.mode='ppo_clip' / 'gspo' / 'cispo'",
    "actor.use_kl_loss=True, actor.kl_loss_coef=B, actor.kl_loss_type=T":
        "kl_loss={'coef': B, 'estimator': T as in kl_penalty} (k3 clamped ±10)",
    "actor.entropy_coeff=C": "entropy_bonus.coef=C",
    "critic.cliprange_value=C": "value_loss.clip=C (0.5; verl's gradient at an exact clip bound: clip_ties='split')",
    "rollout_corr_helper: rollout_is=token / sequence, rollout_is_threshold=H or 'L_H'":
        "rollout_correction.level, mode='truncate' (high=H) or 'mask' (low=L, high=H)",
    # verl 0.9.1's other policy losses (docs/semantics.md)
    "actor.policy_loss.loss_mode=dppo_tv / dppo_kl": "policy_loss.mode='dppo_tv' / 'dppo_kl'; clip_ratio_low / "
    "clip_ratio_high are the divergence bounds policy_loss.clip_low / clip_high, clip_ratio_c the cap "
    "policy_loss.ratio_cap (3.0)",
    "actor.policy_loss.loss_mode=sapo, actor.tau_pos, actor.tau_neg": "policy_loss.mode='sapo', policy_loss.tau_pos, "
    "policy_loss.tau_neg (1.0, 1.05; aggregated seq-mean-token-mean whatever loss_agg_mode says, as in verl)",
    "actor.policy_loss.loss_mode=gpg": "policy_loss.mode='gpg' (−A·log π, no ratio)",
    "actor.policy_loss.loss_mode=clip_cov, policy_loss.clip_cov_ratio / clip_cov_lb / clip_cov_ub":
        "policy_loss.mode='clip_cov', policy_loss.clip_cov_ratio, policy_loss.clip_cov_lb, policy_loss.clip_cov_ub "
        "(verl draws from torch's global generator, advserve from policy_loss.clip_cov_seed)",
    "actor.policy_loss.loss_mode=kl_cov, policy_loss.kl_cov_ratio, policy_loss.ppo_kl_coef":
        "policy_loss.mode='kl_cov', policy_loss.kl_cov_ratio, policy_loss.kl_cov_coef",
    "actor.policy_loss.loss_mode=geo_mean": "policy_loss.mode='geo_mean' (GMPO: the mean of B sequence losses)",
    "actor.policy_loss.loss_mode=dro, policy_loss.dro_beta=B": "policy_loss.mode='dro', policy_loss.dro_beta=B",
    "actor.policy_loss.loss_mode=bypass_mode, policy_loss.rollout_correction.loss_type / rollout_is / "
    "rollout_is_threshold": "policy_loss.mode='bypass_mode', policy_loss.bypass_loss, policy_loss.bypass_is, "
    "policy_loss.bypass_is_high ('L_H': policy_loss.bypass_is_low=L too); old_logprobs are the rollout's",
    # the rest of verl's vocabulary
    "actor.kl_loss_type=low_var_kl+ (any estimator with '+')": "kl_loss={'estimator': 'k3', "
    "'gradient_estimator': 'k2'} (straight-through: k3's value, k2's gradient)",
    "core_algos.agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)":
        "a token_loss term with token_losses=loss_mat and token_loss.agg (null: the policy's); dp_size, num_tokens, "
        "num_sequences",
    "actor global_batch_info: dp_size, batch_num_tokens, global_batch_size": "dp_size, num_tokens, num_sequences",
    "rollout_is_weights (from rollout_corr_helper, zeros allowed)": "the tensor rollout_is_weights, multiplying the "
    "policy's per-token loss (instead of a rollout_correction term)",
    "kl_penalty(logprob, ref_logprob, kl_penalty) per token": "return_kl_values=true: the result's kl_values [B, T]",
    "batch keys values / vpreds / returns (the critic's)": "tensors old_values / values / returns",
    "batch key reward_baselines (ReMax)": "tensor greedy_rewards",
    "non_tensor_batch uid (compute_advantage's index)": "tensor group_ids",
    "metrics actor/pg_clipfrac, actor/pg_clipfrac_lower, actor/ppo_kl": "metrics clip_fraction_high + "
    "clip_fraction_low, dual_clip_fraction, approx_kl (advserve.integrations.verl returns verl's names)",
    "metric critic/vf_clipfrac": "metric value_clip_fraction",
    "algorithm.adv_estimator=advserve_<name>, actor.policy_loss.loss_mode=advserve or advserve_<mode>":
        "advserve.integrations.verl: verl's own registries, computed by advserve (docs/integrations.md)",
}

# verl's log-ratio clamp: ±20 (vanilla, cispo, sapo, dppo, bypass_mode), 10 above for gspo, none in
# clip_cov, kl_cov and geo_mean. verl 0.9.1's other policy losses: dppo truncates
# its detached ratio at clip_ratio_c (ActorConfig: 3.0); sapo aggregates seq-mean-token-mean whatever
# loss_agg_mode says, geo_mean means its sequence losses over all B rows (torch.mean); the other parameters
# keep their own defaults (verl's: ActorConfig tau_pos/tau_neg, PolicyLossConfig clip_cov_*, kl_cov_*,
# rollout_correction's rollout_is 'sequence' with threshold 2.0 for bypass_mode)
_VERL_POLICY_MODES = {
    "ratio_clamp": DependsOn("mode", {"gspo": 10.0, "clip_cov": None, "kl_cov": None, "geo_mean": None}, 20.0),
    "ratio_cap": DependsOn("mode", {"dppo_tv": 3.0, "dppo_kl": 3.0}, None),
    "agg": DependsOn("mode", {"sapo": "seq-mean-token-mean", "geo_mean": "seq-mean-token-mean"}, "token-mean"),
    "seq_denominator": DependsOn("mode", {"geo_mean": "all"}, "nonempty"),
}

VERL = Preset(
    name="verl",
    library="verl 0.9.1",
    options=_VERL_OPTIONS,
    description="verl 0.9.1 (verl.trainer.ppo.core_algos): unbiased group std + 1e-6, size-1 groups keep "
    "the raw score, whitened GAE and REINFORCE++, KL-in-reward on token rewards, dual-clip PPO (c = 3).",
    estimators={
        "gae": _merge({"gamma": 1.0, "lam": 1.0}, _VERL_KL, _VERL_WHITEN),
        "orz": _VERL_WHITEN,
        "grpo": _merge(_VERL_KL, {"kl_placement": "sequence"}, _VERL_STD, _VERL_MASKED),
        "dr_grpo": _merge(_VERL_KL, {"kl_placement": "sequence", "singleton_groups": "raw"}, _VERL_MASKED),
        "rloo": _merge(_VERL_KL, {"kl_placement": "sequence", "singleton_groups": "raw"},
                       _VERL_WHITEN, {"whiten": False, "whiten_scope": "token"}, _VERL_MASKED),
        "reinforce_pp": _merge({"gamma": 1.0}, _VERL_KL, _VERL_WHITEN),
        "reinforce_pp_baseline": _merge(_VERL_KL, {"kl_placement": "sequence", "singleton_groups": "raw"},
                                        _VERL_WHITEN, {"returns_whitened": True}, _VERL_MASKED),
        "remax": _VERL_KL,
        # compute_grpo_passk_outcome_advantage: torch.std + 1e-6, a group of one is an error
        "grpo_passk": _merge({"scale_by_std": True, "std_ddof": 1, "std_eps": 1e-6, "singleton_groups": "error"},
                             _VERL_KL, _VERL_MASKED),
        "opo": _merge({"singleton_groups": "raw"}, _VERL_KL, _VERL_MASKED),  # a group of one: baseline 0
        "gpg": _merge({"singleton_groups": "raw"}, _VERL_KL, _VERL_MASKED),  # a group of one: mean 0
        "gdpo": _merge({"scale_by_std": True, "reward_weights": None}, _VERL_STD, _VERL_WHITEN, _VERL_KL,
                       _VERL_MASKED),
        "optimal_token_baseline": _merge({"handle_zero_tail": True, "baseline_eps": 1e-8}, _VERL_KL),
        "tir_optimal_token_baseline": _merge({"handle_zero_tail": True, "baseline_eps": 1e-8}, _VERL_KL),
    },
    losses={
        # verl's gspo has no dual clip (compute_policy_loss_gspo ignores clip_ratio_c)
        "policy_loss": {"mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2,
                               "dual_clip": DependsOn("mode", {"gspo": None}, 3.0), "loss_scale_factor": None,
                               **_VERL_POLICY_MODES},  # ratio_clamp, ratio_cap, agg, seq_denominator
        "kl_loss": {"coef": 0.001, "estimator": "k3", "clamp": DependsOn("estimator", {"k3": 10.0}, None)},
        "value_loss": {"coef": 1.0, "clip": 0.5, "clip_ties": "split", "agg": None},
        "entropy_bonus": {"coef": 0.0, "agg": None},
        "token_loss": {"coef": 1.0, "agg": None},  # any per-token loss matrix (verl's agg_loss)
        "rollout_correction": {"level": "token", "mode": "truncate", "low": None, "high": 2.0},
    },
    unavailable={
        "reinforce": "verl has no plain REINFORCE estimator; use reinforce_pp with whiten=false for the "
        "reward-to-go form",
        "reinforce_rtg": "verl has no unwhitened reward-to-go estimator; use reinforce_pp with whiten=false",
        "grpo_original": "in verl the 1/|o| factor is the loss aggregation: use grpo with "
        "policy_loss.agg='seq-mean-token-mean'",
        "dapo": "in verl DAPO is grpo with policy_loss.agg='token-mean' and clip_high=0.28",
        "flash_reinforce": "verl has no batch-mean baseline estimator (OpenRLHF's FlashREINFORCE): use preset "
        "'openrlhf'",
    },
)

# --- OpenRLHF 0.11.2 (docs/research/openrlhf.md) --------------------------------------------------

# RemoteExperienceMaker.compute_advantages_and_returns: the group baseline on the scalar reward,
# then compute_reward (clip to --reward.clip_range, place on the last token, −β·kl on every token),
# then cumulative returns (γ forced to 1 but for reinforce) or GAE over every position, then
# whitening (gae, reinforce, reinforce_baseline) with population variance and rsqrt(max(var, 1e-8))
_ORLHF_KL = {"kl_coef": 0.01, "kl_estimator": "k1", "kl_clamp": 10.0}  # --algo.kl.*; every estimator clamped ±10
_ORLHF_CLIP = {"reward_clip_low": -10.0, "reward_clip_high": 10.0}  # --reward.clip_range
_ORLHF_WHITEN = {"whiten": True, "whiten_std": True, "whiten_ddof": 0, "whiten_eps": 1e-8, "whiten_eps_mode": "floor"}
_ORLHF_GROUP = {"kl_placement": "reward_to_go", "singleton_groups": "error"}  # n_samples_per_prompt > 1 asserted

# OpenRLHF's options (cli/train_ppo_ray.py) -> the advantage request that reproduces them
_ORLHF_ESTIMATOR_OPTIONS = {
    "--algo.advantage.estimator gae": "estimator='gae' (with values)",
    "--algo.advantage.estimator reinforce": "estimator='reinforce_pp'",
    "--algo.advantage.estimator reinforce_baseline": "estimator='reinforce_pp_baseline'",
    "--algo.advantage.estimator rloo": "estimator='rloo'",
    "--algo.advantage.estimator group_norm": "estimator='grpo'",
    "--algo.advantage.estimator dr_grpo": "estimator='dr_grpo'",
    "--algo.advantage.estimator flash_reinforce": "estimator='flash_reinforce'",
    "--algo.advantage.gamma G": "params.gamma=G (gae, reinforce_pp; OpenRLHF forces 1 for the other estimators)",
    "--algo.advantage.lambd L": "params.lam=L (gae)",
    "--algo.advantage.no_std_norm": "params.whiten_std=false (gae, reinforce_pp, reinforce_pp_baseline)",
    "--reward.clip_range LO HI": "params.reward_clip_low=LO, params.reward_clip_high=HI",
    "--algo.kl.init_coef B": "params.kl_coef=B (KL in the reward); with --algo.kl.use_loss: kl_loss.coef=B and "
    "params.kl_coef=0",
    "--algo.kl.estimator E": "params.kl_estimator=E (KL in the reward); with --algo.kl.use_loss: kl_loss.estimator=E",
    "--algo.kl.target T": "adaptive KL: send the controller's current β as params.kl_coef (advserve keeps no state)",
    "--rollout.n_samples_per_prompt N": "group_ids: the N samples of a prompt share an id (any order; OpenRLHF "
    "needs N > 1 for rloo, reinforce_baseline, group_norm, dr_grpo: singleton_groups='error')",
}

OPENRLHF = Preset(
    name="openrlhf",
    description="OpenRLHF 0.11.2 (openrlhf.trainer.ppo_utils.experience_maker, openrlhf.models.loss): "
    "KL (k1, β = 0.01, clamped ±10) in the reward as reward-to-go, reward clip ±10 after the baseline, "
    "group_norm with unbiased std + 1e-9, whitening with rsqrt(max(var, 1e-8)), interior mask zeros as steps.",
    library="openrlhf 0.11.2",
    estimators={
        "gae": _merge({"gamma": 1.0, "lam": 1.0, "mask_gaps": "step"}, _ORLHF_KL, _ORLHF_CLIP, _ORLHF_WHITEN),
        "reinforce_pp": _merge({"gamma": 1.0, "mask_gaps": "step"}, _ORLHF_KL, _ORLHF_CLIP, _ORLHF_WHITEN),
        # returns: the cumulative return before whitening
        "reinforce_pp_baseline": _merge(_ORLHF_KL, _ORLHF_GROUP, _ORLHF_CLIP, _ORLHF_WHITEN,
                                        {"returns_whitened": False}),
        "rloo": _merge(_ORLHF_KL, _ORLHF_GROUP, _ORLHF_CLIP, _ORLHF_WHITEN, {"whiten": False, "whiten_scope": "token"}),
        "grpo": _merge(_ORLHF_KL, _ORLHF_GROUP, _ORLHF_CLIP,
                       {"std_ddof": 1, "std_eps": 1e-9, "std_scope": "group"}),  # group_norm: torch.std + 1e-9
        "dr_grpo": _merge(_ORLHF_KL, _ORLHF_GROUP, _ORLHF_CLIP),
        "flash_reinforce": _merge(_ORLHF_KL, _ORLHF_CLIP),
    },
    unavailable={
        "reinforce": "OpenRLHF's 'reinforce' is advserve's reinforce_pp (reward-to-go, whitened); there is no "
        "whole-trajectory REINFORCE",
        "reinforce_rtg": "OpenRLHF always normalizes 'reinforce': use reinforce_pp (whiten=false for the plain "
        "reward-to-go)",
        "remax": "OpenRLHF has no ReMax estimator",
        "orz": "use gae (γ = λ = 1 is OpenRLHF's default; OpenRLHF always whitens GAE)",
        "grpo_original": "in OpenRLHF the 1/|o| factor is the loss aggregation: grpo (group_norm) with "
        "--actor.loss_agg_mode seq-mean-token-mean (policy_loss.agg='seq-mean-token-mean')",
        "dapo": "in OpenRLHF DAPO is group_norm (grpo) with --actor.eps_clip_low_high 0.2 0.28 and token-mean",
        **dict.fromkeys(_VERL_ONLY, "OpenRLHF 0.11.2 has no such estimator (verl 0.9.1 has): use preset 'verl'"),
    },
    options=_merge(_ORLHF_ESTIMATOR_OPTIONS, _ORLHF_LOSS_OPTIONS),
    losses={
        # PolicyLoss: ±20 log-ratio clamp for ppo, none for gspo, which also forces per-sequence
        # aggregation and passes its gradient through the mean; dual clip applies to both
        "policy_loss": {
            "mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None,
            "ratio_clamp": DependsOn("mode", {"gspo": None}, 20.0),
            "agg": DependsOn("mode", {"gspo": "seq-mean-token-mean"}, "token-mean"), "loss_scale_factor": None,
            "sequence_ratio_gradient": "through_mean"},
        # compute_approx_kl clamps every estimator to ±10; the actor aggregates the KL and entropy
        # terms per token (aggregate_loss's default), the critic its value loss too
        "kl_loss": {"coef": 0.01, "estimator": "k1", "clamp": 10.0, "agg": "token-mean"},
        # ValueLoss clips the difference: old + (v − old).clamp(±clip), then torch.max (clip_form delta)
        "value_loss": {"coef": 1.0, "clip": 0.5, "clip_ties": "pass", "clip_form": "delta", "agg": "token-mean"},
        "entropy_bonus": {"coef": 0.0, "agg": "token-mean"},
        "token_loss": {"coef": 1.0, "agg": None},  # any per-token loss matrix (verl's agg_loss)
        # is_correction_*: mode mask, threshold [0.5, 5.0], no log clamp; survivors keep their token ratio
        "rollout_correction": {"level": "token", "mode": "mask", "low": 0.5, "high": 5.0, "log_clamp": None,
                               "gating": "ratio", "weight": "token"},
    },
)

# --- TRL 1.16.0 (docs/research/trl.md) ----------------------------------------------------------

# GRPOTrainer._generate_and_score_completions: contiguous groups of num_generations, nanstd (unbiased)
# + 1e-4 outside the sqrt, std forced to 0 for num_generations = 1 (A = 0); no KL in the advantage
# (β goes into the loss). RLOOTrainer: R − β Σ_t (old − ref) before the leave-one-out baseline,
# normalize_advantages over the B sequence values.
_TRL_GRPO_KL = {"kl_coef": 0.0, "kl_estimator": "k3", "kl_clamp": None, "kl_placement": "sequence"}

# TRL's options (GRPOConfig, RLOOConfig) -> the advantage request that reproduces them
_TRL_ESTIMATOR_OPTIONS = {
    "GRPOConfig.scale_rewards='group'": "estimator='grpo' (True is the same)",
    "GRPOConfig.scale_rewards='batch'": "estimator='grpo', params.std_scope='batch'",
    "GRPOConfig.scale_rewards='none'": "estimator='dr_grpo' (False is the same)",
    "GRPOConfig.num_generations=N": "group_ids: the N completions of a prompt share an id (any order, any size)",
    "GRPOConfig.reward_weights=[w_k]": "rewards = Σ_k w_k r_k, computed by the caller",
    "GRPOConfig.multi_objective_aggregation='normalize_then_sum'": "not supported (needs per-function rewards)",
    "RLOOConfig.beta=B": "estimator='rloo', params.kl_coef=B (k1 summed over the completion, before the baseline)",
    "RLOOConfig.normalize_advantages=True": "estimator='rloo', params.whiten=true (over the B sequence advantages)",
    "RLOOConfig.reward_clip_range=(LO, HI)": "clamp rewards to [LO, HI] before sending them (TRL clips the raw "
    "score, before the KL and the baseline)",
    "RLOOConfig.num_generations=N": "group_ids: the N completions of a prompt share an id",
}

TRL = Preset(
    name="trl",
    description="TRL 1.16.0 (trl.trainer.grpo_trainer.GRPOTrainer, trl.trainer.rloo_trainer.RLOOTrainer): "
    "GRPO with unbiased std + 1e-4 (group or batch std), Dr. GRPO, RLOO with β·Σ k1 in the score; "
    "the loss_type aggregations, β·k3 in the loss.",
    library="trl 1.16.0",
    estimators={
        "grpo": _merge(_TRL_GRPO_KL,
                       {"std_ddof": 1, "std_eps": 1e-4, "std_scope": "group", "singleton_groups": "zero"}),
        "dr_grpo": _merge(_TRL_GRPO_KL, {"singleton_groups": "zero"}),  # scale_rewards="none"
        "rloo": _merge({"kl_coef": 0.05, "kl_estimator": "k1", "kl_clamp": None, "kl_placement": "sequence",
                        "singleton_groups": "zero"},
                       {"whiten": False, "whiten_std": True, "whiten_scope": "sequence", "whiten_ddof": 1,
                        "whiten_eps": 1e-4, "whiten_eps_mode": "outside"}),  # normalize_advantages
    },
    unavailable={
        "reinforce": "TRL has no REINFORCE estimator (use rloo or grpo)",
        "reinforce_rtg": "TRL has no reward-to-go estimator",
        "reinforce_pp": "TRL has no REINFORCE++ estimator",
        "reinforce_pp_baseline": "TRL has no token-whitened REINFORCE++-baseline; the closest is grpo with "
        "std_scope='batch' (scale_rewards='batch'), which whitens sequence scores, not tokens",
        "remax": "TRL has no ReMax estimator",
        "gae": "TRL's PPOTrainer (GAE) is not covered by this preset: use preset 'openrlhf' or 'verl'",
        "orz": "TRL's PPOTrainer (GAE) is not covered by this preset: use preset 'openrlhf' or 'verl'",
        "grpo_original": "in TRL the 1/|o| factor is the loss: grpo with loss_type='grpo' "
        "(policy_loss.agg='seq-mean-token-mean')",
        "dapo": "in TRL DAPO is grpo with loss_type='dapo' (the default token-mean) and epsilon_high=0.28",
        "flash_reinforce": "TRL has no batch-mean baseline estimator: use preset 'openrlhf'",
        **dict.fromkeys(_VERL_ONLY, "TRL 1.16.0 has no such estimator (verl 0.9.1 has): use preset 'verl'"),
    },
    options=_merge(_TRL_ESTIMATOR_OPTIONS, _TRL_LOSS_OPTIONS),
    losses={
        # GRPOTrainer._compute_loss: loss_type "dapo" (token mean), epsilon 0.2, no log-ratio clamp,
        # Dr. GRPO's C = max_completion_length (512), grpo/dr_grpo divide by all B rows; cispo caps
        # min(ρ, epsilon_high) with epsilon_high = epsilon = 0.2; sequence level through the mean
        "policy_loss": {
            "mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None, "ratio_clamp": None,
            "agg": "token-mean", "loss_scale_factor": 512.0, "seq_denominator": "all",
            "cispo_cap": DependsOn("mode", {"cispo": 0.2}, None), "sequence_ratio_gradient": "through_mean"},
        # β·k3 inside the per-token loss (the policy's aggregation), × ρ (use_bias_correction_kl)
        "kl_loss": {"coef": 0.0, "estimator": "k3", "clamp": None, "importance_weighted": True},
        "value_loss": {"coef": 1.0, "clip": None, "clip_ties": "pass", "agg": None},
        # the entropy bonus is a local token mean whatever loss_type says
        "entropy_bonus": {"coef": 0.0, "agg": "token-mean"},
        "token_loss": {"coef": 1.0, "agg": None},  # any per-token loss matrix (verl's agg_loss)
        # vllm_importance_sampling_mode "sequence_mask", clip_min None, clip_max 3.0, no log clamp
        "rollout_correction": {"level": "sequence", "mode": "mask", "low": None,
                                                        "high": 3.0, "log_clamp": None},
    },
)

PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, VERL, OPENRLHF, TRL)}
DEFAULT_PRESET = "paper"
