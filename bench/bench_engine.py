"""Engine benchmark: advserve against the per-token / per-group Python loops it replaces.

    .venv/bin/python bench/bench_engine.py            # full sizes (make bench), ~15 s on an idle 2-core box
    .venv/bin/python bench/bench_engine.py --quick    # smoke run, a few seconds
    .venv/bin/python bench/bench_engine.py --no-tune-allocator   # glibc defaults, to see the difference
    .venv/bin/python bench/bench_engine.py --device cuda --kernels triton --cases gae,gae_gaps,grpo
        # on a GPU: CUDA tensors in and out, the Triton kernels (--kernels torch: the torch path), GAE
        # also at [1024, 8192] and [4096, 16384], the bound from a device-to-device copy in the same run

Rows (full sizes; --quick shrinks them):
  * GAE [256, 4096] fp32, right-padded (lengths uniform in [T/4, T]), 0/1 outcome on the last valid
    token plus small per-token rewards (token_rewards), random values: advserve.compute_advantages
    ("gae", preset="paper", gamma=1, lam=0.95) and the pure function advserve.functional.scan.gae,
    against a verl-style loop over tokens (verl 0.9.1 compute_gae_advantage_return, without the
    final whitening). Also the memory-bandwidth bound of the op.
  * The same with interior mask gaps (multi-turn: 10% of the tokens inside each row masked).
  * gae_verl: the right-padded batch with preset="verl" (the advantages whitened over the batch's
    tokens: unbiased variance, rsqrt(var + 1e-8)), against verl 0.9.1 compute_gae_advantage_return
    whole: the loop, then verl_F.masked_whiten as verl writes it.
  * GRPO over 4096 sequences (groups of 16, rows shuffled, uuid-like string group ids, 0/1
    rewards) with preset="verl", against verl's dict-of-lists loop: at sequence level
    (response_mask [4096, 1]: the group statistics, target 20x) and at token level ([4096, 1024]:
    plus the broadcast of each sequence's advantage over its tokens).
  * compute_losses(preset="verl"): ppo_clip (dual clip), token-mean, plus kl_loss k3, at [256, 4096],
    against the same loss written in torch and differentiated by autograd (forward + backward).
  * gae_openrlhf: compute_advantages("gae", preset="openrlhf", params={"lam": 0.95}) at [256, 4096] with
    10% interior mask gaps: outcome rewards [B] (clipped to ±10, placed on the last valid token), KL in the
    reward (k1, beta 0.01, clamped ±10, from old_logprobs and ref_logprobs), mask gaps as steps ("step":
    a gap has reward 0 and V = 0 but discounts), whitening over the batch with rsqrt(max(var, 1e-8)),
    against OpenRLHF 0.11.2 as it writes it: compute_approx_kl, compute_reward, get_advantages_and_returns
    (vectorised over rows, a loop over T) and the whitening of compute_advantages_and_returns. lam 0.95
    (OpenRLHF's --algo.advantage.lambd) so that the gaps' step semantics matter: at gamma = lam = 1
    "step" and "skip" give the same values.
  * grpo_compute: GRPO's compute over 1M sequences (--quick 64K) in scattered groups of 16 (int64 ids,
    [B, 1]): Engine.run_advantages of a request prepared once (its validation and the ids' factorization,
    host work, untimed) with its statistics read, against the same formula in plain torch (index_add
    means and stds, verl's eps): the issue's "GRPO at 1M sequences" on a GPU.
  * grpo_trl_batch: compute_advantages("grpo", preset="trl", params={"std_scope": "batch"}) over 4096
    sequences in contiguous groups of 16 (int64 ids), mask [4096, 1024], against TRL 1.16.0's
    scale_rewards="batch" block in torch (rewards.view(-1, n) nanmean, nanstd of the whole batch + 1e-4,
    nan_to_num), plus the broadcast of each sequence's advantage over its tokens (* mask).

With --device cuda every tensor (inputs, references, results) lives on the GPU and each timed call
ends with torch.cuda.synchronize(); GAE rows then add "kernels.scan.gae" (the Triton kernel alone)
and the losses row "kernels.losses.ppo_clip_kl" (the fused loss + gradient kernel alone with its
token-mean weights, without the request's checks) when --kernels resolves to triton; both losses rows
then carry the issue's target, 3x autograd, and GRPO runs at 4096 and 65536 sequences (the verl loop is the
reference; 1M sequences would take it minutes).

Every reference runs in this process, right after the engine, so the ratios are comparable even
when absolute times drift. Timing: warm-up calls, then the median (p50) of N repeats with
time.perf_counter; torch's thread count is left at its default. Each row also checks the engine's
result against its reference: max |diff| / max |reference| must be <= 1e-4, else the script exits 1.
Speed targets are reported, never enforced by the exit code.

Results go to bench/results/engine.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import advserve
from advserve.runtime import tune_allocator
from advserve.functional import scan
from advserve.kernels import resolve_kernels
from advserve.testing import cpu_model, wait_for_quiet

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
REL_TOLERANCE = 1e-4
CASES = ("gae", "gae_gaps", "gae_verl", "grpo", "losses", "gae_openrlhf", "grpo_trl_batch", "grpo_compute")
# where the engine runs (set by main from --device and --kernels): every row's tensors go there
TARGET = {"device": "cpu", "kernels": "auto", "pause_s": 0.0}


def on_target(tensors: dict[str, Any]) -> dict[str, Any]:
    """`tensors` with every torch tensor moved to the target device (lists, e.g. string ids, as they are)."""
    return {k: v.to(TARGET["device"]) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def engine_options() -> dict[str, str]:
    """The in-process API's device and kernels arguments for the target."""
    return {"device": TARGET["device"], "kernels": TARGET["kernels"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run, < 10 s)")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="keep glibc's default mmap/trim thresholds (the server tunes them at start)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats of the fast calls (default 21; quick 5)")
    parser.add_argument("--loop-repeats", type=int, default=None,
                        help="timed repeats of the slow loop references (default 7; quick 3; at least 3)")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait, before each case, for other processes to use < 15%% of the CPUs "
                        "(default 20; quick 0)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)} (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where inputs, engine and "
                        "references run")
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                        help="the engine's kernels setting (auto: triton on CUDA when installed)")
    parser.add_argument("--pause-ms", type=float, default=0.0,
                        help="sleep this long before each timed call, untimed: a trainer's call between its "
                        "other work, caches cold (default 0: back to back)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    return parser.parse_args(argv)


# --- machine and timing ----------------------------------------------------------------------------


def machine(tuned: bool, requested: bool) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "advserve": advserve.__version__,
        "allocator": ("glibc, tuned by advserve.runtime.tune_allocator() (mallopt M_MMAP_THRESHOLD 1 GiB, "
                      "M_TRIM_THRESHOLD raised), as the server does at start") if tuned else
                     ("glibc defaults (--no-tune-allocator)" if not requested
                      else "defaults (tune_allocator() returned False: not glibc?)"),
        "allocator_tuned": tuned,
    }


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> dict[str, float]:
    """p50/min/max ms of `fn` over `repeats` calls after `warmup` calls, and minor page faults per call."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.device(TARGET["device"]).type == "cuda" else (lambda: None)
    sync()
    times, faults = [], []
    for _ in range(repeats):
        time.sleep(TARGET["pause_s"])
        f0 = minor_faults()
        t0 = time.perf_counter()
        fn()
        sync()
        t1 = time.perf_counter()
        faults.append(minor_faults() - f0)
        times.append((t1 - t0) * 1e3)
    return {"p50_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats,
            "minflt_per_call": statistics.median(faults)}


def copy_bandwidth(mib: int, repeats: int) -> dict[str, float]:
    """dst.copy_(src) of a `mib` MiB float32 tensor into a preallocated one; GB/s counts read + write."""
    n = mib * (1 << 20) // 4
    src = torch.rand(n, device=TARGET["device"])
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    t = timeit(lambda: dst.copy_(src), repeats, warmup=2)
    moved = 2 * n * 4
    return {"bytes_per_copy": moved, "size_mib": mib, "p50_ms": t["p50_ms"], "min_ms": t["min_ms"],
            "gb_per_s": moved / (t["p50_ms"] * 1e-3) / 1e9, "best_gb_per_s": moved / (t["min_ms"] * 1e-3) / 1e9}


def compare(name: str, got: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """max |got − ref| and that divided by max |ref|; ok when the relative error is <= REL_TOLERANCE."""
    got, ref = got.double(), ref.double()
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    rel = diff / scale if scale > 0 else diff
    return {"what": name, "max_abs_diff": diff, "max_abs_ref": scale, "rel": rel, "ok": rel <= REL_TOLERANCE
            and bool(torch.isfinite(got).all())}


# --- inputs --------------------------------------------------------------------------------------


def right_padded_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """float32 [B, T]: row i valid on its first L_i tokens, L_i uniform in [T/4, T]."""
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=gen)
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()


def with_interior_gaps(mask: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Masks `fraction` of each row's valid tokens (i.i.d.), keeping the last valid token (the outcome)."""
    length = mask.shape[1]
    last = (mask * torch.arange(1, length + 1)).argmax(dim=1)
    drop = (torch.rand(mask.shape, generator=gen) < fraction) & (mask > 0)
    drop[torch.arange(mask.shape[0]), last] = False
    return mask * (~drop).float()


def gae_inputs(batch: int, length: int, gen: torch.Generator, gaps: float = 0.0) -> dict[str, torch.Tensor]:
    mask = right_padded_mask(batch, length, gen)
    if gaps:
        mask = with_interior_gaps(mask, gaps, gen)
    last = (mask * torch.arange(1, length + 1)).argmax(dim=1)
    outcome = (torch.rand(batch, generator=gen) < 0.5).float()
    token_rewards = 0.01 * torch.randn(batch, length, generator=gen)
    token_rewards[torch.arange(batch), last] += outcome
    token_rewards *= mask
    values = torch.randn(batch, length, generator=gen)
    return {"token_rewards": token_rewards, "values": values, "response_mask": mask}


def uuid_like(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def grpo_inputs(batch: int, group_size: int, length: int, gen: torch.Generator, rng: random.Random):
    groups = batch // group_size
    uids = [uuid_like(rng) for _ in range(groups)]
    pass_rate = torch.rand(groups, generator=gen)
    rewards = (torch.rand(groups, group_size, generator=gen) < pass_rate.unsqueeze(1)).float().reshape(-1)
    ids = [uid for uid in uids for _ in range(group_size)]
    order = torch.randperm(batch, generator=gen)  # scatter the groups through the batch
    rewards = rewards[order].contiguous()
    ids = [ids[i] for i in order.tolist()]
    mask = right_padded_mask(batch, length, gen)
    return {"rewards": rewards, "response_mask": mask, "group_ids": ids}


def loss_inputs(batch: int, length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = right_padded_mask(batch, length, gen)
    old = -torch.rand(batch, length, generator=gen) * 3
    return {
        "logprobs": old + 0.2 * torch.randn(batch, length, generator=gen),  # ratios on both sides of the clip
        "old_logprobs": old,
        "ref_logprobs": old + 0.2 * torch.randn(batch, length, generator=gen),
        "advantages": torch.randn(batch, length, generator=gen),
        "response_mask": mask,
    }


# --- references (what trainers run today) ----------------------------------------------------------


def gae_loop(token_rewards, values, response_mask, gamma: float, lam: float):
    """verl 0.9.1 compute_gae_advantage_return without the final whitening: a loop over tokens with
    [B] slices; masked (observation) tokens carry the next value and the running advantage across."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        for t in reversed(range(token_rewards.shape[-1])):
            m = response_mask[:, t]
            delta = token_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * m + (1 - m) * nextvalues
            lastgaelam = lastgaelam_ * m + (1 - m) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


def verl_gae_whitened(token_rewards, values, response_mask, gamma: float, lam: float):
    """verl 0.9.1 compute_gae_advantage_return whole: `gae_loop`, then verl_F.masked_whiten(advantages,
    response_mask) as verl writes it (masked_mean divides by mask.sum() + 1e-8; masked_var unbiased,
    x n/(n-1); (x - mean) * rsqrt(var + 1e-8))."""
    advantages, returns = gae_loop(token_rewards, values, response_mask, gamma, lam)
    with torch.no_grad():
        mean = (advantages * response_mask).sum() / (response_mask.sum() + 1e-8)
        variance = ((advantages - mean) ** 2 * response_mask).sum() / (response_mask.sum() + 1e-8)
        count = response_mask.sum()
        variance = variance * (count / (count - 1))
        advantages = (advantages - mean) * torch.rsqrt(variance + 1e-8)
    return advantages, returns


def grpo_loop(scores, response_mask, index, epsilon: float = 1e-6):
    """verl 0.9.1 compute_grpo_outcome_advantage (norm by std): dict of lists keyed by uid,
    torch.mean / torch.std per group, a loop over rows, then broadcast * mask. Takes the [B]
    scores (verl sums token_level_rewards [B, T] first; that sum is left out here)."""
    scores = scores.clone()
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                group = torch.stack(id2score[idx])
                id2mean[idx], id2std[idx] = torch.mean(group), torch.std(group)
        for i in range(scores.shape[0]):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        return scores.unsqueeze(-1) * response_mask


def loss_autograd(logprobs, old_logprobs, advantages, ref_logprobs, response_mask,
                  clip: float = 0.2, dual_clip: float = 3.0, kl_coef: float = 0.001):
    """verl's ppo_clip (log-ratio clamp ±20, dual clip c = 3) + kl_loss k3 (log-ratio ±20, value ±10),
    token-mean, written in torch; returns (loss, d loss / d logprobs) from autograd."""
    logp = logprobs.detach().requires_grad_(True)
    ratio = (logp - old_logprobs).clamp(-20.0, 20.0).exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.minimum(-advantages * dual_clip, clipped)
    pg = torch.where(advantages < 0, dual, clipped)
    n = response_mask.sum()
    log_ratio = (ref_logprobs - logp).clamp(-20.0, 20.0)
    kl = (log_ratio.exp() - log_ratio - 1).clamp(-10.0, 10.0)
    loss = (pg * response_mask).sum() / n + kl_coef * ((kl * response_mask).sum() / n)
    loss.backward()
    return loss.detach(), logp.grad


def openrlhf_gae_loop(rewards, values, response_mask, old_logprobs, ref_logprobs, gamma: float, lam: float,
                      kl_coef: float = 0.01, reward_clip: float = 10.0):
    """OpenRLHF 0.11.2 as it writes it, for estimator gae: compute_approx_kl (k1, clamp ±10, in float32),
    compute_reward (reward clip, the outcome scattered on the last valid token, - kl_coef * kl),
    get_advantages_and_returns (rewards and values times the mask, a loop over all T positions with
    [B] slices: a masked position is a step with reward 0 and V = 0) and the batch whitening of
    compute_advantages_and_returns (population variance, rsqrt(var.clamp(min=1e-8))). Returns
    (advantages, returns); values at masked positions are whatever OpenRLHF leaves there."""
    with torch.no_grad():
        action_mask = response_mask.bool()
        kl = (old_logprobs.float() - ref_logprobs.float()).clamp(min=-10, max=10)
        r = rewards.clamp(min=-reward_clip, max=reward_clip)
        kl_reward = -kl_coef * kl
        eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
        last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
        reward = last_reward + kl_reward

        lastgaelam = 0
        advantages_reversed = []
        response_length = reward.size(1)
        values = action_mask * values
        reward = action_mask * reward
        for t in reversed(range(response_length)):
            nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
            delta = reward[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values

        all_advantages = advantages.flatten().float()
        all_action_masks = action_mask.flatten()
        num_actions = all_action_masks.sum()
        mean = (all_advantages * all_action_masks).sum() / num_actions
        var = ((all_advantages - mean).pow(2) * all_action_masks).sum() / num_actions
        rstd = var.clamp(min=1e-8).rsqrt()
        advantages = (advantages - mean) * rstd
    return advantages, returns


def trl_nanstd(tensor: torch.Tensor) -> torch.Tensor:
    """trl.trainer.utils.nanstd over all dimensions (TRL 1.16.0)."""
    mean = torch.nanmean(tensor, dim=None, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=None, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=None, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    return torch.sqrt(variance).squeeze()


def trl_grpo_batch(rewards, response_mask, num_generations: int):
    """TRL 1.16.0 GRPOTrainer._generate_and_score_completions, scale_rewards="batch" (sum_then_normalize):
    the group mean from rewards.view(-1, num_generations) (contiguous groups), the std of the whole batch,
    (r - mean) / (std + 1e-4), nan_to_num; then each sequence's advantage broadcast over its tokens, as the
    engine returns it (TRL does that in the loss: advantages.unsqueeze(1) * per-token terms)."""
    with torch.no_grad():
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
        advantages = (rewards - mean_grouped_rewards) / (std_rewards + 1e-4)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        return advantages.unsqueeze(1) * response_mask


# --- rows ----------------------------------------------------------------------------------------


def gae_rows(batch: int, length: int, gaps: float, cfg: dict, gen: torch.Generator, bandwidth: dict) -> list[dict]:
    x = on_target(gae_inputs(batch, length, gen, gaps))
    gamma, lam = 1.0, 0.95
    mask_bool = x["response_mask"].bool()
    # the pure function's precondition (which the engine establishes): inputs are 0 at masked positions
    fn_rewards, fn_values = x["token_rewards"] * x["response_mask"], x["values"] * x["response_mask"]

    def engine():
        return advserve.compute_advantages("gae", preset="paper", params={"gamma": gamma, "lam": lam}, **x,
                                           **engine_options())

    def function():
        return scan.gae(fn_rewards, fn_values, mask_bool, gamma, lam)

    def loop():
        return gae_loop(x["token_rewards"], x["values"], x["response_mask"], gamma, lam)

    ref_adv, ref_ret = loop()
    ref_adv, ref_ret = torch.where(mask_bool, ref_adv, 0), torch.where(mask_bool, ref_ret, 0)
    out = engine()
    fn_adv, fn_ret = function()
    checks_engine = [compare("advantages", out.advantages, ref_adv), compare("returns", out.returns, ref_ret)]
    checks_fn = [compare("advantages", fn_adv, ref_adv), compare("returns", fn_ret, ref_ret)]

    t_engine = timeit(engine, cfg["repeats"])
    t_fn = timeit(function, cfg["repeats"])
    t_loop = timeit(loop, cfg["loop_repeats"], warmup=1)
    impls = [("advserve.compute_advantages", t_engine, checks_engine), ("functional.scan.gae", t_fn, checks_fn)]
    if resolve_kernels(TARGET["kernels"], torch.device(TARGET["device"])) == "triton":
        from advserve.kernels import scan as fused

        def kernel():
            return fused.gae(fn_rewards, fn_values, mask_bool, gamma, lam)

        k_adv, k_ret = kernel()
        impls.append(("kernels.scan.gae", timeit(kernel, cfg["repeats"]),
                      [compare("advantages", k_adv, ref_adv), compare("returns", k_ret, ref_ret)]))

    tokens = batch * length
    label = "gae, 10% interior gaps" if gaps else "gae, right-padded"
    size = f"{batch}x{length}"
    # bytes the op must touch, over every (padded) token: read r, V, mask; write advantages, returns
    engine_bytes = tokens * (4 + 4 + 4 + 4 + 4)  # the engine gets a float32 0/1 mask
    fn_bytes = tokens * (4 + 4 + 1 + 4 + 4)  # scan.gae takes a bool mask
    rows = []
    for what, t, checks in impls:
        nbytes = engine_bytes if what.startswith("advserve") else fn_bytes
        bound_ms = nbytes / (bandwidth["gb_per_s"] * 1e9) * 1e3
        rows.append({
            "row": label, "impl": what, "size": size, "dtype": "float32",
            "engine": t, "reference": t_loop, "reference_impl": "verl-style loop over T ([B] slices)",
            "ratio": t_loop["p50_ms"] / t["p50_ms"],
            "target_ratio": (10.0 if gaps else 50.0) if what.startswith("advserve") else None,
            "checks": checks,
            "bound": {"bytes": nbytes, "bytes_per_token": nbytes // tokens, "ms": bound_ms,
                      "multiple": t["p50_ms"] / bound_ms},
        })
    return rows


def gae_verl_row(batch: int, length: int, cfg: dict, gen: torch.Generator) -> dict:
    x = on_target(gae_inputs(batch, length, gen, 0.0))
    gamma, lam = 1.0, 0.95

    def engine():
        return advserve.compute_advantages("gae", preset="verl", params={"gamma": gamma, "lam": lam}, **x,
                                           **engine_options())

    def loop():
        return verl_gae_whitened(x["token_rewards"], x["values"], x["response_mask"], gamma, lam)

    return library_gae_row("gae verl, whitened", engine, loop, x["response_mask"].bool(), f"{batch}x{length}", cfg,
                           "verl 0.9.1 compute_gae_advantage_return (loop over T, [B] slices) + masked_whiten",
                           "gamma 1, lam 0.95, right-padded, whitened (ddof 1, eps 1e-8 inside)")


def library_gae_row(label: str, engine: Callable, loop: Callable, valid: torch.Tensor, size: str, cfg: dict,
                    reference_impl: str, semantics: str) -> dict:
    """A GAE row against a library's own code: both results compared on the valid tokens (the
    libraries leave values at masked positions; the engine writes 0), both timed in this process."""
    ref_adv, ref_ret = (torch.where(valid, t, 0) for t in loop())
    out = engine()
    checks = [compare("advantages", out.advantages, ref_adv), compare("returns", out.returns, ref_ret)]
    t_engine = timeit(engine, cfg["repeats"])
    t_loop = timeit(loop, cfg["loop_repeats"], warmup=1)
    return {"row": label, "impl": "advserve.compute_advantages", "size": size, "dtype": "float32",
            "engine": t_engine, "reference": t_loop, "reference_impl": reference_impl,
            "ratio": t_loop["p50_ms"] / t_engine["p50_ms"], "target_ratio": None, "checks": checks,
            "params": out.params, "semantics": semantics}


def grpo_row(batch: int, group_size: int, length: int, cfg: dict, gen: torch.Generator, rng: random.Random) -> dict:
    x = on_target(grpo_inputs(batch, group_size, length, gen, rng))

    def engine():
        return advserve.compute_advantages("grpo", preset="verl", **x, **engine_options())

    def loop():
        return grpo_loop(x["rewards"], x["response_mask"], x["group_ids"])

    ref = loop()
    out = engine()
    checks = [compare("advantages", out.advantages, ref), compare("returns", out.returns, ref)]
    t_engine = timeit(engine, cfg["repeats"])
    t_loop = timeit(loop, cfg["loop_repeats"], warmup=1)
    level = "sequence level" if length == 1 else "token level"
    return {
        "row": f"grpo {level}, M={group_size}", "impl": "advserve.compute_advantages",
        "size": f"{batch}x{length}", "dtype": "float32", "engine": t_engine, "reference": t_loop,
        "reference_impl": "verl-style dict-of-lists loop, string uids, broadcast * mask",
        "ratio": t_loop["p50_ms"] / t_engine["p50_ms"], "target_ratio": 20.0 if length == 1 else None,
        "checks": checks,
        "groups": batch // group_size, "group_ids": "uuid4-like strings, rows shuffled",
    }


def grpo_torch(scores: torch.Tensor, index: torch.Tensor, groups: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO as verl computes it, written in plain torch over scattered groups: (R − mean_g) / (std_g + eps),
    the unbiased std (groups of at least 2 here)."""
    sizes = torch.bincount(index, minlength=groups).to(scores.dtype)
    mean = scores.new_zeros(groups).index_add_(0, index, scores) / sizes
    centered = scores - mean[index]
    var = scores.new_zeros(groups).index_add_(0, index, centered * centered) / (sizes - 1)
    return centered / (var.sqrt()[index] + eps)


def grpo_compute_row(batch: int, group_size: int, cfg: dict, gen: torch.Generator) -> dict:
    """GRPO's compute at scale: `Engine.run_advantages` of a prepared request (int64 ids, groups of
    `group_size` scattered through the batch, [B, 1]) to its statistics read (the one sync on a device;
    validation and the ids' factorization, host work, are done once, untimed), against `grpo_torch` on
    the same tensors."""
    from advserve.engine import Engine
    from advserve.model import AdvantageRequest

    groups = batch // group_size
    index = torch.randperm(batch, generator=gen) % groups
    rewards = (torch.rand(batch, generator=gen) < 0.5).float()
    engine = Engine(TARGET["device"], kernels=TARGET["kernels"])
    prepared = engine.prepare_advantages(AdvantageRequest(
        "grpo", {"rewards": rewards, "response_mask": torch.ones(batch, 1), "group_ids": index.numpy()},
        preset="verl"), defer_checks=True)
    scores, on_device = rewards.to(TARGET["device"]), index.to(TARGET["device"])

    def compute():
        result = engine.run_advantages([prepared])[0]
        result.check()  # the statistics and the value checks, read together
        return result

    def reference():
        return grpo_torch(scores, on_device, groups)

    out = compute()
    checks = [compare("advantages", out.advantages.reshape(-1), reference())]
    t_engine = timeit(compute, cfg["repeats"])
    t_ref = timeit(reference, cfg["repeats"])
    return {
        "row": f"grpo compute, M={group_size}", "impl": "Engine.run_advantages", "size": f"{batch}x1",
        "dtype": "float32", "engine": t_engine, "reference": t_ref,
        "reference_impl": "GRPO in plain torch (index_add means and unbiased stds), no statistics",
        "ratio": t_ref["p50_ms"] / t_engine["p50_ms"], "target_ratio": None, "checks": checks,
        "groups": groups, "group_ids": "int64, scattered",
    }


def loss_rows(batch: int, length: int, cfg: dict, gen: torch.Generator) -> list[dict]:
    x = on_target(loss_inputs(batch, length, gen))

    def engine():
        return advserve.compute_losses(preset="verl", kl_loss={"estimator": "k3"}, **x, **engine_options())

    def autograd():
        return loss_autograd(x["logprobs"], x["old_logprobs"], x["advantages"], x["ref_logprobs"],
                             x["response_mask"])

    ref_loss, ref_grad = autograd()
    out = engine()
    checks = [compare("loss", torch.tensor(out.loss), ref_loss), compare("grad_logprobs", out.grad_logprobs, ref_grad)]
    t_engine = timeit(engine, cfg["repeats"])
    t_ref = timeit(autograd, cfg["repeats"])
    row = {
        "row": "losses, ppo_clip + kl k3", "impl": "advserve.compute_losses", "size": f"{batch}x{length}",
        "dtype": "float32", "engine": t_engine, "reference": t_ref,
        "reference_impl": "torch autograd (forward + backward)",
        "ratio": t_ref["p50_ms"] / t_engine["p50_ms"], "target_ratio": None, "checks": checks,
        "params": out.params,
    }
    if resolve_kernels(TARGET["kernels"], torch.device(TARGET["device"])) != "triton":
        return [row]
    row["target_ratio"] = 3.0
    from advserve.kernels import losses as fused

    def kernel():
        # the token-mean weights (one division) and the fused loss + gradient: what the engine would launch
        weights = x["response_mask"] / x["response_mask"].sum().clamp_min(1)
        return fused.ppo_clip_kl(x["logprobs"], x["old_logprobs"], x["ref_logprobs"], x["advantages"], weights,
                                 weights, clip_low=0.2, clip_high=0.2, dual_clip=3.0, ratio_clamp=20.0,
                                 kl_coef=0.001, kl_estimator="k3", kl_clamp=10.0)

    k_loss, _, _, k_grad = kernel()
    t_kernel = timeit(kernel, cfg["repeats"])
    return [row, {**row, "impl": "kernels.losses.ppo_clip_kl", "engine": t_kernel,
                  "ratio": t_ref["p50_ms"] / t_kernel["p50_ms"], "target_ratio": 3.0,
                  "checks": [compare("loss", k_loss, ref_loss), compare("grad_logprobs", k_grad, ref_grad)]}]


def gae_openrlhf_row(batch: int, length: int, cfg: dict, gen: torch.Generator) -> dict:
    x = on_target(gae_inputs(batch, length, gen, gaps=0.1))
    mask = x["response_mask"]
    rewards = (torch.rand(batch, generator=gen) < 0.5).float().to(TARGET["device"])  # the 0/1 outcome, [B]
    old = (-torch.rand(batch, length, generator=gen) * 3).to(TARGET["device"])
    ref_lp = old + 0.2 * torch.randn(batch, length, generator=gen).to(TARGET["device"])
    gamma, lam = 1.0, 0.95
    tensors = {"rewards": rewards, "values": x["values"], "response_mask": mask, "old_logprobs": old,
               "ref_logprobs": ref_lp}

    def engine():
        return advserve.compute_advantages("gae", preset="openrlhf", params={"gamma": gamma, "lam": lam}, **tensors,
                                           **engine_options())

    def loop():
        return openrlhf_gae_loop(rewards, x["values"], mask, old, ref_lp, gamma, lam)

    return library_gae_row("gae openrlhf, 10% gaps", engine, loop, mask.bool(), f"{batch}x{length}", cfg,
                           "OpenRLHF 0.11.2 compute_reward + get_advantages_and_returns (loop over T, [B] slices) "
                           "+ whitening rsqrt(max(var, 1e-8))",
                           "gamma 1, lam 0.95, mask_gaps step, KL k1 beta 0.01 in the reward, reward clip ±10, whitened")


def grpo_trl_batch_row(batch: int, group_size: int, length: int, cfg: dict, gen: torch.Generator) -> dict:
    groups = batch // group_size
    pass_rate = torch.rand(groups, generator=gen)
    rewards = (torch.rand(groups, group_size, generator=gen) < pass_rate.unsqueeze(1)).float().reshape(-1)
    group_ids = torch.arange(batch) // group_size  # contiguous blocks, as TRL lays its groups out
    mask = right_padded_mask(batch, length, gen)
    rewards, group_ids, mask = (t.to(TARGET["device"]) for t in (rewards, group_ids, mask))

    def engine():
        return advserve.compute_advantages("grpo", preset="trl", params={"std_scope": "batch"}, rewards=rewards,
                                           response_mask=mask, group_ids=group_ids, **engine_options())

    def reference():
        return trl_grpo_batch(rewards, mask, group_size)

    ref = reference()
    out = engine()
    checks = [compare("advantages", out.advantages, ref), compare("returns", out.returns, ref)]
    t_engine = timeit(engine, cfg["repeats"])
    t_ref = timeit(reference, cfg["repeats"])
    return {
        "row": "grpo trl batch std, M=16", "impl": "advserve.compute_advantages", "size": f"{batch}x{length}",
        "dtype": "float32", "engine": t_engine, "reference": t_ref,
        "reference_impl": "TRL 1.16.0 scale_rewards='batch' in torch: view(-1, n) nanmean, nanstd + 1e-4, "
                          "broadcast * mask",
        "ratio": t_ref["p50_ms"] / t_engine["p50_ms"], "target_ratio": None, "checks": checks,
        "groups": groups, "group_ids": "int64, contiguous blocks of 16",
    }


# --- report --------------------------------------------------------------------------------------


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def print_table(rows: list[dict], quick: bool = False) -> None:
    """The results, one row per case; `quick`: say that the targets are for the full sizes."""
    header = (f"{'case':<27} {'impl':<28} {'size':>10} {'p50 ms':>8} {'ref ms':>8} {'ref/impl':>9} "
              f"{'target':>9} {'max|diff|':>9} {'rel':>8} {'faults':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        worst = max(r["checks"], key=lambda c: c["rel"])
        target = r["target_ratio"]
        verdict = "" if target is None else (f">={target:.0f}x " + ("ok" if r["ratio"] >= target else "MISS"))
        print(f"{r['row']:<27} {r['impl']:<28} {r['size']:>10} {fmt_ms(r['engine']['p50_ms']):>8} "
              f"{fmt_ms(r['reference']['p50_ms']):>8} {r['ratio']:>8.1f}x {verdict:>9} "
              f"{worst['max_abs_diff']:>9.1e} {worst['rel']:>8.1e} {r['engine']['minflt_per_call']:>7.0f}")
    if quick and any(r["target_ratio"] is not None for r in rows):
        print("(--quick: the targets are for the full sizes; at these small sizes ok/MISS says nothing of them)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        print(f"unknown case(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(CASES)}", file=sys.stderr)
        return 2
    TARGET.update(device=args.device, kernels=args.kernels, pause_s=args.pause_ms / 1e3)
    device = torch.device(args.device)
    kernels = resolve_kernels(args.kernels, device)  # refuses an impossible --kernels triton before any work
    cuda = device.type == "cuda"
    # before the large buffers exist: the server calls this at start too
    tuned = False if args.no_tune_allocator else tune_allocator()
    cfg = {"repeats": args.repeats or (5 if args.quick else 21),
           "loop_repeats": max(3, args.loop_repeats or (3 if args.quick else 7))}
    if args.quick:
        sizes = {"gae": (64, 1024), "grpo": [(1024, 16, 1), (1024, 16, 256)], "loss": (64, 1024), "copy_mib": 32,
                 "gae_openrlhf": (64, 1024), "grpo_trl_batch": (1024, 16, 256), "grpo_compute": (1 << 16, 16)}
    else:
        sizes = {"gae": (256, 4096), "grpo": [(4096, 16, 1), (4096, 16, 1024)], "loss": (256, 4096),
                 "copy_mib": 256, "gae_openrlhf": (256, 4096), "grpo_trl_batch": (4096, 16, 1024),
                 "grpo_compute": (1 << 20, 16)}
    if cuda and not args.quick:  # the issue's GPU sizes: 1M, 8M and 64M GAE tokens; 64K GRPO sequences
        sizes.update(gae=[(256, 4096), (1024, 8192), (4096, 16384)], copy_mib=1024,
                     grpo=[(4096, 16, 1), (65536, 16, 1), (4096, 16, 1024)], loss=(1024, 8192))
    elif not isinstance(sizes["gae"], list):
        sizes["gae"] = [sizes["gae"]]
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)

    info = machine(tuned, not args.no_tune_allocator)
    print(f"machine: {info['cpu_model']}, nproc {info['nproc']}, python {info['python']}, torch {info['torch']} "
          f"({info['torch_num_threads']} threads, default), numpy {info['numpy']}, advserve {info['advserve']}")
    print(f"allocator: {info['allocator']}")
    info["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    info["kernels"] = {"setting": args.kernels, "resolved": kernels}
    print(f"device: {info['device']} ({args.device}); kernels {args.kernels} -> {kernels}")
    print(f"mode: {'quick' if args.quick else 'full'}; p50 of {cfg['repeats']} calls after 2 warm-ups "
          f"(loop references: {cfg['loop_repeats']} after 1); time.perf_counter; seed {args.seed}"
          + (f"; {args.pause_ms:g} ms asleep before each timed call (caches cold)" if args.pause_ms else ""))
    info["pause_ms"] = args.pause_ms

    max_wait = args.max_wait if args.max_wait is not None else (0.0 if args.quick else 20.0)
    loads = {}

    def settle(case: str) -> None:
        if args.quick and loads:  # the smoke run samples the load once
            return
        loads[case] = w = wait_for_quiet(max_wait)
        if not w["quiet"]:
            print(f"warning: other processes keep {100 * w['load']:.0f}% of the CPUs busy before {case!r} "
                  f"(waited {w['waited_s']:.0f} s); its timings are contended", flush=True)

    started = time.perf_counter()
    settle("bandwidth")
    bandwidth = copy_bandwidth(sizes["copy_mib"], cfg["repeats"])
    print(f"memory bandwidth: dst.copy_(src), {sizes['copy_mib']} MiB float32 preallocated: "
          f"p50 {bandwidth['p50_ms']:.2f} ms = {bandwidth['gb_per_s']:.1f} GB/s (read + write; best call "
          f"{bandwidth['best_gb_per_s']:.1f} GB/s); the bounds below use the p50")
    print()

    rows: list[dict] = []
    for case in CASES:
        if case not in cases:
            continue
        settle(case)
        if case == "gae":
            rows += [row for size in sizes["gae"] for row in gae_rows(*size, 0.0, cfg, gen, bandwidth)]
        elif case == "gae_gaps":
            rows += [row for size in sizes["gae"] for row in gae_rows(*size, 0.1, cfg, gen, bandwidth)]
        elif case == "gae_verl":
            rows += [gae_verl_row(*size, cfg, gen) for size in sizes["gae"]]
        elif case == "grpo":
            rows += [grpo_row(*size, cfg, gen, rng) for size in sizes["grpo"]]
        elif case == "losses":
            rows += loss_rows(*sizes["loss"], cfg, gen)
        elif case == "gae_openrlhf":
            rows.append(gae_openrlhf_row(*sizes["gae_openrlhf"], cfg, gen))
        elif case == "grpo_compute":
            rows.append(grpo_compute_row(*sizes["grpo_compute"], cfg, gen))
        else:
            rows.append(grpo_trl_batch_row(*sizes["grpo_trl_batch"], cfg, gen))
    busiest = max((w["load"] for w in loads.values() if w["load"] is not None), default=None)

    print_table(rows, quick=args.quick)
    if busiest is not None:
        print(f"background CPU load before the cases (other processes, 0.3 s samples): max {100 * busiest:.0f}%"
              f"{'' if busiest < 0.15 else '  <- CONTENDED: rerun on an idle machine'}")
    print()
    print("ref: GAE/GRPO = verl-style Python loop in this process; losses = the same loss by torch autograd "
          "(forward + backward); gae verl = verl 0.9.1's loop and masked_whiten; gae openrlhf = OpenRLHF 0.11.2's own code (loop over T); grpo trl = TRL 1.16.0's "
          f"own torch code (view(-1, n), vectorised). rel = max|diff| / max|ref| (worst output), limit {REL_TOLERANCE:.0e}. faults = minor "
          "page faults per impl call (median). Targets are reported, not enforced.")
    print(f"GAE memory bound ({bandwidth['gb_per_s']:.1f} GB/s copy): bytes over all B*T (padded) tokens, "
          "read r, V, mask + write advantages, returns")
    for r in rows:
        if "bound" in r:
            b = r["bound"]
            mask_kind = "fp32 mask" if b["bytes_per_token"] == 20 else "bool mask"
            print(f"  {r['row']:<25} {r['impl']:<28} {b['bytes_per_token']} B/token ({mask_kind}) = "
                  f"{b['bytes'] / 1e6:.1f} MB -> bound {b['ms']:.3f} ms; p50 {r['engine']['p50_ms']:.3f} ms = "
                  f"{b['multiple']:.1f}x the bound")

    failures = [(r["row"], r["impl"], c) for r in rows for c in r["checks"] if not c["ok"]]
    elapsed = time.perf_counter() - started
    result = {"machine": info, "mode": "quick" if args.quick else "full",
              "config": {**cfg, "sizes": sizes, "cases": cases, "max_wait_s": max_wait},
              "bandwidth": bandwidth, "rows": rows, "rel_tolerance": REL_TOLERANCE,
              "correct": not failures, "elapsed_s": elapsed, "background_load": loads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({elapsed:.1f} s)")
    if failures:
        for row, impl, c in failures:
            print(f"CORRECTNESS CHECK FAILED: {row} / {impl} / {c['what']}: max|diff| {c['max_abs_diff']:.3e}, "
                  f"rel {c['rel']:.3e} > {REL_TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"correctness: all checks within {REL_TOLERANCE:.0e} relative")
    return 0


if __name__ == "__main__":
    sys.exit(main())
