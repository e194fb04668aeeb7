"""Generate tests/golden/verl_0.9.1_policy_losses.json: golden vectors for verl 0.9.1's other policy losses
(dro, sapo, gpg, clip_cov, kl_cov, geo_mean, dppo_tv, dppo_kl, bypass_mode) under advserve's `verl` preset,
computed by the real verl library (version 0.9.1).

Run with the throwaway venv of make_verl_golden.py (``verl==0.9.1 --no-deps`` plus torch, numpy, packaging,
omegaconf; the rest of verl's import-time dependencies stubbed by ``verl_stub.py``)::

    /tmp/verlenv/bin/python tests/golden/make_verl_policy_losses.py

Every expected number comes out of verl's own registered function (``core_algos.get_policy_loss_fn(mode)``)
called as verl's actor calls it: an ``ActorConfig`` carrying the parameters (clip_ratio_low/high, clip_ratio_c,
tau_pos/tau_neg, ``PolicyLossConfig`` clip_cov_*, kl_cov_ratio, ppo_kl_coef, dro_beta, rollout_correction),
``global_batch_info`` filled as ``verl.workers.utils.losses.ppo_loss`` fills it on one rank, response_mask as
bool; float64 inputs; the gradient d loss / d log_prob by ``torch.autograd.grad``, multiplied by
response_mask (advserve defines masked positions as 0). clip_cov draws its tokens with torch.randperm from the
global generator: ``torch.manual_seed(seed)`` right before the call, the seed recorded as the request's
``clip_cov_seed``. bypass_mode wraps its weights in a DataProto, whose tensordict is stubbed: the one class it
needs (``from_dict`` holding the tensors) stands in; the weights themselves are computed by verl's code.

Metrics: verl's metric dict is recorded ("verl_metrics") with the advserve metric each maps onto.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import verl_stub  # noqa: E402

verl_stub.install()

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import verl  # noqa: E402
from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.trainer.ppo import core_algos as ca  # noqa: E402
from verl.trainer.ppo import rollout_corr_helper as rch  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

OUT = os.path.join(HERE, "verl_0.9.1_policy_losses.json")


class _TensorsOnly:
    """DataProto.from_dict's result as bypass_mode reads it (.batch[name]); tensordict is stubbed here."""

    def __init__(self, batch):
        self.batch = batch

    @classmethod
    def from_dict(cls, tensors):
        return cls(dict(tensors))


rch.DataProto = _TensorsOnly

rng = np.random.default_rng(20260917)
MODES = ("dro", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dppo_tv", "dppo_kl", "bypass_mode")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")


# ----------------------------------------------------------------------------------------------- inputs
def mask(*rows: str) -> np.ndarray:
    return np.array([[int(c) for c in r] for r in rows], dtype=np.int64)


MASKS = {
    "ragged": mask("11111111", "11111000", "11000000", "11111111", "11110000", "10000000"),
    "gaps": mask("11011101", "10111100", "11111111", "01101100", "11100111"),
    "length-1": mask("1000", "1000", "1100", "1000"),
    "empty-row": mask("1111100", "0000000", "1111111", "1110000"),
    "full": np.ones((4, 6), dtype=np.int64),
}


def random_mask(b, t):
    m = (rng.uniform(size=(b, t)) < 0.8).astype(np.int64)
    m[:, 0] = 1
    return m


def tensors_for(m, spread=0.3, adv="token"):
    """Log-probs in log(0.02..0.98) (probabilities matter to dppo), old = lp + noise, advantages per token
    or per sequence (GMPO's form), masked positions filled with garbage-free values verl never reads."""
    b, t = m.shape
    lp = np.round(np.log(rng.uniform(0.02, 0.98, size=(b, t))), 6)
    old = np.round(np.minimum(lp + rng.normal(0.0, spread, size=(b, t)), -1e-3), 6)
    if adv == "sequence":
        a = np.repeat(np.round(rng.normal(size=(b, 1)), 4), t, axis=1)
    else:
        a = np.round(rng.normal(size=(b, t)), 4)
    return {"response_mask": m, "logprobs": lp, "old_logprobs": old, "advantages": a * m}


# ----------------------------------------------------------------------------------------------- verl
def actor_config(mode: str, request: dict) -> ActorConfig:
    """verl's ActorConfig for the advserve `policy_loss` request (advserve name -> verl name)."""
    pl = request["policy_loss"]
    lo, hi = pl.get("clip_low", 0.2), pl.get("clip_high", 0.2)
    c = pl.get("ratio_cap", pl.get("dual_clip", 3.0))
    kw = {theirs: pl[ours] for ours, theirs in (
        ("clip_cov_ratio", "clip_cov_ratio"), ("clip_cov_lb", "clip_cov_lb"), ("clip_cov_ub", "clip_cov_ub"),
        ("kl_cov_ratio", "kl_cov_ratio"), ("kl_cov_coef", "ppo_kl_coef"), ("dro_beta", "dro_beta")) if ours in pl}
    if mode == "bypass_mode":
        high, low = pl.get("bypass_is_high", 2.0), pl.get("bypass_is_low")
        kw["rollout_correction"] = RolloutCorrectionConfig(
            rollout_is=pl.get("bypass_is", "sequence"), rollout_is_threshold=high if low is None else f"{low}_{high}",
            bypass_mode=True, loss_type=pl.get("bypass_loss", "ppo_clip"))
    policy = PolicyLossConfig(loss_mode=mode, **kw)
    cfg = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=lo, clip_ratio_low=lo,
        clip_ratio_high=hi, clip_ratio_c=c, loss_agg_mode=pl.get("agg", "token-mean"),
        loss_scale_factor=pl.get("loss_scale_factor"), policy_loss=policy,
        tau_pos=pl.get("tau_pos", 1.0), tau_neg=pl.get("tau_neg", 1.05))
    # as verl.workers.utils.losses.ppo_loss fills it (one data-parallel rank)
    cfg.global_batch_info["dp_size"] = 1
    cfg.global_batch_info["batch_num_tokens"] = request.get("num_tokens")
    cfg.global_batch_info["global_batch_size"] = request.get("num_sequences")
    cfg.global_batch_info["loss_scale_factor"] = cfg.loss_scale_factor
    return cfg


def verl_policy_loss(request: dict, tensors: dict) -> dict:
    pl = request["policy_loss"]
    mode = pl["mode"]
    cfg = actor_config(mode, request)
    T = {k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items() if k != "response_mask"}
    m = torch.tensor(tensors["response_mask"]).to(bool)
    lp = T["logprobs"].clone().requires_grad_(True)
    if mode == "clip_cov":
        torch.manual_seed(pl.get("clip_cov_seed", 0))
    loss, metrics = ca.get_policy_loss_fn(mode)(
        old_log_prob=T["old_logprobs"], log_prob=lp, advantages=T["advantages"], response_mask=m,
        loss_agg_mode=cfg.loss_agg_mode, config=cfg, rollout_is_weights=None)
    (grad,) = torch.autograd.grad(loss, [lp])
    return {"loss": loss.item(), "grad_logprobs": (grad * m).tolist(),
            "verl_metrics": {k: float(v) for k, v in metrics.items()
                             if k.startswith("actor/") or k in ("rollout_corr/rollout_is_mean",)}}


# ----------------------------------------------------------------------------------------------- cases
CASES: list[tuple[str, dict, dict]] = []


def case(name: str, policy_loss: dict, tensors: dict, **request) -> None:
    CASES.append((name, {"policy_loss": policy_loss, **request}, tensors))


def with_ties(t: dict, d: float) -> dict:
    """A few valid tokens with lp − old exactly d (a clip bound in log space, or 0: ratio 1)."""
    t = {k: v.copy() for k, v in t.items()}
    m = t["response_mask"].astype(bool)
    idx = np.argwhere(m)[:: 3]
    for i, j in idx:
        t["old_logprobs"][i, j] = -1.0
        t["logprobs"][i, j] = -1.0 + d
    return t


def build_cases() -> None:
    for mode in MODES:
        base = {"mode": mode}
        if mode == "dro":
            base["dro_beta"] = 0.1  # verl requires one
        # defaults over every mask shape and every aggregation (sapo and geo_mean aggregate their own way)
        for i, (shape, m) in enumerate(MASKS.items()):
            agg = AGGS[i % len(AGGS)]
            p = dict(base) if mode in ("sapo", "geo_mean") else {**base, "agg": agg}
            if agg == "seq-mean-token-sum-norm" and "agg" in p:
                p["loss_scale_factor"] = [None, 16.0][i % 2]
            t = tensors_for(m, adv="sequence" if mode == "geo_mean" and i % 2 else "token")
            case(f"{mode}/defaults-{shape}-{agg if 'agg' in p else 'own-agg'}", p, t)
        # random shapes, non-default parameters
        for k in range(4):
            m = random_mask(int(rng.integers(3, 9)), int(rng.integers(2, 12)))
            p = dict(base)
            if mode in ("clip_cov", "geo_mean", "dppo_tv", "dppo_kl", "bypass_mode"):
                p["clip_low"], p["clip_high"] = [(0.1, 0.28), (0.3, 0.1), (0.05, 0.05), (0.2, 0.4)][k]
            if mode == "dro":
                p["dro_beta"] = [0.01, 0.5, 2.0, 1e-3][k]
            if mode == "sapo":
                p["tau_pos"], p["tau_neg"] = [(0.5, 2.0), (2.0, 1.0), (1.0, 1.0), (3.0, 0.2)][k]
            if mode == "clip_cov":
                p["clip_cov_ratio"] = [0.05, 0.2, 1.0, 0.0002][k]
                p["clip_cov_lb"], p["clip_cov_ub"] = [(0.0, 5.0), (-1.0, 1.0), (0.1, 0.5), (-10.0, 10.0)][k]
                p["clip_cov_seed"] = [1, 7, 123, 2026][k]
            if mode == "kl_cov":
                p["kl_cov_ratio"], p["kl_cov_coef"] = [(0.1, 1.0), (0.5, 0.3), (1.0, 0.05), (0.02, 2.0)][k]
            if mode in ("dppo_tv", "dppo_kl"):
                p["ratio_cap"] = [1.5, 20.0, 1.05, 3.0][k]
            if mode == "bypass_mode":
                p["bypass_loss"] = ["reinforce", "reinforce", "ppo_clip", "reinforce"][k]
                p["bypass_is"] = ["token", "sequence", "token", "token"][k]
                p["bypass_is_high"] = [2.0, 1.5, 3.0, 5.0][k]
                if k == 3:
                    p["bypass_is_low"] = 0.5  # IcePop
            if mode not in ("sapo", "geo_mean"):
                p["agg"] = AGGS[k]
            t = tensors_for(m, spread=[0.2, 0.6, 1.0, 0.05][k])
            extra = {"num_sequences": float(m.shape[0] + 2)} if k == 1 and p.get("agg") == "seq-mean-token-mean" else {}
            if k == 0 and p.get("agg") == "token-mean":
                extra = {"num_tokens": float(m.sum() + 3)}
            case(f"{mode}/params-{k}", p, t, **extra)
        # ties: lp − old exactly 0 (ratio 1) and exactly a log-space bound (geo_mean 0.25)
        p = dict(base)
        if mode in ("clip_cov", "dppo_tv", "dppo_kl", "bypass_mode"):
            p["clip_low"], p["clip_high"] = 0.0, 0.0  # ratio 1 sits on both clip bounds
        if mode == "geo_mean":
            p["clip_low"], p["clip_high"] = 0.25, 0.25
        if mode == "clip_cov":
            p["clip_cov_lb"], p["clip_cov_ub"], p["clip_cov_ratio"] = -5.0, 5.0, 0.3
        case(f"{mode}/ties-ratio-1", p, with_ties(tensors_for(MASKS["ragged"]), 0.0))
        if mode == "geo_mean":
            case(f"{mode}/ties-log-bound", p, with_ties(tensors_for(MASKS["gaps"]), 0.25))
            case(f"{mode}/ties-log-bound-low", p, with_ties(tensors_for(MASKS["gaps"]), -0.25))
        # duplicated values: equal covariances (kl_cov's topk ties), zero advantages
        t = tensors_for(MASKS["gaps"])
        t["advantages"][1] = 0.5 * t["response_mask"][1]
        t["advantages"][2, :4] = 0.0
        t["logprobs"][3] = np.round(np.log(0.5), 6)
        case(f"{mode}/duplicates-and-zero-advantages", dict(base) if mode != "kl_cov" else {**base, "kl_cov_ratio": 0.2}, t)
    # a few more per mode with mode-specific edge cases
    m = MASKS["ragged"]
    t = tensors_for(m, spread=3.0)
    case("sapo/far-off-policy", {"mode": "sapo", "tau_pos": 1.0, "tau_neg": 1.05}, t)
    case("dro/far-off-policy", {"mode": "dro", "dro_beta": 0.05, "agg": "seq-mean-token-mean"}, t)
    case("dppo_kl/far-off-policy", {"mode": "dppo_kl", "agg": "token-mean"}, t)
    case("dppo_tv/far-off-policy-wide", {"mode": "dppo_tv", "clip_low": 0.9, "clip_high": 0.9}, t)
    case("bypass_mode/far-off-policy-seq-truncated", {"mode": "bypass_mode", "bypass_loss": "reinforce",
                                                      "agg": "seq-mean-token-sum"}, t)
    case("bypass_mode/no-weights-reinforce", {"mode": "bypass_mode", "bypass_loss": "reinforce", "bypass_is": None},
         tensors_for(MASKS["gaps"]))
    case("kl_cov/all-tokens", {"mode": "kl_cov", "kl_cov_ratio": 1.0}, tensors_for(MASKS["length-1"]))
    case("clip_cov/all-candidates", {"mode": "clip_cov", "clip_cov_ratio": 1.0, "clip_cov_lb": -100.0,
                                     "clip_cov_ub": 100.0}, tensors_for(MASKS["full"]))
    case("gpg/length-1", {"mode": "gpg", "agg": "seq-mean-token-mean"}, tensors_for(MASKS["length-1"]))
    case("geo_mean/empty-row-sequence-advantages", {"mode": "geo_mean"},
         tensors_for(MASKS["empty-row"], adv="sequence"))


# ----------------------------------------------------------------------------------------------- main
def main():
    build_cases()
    names = [name for name, _, _ in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    out = []
    for name, request, tensors in CASES:
        got = verl_policy_loss(request, tensors)
        assert math.isfinite(got["loss"]), name
        out.append({"case": name, "dtype": "float64", "request": request,
                    "tensors": {k: np.asarray(v).tolist() for k, v in tensors.items()},
                    "expected": {"loss": got["loss"], "grad_logprobs": got["grad_logprobs"]},
                    "verl_metrics": got["verl_metrics"]})
    doc = {
        "library": "verl",
        "version": getattr(verl, "__version__", None) or importlib.metadata.version("verl"),
        "torch": torch.__version__,
        "generated": datetime.date.today().isoformat(),
        "generator": "tests/golden/make_verl_policy_losses.py",
        "losses": out,
    }
    assert doc["version"] == "0.9.1", doc["version"]
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    counts = {mode: sum(c["request"]["policy_loss"]["mode"] == mode for c in out) for mode in MODES}
    print(f"wrote {OUT}: {len(out)} cases {counts}, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
