"""Randomized differential check of advserve's presets against the real libraries (a developer tool, run by
hand; not collected by pytest).

    .venv/bin/python tests/golden/fuzz_libraries.py --library openrlhf --cases 200 --seed 1

For a library L and a seed it

1. generates K random cases in L's golden-case format (tests/golden/make_<L>_golden.py) and has the real
   library compute them: this script re-runs itself with L's throwaway venv (/tmp/verlenv, /tmp/orlhfenv,
   /tmp/trlenv; see the header of each make_*_golden.py) and calls that generator's own
   ``advantage_record`` / ``loss_record`` (and its input helpers, on this script's random generator), so
   the cases are exactly what the generator would write into a golden file;
2. writes them to a temporary JSON (``--keep PATH`` keeps it);
3. in the main .venv, asks advserve for the same cases exactly as tests/test_<L>_golden.py does (the same
   request translation, imported from those modules, and the same tolerances) and prints a summary and
   every mismatch (case, field, max |diff|).

Case i of seed S draws from numpy's default_rng([S, i]); ``--only i,j`` reruns single cases. Cases the
library itself cannot compute (it raises, or answers NaN: e.g. verl whitening one valid token) are counted
as "library skipped", not compared. ``--extract NAMES --to FILE`` appends the named cases of a kept JSON
to a golden-format file (for regression tests: tests/golden/<L>_<version>_fuzz.json).

What is covered: every estimator and loss mode the generator supports; scattered and ragged groups (verl),
equal-size scattered groups (OpenRLHF, no singletons), contiguous groups of n >= 1 (TRL); ties, all-equal
and inexact-mean groups, binary / continuous / large (reward-clip) rewards; length-1 responses, interior
mask gaps, empty rows (losses); KL in reward on/off with log-ratios that hit the clamps; random clip
ranges, dual clip / delta, all aggregation modes, global normalizers, IS correction modes, KL / entropy /
value terms; float32 advantage requests (verl).

Comparison: the golden tests' tolerances (verl 1e-8 / float32 1e-5, OpenRLHF the case's tol, TRL 1e-10 /
1e-12). Each documented deliberate difference the fuzzing ran into is accounted for where it applies, and
only there, each with a comment at the code pointing at its documentation:
* request translation: a TRL token-level `delta` is `ratio_cap` (make_trl_golden.policy_request writes it
  as dual_clip, equal only for δ > 1 + epsilon_high, which every golden case has); TRL's entropy bonus with
  a global num_tokens is sent in a call of its own; OpenRLHF's gspo under IS correction is sent with
  rollout_logprobs as old_logprobs and no rollout_correction (with kl_loss.unbiased_gradient as well it
  needs both: counted "not expressible", not compared); verl's GAE at γ = λ = 1 with KL in reward is
  advserve's gae (advserve's orz has β = 0).
* all-equal groups whose float mean is inexact (TRL, OpenRLHF group_norm): the library's rounding residue
  / std_eps, per row of such a group; TRL nanstd's float32 Bessel factor: 1e-7 where n/(n − 1) is inexact.
* whitening with a near-constant batch (|μ| ≫ σ): verl's N + 1e-8 (bounded), OpenRLHF's float32 statistics
  (measured by emulating them on advserve's unwhitened A, or bounded where var < 1e-6).
* float32 conditioning: verl float32 requests, and OpenRLHF's float32 KL-in-reward chain, get twice advserve's
  own float32-vs-float64 difference; verl float32 GRPO also ε32·max|S_g|/(σ_g + 1e-6) per group.
(Found here and since reproduced, no longer an allowance: verl's value-clip gradient at an exact tie
v = v_old ± clip is ¾ (v − G): the verl preset's value_loss.clip_ties="split"; regression cases
tests/golden/verl_0.9.1_fuzz.json, test_verl_golden.py.)

Results (library venvs of 2026-11-25: verl 0.9.1, OpenRLHF 0.11.2, TRL 1.16.0, torch 2.13.0+cpu), each
``--cases 500 --seed S`` for S = 1, 2, 3, 4:
* verl: 1973 of 2000 cases compared, all agree (27 verl itself refuses: whitening a single valid token).
* OpenRLHF: 1985 of 2000 compared, all agree (15 gspo + IS + unbiased-gradient KL, not expressible).
* TRL: 2000 of 2000 compared, all agree.
<RESULTS>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VENVS = {"verl": "/tmp/verlenv", "openrlhf": "/tmp/orlhfenv", "trl": "/tmp/trlenv"}
GOLDEN = {"verl": ("verl_0.9.1.json", "0.9.1"), "openrlhf": ("openrlhf_0.11.2.json", "0.11.2"),
          "trl": ("trl_1.16.0.json", "1.16.0")}


# ==================================================================================================
# generation (runs inside the library's venv)
# ==================================================================================================
def _mask(r, B, T, gaps=0.3, empty=0.0, full=0.3):
    """[B, T] 0/1: ragged lengths (some 1, some T), interior gaps, optionally empty rows; first token valid."""
    import numpy as np

    m = np.zeros((B, T), dtype=np.int64)
    for i in range(B):
        u = r.random()
        L = 1 if u < 0.15 else T if u < 0.15 + full else int(r.integers(1, T + 1))
        m[i, :L] = 1
        if L >= 3 and r.random() < gaps:
            k = int(r.integers(1, L - 1))
            m[i, r.choice(np.arange(1, L - 1), size=min(k, L - 2), replace=False)] = 0
        if r.random() < empty:
            m[i] = 0
    if m.sum() == 0:
        m[0, 0] = 1
    return m


def _rewards(r, n, kind=None):
    import numpy as np

    kind = kind or r.choice(["binary", "continuous", "ties", "inexact", "large"], p=[0.3, 0.3, 0.15, 0.15, 0.1])
    if kind == "binary":
        return (r.random(n) < r.uniform(0.2, 0.8)).astype(float)
    if kind == "ties":
        return r.choice([-1.0, 0.0, 0.5, 1.0], size=n)
    if kind == "inexact":
        return r.choice([0.1, 0.2, 0.3, 0.7], size=n)
    if kind == "large":
        return np.round(r.normal(0, 12.0, n), 4)
    return np.round(r.normal(r.uniform(-1, 1), r.uniform(0.3, 2.0), n), 4)


def _equalize_some_groups(r, rewards, gids, p=0.25):
    """Make some groups all-equal (ties), sometimes with a value whose float mean is inexact."""
    for g in sorted(set(gids), key=str):
        if r.random() < p:
            v = float(r.choice([0.0, 1.0, 0.1, 0.7, 0.3, -0.5]))
            for i, x in enumerate(gids):
                if x == g:
                    rewards[i] = v
    return rewards


def _kl_extremes(r, m, p=0.5):
    """(i, j, ref - old) placed on valid tokens: beyond the ±10 / ±20 clamps."""
    import numpy as np

    if r.random() > p:
        return []
    idx = np.argwhere(m > 0)
    k = min(len(idx), int(r.integers(1, 4)))
    pick = idx[r.choice(len(idx), size=k, replace=False)]
    return [(int(i), int(j), float(r.choice([-25.0, -22.0, -14.0, 12.0, 16.0, 24.0]))) for i, j in pick]


def _size(r, bmax, tmax):
    """(B, T): mostly small; one draw in five up to 32 rows by 32 tokens (longer sums, more groups)."""
    if r.random() < 0.2:
        return int(r.integers(1, 33)), int(r.integers(1, 33))
    return int(r.integers(1, bmax + 1)), int(r.integers(1, tmax + 1))


def _rnd_clip(r, choices, lo, hi):
    return float(r.choice(choices)) if r.random() < 0.5 else round(float(r.uniform(lo, hi)), 3)


# ------------------------------------------------------------------------------------------- verl
def gen_verl(g, r, name):
    g.rng = r  # the generator's input helpers (rnd, binary, kl_inputs, loss_tensors, ...) draw from it
    if r.random() < 0.5:
        est = str(r.choice(list(g.VERL_ADV)))
        B, T = _size(r, 12, 9)
        m = _mask(r, B, T, gaps=0.35)
        t = {"response_mask": m}
        params = {}
        if est in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
            ids = r.integers(0, max(1, int(r.integers(1, B + 1))), size=B)  # scattered, ragged, singletons
            gids = [int(x) * 7 + 3 for x in ids]
            if r.random() < 0.2:
                gids = [f"p{x}" for x in gids]
            t["group_ids"] = gids
        if r.random() < 0.3 and est != "orz":
            t["token_rewards"] = g.token_rewards(m, density=float(r.uniform(0.2, 1.0)))
        else:
            R = _rewards(r, B)
            t["rewards"] = _equalize_some_groups(r, R, t["group_ids"]) if "group_ids" in t else R
        if est in ("gae", "orz"):
            t["values"] = g.rnd(m.shape, 0.5)
        if est == "remax":
            t["greedy_rewards"] = _rewards(r, B)
        if est == "gae" and r.random() < 0.7:
            params.update(gamma=_rnd_clip(r, [1.0, 0.99, 0.9], 0.8, 1.0), lam=_rnd_clip(r, [1.0, 0.95, 0.8], 0.5, 1.0))
        if est == "reinforce_pp" and r.random() < 0.6:
            params["gamma"] = _rnd_clip(r, [1.0, 0.99, 0.9], 0.8, 1.0)
        if r.random() < 0.4:
            params["kl_coef"] = float(r.choice([0.001, 0.02, 0.05, 0.1]))
            params["kl_estimator"] = str(r.choice(["k1", "k2", "k3", "abs"]))
            t["old_logprobs"], t["ref_logprobs"] = g.kl_inputs(m, float(r.choice([0.2, 0.4, 0.8])),
                                                               extremes=_kl_extremes(r, m))
        dtype = "float32" if r.random() < 0.2 else "float64"
        if dtype == "float32":  # float32-representable inputs, as the golden's float32 cases
            t = {k: (v if k in ("group_ids", "response_mask") else g.f32(v)) for k, v in t.items()}
        return "advantages", g.advantage_record(f"{name}/{est}", est, params, dtype, None, t, [])

    mode = str(r.choice(["ppo_clip", "ppo_clip", "gspo", "cispo"]))
    agg = str(r.choice(["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                        "seq-mean-token-sum-norm"]))
    B, T = _size(r, 8, 9)
    m = _mask(r, B, T, gaps=0.35, empty=0.1)
    lsf = None
    if agg == "seq-mean-token-sum-norm" and r.random() < 0.4:
        lsf = int(r.choice([4, 16, 32, 4096]))
    if mode == "ppo_clip":
        lo = _rnd_clip(r, [0.2], 0.05, 0.3)
        hi = _rnd_clip(r, [lo, 0.28], 0.05, 0.4)
        pol = g.PPO(agg, lo, hi, None if r.random() < 0.25 else _rnd_clip(r, [3.0, 2.0], 1.1, 5.0), lsf)
        spread = float(r.choice([0.05, 0.25, 0.8, 1.5]))
    elif mode == "gspo":
        lo, hi = (3e-4, 4e-4) if r.random() < 0.4 else \
            (_rnd_clip(r, [0.2], 0.01, 0.3), _rnd_clip(r, [0.2, 0.28], 0.01, 0.4))
        pol = g.PL("gspo", agg, lo, hi, lsf)
        spread = float(r.choice([0.01, 0.1, 0.3]))
    else:
        pol = g.PL("cispo", agg, _rnd_clip(r, [0.2, 1.0], 0.1, 1.0), _rnd_clip(r, [0.28, 4.0], 0.1, 5.0), lsf)
        spread = float(r.choice([0.1, 0.5, 0.8]))
    req = {"policy_loss": pol}
    if r.random() < 0.3:
        req["num_tokens"] = int(m.sum()) + int(r.integers(0, 100))
    if r.random() < 0.3:
        req["num_sequences"] = B + int(r.integers(0, 24))
    with_ref, with_values, with_entropy, with_rollout = (bool(r.random() < p) for p in (0.35, 0.3, 0.3, 0.35))
    t = g.loss_tensors(m, with_ref=with_ref, with_values=with_values, with_entropy=with_entropy,
                       with_rollout=with_rollout, lp_scale=spread)
    if mode == "ppo_clip" and r.random() < 0.3:  # log ratios beyond the ±20 clamp, dual clip territory
        for i, j, _ in _kl_extremes(r, m, p=1.0):
            t["logprobs"][i, j] = t["old_logprobs"][i, j] + float(r.choice([1.5, 4.0, 25.0, -25.0]))
            t["advantages"][i, j] = float(r.choice([-1.5, -0.7, 0.9, 0.0]))
    if with_ref:
        est = str(r.choice(["k1", "k2", "k3", "abs"]))
        req["kl_loss"] = {"coef": float(r.choice([0.001, 0.01, 0.05, 0.1])), "estimator": est}
        for i, j, d in _kl_extremes(r, m):
            t["ref_logprobs"][i, j] = t["logprobs"][i, j] + d
    if with_values:
        req["value_loss"] = {"coef": float(r.choice([0.25, 0.5, 1.0])), "clip": float(r.choice([0.2, 0.5, 1.0]))}
    if with_entropy:
        req["entropy_bonus"] = {"coef": float(r.choice([0.001, 0.005, 0.01]))}
    if with_rollout:
        level, kind = str(r.choice(["token", "sequence"])), str(r.choice(["truncate", "mask"]))
        rc = {"level": level, "mode": kind, "high": float(r.choice([1.5, 2.0, 5.0]))}
        if kind == "mask":
            rc["low"] = float(r.choice([0.25, 0.5, 0.8]))
        req["rollout_correction"] = rc
        if level == "sequence" and r.random() < 0.3:
            i, j, _ = _kl_extremes(r, m, p=1.0)[0]
            t["rollout_logprobs"][i, j] = t["old_logprobs"][i, j] - 30.0
    return "losses", g.loss_record(f"{name}/{mode}-{agg}", req, None, t, [])


# --------------------------------------------------------------------------------------- OpenRLHF
def gen_openrlhf(g, r, name):
    import numpy as np

    g.rng = r
    if r.random() < 0.5:
        est = str(r.choice(list(g.ORLHF_ADV)))
        T = _size(r, 10, 9)[1]
        params = {}
        grouped = est in ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline")
        if grouped:
            n, ng = int(r.integers(2, 5)), int(r.integers(1, 5 if r.random() < 0.8 else 9))
            B = n * ng
            ids = np.repeat(np.arange(ng) * 3 + 1, n)
            r.shuffle(ids)
            gids = ids.tolist()
        else:
            B = _size(r, 10, 9)[0]
        m = _mask(r, B, T, gaps=0.3)
        t = {"response_mask": m.tolist()}
        if grouped:
            t["group_ids"] = gids
        kind = str(r.choice(["binary", "continuous", "ties", "inexact", "large"], p=[0.3, 0.3, 0.15, 0.15, 0.1]))
        R = _rewards(r, B, kind)
        if grouped:
            R = _equalize_some_groups(r, R, gids)
        t["rewards"] = [float(x) for x in R]
        if r.random() < 0.4:
            params["kl_coef"] = float(r.choice([0.01, 0.05, 0.1]))
            params["kl_estimator"] = str(r.choice(["k1", "k2", "k3"]))
            o, ref = g.kl_inputs(m, float(r.choice([0.2, 0.4, 0.8])), extremes=_kl_extremes(r, m))
            t["old_logprobs"], t["ref_logprobs"] = (o * m).tolist(), (ref * m).tolist()
        if est == "gae":
            t["values"] = (g.rnd(m.shape, 0.8) * m).tolist()
            if r.random() < 0.7:
                params.update(gamma=_rnd_clip(r, [1.0, 0.99], 0.8, 1.0), lam=_rnd_clip(r, [1.0, 0.95], 0.5, 1.0))
        if est == "reinforce_pp" and r.random() < 0.6:
            params["gamma"] = _rnd_clip(r, [1.0, 0.99, 0.9], 0.8, 1.0)
        if est in ("gae", "reinforce_pp", "reinforce_pp_baseline") and r.random() < 0.25:
            params["whiten_std"] = False
        if r.random() < 0.2:
            c = float(r.choice([0.5, 1.0, 3.0]))
            params.update(reward_clip_low=-c, reward_clip_high=c)
        chunks, left = [], B
        while left:
            c = min(left, int(r.integers(1, 4)))
            chunks.append(c)
            left -= c
        return "advantages", g.advantage_record(f"{name}/{est}", est, params, t, chunks, "")

    B, T = _size(r, 8, 9)
    m = _mask(r, B, T, gaps=0.35, empty=0.05)
    mode = "gspo" if r.random() < 0.25 else "ppo_clip"
    dual = None if r.random() < 0.5 else _rnd_clip(r, [3.0, 1.05], 1.05, 5.0)
    if mode == "gspo":
        lo, hi = (3e-4, 4e-4) if r.random() < 0.4 else \
            (_rnd_clip(r, [0.01], 0.005, 0.2), _rnd_clip(r, [0.01], 0.005, 0.3))
        pol = {"mode": "gspo", "clip_low": lo, "clip_high": hi, "dual_clip": dual, "ratio_clamp": None,
               "agg": "seq-mean-token-mean"}
        spread, shift = float(r.choice([0.02, 0.1, 0.3])), float(r.choice([0.0, 0.08]))
    else:
        lo = _rnd_clip(r, [0.2], 0.05, 0.3)
        pol = {"mode": "ppo_clip", "clip_low": lo, "clip_high": _rnd_clip(r, [lo, 0.28], 0.05, 0.4), "dual_clip": dual,
               "ratio_clamp": 20.0, "agg": str(r.choice(["token-mean", "seq-mean-token-mean"]))}
        spread, shift = float(r.choice([0.1, 0.4, 0.8, 1.5])), 0.0
    req = {"policy_loss": pol}
    if r.random() < 0.25:
        req["num_tokens"] = int(m.sum()) + int(r.integers(0, 60))
    if r.random() < 0.25:
        req["num_sequences"] = B + int(r.integers(0, 12))
    old = g.logprobs(m)
    t = {"response_mask": m.tolist(), "old_logprobs": (old * m).tolist(),
         "logprobs": (np.round(old + r.normal(shift, spread, m.shape), 4) * m).tolist(),
         "advantages": (g.rnd(m.shape, float(r.choice([0.5, 1.2, 3.0]))) * m).tolist()}
    if mode == "ppo_clip" and r.random() < 0.25:
        lp = np.asarray(t["logprobs"])
        for i, j, _ in _kl_extremes(r, m, p=1.0):
            lp[i, j] = old[i, j] + float(r.choice([4.0, 25.0, -25.0]))
        t["logprobs"] = (lp * m).tolist()
    if r.random() < 0.35:
        ref = np.round(old + r.normal(0, 0.5, m.shape), 4)
        for i, j, d in _kl_extremes(r, m):
            ref[i, j] = old[i, j] + d
        t["ref_logprobs"] = (ref * m).tolist()
        req["kl_loss"] = {"coef": float(r.choice([0.001, 0.01, 0.05])), "estimator": str(r.choice(["k1", "k2", "k3"])),
                          "clamp": 10.0, "agg": "token-mean"}
        if r.random() < 0.4:
            req["kl_loss"]["unbiased_gradient"] = True
    if r.random() < 0.3:
        t["entropy"] = (np.round(r.uniform(0.1, 2.5, m.shape), 4) * m).tolist()
        req["entropy_bonus"] = {"coef": float(r.choice([0.001, 0.01])), "agg": "token-mean"}
    if r.random() < 0.3:
        v_old = g.rnd(m.shape, 0.8)
        t["values"] = (np.round(v_old + r.normal(0, 0.6, m.shape), 4) * m).tolist()
        t["old_values"] = (v_old * m).tolist()
        t["returns"] = (g.rnd(m.shape, 1.0) * m).tolist()
        req["value_loss"] = {"coef": float(r.choice([0.5, 1.0])), "clip": None if r.random() < 0.3 else
                             float(r.choice([0.2, 0.5])), "agg": "token-mean"}
    if r.random() < 0.35:
        t["rollout_logprobs"] = (np.round(old + r.normal(0, float(r.choice([0.1, 0.6])), m.shape), 4) * m).tolist()
        gating = str(r.choice(["ratio", "ratio", "binary_kl", "tv"]))
        level = str(r.choice(["token", "sequence"]))
        kind = "truncate" if gating == "ratio" and level == "token" and r.random() < 0.4 else "mask"
        if gating == "ratio":
            low, high = float(r.choice([0.5, 0.8])), float(r.choice([1.25, 1.5, 5.0]))
        else:
            low, high = None, float(r.choice([0.01, 0.05, 0.1, 0.3]))
        req["rollout_correction"] = {"low": low, "high": high, "gating": gating, "weight": "token", "level": level,
                                     "mode": kind}
    return "losses", g.loss_record(f"{name}/{mode}-{pol['agg']}", req, "", t)


# -------------------------------------------------------------------------------------------- TRL
def gen_trl(g, r, name):
    import numpy as np

    g.rng = r
    if r.random() < 0.5:
        n, ng = int(r.integers(1, 6 if r.random() < 0.8 else 17)), int(r.integers(1, 5))
        B, T = n * ng, _size(r, 8, 7)[1]
        m = _mask(r, B, T, gaps=0.3)
        gids = g.contiguous_ids(B, n)
        R = _equalize_some_groups(r, _rewards(r, B), gids)
        t = {"response_mask": m, "group_ids": gids, "rewards": R}
        grpo_p = {"std_ddof": 1, "std_eps": 1e-4, "singleton_groups": "zero"}
        kind = str(r.choice(["group", "batch", "none", "rloo"]))
        if kind in ("group", "batch"):
            params = dict(grpo_p, std_scope="batch") if kind == "batch" else grpo_p
            proposed = ["std_scope"] if kind == "batch" else []
            est = "grpo"
        elif kind == "none":
            est, params, proposed = "dr_grpo", {"singleton_groups": "zero"}, []
        if kind != "rloo":
            cfg = {"scale_rewards": kind, "num_generations": n}
            return "advantages", g.advantage_record(f"{name}/{est}-{kind}", est, params, proposed, cfg, None, t,
                                                    lambda tt: g.trl_grpo_advantages(tt["rewards"], n, kind))
        beta = float(r.choice([0.01, 0.05, 0.1])) if r.random() < 0.4 else 0.0
        normalize = bool(r.random() < 0.35)
        params = {"kl_coef": beta, "kl_estimator": "k1", "kl_clamp": None, "singleton_groups": "zero"}
        proposed = []
        if beta:
            old = g.logprobs(m)
            ref = np.round(old + r.normal(0, float(r.choice([0.2, 0.4, 0.8])), m.shape), 4)
            t.update(old_logprobs=old * m, ref_logprobs=ref * m)
        if normalize:
            params.update(whiten=True, whiten_scope="sequence", whiten_ddof=1, whiten_eps=1e-4, whiten_eps_place="std")
            proposed = ["whiten_scope", "whiten_eps_place"]
        cfg = {"beta": beta, "num_generations": n}
        if normalize:
            cfg["normalize_advantages"] = True
        return "advantages", g.advantage_record(
            f"{name}/rloo", "rloo", params, proposed, cfg, None, t,
            lambda tt: g.trl_rloo_advantages(tt["rewards"], n, beta, tt["response_mask"] if beta else None,
                                             tt.get("old_logprobs"), tt.get("ref_logprobs"), normalize=normalize))

    lt = str(r.choice(["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]))
    B, T = _size(r, 7, 9)
    vllm = r.random() < 0.3
    m = _mask(r, B, T, gaps=0.0 if vllm else 0.35, empty=0.1)
    cfg = {"loss_type": lt}
    if r.random() < 0.6:
        cfg["epsilon"] = _rnd_clip(r, [0.2], 0.05, 0.3)
    if lt == "cispo":
        if r.random() < 0.8:
            cfg["epsilon_high"] = _rnd_clip(r, [5.0, 1.2, 3.0], 0.5, 6.0)
    elif r.random() < 0.5:
        cfg["epsilon_high"] = _rnd_clip(r, [0.28], 0.05, 0.4)
    seq = r.random() < 0.25
    if seq:
        cfg["importance_sampling_level"] = "sequence"
    if lt != "cispo" and r.random() < 0.3:
        cfg["delta"] = _rnd_clip(r, [3.0, 1.5, 1.1], 1.05, 4.0)
    if lt == "dr_grpo":
        cfg["max_completion_length"] = int(r.choice([T, 16, 512]))
    if lt in ("dapo", "cispo") and r.random() < 0.3:
        cfg["num_items_in_batch"] = int(m.sum()) + int(r.integers(0, 80))
    with_ref = r.random() < 0.3
    if with_ref:
        cfg["beta"] = float(r.choice([0.02, 0.04, 0.1]))
        if r.random() < 0.4:
            cfg["use_bias_correction_kl"] = False
    with_entropy = r.random() < 0.25
    if with_entropy:
        cfg["entropy_coef"] = float(r.choice([0.001, 0.01]))
    if vllm:
        mode = str(r.choice(["sequence_mask", "sequence_truncate", "token_truncate", "token_mask"]))
        cfg["vllm_importance_sampling_mode"] = mode
        cfg["vllm_importance_sampling_clip_min"] = float(r.choice([0.5, 0.8])) if mode.endswith("mask") and \
            r.random() < 0.5 else None
        cfg["vllm_importance_sampling_clip_max"] = float(r.choice([1.2, 1.5, 2.0, 3.0]))
    spread = float(r.choice([0.02, 0.1, 0.3, 0.8, 1.2])) if not seq else float(r.choice([0.02, 0.1, 0.15]))
    t = g.loss_inputs(m, spread=spread, with_ref=with_ref, with_rollout=vllm, with_entropy=with_entropy,
                      adv_scale=float(r.choice([0.5, 1.0, 2.0])))
    g.loss_case(f"{name}/{lt}", cfg, t)  # policy_request: the generator's own config -> request translation
    case = g.LOSS_CASES.pop()
    return "losses", g.loss_record(*case)


def generate(library, n, seed, out, only=None):
    """Inside the library venv: K cases through the generator's own functions, to `out`."""
    import warnings

    import numpy as np

    sys.path.insert(0, HERE)
    g = __import__(f"make_{library}_golden")
    warnings.filterwarnings("ignore")
    gen = {"verl": gen_verl, "openrlhf": gen_openrlhf, "trl": gen_trl}[library]
    doc = {"library": library, "seed": seed, "advantages": [], "losses": [], "skipped": []}
    for i in (only if only is not None else range(n)):
        r = np.random.default_rng([seed, i])
        name = f"fuzz-s{seed}-{i}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kind, case = gen(g, r, name)
        except Exception as e:  # the library cannot compute this input (raises, NaN): not a comparison
            doc["skipped"].append({"case": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        case = json.loads(json.dumps(case, default=_jsonable))
        case["fuzz"] = {"seed": seed, "index": i}
        doc[kind].append(case)
    with open(out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


# ==================================================================================================
# comparison (runs in the main .venv), the golden tests' translation and tolerances
# ==================================================================================================
def _float32_inexact_bessel(n):
    import numpy as np

    return n > 1 and float(np.float32(n) / np.float32(n - 1)) != n / (n - 1)


class NotExpressible(Exception):
    """A library configuration advserve documents as expressed differently (not one call): not compared."""


def _all_equal_group_tol(case, tol, std_eps):
    """[B, 1] tolerances: `tol`, or for the rows of an all-equal group whose float mean may be inexact, the
    library's rounding residue divided by std_eps (bounded by n·2^-52·max|R_g| / std_eps), where advserve's
    exact-constant rule gives 0. The brief's and docs' deliberate difference "all-equal groups with inexact
    float means" (docs/semantics.md "trl" deliberate differences, docs/research/trl.md; the same holds for
    OpenRLHF's group_norm, docs/research/openrlhf.md "Rewards": 0/(0 + 1e-9) only when the mean is exact)."""
    import numpy as np

    R = np.asarray(case["tensors"]["rewards"], dtype=np.float64)
    gids = case["tensors"]["group_ids"]
    out = np.full((len(R), 1), float(tol))
    for g in set(gids):
        rows = [i for i, x in enumerate(gids) if x == g]
        if len(rows) > 1 and len(set(R[rows])) == 1:
            out[rows, 0] = max(tol, len(rows) * 2.0 ** -52 * float(np.abs(R[rows]).max()) / std_eps)
    return out


def _trl_adv_tol(case):
    """test_trl_golden's 1e-12, plus its documented deliberate differences (test_trl_golden.ADV_TOL comment,
    docs/research/trl.md "GRPO", docs/semantics.md "trl"): nanstd's Bessel factor in float32 (1e-7 where
    float32(n/(n-1)) is inexact, as the golden test's n = 4 and n = 8 cases), and the rounding residue / 1e-4
    of an all-equal group whose float mean is inexact (per row)."""
    cfg, R = case["trl_config"], case["tensors"]["rewards"]
    n, B = cfg["num_generations"], len(R)
    stds = []
    if cfg.get("scale_rewards") == "group":
        stds.append(n)
    if cfg.get("scale_rewards") == "batch":
        stds.append(B)
    if cfg.get("normalize_advantages"):
        stds.append(B)
    tol = 1e-7 if any(_float32_inexact_bessel(k) for k in stds) else 1e-12
    if cfg.get("scale_rewards") in ("group", "batch"):
        return _all_equal_group_tol(case, tol, 1e-4)
    return tol


class Comparer:
    def __init__(self, library):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import advserve

        self.advserve = advserve
        self.library = library
        self.mod = __import__(f"test_{library}_golden")

    def _adv(self, case, estimator, params):
        import golden_cases

        return self.advserve.compute_advantages(estimator, preset=self.library, params=params, dtype=case["dtype"],
                                                **golden_cases.inputs(case["tensors"]))

    def _verl_whitening_tol(self, case, estimator, params):
        """verl's masked_mean divides by N + 1e-8, which advserve does not copy (test_verl_golden TOL comment,
        README "Presets", verl's deliberate differences): A − mean is off by |μ|·1e-8/N, times
        rsqrt(var + 1e-8). Relative to the output that is (|μ|/σ)·1e-8/N: inside the golden's 1e-8 unless
        |μ| ≫ σ (a near-constant batch: up to |μ|·1e-4/N). The bound of that effect, from advserve's
        unwhitened advantages (0 in float32, where N + 1e-8 == N)."""
        import numpy as np

        if case["dtype"] != "float64":
            return 0.0
        raw = self._adv(case, estimator, {**params, "whiten": False})
        m = np.asarray(case["tensors"]["response_mask"]) > 0
        a = np.asarray(raw.advantages, dtype=np.float64)[m]
        if a.size == 0:
            return 0.0
        return 4e-8 * (abs(float(a.mean())) + float(np.abs(a).max())) / (a.size * math.sqrt(float(a.var()) + 1e-8))

    def _openrlhf_float32_whitening_allowance(self, case, estimator, params, whitened):
        """OpenRLHF whitens float64 advantages with float32 statistics: (A − μ32)·rsqrt(max(var32, 1e-8))
        (docs/research/openrlhf.md "Whitening", docs/semantics.md "openrlhf": float32 statistics whatever the
        input dtype; advserve uses the request's dtype). The golden tol 1e-6 covers that for σ of order
        max|A|; where |μ| ≫ σ (few tokens, a near-constant batch) μ32's rounding is amplified by 1/σ (up to
        1e4). Measured, not bounded: twice the difference between advserve's float64 whitening and the same
        whitening with OpenRLHF's float32 statistics on advserve's own unwhitened A (elementwise)."""
        import numpy as np

        raw = self._adv(case, estimator, {**params, "whiten": False})
        mask = np.asarray(case["tensors"]["response_mask"], dtype=np.float64)
        a64 = np.asarray(raw.advantages, dtype=np.float64)
        a32, m32 = a64.astype(np.float32), mask.astype(np.float32)
        n = np.float32(m32.sum())
        mu = np.float32((a32 * m32).sum(dtype=np.float32) / n)
        if params.get("whiten_std", True):
            var = np.float32((((a32 - mu) ** 2) * m32).sum(dtype=np.float32) / n)
            rstd = np.float32(1.0) / np.sqrt(np.maximum(var, np.float32(1e-8)))
        else:
            rstd = np.float32(1.0)
        emulated = (a64 - np.float64(mu)) * np.float64(rstd) * mask
        allowance = 2.0 * np.abs(emulated - np.asarray(whitened, dtype=np.float64))
        valid = a64[mask > 0]
        if valid.size and float(valid.var()) < 1e-6:
            # a near-constant batch: OpenRLHF's A itself differs from advserve's by float32 KL rounding, so the
            # residues A − μ32 differ too; both are bounded by ~N·2^-24·max|A|, amplified by up to 1e4
            bound = 2.0 ** -22 * valid.size * float(np.abs(valid).max()) / math.sqrt(max(float(valid.var()), 1e-8))
            allowance = np.maximum(allowance, bound)
        if params.get("kl_coef", 0.0) > 0:
            # with KL in reward OpenRLHF's whole reward chain is float32 (docs/research/openrlhf.md "KL in
            # reward": compute_reward's output is float32 even for float64 inputs), returns accumulated in
            # float32 included: measured as advserve's own float32-vs-float64 difference (test_openrlhf_golden's
            # test_advantages_float32 checks the float32 request against the library)
            f32 = self._adv({**case, "dtype": "float32"}, estimator, params)
            allowance = np.maximum(allowance, 2.0 * np.abs(np.asarray(f32.advantages, np.float64)
                                                           - np.asarray(whitened, np.float64)))
        return allowance

    def _verl_grpo_float32_conditioning(self, case, params):
        """[B, 1]: 8·2^-24·max_g|S|/(σ_g + 1e-6) for each row's group, S_i the sequence score (with KL in reward),
        σ_g verl's unbiased std (1 for singletons). A float32 GRPO answer is only determined to that: a group
        of scores 0.0997 and 0.0998 (σ 7e-5) leaves verl's float32 mean off the midpoint by ε32·0.1, i.e.
        1e-4 of the answer, where advserve's float32 answer is symmetric."""
        import golden_cases
        import numpy as np

        tensors = golden_cases.inputs(case["tensors"])
        tensors.pop("group_ids")
        B = tensors["response_mask"].shape[0]
        kl = {k: v for k, v in params.items() if k in ("kl_coef", "kl_estimator")}
        # remax with greedy rewards 0 returns the reward-to-go of the token rewards (KL included): at t = 0, S_i
        res = self.advserve.compute_advantages("remax", preset="verl", params=kl, dtype="float64",
                                               greedy_rewards=np.zeros(B), **tensors)
        S = np.asarray(res.returns, np.float64)[:, 0]
        gids = case["tensors"]["group_ids"]
        out = np.zeros((B, 1))
        for g in set(gids):
            rows = [i for i, x in enumerate(gids) if x == g]
            sd = float(np.std(S[rows], ddof=1)) if len(rows) > 1 else 1.0
            out[rows, 0] = 8 * 2.0 ** -24 * float(np.abs(S[rows]).max()) / (sd + 1e-6)
        return out

    def advantages(self, case):
        L, m = self.library, self.mod
        est = case["estimator"]
        if L == "verl":
            params, tol = dict(case["params"]), m.TOL[case["dtype"]]
            if est == "orz" and params.get("kl_coef"):
                # advserve's orz is GAE with γ = λ = 1 and β = 0 (docs/semantics.md estimator table); verl's
                # "orz" here is its GAE with γ = λ = 1, which with KL in reward is advserve's gae at γ = λ = 1
                est, params = "gae", {**params, "gamma": 1.0, "lam": 1.0}
            adv_tol = ret_tol = tol
            if est in ("gae", "orz", "reinforce_pp", "reinforce_pp_baseline"):
                adv_tol = max(tol, self._verl_whitening_tol(case, est, params))
                ret_tol = adv_tol if est == "reinforce_pp_baseline" else tol  # returns whitened there only
        elif L == "openrlhf":
            params, tol = m._advantage_params(case), case["tol"]
            adv_tol = ret_tol = tol
            if est == "grpo":
                adv_tol = ret_tol = _all_equal_group_tol(case, tol, params["std_eps"])
        else:
            params = m._advantage_params(case)
            adv_tol = ret_tol = _trl_adv_tol(case)
        res = self._adv(case, est, params)
        if L == "openrlhf" and params.get("whiten"):
            adv_tol = adv_tol + self._openrlhf_float32_whitening_allowance(case, est, params, res.advantages)
        if L == "verl" and case["dtype"] == "float32":
            # test_verl_golden's float32 TOL 1e-5 presumes well-conditioned statistics; where a group's or the
            # batch's σ is small against |μ| two float32 computations in different orders differ by ε32·|μ|/σ.
            # Measured as twice advserve's own float32-vs-float64 difference on the same inputs (elementwise).
            import numpy as np

            exact = self._adv({**case, "dtype": "float64"}, est, params)
            for_adv = 2.0 * np.abs(np.asarray(res.advantages, np.float64) - np.asarray(exact.advantages, np.float64))
            for_ret = 2.0 * np.abs(np.asarray(res.returns, np.float64) - np.asarray(exact.returns, np.float64))
            adv_tol, ret_tol = adv_tol + for_adv, ret_tol + for_ret
            if est == "grpo":  # the same, bounded: ε32·max|S_g|/(σ_g + 1e-6) per group (S: the scores)
                cond = self._verl_grpo_float32_conditioning(case, params)
                adv_tol, ret_tol = adv_tol + cond, ret_tol + cond
        return [("advantages", res.advantages, case["expected"]["advantages"], adv_tol),
                ("returns", res.returns, case["expected"]["returns"], ret_tol)]

    def losses(self, case):
        import copy

        import golden_cases

        L, m = self.library, self.mod
        tensors = golden_cases.inputs(case["tensors"])
        split_entropy = None
        if L == "verl":
            request, tol = copy.deepcopy(case["request"]), m.TOL[case["dtype"]]
        elif L == "openrlhf":
            request, tol = m._loss_request(case), case["tol"]
            if request["policy_loss"]["mode"] == "gspo" and "rollout_correction" in request:
                # docs/semantics.md "openrlhf": with IS correction on, OpenRLHF's gspo takes lp − rollout as its
                # ratio and applies no IS weight: send rollout_logprobs as old_logprobs, no rollout_correction
                if request.get("kl_loss", {}).get("unbiased_gradient"):
                    raise NotExpressible("gspo + IS correction + kl_loss.unbiased_gradient (needs the true old "
                                         "logprobs for the KL weight and the rollout ones for the ratio)")
                del request["rollout_correction"]
                tensors["old_logprobs"] = tensors.pop("rollout_logprobs")
        else:
            request, tol = m._loss_request(case), m.TOL
            pol, delta = request["policy_loss"], case["trl_config"].get("delta")
            if delta is not None and pol.get("dual_clip") == delta:
                # make_trl_golden.policy_request writes a token-level `delta` as dual_clip, which equals TRL's
                # min(ρ, δ) only when δ > 1 + epsilon_high (true of every golden case); the preset's translation
                # is ratio_cap = δ (docs/semantics.md "trl", README's TRL table, test_trl_golden.DEFAULT_REQUESTS)
                del pol["dual_clip"]
                pol["ratio_cap"] = delta
            if "entropy_bonus" in request and request.get("num_tokens") is not None:
                # TRL's entropy bonus is a local token mean whatever num_items_in_batch; docs/semantics.md "trl"
                # and the preset's option text: with a global num_tokens send the entropy bonus in a call of its own
                split_entropy = request.pop("entropy_bonus")
        main = {k: v for k, v in tensors.items() if not (split_entropy is not None and k == "entropy")}
        res = self.advserve.compute_losses(preset=L, dtype=case["dtype"], **request, **main)
        loss, comps, grad_entropy, grad_values = res.loss, dict(res.components), res.grad_entropy, res.grad_values
        if split_entropy is not None:
            own = {k: v for k, v in request.items() if k not in ("num_tokens", "kl_loss")}
            ent = self.advserve.compute_losses(preset=L, dtype=case["dtype"], entropy_bonus=split_entropy, **own,
                                               **{k: v for k, v in tensors.items() if k != "ref_logprobs"})
            comps["entropy"], grad_entropy = ent.components["entropy"], ent.grad_entropy
            loss = loss - split_entropy["coef"] * comps["entropy"]
        e = case["expected"]
        out = [("loss", loss, e["loss"], tol)]
        for k, v in e["components"].items():
            out.append((f"components.{k}", comps.get(k), v, tol))
        out.append(("grad_logprobs", res.grad_logprobs, e["grad_logprobs"], tol))
        out.append(("grad_values", grad_values, e["grad_values"], tol))
        out.append(("grad_entropy", grad_entropy, e["grad_entropy"], tol))
        return out


def _field_failure(got, want, tol):
    """None if equal as golden_cases.check_* decide (allclose rtol = atol = tol; tol may be per element),
    else a description."""
    import numpy as np

    if want is None or got is None:
        return None if (want is None) == (got is None) else f"got {'None' if got is None else 'a value'}, " \
            f"expected {'None' if want is None else 'a value'}"
    g, w = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        return f"shape {g.shape} != {w.shape}"
    t = np.broadcast_to(np.asarray(tol, dtype=np.float64), w.shape)
    bad = ~(np.abs(g - w) <= t + t * np.abs(w)) & ~((g == w) | (np.isnan(g) & np.isnan(w)))
    if not bad.any():
        return None
    d = np.abs(g - w)
    d = np.where(np.isnan(d), np.inf, d)
    k = np.unravel_index(int(np.argmax(np.where(bad, d, -1))), d.shape) if d.ndim else ()
    rel = float(d[k] / max(abs(float(w[k])), 1e-300))
    return f"max |diff| {float(d.max()):.3g} (tol {float(t[k]):g}; at {tuple(int(x) for x in k)}: got " \
           f"{float(g[k])!r} expected {float(w[k])!r}, rel {rel:.3g})"


def compare(library, doc):
    c = Comparer(library)
    mismatches, n, skipped = [], 0, []
    for kind in ("advantages", "losses"):
        for case in doc[kind]:
            try:
                fields = getattr(c, kind)(case)
            except NotExpressible as e:
                skipped.append((case, str(e)))
                continue
            except Exception as e:  # advserve refused or failed: a disagreement too
                n += 1
                mismatches.append((case, "request", f"advserve raised {type(e).__name__}: {str(e)[:300]}"))
                continue
            n += 1
            for field, got, want, tol in fields:
                why = _field_failure(got, want, tol)
                if why:
                    mismatches.append((case, field, why))
    return n, mismatches, skipped


def _describe(case):
    what = case.get("trl_config") or case.get("request") or {"estimator": case.get("estimator"),
                                                                 "params": case.get("params"),
                                                                 "dtype": case.get("dtype")}
    return json.dumps(what, separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", required=True, choices=sorted(VENVS))
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", help="comma-separated case indices (of --seed) instead of 0..cases-1")
    ap.add_argument("--keep", help="write the library's cases to this JSON (else a temp file, removed)")
    ap.add_argument("--extract", help="comma-separated case names of --keep's file to append to --to")
    ap.add_argument("--to", help="golden-format JSON to append extracted cases to (created from the golden header)")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)  # internal: inside the lib venv
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    only = [int(x) for x in a.only.split(",")] if a.only else None

    if a.generate_only:
        generate(a.library, a.cases, a.seed, a.out, only)
        return 0

    if a.extract:
        return extract(a)

    path = a.keep or tempfile.mkstemp(prefix=f"fuzz-{a.library}-", suffix=".json")[1]
    t0 = time.time()
    py = os.path.join(VENVS[a.library], "bin", "python")
    cmd = [py, os.path.abspath(__file__), "--generate-only", "--library", a.library, "--cases", str(a.cases),
           "--seed", str(a.seed), "--out", path] + (["--only", a.only] if a.only else [])
    subprocess.run(cmd, check=True)
    t1 = time.time()
    with open(path) as f:
        doc = json.load(f)
    if not a.keep:
        os.unlink(path)
    n, mismatches, not_expressible = compare(a.library, doc)
    t2 = time.time()
    bad = {m[0]["case"] for m in mismatches}
    print(f"{a.library} seed {a.seed}: {n} cases compared (of {len(doc['advantages'])} advantages, "
          f"{len(doc['losses'])} losses), {len(doc['skipped'])} library skipped, {len(not_expressible)} not "
          f"expressible in one call; {n - len(bad)} agree, {len(bad)} disagree  "
          f"[library {t1 - t0:.0f}s, advserve {t2 - t1:.0f}s]")
    for s in doc["skipped"]:
        print(f"  library skipped {s['case']}: {s['error']}")
    for case, why in not_expressible:
        print(f"  not expressible {case['case']}: {why}")
    for case, field, why in mismatches:
        print(f"MISMATCH {case['case']} [{field}] {why}\n    {_describe(case)}")
    return 1 if mismatches else 0


def extract(a):
    with open(a.keep) as f:
        doc = json.load(f)
    want = set(a.extract.split(","))
    if os.path.exists(a.to):
        with open(a.to) as f:
            out = json.load(f)
    else:
        with open(os.path.join(HERE, GOLDEN[a.library][0])) as f:
            head = json.load(f)
        out = {k: v for k, v in head.items() if k not in ("advantages", "losses", "generated")}
        out.update(generator="tests/golden/fuzz_libraries.py (cases from make_%s_golden.py)" % a.library,
                   advantages=[], losses=[])
    have = {c["case"] for c in out["advantages"] + out["losses"]}
    for kind in ("advantages", "losses"):
        for case in doc[kind]:
            if case["case"] in want and case["case"] not in have:
                out[kind].append(case)
                want.discard(case["case"])
    with open(a.to, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"{a.to}: {len(out['advantages'])} advantage, {len(out['losses'])} loss cases; not found: {sorted(want)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
