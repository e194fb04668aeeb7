"""Generate tests/golden/trl_<version>.json: golden vectors for a future advserve `trl` preset, computed by
the real TRL library (GRPOTrainer / RLOOTrainer of the installed version, 1.16.0 when this was written).

Run with a throwaway venv (no stubs needed: trl installs with transformers, accelerate, datasets)::

    python3 -m venv /tmp/trlenv
    /tmp/trlenv/bin/pip install torch==2.13.0 numpy trl==1.16.0
    /tmp/trlenv/bin/python tests/golden/make_trl_golden.py

TRL's math lives inside Trainer methods, so every number here comes from TRL's own code reached in one of
two ways (nothing of TRL is copied into this repository):

* advantages: the advantage block of ``GRPOTrainer._generate_and_score_completions`` (from
  ``if self.multi_objective_aggregation == "sum_then_normalize":`` to
  ``advantages = torch.nan_to_num(advantages, nan=0.0)``) and of ``RLOOTrainer._generate_and_score_completions``
  (from the reward weighting to the same ``nan_to_num`` line) are read at run time with ``inspect.getsource``
  and executed verbatim on a namespace holding a minimal ``self`` (reward_weights = [1], scale_rewards, beta,
  normalize_advantages), ``rewards_per_func`` = rewards[:, None] and ``num_generations`` (TRL's groups are
  contiguous blocks of num_generations rows; our ``group_ids`` here are such blocks). The vLLM importance
  sampling block of ``GRPOTrainer._generate_and_score_completions`` is executed the same way.
* losses: ``GRPOTrainer._compute_loss`` itself, on ``object.__new__(GRPOTrainer)`` with the attributes it
  reads set by hand and ``_get_per_token_logps_and_entropies`` replaced by a function returning our
  ``logprobs`` (a leaf float64 tensor) and ``entropy``. One process, gradient accumulation 1,
  steps_per_generation 1, model in train mode. Gradients by torch.autograd.grad of the returned loss.
  ``components.policy`` is the same call with beta = 0; ``components.kl`` = (loss - policy - entropy part)/beta.

Parameter names are advserve's (service/advserve/estimators.py PARAMS, loss_specs.py) where they exist;
names advserve does not have yet are PROPOSED (docs/research/trl.md) and each case lists the ones it uses in
"proposed_new_params". Every case also records TRL's own configuration in "trl_config".
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import json
import math
import os
import textwrap
import types
import warnings
from collections import defaultdict

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trl.trainer import grpo_trainer as gt  # noqa: E402
from trl.trainer import rloo_trainer as rt  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TRL_VERSION = importlib.metadata.version("trl")
OUT = os.path.join(HERE, f"trl_{TRL_VERSION}.json")
DT = torch.float64

rng = np.random.default_rng(20251125)


# ---------------------------------------------------------------------------------- TRL code, verbatim
def _block(fn, start: str, end: str | None, stop_before: str | None = None) -> types.CodeType:
    """Compile the lines of fn's source from the first line containing `start` to the first later line
    containing `end` (inclusive) or up to the line before one containing `stop_before`."""
    lines = inspect.getsource(fn).splitlines()
    i = next(k for k, l in enumerate(lines) if start in l)
    if end is not None:
        j = next(k for k in range(i + 1, len(lines)) if end in lines[k]) + 1
    else:
        j = next(k for k in range(i + 1, len(lines)) if stop_before in lines[k])
    src = textwrap.dedent("\n".join(lines[i:j]))
    return compile(src, f"<{fn.__qualname__} lines {i}-{j}>", "exec")


GRPO_ADV = _block(gt.GRPOTrainer._generate_and_score_completions,
                  'if self.multi_objective_aggregation == "sum_then_normalize":',
                  "advantages = torch.nan_to_num(advantages, nan=0.0)")
RLOO_ADV = _block(rt.RLOOTrainer._generate_and_score_completions,
                  "# Apply weights to each reward function's output and sum",
                  "advantages = torch.nan_to_num(advantages, nan=0.0)")
VLLM_IS = _block(gt.GRPOTrainer._generate_and_score_completions,
                 "# Compute the importance sampling ratio when using vLLM", None,
                 stop_before="# Compute the per-token log probabilities for the reference model")


def trl_grpo_advantages(rewards, num_generations, scale_rewards):
    R = torch.tensor(rewards, dtype=DT)
    ns = {
        "self": types.SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=scale_rewards,
                                      reward_weights=torch.ones(1, dtype=DT)),
        "rewards_per_func": R[:, None].clone(), "unscorable_mask": torch.zeros(len(R), dtype=torch.bool),
        "num_generations": num_generations, "device": "cpu", "torch": torch, "nanstd": nanstd,
    }
    exec(GRPO_ADV, ns)
    return ns["advantages"]


def trl_rloo_advantages(rewards, num_generations, beta=0.0, mask=None, old=None, ref=None, normalize=False):
    R = torch.tensor(rewards, dtype=DT)
    ns = {
        "self": types.SimpleNamespace(reward_weights=torch.ones(1, dtype=DT), reward_clip_range=None, beta=beta,
                                      normalize_advantages=normalize),
        "rewards_per_func": R[:, None].clone(), "unscorable_mask": torch.zeros(len(R), dtype=torch.bool),
        "num_generations": num_generations, "device": "cpu", "torch": torch, "nanstd": nanstd,
        "gather": lambda t: t,
    }
    if beta:
        ns.update(completion_mask=torch.tensor(mask), old_per_token_logps=torch.tensor(old, dtype=DT),
                  ref_per_token_logps=torch.tensor(ref, dtype=DT))
    exec(RLOO_ADV, ns)
    return ns["advantages"]


def trl_vllm_is(mask, old, rollout, mode, clip_min, clip_max):
    ns = {
        "self": types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                      vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                                      vllm_importance_sampling_clip_max=clip_max),
        "completion_mask": torch.tensor(mask), "tool_mask": None, "torch": torch, "math": math,
        "old_per_token_logps": torch.tensor(old, dtype=DT), "sampling_per_token_logps": torch.tensor(rollout, dtype=DT),
    }
    exec(VLLM_IS, ns)
    return ns["vllm_importance_sampling_ratio"]


class _Accel:
    num_processes = 1
    sync_gradients = True

    def gather(self, t):
        return t.reshape(-1) if t.dim() == 0 else t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


def trl_grpo_loss(cfg, tensors, beta_override=None):
    """GRPOTrainer._compute_loss on a hand-built trainer; returns (loss, grad_logprobs, grad_entropy)."""
    m = np.asarray(tensors["response_mask"])
    B, T = m.shape
    tr = object.__new__(gt.GRPOTrainer)
    beta = cfg.get("beta", 0.0) if beta_override is None else beta_override
    entropy_coef = cfg.get("entropy_coef", 0.0)
    use_vllm = cfg.get("vllm_importance_sampling_mode") is not None
    tr.__dict__.update(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=cfg.get("importance_sampling_level", "token"), beta=beta,
        loss_type=cfg["loss_type"], epsilon_low=cfg.get("epsilon", 0.2),
        epsilon_high=cfg.get("epsilon_high") if cfg.get("epsilon_high") is not None else cfg.get("epsilon", 0.2),
        use_vllm=use_vllm, vllm_importance_sampling_correction=use_vllm,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=cfg.get("max_completion_length", 512), accelerator=_Accel(),
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=cfg.get("use_bias_correction_kl", True),
                                   delta=cfg.get("delta"), steps_per_generation=1),
    )
    lp = torch.tensor(tensors["logprobs"], dtype=DT, requires_grad=True)
    ent = torch.tensor(tensors["entropy"], dtype=DT, requires_grad=True) if "entropy" in tensors else torch.zeros(B, T, dtype=DT)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    # TRL's masks: completion_mask (1 up to the row's end, padding 0) times tool_mask (0 on tool tokens)
    comp = np.zeros_like(m)
    for i in range(B):
        nz = np.nonzero(m[i])[0]
        if len(nz):
            comp[i, : nz[-1] + 1] = 1
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": torch.tensor(comp),
        "advantages": torch.tensor(tensors["_seq_advantages"], dtype=DT),
        "old_per_token_logps": torch.tensor(tensors["old_logprobs"], dtype=DT),
        "num_items_in_batch": torch.tensor(cfg.get("num_items_in_batch", int(m.sum()))),
    }
    if (comp != m).any():
        inputs["tool_mask"] = torch.tensor(np.where(comp == 1, m, 1))
    if beta:
        inputs["ref_per_token_logps"] = torch.tensor(tensors["ref_logprobs"], dtype=DT)
    if use_vllm:
        inputs["importance_sampling_ratio"] = trl_vllm_is(
            comp, tensors["old_logprobs"], tensors["rollout_logprobs"], cfg["vllm_importance_sampling_mode"],
            cfg.get("vllm_importance_sampling_clip_min"), cfg.get("vllm_importance_sampling_clip_max", 3.0))
        if "tool_mask" in inputs:
            raise AssertionError("vLLM IS cases use masks without gaps")
    loss = tr._compute_loss(None, inputs)
    wrt = [lp] + ([ent] if "entropy" in tensors else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    ge = grads[1] if len(grads) > 1 else None
    return loss.detach(), grads[0], ge, tr


# ----------------------------------------------------------------------------------------------- inputs
def mask(*rows: str) -> np.ndarray:
    return np.array([[int(c) for c in r] for r in rows], dtype=np.int64)


def rnd(shape, scale=1.0, nd=4):
    return np.round(rng.normal(0.0, scale, size=shape), nd)


def logprobs(m, nd=4):
    return np.round(-np.abs(rng.normal(0.0, 1.2, size=m.shape)) - 0.01, nd)


def tolist(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).tolist()


def contiguous_ids(B, n):
    return [i // n for i in range(B)]


ADV_CASES = []  # (name, estimator, params, proposed_new, trl_config, note, tensors, fn)


def adv_case(name, est, params, proposed, trl_cfg, note, tensors, fn):
    ADV_CASES.append((name, est, params, proposed, trl_cfg, note, tensors, fn))


def build_advantage_cases():
    # GRPO, scale_rewards="group": (R - mean_g)/(std_g(ddof 1) + 1e-4)
    grpo_p = {"std_ddof": 1, "std_eps": 1e-4, "singleton_groups": "zero"}
    m = mask("111111", "111000", "100000", "111110", "110000", "111111",
             "111100", "100000", "110000", "111000", "111111", "111110")
    R = rnd(12)
    adv_case("grpo/group-contiguous-4x3", "grpo", grpo_p, [], {"scale_rewards": "group", "num_generations": 3}, None,
             {"response_mask": m, "group_ids": contiguous_ids(12, 3), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 3, "group"))
    m = mask("1111", "1100", "1110", "1000", "1111", "1111", "1100", "1110")
    R = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # group 0: 3/4 ones; group 1: all equal
    adv_case("grpo/binary-with-all-equal-group", "grpo", grpo_p, [], {"scale_rewards": "group", "num_generations": 4},
             "group 1 has all-equal rewards: std 0, TRL gives (R - mean)/1e-4 = 0",
             {"response_mask": m, "group_ids": contiguous_ids(8, 4), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 4, "group"))
    R = np.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    m = mask("111", "110", "100", "111", "111", "100")
    adv_case("grpo/all-equal-inexact-mean", "grpo", grpo_p, [], {"scale_rewards": "group", "num_generations": 3},
             "all-equal groups whose float64 mean is not exactly the common value: TRL divides the rounding "
             "residue by 1e-4 (advserve's exact-constant rule would give exactly 0; compare with atol)",
             {"response_mask": m, "group_ids": contiguous_ids(6, 3), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 3, "group"))
    m = mask("1", "1", "1", "1", "1", "1")
    R = rnd(6)
    adv_case("grpo/length-1-responses-T1", "grpo", grpo_p, [], {"scale_rewards": "group", "num_generations": 2}, None,
             {"response_mask": m, "group_ids": contiguous_ids(6, 2), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 2, "group"))
    m = mask("111", "110", "100", "111")
    R = rnd(4)
    adv_case("grpo/singleton-groups-num-generations-1", "grpo", grpo_p, [],
             {"scale_rewards": "group", "num_generations": 1},
             "num_generations = 1 (TRL: eval only): std forced to 0, advantage 0",
             {"response_mask": m, "group_ids": contiguous_ids(4, 1), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 1, "group"))
    m = mask("11111", "11100", "11000", "11111", "10000", "11110", "11111", "11000", "11100")
    R = rnd(9)
    batch_p = dict(grpo_p, std_scope="batch")
    adv_case("grpo/scale-rewards-batch", "grpo", batch_p, ["std_scope"],
             {"scale_rewards": "batch", "num_generations": 3},
             "group mean, batch std (unbiased over all B rewards) + 1e-4",
             {"response_mask": m, "group_ids": contiguous_ids(9, 3), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 3, "batch"))
    R2 = R.copy()
    R2[3:6] = 0.5
    adv_case("grpo/scale-rewards-batch-with-all-equal-group", "grpo", batch_p, ["std_scope"],
             {"scale_rewards": "batch", "num_generations": 3}, None,
             {"response_mask": m, "group_ids": contiguous_ids(9, 3), "rewards": R2},
             lambda t: trl_grpo_advantages(t["rewards"], 3, "batch"))
    adv_case("grpo/scale-rewards-batch-singletons", "grpo", batch_p, ["std_scope"],
             {"scale_rewards": "batch", "num_generations": 1},
             "num_generations = 1 with batch scaling: mean_g = R, so A = 0/(std_batch + 1e-4) = 0",
             {"response_mask": m, "group_ids": contiguous_ids(9, 1), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 1, "batch"))
    adv_case("dr_grpo/scale-rewards-none", "dr_grpo", {"singleton_groups": "zero"}, [],
             {"scale_rewards": "none", "num_generations": 3}, "A = R - mean_g R",
             {"response_mask": m, "group_ids": contiguous_ids(9, 3), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 3, "none"))
    adv_case("dr_grpo/scale-rewards-none-singletons", "dr_grpo", {"singleton_groups": "zero"}, [],
             {"scale_rewards": "none", "num_generations": 1}, None,
             {"response_mask": m, "group_ids": contiguous_ids(9, 1), "rewards": R},
             lambda t: trl_grpo_advantages(t["rewards"], 1, "none"))

    # RLOO
    rloo_p = {"kl_coef": 0.0, "kl_estimator": "k1", "kl_clamp": None, "singleton_groups": "zero"}
    m = mask("1111", "1100", "1110", "1000", "1111", "1111", "1100", "1110")
    R = rnd(8)
    adv_case("rloo/contiguous-2x4", "rloo", rloo_p, [], {"beta": 0.0, "num_generations": 4}, None,
             {"response_mask": m, "group_ids": contiguous_ids(8, 4), "rewards": R},
             lambda t: trl_rloo_advantages(t["rewards"], 4))
    m = mask("11111", "11011", "10000", "11101", "11100", "11111")
    old = logprobs(m)
    ref = np.round(old + rng.normal(0, 0.4, size=m.shape), 4)
    R = rnd(6)
    adv_case("rloo/kl-in-reward-k1-beta-0.05", "rloo", dict(rloo_p, kl_coef=0.05), [],
             {"beta": 0.05, "num_generations": 3},
             "R - beta * sum_t m_t (old - ref) before the leave-one-out baseline (TRL RLOO's default beta)",
             {"response_mask": m, "group_ids": contiguous_ids(6, 3), "rewards": R, "old_logprobs": old * m,
              "ref_logprobs": ref * m},
             lambda t: trl_rloo_advantages(t["rewards"], 3, 0.05, t["response_mask"], t["old_logprobs"],
                                           t["ref_logprobs"]))
    m = mask("111", "110", "100", "111")
    adv_case("rloo/singletons-num-generations-1", "rloo", rloo_p, [], {"beta": 0.0, "num_generations": 1},
             "num_generations = 1 (eval only): advantage 0",
             {"response_mask": m, "group_ids": contiguous_ids(4, 1), "rewards": rnd(4)},
             lambda t: trl_rloo_advantages(t["rewards"], 1))
    m = mask("11111", "11100", "11000", "11111", "10000", "11110", "11111", "11000")
    R = rnd(8)
    adv_case("rloo/normalize-advantages", "rloo",
             dict(rloo_p, whiten=True, whiten_scope="sequence", whiten_ddof=1, whiten_eps=1e-4, whiten_eps_place="std"),
             ["whiten_scope", "whiten_eps_place"], {"beta": 0.0, "num_generations": 2, "normalize_advantages": True},
             "normalize_advantages: (A - mean_B A)/(std_B A (ddof 1) + 1e-4) over the B sequence advantages "
             "(one value per sequence, not per token; eps outside the sqrt)",
             {"response_mask": m, "group_ids": contiguous_ids(8, 2), "rewards": R},
             lambda t: trl_rloo_advantages(t["rewards"], 2, normalize=True))


LOSS_CASES = []  # (name, request, proposed_new, trl_config, note, tensors)


def loss_inputs(m, spread=0.3, with_ref=False, with_rollout=False, with_entropy=False, adv_scale=1.0):
    B = m.shape[0]
    old = logprobs(m)
    lp = np.round(old + rng.normal(0, spread, size=m.shape), 4)
    seq_adv = rnd(B, adv_scale)
    t = {"response_mask": m, "old_logprobs": old * m, "logprobs": lp * m,
         "advantages": seq_adv[:, None] * m, "_seq_advantages": seq_adv}
    if with_ref:
        t["ref_logprobs"] = np.round(old + rng.normal(0, 0.4, size=m.shape), 4) * m
    if with_rollout:
        t["rollout_logprobs"] = np.round(old + rng.normal(0, 0.15, size=m.shape), 4) * m
    if with_entropy:
        t["entropy"] = np.round(rng.uniform(0.1, 3.0, size=m.shape), 4) * m
    return t


AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
       "dapo": "token-mean", "cispo": "token-mean"}


def policy_request(cfg, B):
    """Our request for a TRL config; returns (request, proposed_new_params)."""
    lt = cfg["loss_type"]
    eps = cfg.get("epsilon", 0.2)
    eh = cfg.get("epsilon_high") if cfg.get("epsilon_high") is not None else eps
    proposed = []
    seq = cfg.get("importance_sampling_level", "token") == "sequence"
    pol = {"agg": AGG[lt], "ratio_clamp": None}
    if lt == "cispo":
        pol.update(mode="cispo", clip_low=1.0, clip_high=None, cispo_cap=eh)
        proposed.append("policy_loss.cispo_cap")
        if seq:
            pol["cispo_level"] = "sequence"
            proposed.append("policy_loss.cispo_level")
    else:
        pol.update(mode="gspo" if seq else "ppo_clip", clip_low=eps, clip_high=eh)
        delta = cfg.get("delta")
        if not seq:
            pol["dual_clip"] = delta
        elif delta is not None:
            pol["ratio_cap"] = delta
            proposed.append("policy_loss.ratio_cap")
    if lt == "dr_grpo":
        pol["loss_scale_factor"] = cfg.get("max_completion_length", 512)
    req = {"policy_loss": pol}
    if lt in ("grpo", "dr_grpo"):
        pol["seq_denominator"] = "all"  # TRL divides by B, empty rows included
        proposed.append("policy_loss.seq_denominator")
    if lt in ("dapo", "cispo") and "num_items_in_batch" in cfg:
        req["num_tokens"] = cfg["num_items_in_batch"]
    if cfg.get("beta", 0.0):
        req["kl_loss"] = {"coef": cfg["beta"], "estimator": "k3", "clamp": None,
                          "importance_weighted": cfg.get("use_bias_correction_kl", True)}
        proposed.append("kl_loss.importance_weighted")
    if cfg.get("entropy_coef", 0.0):
        req["entropy_bonus"] = {"coef": cfg["entropy_coef"], "agg": "token-mean"}
        proposed.append("entropy_bonus.agg")
    mode = cfg.get("vllm_importance_sampling_mode")
    if mode is not None:
        level, kind = mode.split("_")
        req["rollout_correction"] = {"level": level, "mode": kind, "low": cfg.get("vllm_importance_sampling_clip_min"),
                                     "high": cfg.get("vllm_importance_sampling_clip_max", 3.0), "log_clamp": None}
        proposed.append("rollout_correction.log_clamp")
        if kind == "mask" and cfg.get("vllm_importance_sampling_clip_min") is None:
            proposed.append("rollout_correction.low=null with mode=mask")
    return req, proposed


def loss_case(name, cfg, tensors, note=None):
    req, proposed = policy_request(cfg, tensors["response_mask"].shape[0])
    LOSS_CASES.append((name, req, proposed, cfg, note, tensors))


def build_loss_cases():
    m = mask("11111111", "11100000", "11011010", "10000000", "11111100", "11110111")
    m_nogap = mask("11111111", "11100000", "11111110", "10000000", "11111100", "11111111")
    m_empty = mask("111111", "000000", "111000", "110000", "111111")
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo"):
        base = {"loss_type": lt, "epsilon": 0.2, "epsilon_high": 5.0 if lt == "cispo" else None}
        if lt == "dr_grpo":
            base["max_completion_length"] = 16
        loss_case(f"{lt}/token-defaults-mask-gaps", base, loss_inputs(m))
        loss_case(f"{lt}/empty-row", base, loss_inputs(m_empty))
        loss_case(f"{lt}/length-1-rows", base, loss_inputs(mask("1", "1", "1", "1"), spread=0.4))
    loss_case("cispo/default-epsilon-high-is-absolute-0.2", {"loss_type": "cispo", "epsilon": 0.2},
              loss_inputs(m), "TRL default epsilon_high = epsilon = 0.2 caps the CISPO weight at 0.2 (absolute)")
    loss_case("cispo/sequence-level", {"loss_type": "cispo", "epsilon_high": 1.2, "importance_sampling_level": "sequence"},
              loss_inputs(m, spread=0.1), "TRL warns about this combination but runs it")
    loss_case("dapo/global-num-items", {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28,
                                        "num_items_in_batch": 113}, loss_inputs(m))
    loss_case("cispo/global-num-items", {"loss_type": "cispo", "epsilon_high": 4.0, "num_items_in_batch": 77},
              loss_inputs(m, spread=0.8))
    loss_case("dapo/epsilon-high-0.28-wide-ratios", {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28},
              loss_inputs(m, spread=0.6))
    loss_case("grpo/delta-3", {"loss_type": "grpo", "epsilon": 0.2, "delta": 3.0},
              loss_inputs(m, spread=1.2), "delta > 1 + epsilon_high: identical to dual-clip c = delta")
    loss_case("dapo/delta-1.5-epsilon-high-0.28", {"loss_type": "dapo", "epsilon_high": 0.28, "delta": 1.5},
              loss_inputs(m, spread=1.0))
    loss_case("grpo/sequence-level-gspo", {"loss_type": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4,
                                            "importance_sampling_level": "sequence"}, loss_inputs(m, spread=0.02))
    loss_case("grpo/sequence-level-empty-row", {"loss_type": "grpo", "epsilon": 0.2,
                                                 "importance_sampling_level": "sequence"}, loss_inputs(m_empty, spread=0.1))
    loss_case("dapo/sequence-level", {"loss_type": "dapo", "epsilon": 0.2, "importance_sampling_level": "sequence"},
              loss_inputs(m, spread=0.1), "TRL warns (dapo sums per-token copies of the sequence loss) but runs it")
    loss_case("grpo/sequence-level-delta", {"loss_type": "grpo", "epsilon": 0.2, "delta": 1.1,
                                             "importance_sampling_level": "sequence"}, loss_inputs(m, spread=0.15))
    for lt in ("grpo", "dapo", "dr_grpo"):
        cfg = {"loss_type": lt, "beta": 0.04, "max_completion_length": 12}
        loss_case(f"{lt}/beta-0.04-k3-bias-corrected", cfg, loss_inputs(m, with_ref=True))
        loss_case(f"{lt}/beta-0.04-k3-plain", dict(cfg, use_bias_correction_kl=False), loss_inputs(m, with_ref=True))
    loss_case("grpo/sequence-level-beta-bias-corrected", {"loss_type": "grpo", "beta": 0.1,
                                                          "importance_sampling_level": "sequence"},
              loss_inputs(m, spread=0.1, with_ref=True))
    loss_case("cispo/beta-0.02", {"loss_type": "cispo", "epsilon_high": 3.0, "beta": 0.02},
              loss_inputs(m, spread=0.7, with_ref=True))
    loss_case("dapo/entropy-bonus", {"loss_type": "dapo", "entropy_coef": 0.01}, loss_inputs(m, with_entropy=True),
              "TRL's entropy bonus is always a token mean over the local mask, whatever loss_type")
    loss_case("grpo/entropy-bonus", {"loss_type": "grpo", "entropy_coef": 0.01}, loss_inputs(m, with_entropy=True))
    for mode, cmin, cmax in [("sequence_mask", None, 3.0), ("sequence_truncate", None, 2.0),
                             ("token_truncate", None, 1.5), ("token_mask", 0.8, 1.25), ("sequence_mask", 0.5, 3.0)]:
        for lt in ("dapo", "grpo"):
            cfg = {"loss_type": lt, "vllm_importance_sampling_mode": mode, "vllm_importance_sampling_clip_min": cmin,
                   "vllm_importance_sampling_clip_max": cmax}
            loss_case(f"{lt}/vllm-{mode}-{cmin}-{cmax}", cfg, loss_inputs(m_nogap, with_rollout=True))
    cfg = {"loss_type": "dapo", "beta": 0.05, "vllm_importance_sampling_mode": "token_truncate",
           "vllm_importance_sampling_clip_max": 1.2, "entropy_coef": 0.001, "epsilon_high": 0.28, "delta": 2.0}
    loss_case("combined/dapo-beta-vllm-token-truncate-entropy-delta", cfg,
              loss_inputs(m_nogap, spread=0.6, with_ref=True, with_rollout=True, with_entropy=True),
              "the vLLM IS weight multiplies the policy term only, not beta*kl")


# ------------------------------------------------------------------------------- independent reference
def ref_grpo_adv(R, n, scale):
    R = np.asarray(R, float)
    g = R.reshape(-1, n)
    mean = np.repeat(g.mean(1), n)
    if scale == "batch":
        std = np.full_like(R, R.std(ddof=1) if len(R) > 1 else 0.0)
    else:
        std = np.repeat(g.std(1, ddof=1), n) if n > 1 else np.zeros_like(R)
    a = R - mean
    return a if scale == "none" else a / (std + 1e-4)


def finite(x):
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def advantage_record(name, est, params, proposed, trl_cfg, note, tensors, fn):
    """One advantage case of the golden file, TRL's answer. Also used by tests/golden/fuzz_libraries.py."""
    m = torch.tensor(tensors["response_mask"], dtype=DT)
    a = fn(tensors)
    assert a.dtype == DT and a.shape == (m.shape[0],), (name, a.dtype, a.shape)
    if est in ("grpo", "dr_grpo"):
        r = ref_grpo_adv(tensors["rewards"], trl_cfg["num_generations"], trl_cfg["scale_rewards"])
        assert np.allclose(a.numpy(), r, atol=1e-9), (name, a, r)
    adv = a[:, None] * m
    assert finite(adv), name
    case = {"case": name, "estimator": est, "params": params, "dtype": "float64",
            "tensors": {k: (list(v) if k == "group_ids" else tolist(v)) for k, v in tensors.items()},
            "expected": {"advantages": tolist(adv), "returns": tolist(adv)},
            "trl_config": trl_cfg, "proposed_new_params": proposed}
    if note:
        case["note"] = note
    return case


def loss_record(name, request, proposed, cfg, note, tensors):
    """One loss case of the golden file, TRL's answer. Also used by tests/golden/fuzz_libraries.py."""
    loss, g_lp, g_ent, tr = trl_grpo_loss(cfg, tensors)
    assert finite(loss) and finite(g_lp), name
    comps = {"policy": None, "kl": None, "value": None, "entropy": None}
    m = torch.tensor(tensors["response_mask"], dtype=DT)
    ent_part = 0.0
    if cfg.get("entropy_coef", 0.0):
        e = torch.tensor(tensors["entropy"], dtype=DT)
        comps["entropy"] = float((e * m).sum() / m.sum().clamp(min=1.0))
        ent_part = cfg["entropy_coef"] * comps["entropy"]
    if cfg.get("beta", 0.0):
        p_loss, _, _, _ = trl_grpo_loss(dict(cfg, entropy_coef=0.0), tensors, beta_override=0.0)
        comps["policy"] = float(p_loss)
        comps["kl"] = (float(loss) + ent_part - float(p_loss)) / cfg["beta"]
    else:
        comps["policy"] = float(loss) + ent_part
    case = {"case": name, "dtype": "float64", "request": request,
            "tensors": {k: tolist(v) for k, v in tensors.items() if not k.startswith("_")},
            "expected": {"loss": float(loss), "components": comps, "grad_logprobs": tolist(g_lp * m),
                         "grad_values": None, "grad_entropy": None if g_ent is None else tolist(g_ent * m)},
            "trl_config": cfg, "proposed_new_params": proposed}
    if note:
        case["note"] = note
    return case


def main():
    build_advantage_cases()
    build_loss_cases()
    adv_out = [advantage_record(*c) for c in ADV_CASES]
    loss_out = [loss_record(*c) for c in LOSS_CASES]

    doc = {
        "library": "trl",
        "version": TRL_VERSION,
        "torch": torch.__version__,
        "generated": datetime.date.today().isoformat(),
        "generator": "tests/golden/make_trl_golden.py",
        "note": "groundwork for a `trl` preset that does not exist yet; request/params use advserve names, "
                "names listed in each case's proposed_new_params are proposals (docs/research/trl.md)",
        "advantages": adv_out,
        "losses": loss_out,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {len(adv_out)} advantage cases, {len(loss_out)} loss cases, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
