"""Monte Carlo of every outcome-reward estimator on the toy problem, against its exact gradient.

One sampled batch is what a trainer sees: every prompt of the toy problem once (N = P, the prompt
distribution is uniform, so this is the stratified form of sampling N prompts) with M responses each.
For each estimator, as a trainer would:

    adv  = advserve.compute_advantages(estimator, preset="paper", rewards, response_mask, group_ids
                                       [, values = the exact critic V(s_t)] [, greedy_rewards], dtype="float64")
    out  = advserve.compute_losses(preset="paper", policy_loss={"mode": "reinforce",
                                   "agg": "seq-mean-token-sum"}, logprobs = old_logprobs = log π_θ(a_t|s_t),
                                   advantages, response_mask, num_sequences = N·M, dtype="float64")
    ĝ    = −∂loss/∂θ = −autograd.grad(log π_θ(a_t|s_t), θ, out.grad_logprobs)

The loss is the seed's surrogate (5) aggregated as its eq. (14): −1/(NM) Σ_ij Σ_t ρ_t Â_t (the `paper`
preset's defaults); the length terms of grpo_original (1/T_ij) and DAPO (1/mean_j T_ij, DAPO's token-level
normalisation within the group) are inside their advantages, as in the seed's table, so every estimator
is aggregated the same way. β = 0 (the seed's binary-reward analysis); on-policy, ρ = 1.

Many batches (`replicates`) are drawn per group size M. The estimators that whiten over the batch
(`whiten` true in the preset: reinforce_pp, reinforce_pp_baseline) get one engine call per batch, as a
trainer makes; the others get one call per block of batches with their groups kept apart, which is
the same computation (group statistics never mix groups) and, through `num_sequences`, the same
per-batch loss normalisation.

Statistics. ĝ is averaged over the batches; the replicates are split into `blocks` consecutive blocks
and every reported figure is a delete-one-block jackknife estimate with its standard error and a 95%
interval (t with blocks − 1 degrees of freedom). For linear figures this is the usual standard error
of a mean; for the cosine it also removes the O(1/R) bias that noise adds to ‖ĝ‖. Figures:

* cosine(E ĝ, ∇J), and the relative scale ⟨E ĝ, ∇J⟩/‖∇J‖² (the projection's length ratio);
* per prompt x, the implied weight ⟨E ĝ_x, ∇_x J⟩/‖∇_x J‖², ĝ_x and ∇_x J the blocks of prompt x's
  parameters (disjoint per prompt), i.e. how much the estimator weights the prompt relative to ∇J.

References. `exact_expectation` gives E ĝ exactly, by enumeration, for every estimator whose advantage
depends only on the response itself (reinforce, reinforce_rtg, remax, gae, orz: the engine evaluates
every enumerated response) or on its group through (r_j, T_j, K, S), K the successes and S the total
length of the other M − 1 responses (rloo, dr_grpo, grpo, grpo_original, dapo: the engine evaluates one
synthetic group per outcome, weighted by the exact distribution of (K, S), an (M − 1)-fold convolution).
The batch-whitened estimators have no finite-batch exact form; their reference is the closed form
alone. The closed forms come from `analysis.theory` (the seed's bias table).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .. import api
from . import theory
from .toy import Responses, ToyProblem

ESTIMATORS: tuple[str, ...] = (
    "reinforce", "reinforce_rtg", "rloo", "remax", "gae", "orz",
    "reinforce_pp", "reinforce_pp_baseline", "dr_grpo", "grpo", "grpo_original", "dapo",
)
"""The estimators that apply to an outcome reward, in the order of the report."""

PRESET = "paper"
POLICY_LOSS = {"mode": "reinforce", "agg": "seq-mean-token-sum"}
CONFIDENCE = 0.95
AGREEMENT_Z = 3.29
"""A reference 'agrees' with the Monte Carlo when it lies within 3.29 standard errors (99.9%): about
fifty figures are compared per run, and at 95% two or three would miss by chance alone."""

# Which outcome of its group a group estimator's advantage depends on: r = the response's reward,
# t = its length, k = successes among the others, s = the others' total length (docs/semantics.md).
_GROUP_DEPENDENCE = {"rloo": "rk", "dr_grpo": "rk", "grpo": "rk", "grpo_original": "rtk", "dapo": "rtks"}
_SINGLE = ("reinforce", "reinforce_rtg", "remax", "gae", "orz")


@dataclass(frozen=True)
class StudyConfig:
    """What to run. group_sizes: the M values; replicates: sampled batches per M (a multiple of
    `blocks`); seed: everything random derives from it through torch.Generator."""

    group_sizes: tuple[int, ...] = (4, 8)
    replicates: int = 600
    blocks: int = 30
    seed: int = 0
    estimators: tuple[str, ...] = ESTIMATORS

    def validate(self) -> "StudyConfig":
        if not self.group_sizes or any(m < 2 for m in self.group_sizes):
            raise ValueError(f"group sizes must be >= 2 (RLOO needs two responses), got {list(self.group_sizes)}")
        if len(set(self.group_sizes)) != len(self.group_sizes):
            raise ValueError(f"group sizes must be distinct, got {list(self.group_sizes)}")
        if self.blocks < 2 or self.replicates < self.blocks or self.replicates % self.blocks:
            raise ValueError(f"replicates ({self.replicates}) must be a positive multiple of blocks ({self.blocks}), "
                             "blocks >= 2")
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            raise ValueError(f"unknown estimators {unknown}; valid: {', '.join(ESTIMATORS)}")
        return self


QUICK = StudyConfig(group_sizes=(4, 8), replicates=600, blocks=30)
FULL = StudyConfig(group_sizes=(2, 4, 8, 16, 32), replicates=8000, blocks=40)


@dataclass
class Estimate:
    """A jackknife estimate: value (bias-corrected), standard error, 95% interval."""

    value: float
    se: float
    low: float
    high: float

    def z(self, reference: float) -> float:
        """(value − reference)/se; ±inf where se = 0 and they differ, 0 where both are equal."""
        if self.se > 0:
            return (self.value - reference) / self.se
        return 0.0 if math.isclose(self.value, reference, rel_tol=1e-9, abs_tol=1e-12) else math.copysign(
            math.inf, self.value - reference)


@dataclass
class Reference:
    """Exact figures of a gradient direction: cosine with ∇J, relative scale, per-prompt weights."""

    cosine: float
    scale: float
    weights: list[float]


@dataclass
class EstimatorResult:
    estimator: str
    group_size: int
    bias: str  # the seed's class: unbiased | scaled | reweighted (theory.ESTIMATOR_BIAS)
    cosine: Estimate
    scale: Estimate
    weights: list[Estimate]
    exact: Reference | None  # E ĝ at this M by enumeration (None: batch-whitened estimators)
    closed_form: Reference  # from theory: exact_group_weight where it applies, else asymptotic_prompt_weight
    closed_form_kind: str  # "exact_group_weight" | "asymptotic_prompt_weight"
    asymptotic_weights: list[float]  # theory.asymptotic_prompt_weight (the seed's M → ∞ column)
    limit: Reference  # E ĝ as M → ∞ (NM → ∞ for whitening): the asymptotic weights' gradient, or for
    # grpo_original (whose blocks are not multiples of ∇_x J) `grpo_original_limit` by enumeration
    agrees_with_exact: bool | None  # scale and every weight within AGREEMENT_Z standard errors of `exact`
    agrees_with_closed_form: bool  # the same against `closed_form`
    max_abs_z_exact: float | None
    max_abs_z_closed_form: float
    no_signal_fraction: float  # share of sampled groups whose rewards are all equal


@dataclass
class StudyResult:
    config: dict
    problem: dict
    results: list[EstimatorResult] = field(default_factory=list)
    seconds: float = 0.0

    def get(self, estimator: str, group_size: int) -> EstimatorResult:
        for r in self.results:
            if r.estimator == estimator and r.group_size == group_size:
                return r
        raise KeyError((estimator, group_size))

    def to_json(self) -> dict:
        return asdict(self)


# --- figures of a gradient --------------------------------------------------------------------


def _figures(g: Tensor, grad: Tensor) -> Tensor:
    """[..., D] gradients -> [..., 2 + P]: cosine with ∇J, relative scale, per-prompt weights.

    grad: ∇J [P, D_x] (one block per prompt); g: [..., P·D_x].
    """
    p = grad.shape[0]
    blocks = g.reshape(*g.shape[:-1], p, -1)
    dots = (blocks * grad).sum(-1)  # [..., P]
    norms2 = grad.square().sum(-1)  # [P]
    cosine = dots.sum(-1) / (g.norm(dim=-1) * norms2.sum().sqrt()).clamp_min(1e-300)
    scale = dots.sum(-1) / norms2.sum()
    weights = dots / norms2
    return torch.cat([cosine.unsqueeze(-1), scale.unsqueeze(-1), weights], dim=-1)


def _reference(g: Tensor, grad: Tensor) -> Reference:
    f = _figures(g, grad).tolist()
    return Reference(f[0], f[1], f[2:])


def _weights_reference(weights: Tensor, grad: Tensor) -> Reference:
    """The figures of Σ_x w_x ∇_x J (a gradient that weights each prompt's exact block by w_x)."""
    return _reference((weights.unsqueeze(1) * grad).reshape(-1), grad)


def _t_quantile(confidence: float, dof: int) -> float:
    """Student t quantile by the Cornish-Fisher expansion in 1/ν (error < 1e-3 for ν >= 10)."""
    z = math.sqrt(2) * _erfinv(confidence)
    return (z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3))


def _erfinv(y: float) -> float:
    return float(torch.special.erfinv(torch.tensor(y, dtype=torch.float64)))


def jackknife(block_means: Tensor, grad: Tensor) -> list[Estimate]:
    """Delete-one-block jackknife of every figure (`_figures`) of the mean of `block_means` [G, D]."""
    g = block_means.shape[0]
    full = _figures(block_means.mean(0), grad)
    loo = _figures((block_means.sum(0) - block_means) / (g - 1), grad)  # [G, F]
    loo_mean = loo.mean(0)
    value = g * full - (g - 1) * loo_mean
    se = ((g - 1) / g * (loo - loo_mean).square().sum(0)).sqrt()
    half = _t_quantile(CONFIDENCE, g - 1) * se
    return [Estimate(float(v), float(s), float(v - h), float(v + h)) for v, s, h in zip(value, se, half)]


# --- the engine, as a trainer calls it ------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """Rollouts of `count` batches (P prompts × M responses each, rows batch-major, then prompt)."""

    responses: Responses
    replicate: Tensor  # [B] index of the row's batch within this block
    group_ids: Tensor  # [B]
    values: Tensor  # [B, H] exact critic V(s_t) (0 at masked positions)
    greedy_rewards: Tensor  # [B]
    count: int
    rows_per_batch: int


@functools.lru_cache(maxsize=None)
def _catalog_entry(estimator: str) -> dict:
    for entry in api.catalog()["estimators"]:
        if entry["name"] == estimator:
            return entry
    raise ValueError(f"unknown estimator {estimator!r}")


def _batch_whitened(estimator: str) -> bool:
    """Whether the estimator whitens over the batch under the preset (then each batch is one engine call)."""
    return bool(_catalog_entry(estimator)["presets"][PRESET]["defaults"].get("whiten", False))


def _advantage_tensors(estimator: str, r: Responses, group_ids: Tensor, values: Tensor,
                       greedy_rewards: Tensor) -> dict[str, Tensor]:
    tensors = {"rewards": r.rewards, "response_mask": r.mask}
    required = set(_catalog_entry(estimator)["tensors"]["required"])
    if "group_ids" in required:
        tensors["group_ids"] = group_ids
    if "values" in required:
        tensors["values"] = values
    if "greedy_rewards" in required:
        tensors["greedy_rewards"] = greedy_rewards
    return tensors


def _advantages(estimator: str, batch: _Batch) -> Tensor:
    """Token advantages [B, H] from the engine: one call per batch for batch-whitened estimators,
    one call for the block otherwise."""
    r = batch.responses

    def call(sl: slice) -> Tensor:
        rows = Responses(*(getattr(r, f)[sl] for f in Responses.__dataclass_fields__))
        tensors = _advantage_tensors(estimator, rows, batch.group_ids[sl], batch.values[sl],
                                     batch.greedy_rewards[sl])
        return api.compute_advantages(estimator, preset=PRESET, dtype="float64", **tensors).advantages

    if not _batch_whitened(estimator):
        return call(slice(None))
    n = batch.rows_per_batch
    return torch.cat([call(slice(i * n, (i + 1) * n)) for i in range(batch.count)])


def _loss_gradient(toy: ToyProblem, batch: _Batch, advantages: Tensor) -> Tensor:
    """ĝ = −∂loss/∂θ of each batch [count, D]: the engine's grad_logprobs chained to θ by autograd."""
    r = batch.responses
    theta = toy.theta.unsqueeze(0).repeat(batch.count, 1, 1, 1, 1).requires_grad_(True)
    logp = toy.token_logprobs(theta, r, table=batch.replicate)
    old = logp.detach()
    out = api.compute_losses(preset=PRESET, policy_loss=POLICY_LOSS, logprobs=old, old_logprobs=old,
                             advantages=advantages, response_mask=r.mask, num_sequences=batch.rows_per_batch,
                             dtype="float64")
    (grad,) = torch.autograd.grad(logp, theta, grad_outputs=out.grad_logprobs.to(logp.dtype))
    return -grad.reshape(batch.count, -1)


def _sample_block(toy: ToyProblem, m: int, count: int, generator: torch.Generator) -> _Batch:
    p = toy.num_prompts
    prompts = torch.arange(p).repeat_interleave(m).repeat(count)
    r = toy.sample(prompts, generator)
    replicate = torch.arange(count).repeat_interleave(p * m)
    group_ids = replicate * p + prompts
    values = torch.where(r.mask, toy.values[prompts.unsqueeze(1), r.node], 0.0)
    return _Batch(r, replicate, group_ids, values, toy.greedy.rewards[prompts], count, p * m)


# --- exact expectations ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _others_distribution(toy: ToyProblem, m: int) -> Tensor:
    """P(K = k, S = s) [P, M, (M−1)H + 1] for the other M − 1 responses of a group: K successes and
    S total length, the (M − 1)-fold convolution of P(r, T | x)."""
    h = toy.horizon
    pmf = toy.outcome_pmf  # [P, 2, H + 1]
    dist = torch.zeros(toy.num_prompts, m, (m - 1) * h + 1, dtype=torch.float64)
    dist[:, 0, 0] = 1.0
    for _ in range(m - 1):
        new = torch.zeros_like(dist)
        for r in (0, 1):
            for t in range(1, h + 1):
                w = pmf[:, r, t].view(-1, 1, 1)
                new[:, r:, t:] += w * dist[:, : m - r, : dist.shape[2] - t]
        dist = new
    return dist


def _group_outcome_advantages(estimator: str, m: int, horizon: int) -> Tensor:
    """A(r, T, K, S) [2, H + 1, M, (M−1)H + 1] from the engine, one synthetic group per outcome: the
    response (reward r, length T), K others with reward 1 and M − 1 − K with 0, the others' lengths
    spread evenly to total S. Only the outcome coordinates the estimator depends on are enumerated
    (the others are broadcast: size-1 dims)."""
    dep = _GROUP_DEPENDENCE[estimator]
    rs = (0, 1)
    ts = range(1, horizon + 1) if "t" in dep else (1,)
    ks = range(m)
    ss = range(m - 1, (m - 1) * horizon + 1) if "s" in dep else (m - 1,)
    cells = [(r, t, k, s) for r in rs for t in ts for k in ks for s in ss]
    n = len(cells)
    cell = torch.tensor(cells, dtype=torch.int64)  # [n, 4]
    j = torch.arange(m)
    rewards = torch.where(j == 0, cell[:, :1], (j <= cell[:, 2:3]).to(torch.int64)).to(torch.float64)  # [n, M]
    others = max(m - 1, 1)
    base, extra = cell[:, 3:4] // others, cell[:, 3:4] % others
    lengths = torch.where(j == 0, cell[:, 1:2], base + (j - 1 < extra).to(torch.int64))  # [n, M]
    mask = torch.arange(horizon) < lengths.reshape(-1, 1)
    group_ids = torch.arange(n).repeat_interleave(m)
    out = api.compute_advantages(estimator, preset=PRESET, dtype="float64", rewards=rewards.reshape(-1),
                                 response_mask=mask, group_ids=group_ids).advantages
    first = out.reshape(n, m, horizon)[:, 0, 0]
    table = first.reshape(2, len(ts), m, len(ss))
    full = torch.zeros(2, horizon + 1, m, (m - 1) * horizon + 1, dtype=torch.float64)
    t_slice = slice(1, horizon + 1) if "t" in dep else slice(None)  # lengths 1..H
    s_slice = slice(m - 1, None) if "s" in dep else slice(None)  # the others' total length M−1..(M−1)H
    full[:, t_slice, :, s_slice] = table.expand_as(full[:, t_slice, :, s_slice])
    return full


def _expected_outcome_advantage(toy: ToyProblem, estimator: str, m: int) -> Tensor:
    """h(x, r, T) = E[A_j | r_j = r, T_j = T] [P, 2, H + 1], averaging over the other M − 1 responses."""
    table = _group_outcome_advantages(estimator, m, toy.horizon)  # [2, H + 1, M, S]
    dist = _others_distribution(toy, m)  # [P, M, S]
    return torch.einsum("rtks,pks->prt", table, dist)


def exact_expectation(toy: ToyProblem, estimator: str, m: int) -> Tensor | None:
    """E ĝ [D] exactly (enumeration), or None for the batch-whitened estimators.

    E ĝ = 1/P Σ_x Σ_y π(y|x) Σ_t E[Â_t | x, y] ∇log π(a_t|s_t) (the seed's eq. (16) with N = P, one group
    of M per prompt); E[Â_t | x, y] is the engine's advantage of y itself (single-response estimators)
    or h(x, r(y), T(y)) (group estimators).
    """
    if _batch_whitened(estimator):
        return None
    e = toy.enumeration
    p, s = toy.num_prompts, e.tokens.shape[0]
    prompts = torch.arange(p).repeat_interleave(s)
    every = Responses(prompts, e.tokens.repeat(p, 1), e.prev.repeat(p, 1), e.node.repeat(p, 1),
                      e.mask.repeat(p, 1), e.lengths.repeat(p), e.rewards.repeat(p))
    if estimator in _SINGLE:
        values = torch.where(every.mask, toy.values[prompts.unsqueeze(1), every.node], 0.0)
        tensors = _advantage_tensors(estimator, every, prompts, values, toy.greedy.rewards[prompts])
        adv = api.compute_advantages(estimator, preset=PRESET, dtype="float64", **tensors).advantages
    elif estimator in _GROUP_DEPENDENCE:
        h = _expected_outcome_advantage(toy, estimator, m)
        per_row = h[prompts, every.rewards.to(torch.int64), every.lengths]
        adv = per_row.unsqueeze(1) * every.mask
    else:
        raise ValueError(f"no exact expectation for {estimator!r}")
    theta = toy.theta.clone().requires_grad_(True)
    logp = toy.token_logprobs(theta, every)
    weight = toy.probs.reshape(-1, 1) / p
    (grad,) = torch.autograd.grad((weight * adv * logp).sum(), theta)
    return grad.reshape(-1)


def grpo_original_limit(toy: ToyProblem) -> Tensor:
    """E ĝ [D] of grpo_original as M → ∞, exactly: p̂ → p(x), so the advantage tends to
    (r − p)/(T sqrt(p(1 − p))) and E ĝ = 1/P Σ_x Σ_y ∇π(y|x) (r(y) − p(x))/(T(y) sqrt(p(x)(1 − p(x)))),
    the seed's expression for GRPO (original) before its last step. That step drops the p(x) term, but
    Σ_y ∇π(y|x) p(x)/T(y) = p(x) ∇E[1/T] is not 0 when lengths depend on θ (docs/analysis.md)."""
    e = toy.enumeration
    p = toy.pass_rate.unsqueeze(1)
    coefficient = (e.rewards - p) / (e.lengths.to(torch.float64) * (p * (1 - p)).sqrt())  # [P, S]
    theta = toy.theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((toy.sequence_probs(theta) * coefficient).sum() / toy.num_prompts, theta)
    return grad.reshape(-1)


def whitening_std(toy: ToyProblem, estimator: str, m: int) -> float:
    """σ of the batch whitening as NM → ∞ (token-weighted, every token of a response carrying its value):
    reinforce_pp whitens r (the seed's σ_k); reinforce_pp_baseline whitens z = r − mean_g r =
    (r − K/(M − 1))(M − 1)/M with K ~ Bin(M − 1, p(x)) the others' successes."""
    if estimator == "reinforce_pp":
        return toy.token_reward_moments[1]
    if estimator != "reinforce_pp_baseline":
        raise ValueError(f"{estimator!r} does not whiten over the batch")
    pmf = toy.outcome_pmf  # [P, 2, H + 1]
    k = _others_distribution(toy, m).sum(-1)  # [P, M]
    lengths = torch.arange(toy.horizon + 1, dtype=torch.float64)
    kk = torch.arange(m, dtype=torch.float64)
    z = (torch.tensor([0.0, 1.0]).view(2, 1) - kk / (m - 1)) * (m - 1) / m  # [2, M]
    w = pmf.unsqueeze(-1) * k.view(-1, 1, 1, m) * lengths.view(1, 1, -1, 1)  # [P, 2, H+1, M] token weight
    zz = z.view(1, 2, 1, m)
    total = w.sum()
    mu = (w * zz).sum() / total
    return float(((w * (zz - mu) ** 2).sum() / total).sqrt())


def closed_form_weights(toy: ToyProblem, estimator: str, m: int) -> tuple[Tensor, Tensor, str]:
    """(closed-form weights [P], asymptotic weights [P], kind) from `analysis.theory`: the finite-M
    `exact_group_weight` where it applies, else `asymptotic_prompt_weight` (T̄ for dapo, the harmonic
    mean length for grpo_original, the whitening σ of `whitening_std` for the REINFORCE++ pair)."""
    p = toy.pass_rate
    kwargs = {}
    if estimator == "dapo":
        kwargs["mean_length"] = toy.mean_length
    elif estimator == "grpo_original":
        kwargs["mean_length"] = toy.harmonic_length
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        kwargs["reward_std"] = whitening_std(toy, estimator, m)
    asymptotic = theory.asymptotic_prompt_weight(estimator, p, m, **kwargs)
    if estimator in theory.EXACT_GROUP_ESTIMATORS:
        return theory.exact_group_weight(estimator, p, m), asymptotic, "exact_group_weight"
    return asymptotic, asymptotic, "asymptotic_prompt_weight"


# --- the study ------------------------------------------------------------------------------------


def _generator(seed: int, m: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + m) * 100_003 + block)


def _max_abs_z(result_scale: Estimate, weights: list[Estimate], ref: Reference) -> float:
    zs = [result_scale.z(ref.scale)] + [w.z(r) for w, r in zip(weights, ref.weights)]
    return max(abs(z) for z in zs)


def run_study(
    toy: ToyProblem,
    config: StudyConfig = QUICK,
    progress: Callable[[int, int, str], None] | None = None,
) -> StudyResult:
    """Sample, compute every estimator's gradients through the engine, and compare (module docstring).

    progress(done, total, label) is called when a group size starts and after each block of batches.
    """
    config.validate()
    start = time.perf_counter()
    grad = toy.gradient.reshape(toy.num_prompts, -1)
    per_block = config.replicates // config.blocks
    total = len(config.group_sizes) * config.blocks
    done = 0
    out = StudyResult(config=asdict(config), problem=toy.summary())
    for m in config.group_sizes:
        sums = {e: torch.zeros(config.blocks, grad.numel(), dtype=torch.float64) for e in config.estimators}
        constant_groups = 0
        if progress is not None:
            progress(done, total, f"M={m}")  # the stage starts
        for block in range(config.blocks):
            batch = _sample_block(toy, m, per_block, _generator(config.seed, m, block))
            group_rewards = batch.responses.rewards.view(-1, m)
            constant_groups += int((group_rewards.amin(1) == group_rewards.amax(1)).sum())
            for estimator in config.estimators:
                g = _loss_gradient(toy, batch, _advantages(estimator, batch))
                sums[estimator][block] = g.mean(0)
            done += 1
            if progress is not None:
                progress(done, total, f"M={m}")
        no_signal = constant_groups / (config.replicates * toy.num_prompts)
        for estimator in config.estimators:
            figures = jackknife(sums[estimator], grad)
            cosine, scale, weights = figures[0], figures[1], figures[2:]
            expectation = exact_expectation(toy, estimator, m)
            exact = None if expectation is None else _reference(expectation, grad)
            cf_weights, asymptotic, kind = closed_form_weights(toy, estimator, m)
            closed = _weights_reference(cf_weights, grad)
            limit = (_reference(grpo_original_limit(toy), grad) if estimator == "grpo_original"
                     else _weights_reference(asymptotic, grad))
            z_exact = None if exact is None else _max_abs_z(scale, weights, exact)
            z_closed = _max_abs_z(scale, weights, closed)
            out.results.append(EstimatorResult(
                estimator=estimator, group_size=m, bias=theory.ESTIMATOR_BIAS[estimator], cosine=cosine,
                scale=scale, weights=weights, exact=exact, closed_form=closed, closed_form_kind=kind,
                asymptotic_weights=asymptotic.tolist(), limit=limit,
                agrees_with_exact=None if z_exact is None else bool(z_exact <= AGREEMENT_Z),
                agrees_with_closed_form=bool(z_closed <= AGREEMENT_Z), max_abs_z_exact=z_exact,
                max_abs_z_closed_form=z_closed, no_signal_fraction=no_signal,
            ))
    out.seconds = time.perf_counter() - start
    return out
