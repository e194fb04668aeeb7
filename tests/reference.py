"""Naive float64 reference for the `paper` preset (docs/semantics.md, seed: "Brief Introduction of
Policy Gradient in LLM Reasoning").

Deliberately slow and obvious: plain Python loops over rows, groups and tokens, numpy float64 arrays
in and out, no torch, no vectorisation tricks. Every function is written straight from a formula of
the seed's table "Advantage Estimations of Popular Policy Gradient Methods" or of docs/semantics.md.
It shares no code with the engine (service/advserve) and must never import it.

The parameters the library presets brought (reward clip, mask_gaps "step", std_scope "batch",
whitening eps modes, mean-only and per-sequence whitening, unwhitened returns, KL as reward-to-go for
the group estimators, flash_reinforce) are written the same way, from docs/semantics.md ("Library
parameters"); their neutral values are in PAPER_DEFAULTS.

Conventions
-----------
* ``mask`` [B, T] (0/1). The valid tokens of row i are ``valid_positions(mask, i)`` (ascending).
  Interior zeros are observation tokens: every recursion walks the valid positions only, so the
  running value is carried across a gap unchanged.
* Positions with mask 0 are exactly 0 in every output.
* Parameters that are not given take the `paper` preset defaults (PAPER_DEFAULTS).
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------------
# Defaults of the `paper` preset (docs/semantics.md, "Paper preset details" and the preset table).
# --------------------------------------------------------------------------------------------------

PAPER_DEFAULTS = dict(
    gamma=1.0,
    lam=0.95,
    kl_coef=0.0,
    kl_estimator="k1",
    kl_clamp=None,
    std_ddof=0,
    std_eps=0.0,
    singleton_groups="zero",
    whiten_eps=0.0,
    whiten_ddof=0,
    # neutral values of the parameters the openrlhf and trl presets set (docs/semantics.md)
    reward_clip_low=None,
    reward_clip_high=None,
    mask_gaps="skip",
    std_scope="group",
    whiten_std=True,
    whiten_eps_mode="inside",
    whiten_scope="token",
    returns_whitened=True,
)

ESTIMATORS = (
    "reinforce",
    "reinforce_rtg",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "rloo",
    "remax",
    "gae",
    "orz",
    "grpo",
    "grpo_original",
    "dapo",
    "dr_grpo",
)
# estimators of the library presets beyond the seed's table (compute_advantages knows them too)
LIBRARY_ESTIMATORS = ("flash_reinforce",)

GROUP_ESTIMATORS = ("reinforce_pp_baseline", "rloo", "grpo", "grpo_original", "dapo", "dr_grpo")


class ReferenceError_(ValueError):
    """Raised where the contract says the request is an error (e.g. RLOO with a group of size 1)."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def valid_positions(mask, i):
    return [t for t in range(mask.shape[1]) if mask[i, t] != 0]


def groups_of(group_ids):
    """{id: [row indices in batch order]}; ids may be ints or strings, scattered through the batch."""
    out = {}
    for i, g in enumerate(list(group_ids)):
        key = g.item() if hasattr(g, "item") else g
        out.setdefault(key, []).append(i)
    return out


def mean(xs):
    s = 0.0
    for x in xs:
        s += x
    return s / len(xs)


def std(xs, ddof):
    mu = mean(xs)
    s = 0.0
    for x in xs:
        s += (x - mu) ** 2
    n = len(xs) - ddof
    if n <= 0:
        return float("nan")
    return math.sqrt(s / n)


def sign(x):
    return 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def clip_optional(x, lo, hi):
    """x clamped to [lo, hi]; a bound of None is no bound."""
    if lo is not None:
        x = max(x, lo)
    if hi is not None:
        x = min(x, hi)
    return x


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------


def kl_value(a, b, estimator, clamp=None):
    """KL estimator of (a, b): a is the policy's log-prob (old in the reward, lp in the loss), b the
    reference log-prob. k1 = a − b; k2 = ½(a − b)²; k3 = e^{b−a} − (b − a) − 1; abs = |a − b|.
    With ``clamp`` c: k3's log-ratio is clamped to [−20, 20] first, then the value to [−c, c]."""
    if estimator == "k1":
        v = a - b
    elif estimator == "k2":
        v = 0.5 * (a - b) ** 2
    elif estimator == "k3":
        x = b - a
        if clamp is not None:
            x = clip(x, -20.0, 20.0)
        v = math.exp(x) - x - 1.0
    elif estimator == "abs":
        v = abs(a - b)
    else:
        raise ValueError(estimator)
    if clamp is not None:
        v = clip(v, -clamp, clamp)
    return v


def kl_grad(a, b, estimator, clamp=None):
    """∂ kl_value(a, b) / ∂a: ∂k1 = 1, ∂k2 = a − b, ∂k3 = 1 − e^{b−a}, ∂abs = sign(a − b);
    0 where a clamp binds (k3's input clamp ±20 or the value clamp ±c)."""
    if estimator == "k1":
        raw, g = a - b, 1.0
    elif estimator == "k2":
        raw, g = 0.5 * (a - b) ** 2, a - b
    elif estimator == "k3":
        x = b - a
        if clamp is not None and not (-20.0 < x < 20.0):
            return 0.0
        raw, g = math.exp(x) - x - 1.0, 1.0 - math.exp(x)
    elif estimator == "abs":
        raw, g = abs(a - b), sign(a - b)
    else:
        raise ValueError(estimator)
    if clamp is not None and not (-clamp < raw < clamp):
        return 0.0
    return g


def kl_tokens(old, ref, mask, estimator, clamp=None):
    B, T = mask.shape
    out = np.zeros((B, T), dtype=np.float64)
    for i in range(B):
        for t in valid_positions(mask, i):
            out[i, t] = kl_value(float(old[i, t]), float(ref[i, t]), estimator, clamp)
    return out


def grpo_token_kl_term(old, ref, estimator, beta, clamp=None):
    """GRPO's per-token KL term in the advantage: −β ∂kl/∂logπ at the behaviour policy.
    k3: β(π_ref/π_old − 1) (the seed's table); k1: −β; k2: −β(old − ref); abs: −β sign(old − ref).
    With kl_clamp: the derivative of the clamped estimator, i.e. 0 where the clamp binds."""
    if clamp is None:
        if estimator == "k3":
            return beta * (math.exp(ref - old) - 1.0)
        if estimator == "k1":
            return -beta
        if estimator == "k2":
            return -beta * (old - ref)
        if estimator == "abs":
            return -beta * sign(old - ref)
        raise ValueError(estimator)
    return -beta * kl_grad(old, ref, estimator, clamp)


# --------------------------------------------------------------------------------------------------
# Token rewards, reward-to-go, whitening
# --------------------------------------------------------------------------------------------------


def token_reward_matrix(mask, rewards=None, token_rewards=None):
    """r_t: the outcome score sits on the row's last valid token, or token_rewards is given."""
    B, T = mask.shape
    r = np.zeros((B, T), dtype=np.float64)
    for i in range(B):
        vp = valid_positions(mask, i)
        if token_rewards is not None:
            for t in vp:
                r[i, t] = float(token_rewards[i, t])
        elif vp:
            r[i, vp[-1]] = float(rewards[i])
    return r


def sequence_scores(mask, r):
    """R_i = Σ_t m_t r_t."""
    B = mask.shape[0]
    return [sum(float(r[i, t]) for t in valid_positions(mask, i)) for i in range(B)]


def reward_to_go(mask, x, gamma, gaps="skip"):
    """rtg_γ(x)_t = Σ_{t' ≥ t, valid} γ^{k(t') − k(t)} x_t' (k = index among valid tokens).

    gaps="step" (OpenRLHF): every position is a step, k(t) = t, masked positions add 0."""
    B, T = mask.shape
    out = np.zeros((B, T), dtype=np.float64)
    for i in range(B):
        running = 0.0
        steps = reversed(range(T)) if gaps == "step" else reversed(valid_positions(mask, i))
        for t in steps:
            running = (float(x[i, t]) if mask[i, t] else 0.0) + gamma * running
            if mask[i, t]:
                out[i, t] = running
    return out


def whiten_scale(vals, eps, ddof, eps_mode="inside", use_std=True):
    """(μ, d) of whitening the list `vals`: (x − μ)/d. d by `eps_mode`: "inside" sqrt(σ² + eps),
    "floor" sqrt(max(σ², eps)), "outside" σ + eps; `use_std` False: d = 1 (mean shift only).
    d = 0 (σ = 0, eps = 0) is returned as None: the whitened values are 0. σ² of a single value
    with ddof 1 is taken as 0."""
    mu = mean(vals)
    if not use_std:
        return mu, 1.0
    s = 0.0
    for v in vals:
        s += (v - mu) ** 2
    var = s / (len(vals) - ddof) if len(vals) > ddof else 0.0
    if eps_mode == "inside":
        d = math.sqrt(var + eps)
    elif eps_mode == "floor":
        d = math.sqrt(max(var, eps))
    elif eps_mode == "outside":
        d = math.sqrt(var) + eps
    else:
        raise ValueError(eps_mode)
    return mu, (d if d > 0.0 else None)


def whiten(mask, x, eps=0.0, ddof=0, eps_mode="inside", use_std=True):
    """(x − μ)/d (see whiten_scale), μ and σ² over all valid tokens of the batch; d = 0 → 0."""
    B, T = mask.shape
    vals = [float(x[i, t]) for i in range(B) for t in valid_positions(mask, i)]
    mu, d = whiten_scale(vals, eps, ddof, eps_mode, use_std)
    out = np.zeros((B, T), dtype=np.float64)
    if d is None:
        return out
    for i in range(B):
        for t in valid_positions(mask, i):
            out[i, t] = (float(x[i, t]) - mu) / d
    return out


def whiten_rows(per_row, eps=0.0, ddof=0, eps_mode="inside", use_std=True):
    """Whitening over the B sequence values (TRL RLOO's normalize_advantages), every row counted."""
    mu, d = whiten_scale(list(per_row), eps, ddof, eps_mode, use_std)
    return [0.0 if d is None else (v - mu) / d for v in per_row]


def broadcast(mask, per_row):
    B, T = mask.shape
    out = np.zeros((B, T), dtype=np.float64)
    for i in range(B):
        for t in valid_positions(mask, i):
            out[i, t] = per_row[i]
    return out


def group_normalized(scores, group_ids, std_ddof, std_eps, singleton_groups, divide_by_std=True, std_scope="group"):
    """(R_i − mean_g R)/(std_g R + std_eps) per row (or R_i − mean_g R without the std).
    std_scope "batch" (TRL scale_rewards="batch"): the std of all B scores instead of the group's.
    All-equal group → 0. Singleton groups: "zero" → 0, "raw" → mean 0 / std 1, "error" → raise."""
    out = [0.0] * len(scores)
    batch_sd = None
    if std_scope == "batch":
        batch_sd = std(scores, std_ddof) if len(scores) > std_ddof else 0.0
    for _, rows in groups_of(group_ids).items():
        vals = [scores[i] for i in rows]
        if len(rows) == 1:
            if singleton_groups == "error":
                raise ReferenceError_("singleton group")
            if singleton_groups == "zero":
                out[rows[0]] = 0.0
            else:  # raw: mean 0, std 1
                out[rows[0]] = vals[0] / (1.0 + std_eps) if divide_by_std else vals[0]
            continue
        mu = mean(vals)
        if not divide_by_std:
            for i in rows:
                out[i] = scores[i] - mu
            continue
        if all(v == vals[0] for v in vals):  # all equal: no signal (exactly 0, whatever the scope)
            for i in rows:
                out[i] = 0.0
            continue
        sd = std(vals, std_ddof) if batch_sd is None else batch_sd
        for i in rows:
            if sd + std_eps == 0.0:
                out[i] = 0.0
            else:
                out[i] = (scores[i] - mu) / (sd + std_eps)
    return out


# --------------------------------------------------------------------------------------------------
# Advantage estimators (paper preset)
# --------------------------------------------------------------------------------------------------


def compute_advantages(
    estimator,
    *,
    response_mask,
    rewards=None,
    token_rewards=None,
    group_ids=None,
    values=None,
    old_logprobs=None,
    ref_logprobs=None,
    greedy_rewards=None,
    **params,
):
    """Returns (advantages [B, T], returns [B, T]) as float64 numpy arrays."""
    p = dict(PAPER_DEFAULTS)
    if estimator == "rloo":
        p["singleton_groups"] = "error"
    if estimator in ("grpo", "grpo_original"):
        p["kl_placement"] = "token"
    if estimator == "reinforce_pp_baseline":
        p["kl_placement"] = "reward_to_go"
    p["whiten"] = estimator in ("reinforce_pp", "reinforce_pp_baseline")
    p.update(params)

    mask = (np.asarray(response_mask) != 0).astype(np.float64)
    B, T = mask.shape
    f = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
    rewards, token_rewards, values = f(rewards), f(token_rewards), f(values)
    old, ref, greedy = f(old_logprobs), f(ref_logprobs), f(greedy_rewards)

    beta = float(p["kl_coef"])
    gamma, lam = float(p["gamma"]), float(p["lam"])
    if estimator == "orz":
        gamma, lam, beta = 1.0, 1.0, 0.0

    r = token_reward_matrix(mask, rewards, token_rewards)
    R = sequence_scores(mask, r)
    L = [len(valid_positions(mask, i)) for i in range(B)]
    if beta != 0.0:
        kl = kl_tokens(old, ref, mask, p["kl_estimator"], p["kl_clamp"])
    else:
        kl = np.zeros((B, T))
    kl_sum = [sum(float(kl[i, t]) for t in valid_positions(mask, i)) for i in range(B)]
    lo, hi = p["reward_clip_low"], p["reward_clip_high"]
    gaps = p["mask_gaps"]

    def clipped(x):  # the reward clip (OpenRLHF --reward.clip_range): outcome terms only, never KL
        return clip_optional(x, lo, hi)

    def whiten_tokens(x):
        return whiten(mask, x, p["whiten_eps"], p["whiten_ddof"], p["whiten_eps_mode"], p["whiten_std"])

    def kl_to_go():  # β Σ_{t' ≥ t} kl_t' (γ = 1: the same over gaps skipped or stepped)
        return reward_to_go(mask, beta * kl, 1.0)

    # r̃_t = m_t (clip(r_t) − β kl_t): the clip applies to the outcome score R before it is placed on
    # the last token (`rewards`), or to every valid token's reward (`token_rewards`)
    if rewards is not None:
        r_clipped = token_reward_matrix(mask, [clipped(float(x)) for x in rewards])
    else:
        r_clipped = np.zeros((B, T))
        for i in range(B):
            for t in valid_positions(mask, i):
                r_clipped[i, t] = clipped(float(r[i, t]))
    r_shaped = np.zeros((B, T))
    for i in range(B):
        for t in valid_positions(mask, i):
            r_shaped[i, t] = float(r_clipped[i, t]) - beta * float(kl[i, t])

    if estimator == "reinforce":
        # R_i − β Σ_{all t'} kl_t' (same for all t)
        adv = broadcast(mask, [R[i] - beta * kl_sum[i] for i in range(B)])
        ret = adv.copy()
    elif estimator == "reinforce_rtg":
        adv = reward_to_go(mask, r_shaped, gamma, gaps)
        ret = adv.copy()
    elif estimator == "reinforce_pp":
        ret = reward_to_go(mask, r_shaped, gamma, gaps)
        adv = whiten_tokens(ret) if p["whiten"] else ret.copy()
    elif estimator == "reinforce_pp_baseline":
        groups = groups_of(group_ids)
        if p["kl_placement"] == "reward_to_go":
            rtg_r = reward_to_go(mask, r, 1.0)
            base = [0.0] * B
            for _, rows in groups.items():
                mu = mean([R[i] for i in rows])
                if len(rows) == 1 and p["singleton_groups"] != "zero":
                    # "zero": the literal group mean (the row's own score: R − mean = 0);
                    # "raw": mean 0 (verl); "error": refuse
                    if p["singleton_groups"] == "error":
                        raise ReferenceError_("singleton group")
                    mu = 0.0
                for i in rows:
                    base[i] = mu
            kl_rtg = kl_to_go()
            x = np.zeros((B, T))
            for i in range(B):
                for t in valid_positions(mask, i):
                    x[i, t] = clipped(float(rtg_r[i, t]) - base[i]) - float(kl_rtg[i, t])
        else:  # "sequence": clip(R̃_i − mean_g(R̃)) broadcast
            Rt = [R[i] - beta * kl_sum[i] for i in range(B)]
            dev = [0.0] * B
            for _, rows in groups.items():
                mu = mean([Rt[i] for i in rows])
                if len(rows) == 1 and p["singleton_groups"] != "zero":
                    if p["singleton_groups"] == "error":
                        raise ReferenceError_("singleton group")
                    mu = 0.0
                for i in rows:
                    dev[i] = clipped(Rt[i] - mu)
            x = broadcast(mask, dev)
        adv = whiten_tokens(x) if p["whiten"] else x
        ret = adv.copy() if p["returns_whitened"] else x
    elif estimator == "rloo":
        placement = p.get("kl_placement", "sequence")
        Rt = [R[i] - beta * kl_sum[i] for i in range(B)] if placement == "sequence" else list(R)
        a = [0.0] * B
        for _, rows in groups_of(group_ids).items():
            M = len(rows)
            if M == 1:
                if p["singleton_groups"] == "error":
                    raise ReferenceError_("rloo needs groups of size >= 2")
                a[rows[0]] = Rt[rows[0]] if p["singleton_groups"] == "raw" else 0.0
                continue
            for j in rows:
                others = [Rt[l] for l in rows if l != j]
                a[j] = Rt[j] - sum(others) / (M - 1)
        a = [clipped(v) for v in a]
        if p["whiten"] and p["whiten_scope"] == "sequence":
            if placement == "reward_to_go" and beta != 0.0:
                raise ReferenceError_("sequence-scope whitening needs a per-sequence advantage")
            a = whiten_rows(a, p["whiten_eps"], p["whiten_ddof"], p["whiten_eps_mode"], p["whiten_std"])
        adv = broadcast(mask, a)
        if placement == "reward_to_go":
            adv = adv - kl_to_go()
        if p["whiten"] and p["whiten_scope"] == "token":
            adv = whiten_tokens(adv)
        ret = adv.copy()
    elif estimator == "flash_reinforce":
        # OpenRLHF's FlashREINFORCE: the mean of all B scores as baseline, KL as reward-to-go
        mu = mean(R)
        adv = broadcast(mask, [clipped(R[i] - mu) for i in range(B)]) - kl_to_go()
        ret = adv.copy()
    elif estimator == "remax":
        ret = reward_to_go(mask, r_shaped, 1.0)
        adv = np.zeros((B, T))
        for i in range(B):
            for t in valid_positions(mask, i):
                adv[i, t] = float(ret[i, t]) - float(greedy[i])
    elif estimator in ("gae", "orz"):
        adv = np.zeros((B, T))
        ret = np.zeros((B, T))
        for i in range(B):
            next_v = 0.0  # V after the last token = 0
            next_a = 0.0
            # "skip": the recursion walks the valid tokens; "step" (OpenRLHF): every position, a masked
            # one with r = V = 0
            steps = range(T) if (gaps == "step" and estimator == "gae") else valid_positions(mask, i)
            for t in reversed(steps):
                v = float(values[i, t]) if mask[i, t] else 0.0
                delta = float(r_shaped[i, t]) + gamma * next_v - v
                a = delta + gamma * lam * next_a
                if mask[i, t]:
                    adv[i, t] = a
                    ret[i, t] = a + v
                next_v, next_a = v, a
        if p.get("whiten"):
            adv = whiten_tokens(adv)
    elif estimator in ("grpo", "grpo_original"):
        placement = p["kl_placement"]
        scores = [R[i] - beta * kl_sum[i] for i in range(B)] if placement == "sequence" else R
        base = group_normalized(scores, group_ids, p["std_ddof"], p["std_eps"], p["singleton_groups"],
                                std_scope=p["std_scope"])
        base = [clipped(v) for v in base]
        kl_rtg = kl_to_go() if placement == "reward_to_go" else None
        adv = np.zeros((B, T))
        for i in range(B):
            for t in valid_positions(mask, i):
                a = base[i]
                if placement == "token" and beta != 0.0:
                    a += grpo_token_kl_term(float(old[i, t]), float(ref[i, t]), p["kl_estimator"], beta, p["kl_clamp"])
                if kl_rtg is not None:
                    a -= float(kl_rtg[i, t])
                if estimator == "grpo_original":
                    a /= L[i]
                adv[i, t] = a
        ret = adv.copy()
    elif estimator == "dapo":
        base = group_normalized(R, group_ids, p["std_ddof"], p["std_eps"], p["singleton_groups"],
                                std_scope=p["std_scope"])
        mean_len = [0.0] * B
        for _, rows in groups_of(group_ids).items():
            ml = mean([float(L[i]) for i in rows])
            for i in rows:
                mean_len[i] = ml
        adv = broadcast(mask, [base[i] / mean_len[i] for i in range(B)])
        ret = adv.copy()
    elif estimator == "dr_grpo":
        placement = p.get("kl_placement", "sequence")
        scores = [R[i] - beta * kl_sum[i] for i in range(B)] if placement == "sequence" else R
        base = group_normalized(scores, group_ids, 0, 0.0, p["singleton_groups"], divide_by_std=False)
        adv = broadcast(mask, [clipped(v) for v in base])
        if placement == "reward_to_go":
            adv = adv - kl_to_go()
        ret = adv.copy()
    else:
        raise ValueError(estimator)
    return adv, ret


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def agg_weights(mask, agg, num_tokens=None, num_sequences=None, loss_scale_factor=None, seq_denominator="nonempty"):
    """w_t of docs/semantics.md (N = num_tokens or Σm, S = num_sequences or #rows with L>0 (all B rows
    with seq_denominator "all"), C = loss_scale_factor or the padded width T)."""
    mask = (np.asarray(mask) != 0)
    B, T = mask.shape
    L = [int(sum(1 for t in range(T) if mask[i, t])) for i in range(B)]
    N = float(num_tokens) if num_tokens is not None else float(sum(L))
    if num_sequences is not None:
        S = float(num_sequences)
    elif seq_denominator == "all":
        S = float(B)
    else:
        S = float(sum(1 for x in L if x > 0))
    C = float(loss_scale_factor) if loss_scale_factor is not None else float(T)
    w = np.zeros((B, T))
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            if agg == "token-mean":
                w[i, t] = 1.0 / N
            elif agg == "token-sum":
                w[i, t] = 1.0
            elif agg == "seq-mean-token-mean":
                w[i, t] = 1.0 / (S * L[i])
            elif agg == "seq-mean-token-sum":
                w[i, t] = 1.0 / S
            elif agg == "seq-mean-token-sum-norm":
                w[i, t] = 1.0 / (S * C)
            else:
                raise ValueError(agg)
    return w


def _bounded(x, lo, hi):
    """x clamped to [lo, hi]; a bound of None is no bound."""
    if lo is not None:
        x = max(x, lo)
    if hi is not None:
        x = min(x, hi)
    return x


def _ratio(lp, old, ratio_clamp):
    """ρ = exp(clamp(lp − old, ±ratio_clamp)) and dρ/dlp (0 where the clamp binds)."""
    x = lp - old
    if ratio_clamp is not None and not (-ratio_clamp < x < ratio_clamp):
        x = clip(x, -ratio_clamp, ratio_clamp)
        rho = math.exp(x)
        return rho, 0.0
    rho = math.exp(x)
    return rho, rho


def _ppo_clip_token(A, rho, drho, lo, hi, dual_clip, ratio_cap=None):
    """ℓ = max(−A min(ρ, δ), −A clip(ρ, lo, hi)) (+ dual clip for A < 0) and ∂ℓ/∂lp (δ = ratio_cap)."""
    if ratio_cap is not None and rho > ratio_cap:
        l1, d1 = -A * ratio_cap, 0.0
    else:
        l1, d1 = -A * rho, -A * drho
    rc = clip(rho, lo, hi)
    l2 = -A * rc
    clipped = not (lo < rho < hi)
    if l1 > l2:
        loss, g = l1, d1
    elif l2 > l1:
        loss, g = l2, (0.0 if clipped else -A * drho)
    else:  # tie: both branches equal; only possible unclipped (or A = 0)
        loss, g = l1, (0.0 if clipped else d1)
    if dual_clip is not None and A < 0:
        l3 = -dual_clip * A
        if l3 < loss:
            loss, g = l3, 0.0
    return loss, g


def _divergence(old, rollout, gating):
    """binary_kl or tv of p = e^rollout vs q = e^old, both clamped to [1e-6, 1 − 1e-6]."""
    p = clip(math.exp(rollout), 1e-6, 1 - 1e-6)
    q = clip(math.exp(old), 1e-6, 1 - 1e-6)
    if gating == "binary_kl":
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    if gating == "tv":
        return abs(p - q)
    raise ValueError(gating)


def rollout_weights(mask, old, rollout, level, mode, low, high, log_clamp=20.0, gating="ratio", weight="unit"):
    """IS weight per token (docs/semantics.md, rollout_correction): a unit (token, or sequence by the
    sum or the mean of its log-ratios / divergences) is gated on [low, high]; truncate clamps the
    unit's ratio, mask zeroes it outside and keeps the unit's ratio or the token's own."""
    def bexp(x):
        return math.exp(x if log_clamp is None else clip(x, -log_clamp, log_clamp))

    B, T = mask.shape
    w = np.zeros((B, T))
    for i in range(B):
        vp = valid_positions(mask, i)
        d = {t: float(old[i, t]) - float(rollout[i, t]) for t in vp}
        if gating == "ratio":
            per_token = {t: bexp(d[t]) for t in vp}
            seq_log = sum(d.values()) / (len(vp) if level == "sequence_mean" else 1) if vp else 0.0
            seq_stat = bexp(seq_log)
        else:
            per_token = {t: _divergence(float(old[i, t]), float(rollout[i, t]), gating) for t in vp}
            seq_stat = sum(per_token.values()) / (len(vp) if level == "sequence_mean" else 1) if vp else 0.0
        for t in vp:
            stat = per_token[t] if level == "token" else seq_stat
            ok = (low is None or stat >= low) and (high is None or stat <= high)
            if mode == "truncate":
                x = _bounded(stat, low, high)
            elif mode == "mask":
                x = (bexp(d[t]) if weight == "token" else stat) if ok else 0.0
            else:
                raise ValueError(mode)
            w[i, t] = x
    return w


def compute_losses(
    *,
    response_mask,
    agg,
    policy=None,
    kl=None,
    value=None,
    entropy_coef=None,
    rollout=None,
    num_tokens=None,
    num_sequences=None,
    loss_scale_factor=None,
    seq_denominator="nonempty",
    logprobs=None,
    old_logprobs=None,
    advantages=None,
    ref_logprobs=None,
    values=None,
    old_values=None,
    returns=None,
    entropy=None,
    rollout_logprobs=None,
    entropy_agg=None,
):
    """Fully resolved parameters (no preset lookup); `agg` is the policy's aggregation:
    policy: None or dict(mode, clip_low, clip_high, dual_clip, ratio_clamp [, ratio_cap, cispo_cap,
    cispo_level, sequence_ratio_gradient]) (mode None: no policy term, its ratio still defined);
    kl: None or dict(coef, estimator, clamp [, agg, unbiased_gradient, importance_weighted]);
    value: None or dict(coef, clip [, agg]); entropy_coef: None or float (entropy_agg its agg);
    rollout: None or dict(level, mode, low, high [, log_clamp, gating, weight]).
    A term's agg None follows `agg`. Returns dict(loss, components, grad_logprobs, grad_values, grad_entropy)."""
    mask = (np.asarray(response_mask) != 0)
    B, T = mask.shape
    f = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
    lp, old, A, ref = f(logprobs), f(old_logprobs), f(advantages), f(ref_logprobs)
    v, v_old, G, H, roll = f(values), f(old_values), f(returns), f(entropy), f(rollout_logprobs)

    def weights(term_agg):
        return agg_weights(mask, term_agg or agg, num_tokens, num_sequences, loss_scale_factor, seq_denominator)

    comps = dict(policy=None, kl=None, value=None, entropy=None)
    total = 0.0
    g_lp = np.zeros((B, T)) if (policy is not None or kl is not None) else None
    g_v = np.zeros((B, T)) if value is not None else None
    g_h = np.zeros((B, T)) if entropy_coef is not None else None
    L = [len(valid_positions(mask, i)) for i in range(B)]

    def add_grad(i, t, g, spread):
        """g: ∂ of token t's term; through a sequence mean it reaches each token of row i by 1/L_i."""
        if spread:
            for u in valid_positions(mask, i):
                g_lp[i, u] += g / L[i]
        else:
            g_lp[i, t] += g

    # the policy's ratio per token: (ρ, ∂ρ, spread)
    ratio = None
    if policy is not None:
        mode = policy.get("mode")
        rc = policy.get("ratio_clamp")
        sequence = mode == "gspo" or (mode == "cispo" and policy.get("cispo_level", "token") == "sequence")
        spread = sequence and policy.get("sequence_ratio_gradient", "token_trick") == "through_mean"
        ratio = {}
        for i in range(B):
            vp = valid_positions(mask, i)
            if sequence and vp:
                s = mean([float(lp[i, t]) - float(old[i, t]) for t in vp])
                if rc is not None and s > rc:  # a sequence ratio's log is clamped above only (verl: 10)
                    rs = (math.exp(rc), 0.0)
                else:
                    rs = (math.exp(s), math.exp(s))
            for t in vp:
                r, dr = rs if sequence else _ratio(float(lp[i, t]), float(old[i, t]), rc)
                ratio[i, t] = (r, dr, spread)

    if policy is not None and policy.get("mode") is not None:
        mode = policy["mode"]
        if mode != "reinforce":
            lo, hi = 1.0 - policy["clip_low"], 1.0 + policy["clip_high"]
        iw = rollout_weights(mask, old, roll, **rollout) if rollout is not None else None
        w = weights(None)
        total_p = 0.0
        for i in range(B):
            for t in valid_positions(mask, i):
                a = float(A[i, t])
                r, dr, spread = ratio[i, t]
                if mode in ("ppo_clip", "gspo"):
                    ell, g = _ppo_clip_token(a, r, dr, lo, hi, policy.get("dual_clip"), policy.get("ratio_cap"))
                elif mode == "cispo":
                    cap = policy.get("cispo_cap")
                    c = min(r, cap) if cap is not None else clip(r, lo, hi)
                    ell, g, spread = -c * a * float(lp[i, t]), -c * a, False
                elif mode == "reinforce":
                    ell, g = -a * r, -a * dr
                else:
                    raise ValueError(mode)
                scale = w[i, t] * (iw[i, t] if iw is not None else 1.0)
                total_p += scale * ell
                add_grad(i, t, scale * g, spread)
        comps["policy"] = total_p
        total += total_p

    if kl is not None:
        w = weights(kl.get("agg"))
        total_k = 0.0
        for i in range(B):
            for t in valid_positions(mask, i):
                a, b = float(lp[i, t]), float(ref[i, t])
                k = kl_value(a, b, kl["estimator"], kl.get("clamp"))
                dk = kl_grad(a, b, kl["estimator"], kl.get("clamp"))
                if kl.get("unbiased_gradient"):
                    dk = min(math.exp(a - float(old[i, t])), 10.0) * (a - b)
                c = kl["coef"] * w[i, t]
                if kl.get("importance_weighted"):
                    r, dr, spread = ratio[i, t]
                    total_k += w[i, t] * k * r
                    add_grad(i, t, c * dk * r, False)
                    add_grad(i, t, c * k * dr, spread)
                else:
                    total_k += w[i, t] * k
                    add_grad(i, t, c * dk, False)
        comps["kl"] = total_k
        total += kl["coef"] * total_k

    if value is not None:
        w = weights(value.get("agg"))
        total_v = 0.0
        c = value.get("clip")
        for i in range(B):
            for t in valid_positions(mask, i):
                vv, gg = float(v[i, t]), float(G[i, t])
                l1 = 0.5 * (vv - gg) ** 2
                d1 = vv - gg
                if c is None:
                    ell, d = l1, d1
                else:
                    lo_v, hi_v = float(v_old[i, t]) - c, float(v_old[i, t]) + c
                    vc = clip(vv, lo_v, hi_v)
                    l2 = 0.5 * (vc - gg) ** 2
                    inside = lo_v < vv < hi_v
                    d2 = (vc - gg) if inside else 0.0
                    if l1 > l2:
                        ell, d = l1, d1
                    elif l2 > l1:
                        ell, d = l2, d2
                    else:
                        ell, d = l1, (d1 if inside else 0.5 * d1)
                total_v += w[i, t] * ell
                g_v[i, t] = value["coef"] * w[i, t] * d
        comps["value"] = total_v
        total += value["coef"] * total_v

    if entropy_coef is not None:
        w = weights(entropy_agg)
        total_h = 0.0
        for i in range(B):
            for t in valid_positions(mask, i):
                total_h += w[i, t] * float(H[i, t])
                g_h[i, t] = -entropy_coef * w[i, t]
        comps["entropy"] = total_h
        total -= entropy_coef * total_h

    return dict(loss=total, components=comps, grad_logprobs=g_lp, grad_values=g_v, grad_entropy=g_h)


# tensors each estimator needs besides response_mask and the rewards (input selection for the tests)
NEEDS = {
    "reinforce": (),
    "reinforce_rtg": (),
    "reinforce_pp": (),
    "reinforce_pp_baseline": ("group_ids",),
    "rloo": ("group_ids",),
    "remax": ("greedy_rewards",),
    "gae": ("values",),
    "orz": ("values",),
    "grpo": ("group_ids",),
    "grpo_original": ("group_ids",),
    "dapo": ("group_ids",),
    "dr_grpo": ("group_ids",),
    "flash_reinforce": (),
}
