"""Generate tests/golden/verl_0.9.1_loss_api.json: golden vectors for the loss API's verl-facing parts
(issue 16, "API gaps"), computed by the real verl library (version 0.9.1).

Run with the throwaway venv of make_verl_golden.py (verl 0.9.1 --no-deps, torch, numpy, packaging,
omegaconf; the rest of verl's import-time dependencies stubbed by ``verl_stub.py``)::

    /tmp/verlenv/bin/python tests/golden/make_verl_loss_api.py

Every number in "expected" comes out of verl's own functions (float64, gradients by torch.autograd.grad):

* ``agg``: ``core_algos.agg_loss`` of an arbitrary loss matrix (the ``token_loss`` term), every
  ``loss_agg_mode`` with ``dp_size`` 1, 2, 4, the global ``batch_num_tokens`` / ``global_batch_size``
  (advserve's ``num_tokens`` / ``num_sequences``, sent only with a mode that reads them) and
  ``loss_scale_factor``; ragged masks with length-1 and empty rows, finite garbage on masked positions.
* ``kl``: ``core_algos.kl_penalty`` with verl's straight-through "+" estimators ("k1+", "k3+",
  "low_var_kl+", "abs+", "k2+") aggregated by ``agg_loss``: the loss, the gradient in log_prob and the
  per-token values (advserve's ``kl_values``), including log-ratios past k3's clamps.
* ``policy``: ``core_algos.get_policy_loss_fn`` ("vanilla", "gspo", "cispo") with ``rollout_is_weights``
  [B, T] holding zeros (rejected tokens), with ``config.global_batch_info`` as ``ppo_loss`` fills it
  (dp_size included).
* ``value``: ``core_algos.compute_value_loss`` alone (a critic-only call: no policy term), with its own
  ``loss_agg_mode``, ``loss_scale_factor``, ``dp_size`` and global counts.
* ``entropy``: ``agg_loss`` of the entropy with its own mode and ``loss_scale_factor``.

Each case holds the advserve request that should reproduce it (preset "verl", dtype float64).
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
from verl.trainer.ppo import core_algos as ca  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

OUT = os.path.join(HERE, "verl_0.9.1_loss_api.json")
MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
POLICY_LOSS = {"ppo_clip": "vanilla", "gspo": "gspo", "cispo": "cispo"}
rng = np.random.default_rng(20261204)


def masks() -> dict[str, np.ndarray]:
    """Ragged right-padded rows, a length-1 row, an empty row, a row with an interior gap; one-row batches."""
    def m(*rows):
        return np.array([[int(c) for c in r] for r in rows], dtype=np.int64)
    return {
        "ragged": m("1111100", "1000000", "0000000", "1111111", "1101100", "1110000"),
        "one-token-rows": m("100", "100", "000", "100"),
        "single-row": m("11110"),
        "full": m("1111", "1111", "1111"),
    }


def normalizers(mode: str, mask: np.ndarray, dp: int, scale: int) -> dict:
    """Global counts as a data-parallel run would pass them: ``scale`` × this shard's (only those the mode reads)."""
    out = {}
    if mode == "token-mean" and (dp > 1 or scale > 1):
        out["num_tokens"] = int(mask.sum()) * scale
    if mode.startswith("seq-mean") and (dp > 1 or scale > 1):
        out["num_sequences"] = int((mask.sum(-1) > 0).sum()) * scale
    return out


def tolist(x):
    return None if x is None else x.detach().to(torch.float64).tolist()


def garbage(shape) -> np.ndarray:
    return np.round(rng.normal(0, 1, size=shape), 4)


CASES: list[dict] = []


def add(name: str, group: str, request: dict, tensors: dict, expected: dict, note: str | None = None) -> None:
    case = {"case": name, "group": group, "dtype": "float64", "request": request,
            "tensors": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in tensors.items()},
            "expected": expected}
    if note:
        case["note"] = note
    CASES.append(case)


def components(**given) -> dict:
    return {"policy": None, "kl": None, "value": None, "entropy": None, "token_loss": None, **given}


# ----------------------------------------------------------------------------- agg_loss (token_loss term)
def agg_cases() -> None:
    for mname, mask in masks().items():
        for mode in MODES:
            for dp, scale in ((1, 1), (1, 3), (2, 2), (4, 5)):
                lsfs = (None, 64) if mode == "seq-mean-token-sum-norm" else (None,)
                for lsf in lsfs:
                    mat = garbage(mask.shape)
                    mt = torch.tensor(mask, dtype=torch.bool)
                    x = torch.tensor(mat, dtype=torch.float64, requires_grad=True)
                    norm = normalizers(mode, mask, dp, scale)
                    loss = ca.agg_loss(loss_mat=x, loss_mask=mt, loss_agg_mode=mode, dp_size=dp,
                                       batch_num_tokens=norm.get("num_tokens"),
                                       global_batch_size=norm.get("num_sequences"), loss_scale_factor=lsf)
                    (g,) = torch.autograd.grad(loss, [x])
                    term = {"coef": 1.0, "agg": mode}
                    if lsf is not None:
                        term["loss_scale_factor"] = lsf
                    request = {"policy_loss": False, "token_loss": term, **norm}
                    if dp > 1:
                        request["dp_size"] = dp
                    add(f"agg/{mname}/{mode}/dp{dp}-x{scale}" + (f"-lsf{lsf}" if lsf else ""), "agg", request,
                        {"response_mask": mask, "token_losses": mat},
                        {"loss": loss.item(), "components": components(token_loss=loss.item()),
                         "grad_token_losses": tolist(g * mt)})
    # a coefficient: loss = coef · agg
    mask = masks()["ragged"]
    mat = garbage(mask.shape)
    x = torch.tensor(mat, dtype=torch.float64, requires_grad=True)
    loss = ca.agg_loss(loss_mat=x, loss_mask=torch.tensor(mask, dtype=torch.bool), loss_agg_mode="token-mean")
    (g,) = torch.autograd.grad(-0.25 * loss, [x])
    add("agg/ragged/token-mean/coef-negative", "agg", {"policy_loss": False, "token_loss": {"coef": -0.25}},
        {"response_mask": mask, "token_losses": mat},
        {"loss": -0.25 * loss.item(), "components": components(token_loss=loss.item()),
         "grad_token_losses": tolist(g * torch.tensor(mask))},
        note="the verl preset's policy agg (token-mean) by default; any sign of coef")


# ------------------------------------------------------------------------------ kl_penalty "+" estimators
OUR_KL = {"kl": "k1", "k1": "k1", "low_var_kl": "k3", "k3": "k3", "abs": "abs", "mse": "k2", "k2": "k2"}


def kl_cases() -> None:
    for mname in ("ragged", "one-token-rows", "full"):
        mask = masks()[mname]
        for verl_name in ("k1+", "kl+", "k3+", "low_var_kl+", "abs+", "k2+", "k3", "k1"):
            for mode in ("token-mean", "seq-mean-token-sum"):
                base = verl_name.rstrip("+")
                lp_np = np.round(-np.abs(rng.normal(0, 1.2, size=mask.shape)) - 0.01, 4)
                ref_np = np.round(lp_np + rng.normal(0, 0.6, size=mask.shape), 4)
                if mname == "ragged":  # past k3's log-ratio clamp (±20) and value clamp (±10)
                    ref_np[0, 0] = lp_np[0, 0] + 25.0
                    ref_np[3, 1] = lp_np[3, 1] - 15.0
                    ref_np[3, 2] = lp_np[3, 2] + 12.5
                mt = torch.tensor(mask, dtype=torch.bool)
                lp = torch.tensor(lp_np, dtype=torch.float64, requires_grad=True)
                ref = torch.tensor(ref_np, dtype=torch.float64)
                kld = ca.kl_penalty(logprob=lp, ref_logprob=ref, kl_penalty=verl_name)
                loss = ca.agg_loss(loss_mat=kld, loss_mask=mt, loss_agg_mode=mode)
                (g,) = torch.autograd.grad(loss, [lp])
                kl = {"coef": 1.0, "estimator": OUR_KL[base], "agg": mode}
                if verl_name.endswith("+") and OUR_KL[base] != "k2":
                    kl["gradient_estimator"] = "k2"
                request = {"policy_loss": False, "kl_loss": kl, "return_kl_values": True}
                add(f"kl/{mname}/{verl_name}/{mode}", "kl", request,
                    {"response_mask": mask, "logprobs": lp_np, "ref_logprobs": ref_np},
                    {"loss": loss.item(), "components": components(kl=loss.item()),
                     "grad_logprobs": tolist(g * mt), "kl_values": tolist(kld * mt)},
                    note=f"verl kl_penalty={verl_name!r}")


# ----------------------------------------------------------------------- policy loss with rollout_is_weights
def actor_config(mode: str, agg: str, dual: float | None = 3.0) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                       clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=math.inf if dual is None else dual,
                       loss_agg_mode=agg, policy_loss=PolicyLossConfig(loss_mode=POLICY_LOSS[mode]))


def policy_cases() -> None:
    for mname in ("ragged", "one-token-rows", "full"):
        mask = masks()[mname]
        for mode in ("ppo_clip", "gspo", "cispo"):
            for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
                for dp in (1, 2):
                    old = np.round(-np.abs(rng.normal(0, 1.2, size=mask.shape)) - 0.01, 4)
                    lp_np = np.round(old + rng.normal(0, 0.3, size=mask.shape), 4)
                    adv = np.round(rng.normal(0, 1, size=mask.shape), 4)
                    w = np.round(rng.uniform(0, 2, size=mask.shape), 4)
                    w[rng.uniform(size=mask.shape) < 0.25] = 0.0  # rejected tokens
                    w[0, 0] = 0.0
                    cfg = actor_config(mode, agg)
                    norm = normalizers(agg, mask, dp, dp)
                    cfg.global_batch_info["dp_size"] = dp
                    cfg.global_batch_info["batch_num_tokens"] = norm.get("num_tokens")
                    cfg.global_batch_info["global_batch_size"] = norm.get("num_sequences")
                    cfg.global_batch_info["loss_scale_factor"] = cfg.loss_scale_factor
                    mt = torch.tensor(mask, dtype=torch.bool)
                    lp = torch.tensor(lp_np, dtype=torch.float64, requires_grad=True)
                    loss, _ = ca.get_policy_loss_fn(POLICY_LOSS[mode])(
                        old_log_prob=torch.tensor(old, dtype=torch.float64), log_prob=lp,
                        advantages=torch.tensor(adv, dtype=torch.float64), response_mask=mt, loss_agg_mode=agg,
                        config=cfg, rollout_is_weights=torch.tensor(w, dtype=torch.float64))
                    (g,) = torch.autograd.grad(loss, [lp])
                    policy = {"mode": mode, "clip_low": 0.2, "clip_high": 0.28, "agg": agg}
                    request = {"policy_loss": policy, **norm}
                    if dp > 1:
                        request["dp_size"] = dp
                    add(f"policy/{mname}/{mode}/{agg}/dp{dp}", "policy", request,
                        {"response_mask": mask, "logprobs": lp_np, "old_logprobs": old, "advantages": adv,
                         "rollout_is_weights": w},
                        {"loss": loss.item(), "components": components(policy=loss.item()),
                         "grad_logprobs": tolist(g * mt)},
                        note=f"verl policy loss {POLICY_LOSS[mode]!r} with rollout_is_weights (zeros included)")


# ---------------------------------------------------------------------------- value loss alone, entropy
def value_cases() -> None:
    for mname in ("ragged", "one-token-rows"):
        mask = masks()[mname]
        for agg, lsf in (("token-mean", None), ("seq-mean-token-mean", None), ("seq-mean-token-sum-norm", 16),
                         ("seq-mean-token-sum-norm", None), ("token-sum", None)):
            for dp in (1, 4):
                old_v = np.round(rng.normal(0, 1, size=mask.shape), 4)
                v_np = np.round(old_v + rng.normal(0, 0.4, size=mask.shape), 4)
                ret = np.round(rng.normal(0, 1, size=mask.shape), 4)
                norm = normalizers(agg, mask, dp, dp)
                mt = torch.tensor(mask, dtype=torch.bool)
                v = torch.tensor(v_np, dtype=torch.float64, requires_grad=True)
                loss, _ = ca.compute_value_loss(
                    vpreds=v, returns=torch.tensor(ret, dtype=torch.float64),
                    values=torch.tensor(old_v, dtype=torch.float64), response_mask=mt, cliprange_value=0.2,
                    loss_agg_mode=agg, dp_size=dp, batch_num_tokens=norm.get("num_tokens"),
                    global_batch_size=norm.get("num_sequences"), loss_scale_factor=lsf)
                (g,) = torch.autograd.grad(loss, [v])
                term = {"coef": 1.0, "clip": 0.2, "agg": agg}
                if lsf is not None:
                    term["loss_scale_factor"] = lsf
                request = {"policy_loss": False, "value_loss": term, **norm}
                if dp > 1:
                    request["dp_size"] = dp
                add(f"value/{mname}/{agg}" + (f"-lsf{lsf}" if lsf else "") + f"/dp{dp}", "value", request,
                    {"response_mask": mask, "values": v_np, "old_values": old_v, "returns": ret},
                    {"loss": loss.item(), "components": components(value=loss.item()),
                     "grad_values": tolist(g * mt)},
                    note="compute_value_loss alone: a critic-only call, no policy term")
    mask = masks()["ragged"]
    for agg, lsf in (("seq-mean-token-sum-norm", 8), ("seq-mean-token-mean", None)):
        ent_np = np.round(rng.uniform(0, 2, size=mask.shape), 4)
        mt = torch.tensor(mask, dtype=torch.bool)
        ent = torch.tensor(ent_np, dtype=torch.float64, requires_grad=True)
        el = ca.agg_loss(loss_mat=ent, loss_mask=mt, loss_agg_mode=agg, loss_scale_factor=lsf)
        (g,) = torch.autograd.grad(-0.01 * el, [ent])
        term = {"coef": 0.01, "agg": agg}
        if lsf is not None:
            term["loss_scale_factor"] = lsf
        add(f"entropy/ragged/{agg}" + (f"-lsf{lsf}" if lsf else ""), "entropy",
            {"policy_loss": False, "entropy_bonus": term}, {"response_mask": mask, "entropy": ent_np},
            {"loss": -0.01 * el.item(), "components": components(entropy=el.item()), "grad_entropy": tolist(g * mt)})


def main() -> None:
    agg_cases()
    kl_cases()
    policy_cases()
    value_cases()
    names = [c["case"] for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    doc = {
        "library": "verl",
        "version": verl.__version__ if hasattr(verl, "__version__") else importlib.metadata.version("verl"),
        "torch": torch.__version__,
        "generated": datetime.date.today().isoformat(),
        "generator": "tests/golden/make_verl_loss_api.py",
        "cases": CASES,
    }
    assert doc["version"] == "0.9.1", doc["version"]
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    groups: dict[str, int] = {}
    for c in CASES:
        groups[c["group"]] = groups.get(c["group"], 0) + 1
    print(f"wrote {OUT}: {len(CASES)} cases {groups}, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
