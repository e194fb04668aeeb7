"""The analysis of a user's batch: what each estimator makes of it, relative to the unbiased policy
gradient (the closed forms of `theory`, evaluated at each group's empirical statistics), and where
the estimators' advantages disagree in sign.

    request = AnalysisRequest(tensors={"rewards": r, "response_mask": m, "group_ids": g})
    document = analyze(engine, request)        # = run_analysis(engine, prepare_analysis(engine, request))

The batch is the one `/v1/advantages` takes (the same tensors, presets, parameters, dtypes, layouts)
and is validated by the engine itself, estimator by estimator, so every error is the one
`/v1/advantages` would give, naming the same field. Group ids are required and every group must
hold at least 2 responses (a pass rate needs a group).

Per group g (M_g responses, rewards R, valid lengths L): the empirical pass rate p̂_g = mean_g(R),
the population reward std s_g (= sqrt(p̂(1−p̂)) for 0/1 rewards), the mean length T̄_g, the harmonic
mean length T_h,g = 1/mean_g(1/L) and whether the group carries no learning signal (all rewards
equal). Per estimator:

- `weights` [G]: the implied weight w_g of the group's prompt relative to the unbiased gradient,
  `theory.asymptotic_prompt_weight` at (p̂_g, M_g, T̄_g or T_h,g) with the engine's own divisor in
  place of sqrt(p(1−p)): std_g(R; std_ddof) + std_eps from the estimator's resolved parameters (with
  std_scope 'batch', TRL's, the std of all B scores + std_eps: GRPO is then only scaled). For 0/1
  rewards and the `paper` preset that is exactly 1/sqrt(p̂(1−p̂)); for other rewards it is the same
  generalisation the engine applies (GRPO divides by the group's reward std whatever the rewards).
  Whitening (REINFORCE++, and any estimator whose `whiten` is on) multiplies every weight by 1/d, the
  engine's whitening scale, measured as std(whitened)/std(unwhitened) over the valid tokens (a second
  engine call with whiten=false): exact for every ε placement, ddof and scope. The weights use the
  reward alone (β = 0, the seed's setting) and do not model reward clipping (reward_clip_*).
- `weights_exact` [G] (0/1 rewards; rloo, dr_grpo, grpo): `theory.exact_group_weight` at (p̂_g, M_g),
  the finite-group value, else null.
- `relative_to_median` [G]: w_g / the median weight over the groups with signal.
- `summary`: min, median, max, mean, token-weighted mean (each group weighted by its valid tokens)
  and max/min of w over the groups with signal (null when no group has signal, max_over_min null
  when min is 0).
- `zero_advantage_fraction`: the share of groups whose advantages (from the engine) are all 0.

An advantage counts as 0 here when it is within `ROUNDING_ULPS` ulps (of the compute dtype) of the
batch's largest |A|: the rounding residue of a value that is exactly 0 in exact arithmetic (a
no-signal group after batch whitening is −μ/σ with μ a sum that is 0 only up to rounding, and its
sign would otherwise depend on the summation order, i.e. on the layout or the order of the rows).

And across estimators, over the batch's valid tokens, with the engine's advantages (KL included):
`sign_disagreement[a][b]`: the share of tokens where sign(A_a) ≠ sign(A_b), the sign taking three
values (−, 0, +: a zero advantage, as above, is its own sign, so 0 against + counts as a disagreement);
`sign_opposition[a][b]`: the share where A_a · A_b < 0 (strictly opposite directions).

Everything is vectorised: one batched engine call per estimator (two for a whitened one), segment
reductions over groups, one pass over the tokens per pair of estimators.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..batch import Batch, build_batch
from ..engine import REWARD_TENSORS, Engine, PreparedAdvantages, advantage_inputs, refuse_params_as_tensors
from ..errors import InvalidArgument, NotFound
from ..estimators import ESTIMATORS
from ..functional.groups import Groups, centered_scores, group_std, group_std_divisor
from ..model import AdvantageRequest
from .theory import ESTIMATOR_BIAS, EXACT_GROUP_ESTIMATORS, WEIGHT_FORMULAS, asymptotic_prompt_weight, \
    exact_group_weight

F64 = torch.float64
_PACKED_ONLY = frozenset({"cu_seqlens"})


@dataclass(frozen=True)
class AnalysisRequest:
    """A batch as for /v1/advantages, and which estimators to analyse (None: every estimator of the
    preset that the given tensors allow). `params`: per-estimator overrides, {name: {param: value}}."""

    tensors: Mapping[str, Any]
    estimators: Sequence[str] | None = None
    preset: str | None = None
    params: Mapping[str, Mapping[str, Any]] | None = None
    dtype: str | None = None
    layout: str | None = None


@dataclass(frozen=True)
class PreparedAnalysis:
    """A validated analysis request: one prepared advantage request per estimator."""

    preset: str
    batch: Batch  # rewards, mask and groups of the rows (every job has the same rows)
    jobs: tuple[PreparedAdvantages, ...]
    unwhitened: Mapping[str, PreparedAdvantages] = dataclasses.field(default_factory=dict)  # whitened jobs, whiten off

    @property
    def estimators(self) -> list[str]:
        return [job.estimator.name for job in self.jobs]


def _select(engine: Engine, request: AnalysisRequest, given: set[str]) -> tuple[str, list[str]]:
    preset = engine.preset(request.preset)
    if request.estimators is None:
        overrides = request.params if isinstance(request.params, Mapping) else {}

        def applies(name: str) -> bool:
            """Its tensors are given: the required ones, and the KL inputs when its kl_coef is > 0."""
            given_params = overrides.get(name) if isinstance(overrides.get(name), Mapping) else {}
            beta = given_params.get("kl_coef", preset.estimators[name].get("kl_coef", 0))
            needs_kl = isinstance(beta, (int, float)) and beta > 0
            return ESTIMATORS[name].requires <= given and (not needs_kl or {"old_logprobs", "ref_logprobs"} <= given)

        names = [name for name in preset.estimators if name in ESTIMATOR_BIAS and applies(name)]
        if not names:
            raise InvalidArgument(f"no estimator of preset {preset.name!r} applies to the given tensors (those with "
                                  "kl_coef > 0 by default also need old_logprobs and ref_logprobs); name the "
                                  "estimators or give the tensors", field="tensors")
        return preset.name, names
    if isinstance(request.estimators, (str, bytes)) or not isinstance(request.estimators, Sequence):
        raise InvalidArgument("estimators must be a list of estimator names", field="estimators")
    names = list(request.estimators)
    if not names:
        raise InvalidArgument("estimators is empty: name at least one, or leave it out for all that apply",
                              field="estimators")
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgument(f"estimators must be names, got {name!r}", field="estimators")
        try:
            engine.estimator(name, preset)
        except NotFound as exc:
            raise NotFound(exc.message, field="estimators") from None
        if name not in ESTIMATOR_BIAS:
            raise InvalidArgument(f"estimator {name!r} is not in the seed's bias table, which the analysis "
                                  f"evaluates; analysed: {', '.join(ESTIMATOR_BIAS)}", field="estimators")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidArgument(f"estimators lists {', '.join(duplicates)} more than once", field="estimators")
    return preset.name, names


def prepare_analysis(engine: Engine, request: AnalysisRequest) -> PreparedAnalysis:
    """Validate the request: the estimators, their parameters and the tensors (by the engine, as for
    /v1/advantages). Raises InvalidArgument / NotFound naming the field."""
    raw = request.tensors if isinstance(request.tensors, Mapping) else None
    if raw is None:
        raise InvalidArgument("tensors must be an object mapping tensor names to arrays", field="tensors")
    refuse_params_as_tensors(raw, "analysis")
    given = {name for name, value in raw.items() if value is not None}
    if "group_ids" not in given:
        raise InvalidArgument("the analysis is per prompt: give group_ids [B] (the responses of one prompt share "
                              "an id)", field="tensors.group_ids")
    preset, names = _select(engine, request, given)
    params = request.params or {}
    if not isinstance(params, Mapping):
        raise InvalidArgument("params must map estimator names to their parameter overrides", field="params")
    for name, overrides in params.items():
        if name not in names:
            raise InvalidArgument(f"params for {name!r}, which is not analysed; analysed: {', '.join(names)}",
                                  field=f"params.{name}")
        if overrides is not None and not isinstance(overrides, Mapping):
            raise InvalidArgument(f"params.{name} must be an object of parameters", field=f"params.{name}")

    # the rows' groups, rewards and lengths, validated like every batch, before any estimator sees them
    if sum(raw.get(name) is not None for name in REWARD_TENSORS) != 1:
        raise InvalidArgument("give exactly one of 'rewards' [B] and 'token_rewards' [B, T]", field="tensors.rewards")
    outcome = {*REWARD_TENSORS, "response_mask", "group_ids", *_PACKED_ONLY}
    batch = build_batch({key: value for key, value in raw.items() if key in outcome}, allowed=outcome,
                        required={"response_mask", "group_ids"}, dtype=engine._dtype(request.dtype),
                        device=engine.device, context="the analysis", layout=request.layout or "padded",
                        max_tokens=engine.max_tokens)
    sizes = torch.bincount(batch.group_index)
    small = torch.nonzero(sizes < 2).flatten()
    if small.numel():
        label = batch.group_labels[int(small[0])]
        raise InvalidArgument(f"group {label!r} has a single response; the analysis needs at least 2 per group "
                              "(a pass rate is a group statistic)", field="tensors.group_ids")

    jobs, used, unwhitened = [], set(), {}
    for name in names:
        estimator = ESTIMATORS[name]
        accepted = set(estimator.requires) | set(estimator.optional) | {*REWARD_TENSORS, "response_mask"}
        accepted |= _PACKED_ONLY if request.layout == "packed" else set()
        used |= accepted
        own = {key: value for key, value in raw.items() if key in accepted}
        try:
            job = engine.prepare_advantages(AdvantageRequest(
                estimator=name, tensors=own, preset=preset, params=params.get(name), dtype=request.dtype,
                layout=request.layout))
        except (InvalidArgument, NotFound) as exc:
            if exc.field and exc.field.startswith("params"):  # the engine names params.x; here params.<estimator>.x
                field = f"params.{name}{exc.field[len('params'):]}"
                raise type(exc)(f"{name}: {exc.message}", field=field) from None
            raise
        jobs.append(job)
        if job.params.get("whiten"):  # the same request without whitening, for the measured scale
            unwhitened[name] = engine.prepare_advantages(AdvantageRequest(
                estimator=name, tensors=own, preset=preset, params={**(params.get(name) or {}), "whiten": False},
                dtype=request.dtype, layout=request.layout))
    for key in sorted(given - used - {"group_ids"}):
        raise InvalidArgument(f"tensor {key!r} is not used by any analysed estimator ({', '.join(names)})",
                              field=f"tensors.{key}")
    return PreparedAnalysis(preset, batch, tuple(jobs), unwhitened)


def analyze(engine: Engine, request: AnalysisRequest) -> dict[str, Any]:
    """Validate and run: `run_analysis(engine, prepare_analysis(engine, request))`."""
    return run_analysis(engine, prepare_analysis(engine, request))


# --- the computation ------------------------------------------------------------------------------


def _padded(job: PreparedAdvantages, output: Tensor) -> Tensor:
    """A result of the engine [B, T] (or flat [N] for a packed request) as padded [B, T]."""
    layout = job.batch.layout
    return output if layout is None else layout.to_padded(output)


def _advantages(engine: Engine, job: PreparedAdvantages) -> Tensor:
    return _padded(job, engine.run_advantages([job])[0].advantages)


def _whitening_scale(engine: Engine, unwhitened: PreparedAdvantages, whitened: Tensor, mask: Tensor) -> float:
    """1/d of the engine's whitening (x − μ)/d, measured: `unwhitened` (the request with whiten off)
    gives x, and the whitened advantages are affine in x with slope 1/d on every valid token, so 1/d =
    std(whitened)/std(x) over the valid tokens, whatever the preset's ε placement, ddof or scope
    (tokens or sequences). 0 when x is constant (the engine whitens a constant to 0)."""
    raw = _advantages(engine, unwhitened)[mask].to(F64)
    spread = float(raw.std(correction=0)) if raw.numel() else 0.0
    return float(whitened[mask].to(F64).std(correction=0)) / spread if spread > 0 else 0.0


def _summary(weights: Tensor, signal: Tensor, tokens: Tensor) -> dict[str, float | None]:
    """Statistics of the weights [G] over the groups with signal (tokens [G]: valid tokens per group)."""
    w, n = weights[signal], tokens[signal]
    if w.numel() == 0:
        return dict.fromkeys(("min", "median", "max", "mean", "token_weighted_mean", "max_over_min"))
    low, high = float(w.min()), float(w.max())
    return {
        "min": low,
        "median": float(torch.quantile(w, 0.5)),
        "max": high,
        "mean": float(w.mean()),
        "token_weighted_mean": float((w * n).sum() / n.sum()),
        "max_over_min": high / low if low > 0 else None,
    }


def _exact_weights(name: str, pass_rate: Tensor, sizes: Tensor, signal: Tensor, params: Mapping[str, Any]) -> Tensor:
    """theory.exact_group_weight at each group's (p̂, M), one call per distinct group size."""
    out = torch.zeros_like(pass_rate)
    for m in torch.unique(sizes).tolist():
        rows = sizes == m
        out[rows] = exact_group_weight(name, pass_rate[rows], int(m), std_ddof=params.get("std_ddof", 0),
                                       std_eps=params.get("std_eps", 0.0))
    if name == "grpo":  # no signal: every advantage is 0 (the closed form's limit at p ∈ {0, 1} is a fiction)
        out = torch.where(signal, out, 0)
    return out


ROUNDING_ULPS = 1024


def numerical_sign(advantages: Tensor, mask: Tensor) -> Tensor:
    """sign(A) [B, T] int8 in −1, 0, 1, with |A| <= ROUNDING_ULPS · eps · max|A| (over the valid
    tokens) counted as 0 (see the module docstring); 0 at masked positions."""
    magnitude = advantages.abs().masked_fill(~mask, 0)
    tolerance = ROUNDING_ULPS * torch.finfo(advantages.dtype).eps * magnitude.max()
    return torch.where(magnitude > tolerance, torch.sign(advantages), 0).to(torch.int8)


def _sign_matrices(signs: list[Tensor]) -> tuple[list[list[float]], list[list[float]]]:
    """(disagreement, opposition) shares over the tokens of the sign vectors (int8 [N] each, in −1, 0, 1).

    With one-hot indicators P = [s > 0], Z = [s = 0], Q = [s < 0] ([E, N] each), the share of tokens
    where estimators a and b agree is (P Pᵀ + Z Zᵀ + Q Qᵀ)_ab / N and where they oppose (P Qᵀ + Q Pᵀ)_ab / N:
    three matrix products for all pairs at once (exact counts in float64).
    """
    stacked = torch.stack(signs)  # [E, N]
    tokens = stacked.shape[1]
    if tokens == 0:
        empty = [[0.0] * len(signs) for _ in signs]
        return empty, [row[:] for row in empty]
    positive, zero, negative = ((stacked == v).to(torch.float64) for v in (1, 0, -1))
    agree = positive @ positive.T + zero @ zero.T + negative @ negative.T
    opposite = positive @ negative.T + negative @ positive.T
    return ((tokens - agree) / tokens).tolist(), (opposite / tokens).tolist()


def run_analysis(engine: Engine, prepared: PreparedAnalysis) -> dict[str, Any]:
    """The analysis document of a prepared request (module docstring). Runs the engine once per
    estimator (twice for a whitened one); everything else is segment reductions over groups."""
    batch = prepared.batch
    inputs = advantage_inputs(batch, prepared.jobs[0].dtype)
    groups = Groups.from_index(batch.group_index)
    mask = batch.mask
    tokens_total = batch.tokens
    scores = inputs.scores.to(F64)
    row_tokens = batch.lengths.to(F64)
    length = row_tokens.clamp_min(1)  # the engine's length factors: 1/max(L, 1)

    sizes = groups.sizes
    pass_rate = groups.mean(scores)
    centered, _ = centered_scores(scores, groups)
    no_signal = groups.is_constant(scores)
    signal = ~no_signal
    reward_std = group_std(centered, groups, 0)
    mean_length = groups.mean(length)
    harmonic_length = 1 / groups.mean(1 / length)
    group_tokens = groups.sum(row_tokens)
    binary = bool(torch.all((scores == 0) | (scores == 1)))

    analysis: dict[str, Any] = {}
    signs: list[Tensor] = []
    for job in prepared.jobs:
        name, params = job.estimator.name, job.params
        advantages = _advantages(engine, job)
        sign = numerical_sign(advantages, mask)
        signs.append(sign[mask])
        nonzero_rows = (sign != 0).any(dim=1).to(F64)
        zero_groups = groups.sum(nonzero_rows) == 0

        scale = _whitening_scale(engine, prepared.unwhitened[name], advantages, mask) if params.get("whiten") else None
        lengths_for = harmonic_length if name == "grpo_original" else mean_length
        # reward_std 1: the whitening's 1/σ is the measured scale, applied to every estimator below
        weights = asymptotic_prompt_weight(name, pass_rate, sizes, lengths_for, reward_std=1.0,
                                           group_reward_std=group_std_divisor(
                                               scores, centered, groups, std_ddof=params.get("std_ddof", 0),
                                               std_eps=params.get("std_eps", 0.0),
                                               std_scope=params.get("std_scope", "group")))
        if scale is not None:
            weights = weights * scale
        exact = None
        if binary and name in EXACT_GROUP_ESTIMATORS and params.get("std_scope", "group") == "group":
            exact_weights = _exact_weights(name, pass_rate, sizes, signal, params)
            exact = (exact_weights if scale is None else exact_weights * scale).tolist()
        summary = _summary(weights, signal, group_tokens)
        median = summary["median"]
        analysis[name] = {
            "bias": ESTIMATOR_BIAS[name],
            "formula": WEIGHT_FORMULAS[name] + (" · 1/σ (whitening)" if scale is not None and name not in (
                "reinforce_pp", "reinforce_pp_baseline") else ""),
            "params": params,
            "whitening_scale": scale,
            "weights": weights.tolist(),
            "weights_exact": exact,
            "relative_to_median": (weights / median).tolist() if median else None,
            "zero_advantage_fraction": float(zero_groups.to(F64).mean()),
            "summary": summary,
        }

    disagreement, opposition = _sign_matrices(signs)
    return {
        "preset": prepared.preset,
        "estimators": prepared.estimators,
        "sequences": int(mask.shape[0]),
        "tokens": tokens_total,
        "binary_rewards": binary,
        "groups": {
            "count": groups.count,
            "ids": [str(label) for label in batch.group_labels],
            "size": sizes.tolist(),
            "pass_rate": pass_rate.tolist(),
            "reward_std": reward_std.tolist(),
            "mean_length": mean_length.tolist(),
            "harmonic_mean_length": harmonic_length.tolist(),
            "tokens": group_tokens.to(torch.int64).tolist(),
            "no_signal": no_signal.tolist(),
        },
        "no_signal_fraction": float(no_signal.to(F64).mean()),
        "no_signal_token_fraction": float(group_tokens[no_signal].sum() / max(tokens_total, 1)),
        "analysis": analysis,
        "sign_disagreement": disagreement,
        "sign_opposition": opposition,
    }
