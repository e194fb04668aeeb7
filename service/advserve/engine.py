"""The engine: validates a request against the catalog and the preset, lays tensors out on the
device, runs the math, and returns results. Every transport and the in-process API call it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from .batch import DEFAULT_MAX_TOKENS, DTYPES, Batch, Checks, build_batch
from .device import fetch_scalars, resolve_device
from .errors import InvalidArgument, NotFound, PayloadTooLarge
from .estimators import ESTIMATORS, KL_TENSORS, AdvantageInputs, Estimator
from .functional.groups import Groups
from .functional.kl import kl_and_grad
from .functional.losses import (PolicyTerm, Ratio, geometric_mean_weight, kl_loss, policy_ratio, policy_term,
                               spread_over_row, value_loss)
from .functional.masks import aggregation_weights, host_reads_are_free, masked_extremes, masked_sums, moments
from .functional.rollout import rollout_weights
from .functional.scan import use_kernels
from .hints import keyword_hint, verl_hint
from .kernels import resolve_kernels
from .loss_specs import (AGGREGATED_TERMS, LOSS_TERMS, TERM_OPTIONAL_TENSORS, TERM_TENSORS, check_loss_terms,
                         echoed_params)
from .model import AdvantageRequest, AdvantageResult, LossRequest, LossResult
from .params import DependsOn, preset_default, resolve_params
from .presets import DEFAULT_PRESET, PRESETS, Preset

REWARD_TENSORS = ("rewards", "token_rewards")
# the padded tokens (B·T) up to which a request's statistics are the two kernels of `kernels.stats` with
# kernels "triton": their merge runs in one program, which a large batch would wait on, where torch's
# reductions are a few bandwidth-bound passes (the choice depends on the request's own shape only, so
# it is the same alone and coalesced)
FUSED_STATS_TOKENS = 1 << 16


def refuse_params_as_tensors(raw: Any, kind: str, estimator: str | None = None) -> None:
    """A parameter sent where tensors go (gamma=1 as a keyword of the in-process API or the client, or a
    "gamma" under "tensors") is an error naming where it belongs (`hints.keyword_hint`), the same on
    every transport. kind: "advantages", "losses" or "analysis"."""
    if not isinstance(raw, Mapping):
        return
    for name, value in raw.items():
        hint = keyword_hint(name, value, kind, estimator)
        if hint is not None:
            raise InvalidArgument(hint, field=f"tensors.{name}")


class Engine:
    """Computes advantages and losses on one device. Thread-compatible: holds no mutable state.

    `kernels`: "auto" (the Triton kernels on a CUDA device when triton imports, the numba ones on the
    CPU when numba does, else torch), "torch", "triton" or "numba" (`advserve.kernels`); `self.kernels`
    is what it resolved to, "torch", "triton" or "numba"."""

    def __init__(self, device: str | torch.device | None = "auto", *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 kernels: str = "auto"):
        self.device = resolve_device(device)
        self.max_tokens = max_tokens
        self.kernels = resolve_kernels(kernels, self.device)

    # --- lookups --------------------------------------------------------------------------------

    @staticmethod
    def preset(name: str | None) -> Preset:
        name = DEFAULT_PRESET if name is None else name
        if name not in PRESETS:
            raise NotFound(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}", field="preset")
        return PRESETS[name]

    @staticmethod
    def estimator(name: str, preset: Preset) -> Estimator:
        if name not in ESTIMATORS:
            raise NotFound(f"unknown estimator {name!r}{verl_hint('estimator', name)}; valid: {', '.join(ESTIMATORS)}",
                           field="estimator")
        if name not in preset.estimators:
            hint = preset.unavailable.get(name, "")
            raise NotFound(f"estimator {name!r} is not part of preset {preset.name!r}"
                           f"{': ' + hint if hint else ''}; available: {', '.join(preset.estimators)}",
                           field="estimator")
        return ESTIMATORS[name]

    @staticmethod
    def _dtype(name: str | None) -> torch.dtype:
        if name is None:
            return torch.float32
        if name not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}", field="dtype")
        return DTYPES[name]

    # --- advantages -----------------------------------------------------------------------------

    def compute_advantages(self, request: AdvantageRequest) -> AdvantageResult:
        """Validate and compute one request (`prepare_advantages` then `run_advantages`): on a device with
        one host read of its value checks and statistics together, before it returns."""
        result = self.run_advantages([self.prepare_advantages(request, defer_checks=True)])[0]
        result.check()
        return result

    def prepare_advantages(self, request: AdvantageRequest, *, defer_checks: bool = False) -> PreparedAdvantages:
        """Everything but the math: look-ups, parameters, tensor validation and layout on the device.

        `defer_checks`: on a device, where reading the checks' verdicts is a host sync, leave them to be
        read with the statistics of the result (one sync per request instead of two): the request is
        computed whatever its values, and its validation error, if any, is raised by the result's
        `check()` (and `stats`). The caller must then call `check()` before it uses the result's
        tensors, and run its own checks between preparing and computing under `errors_after_checks()`.
        No effect on the CPU, where the verdicts are read at once (a host read is free there)."""
        preset = self.preset(request.preset)
        estimator = self.estimator(request.estimator, preset)
        params = resolve_params(estimator.param_specs(), preset.estimators[estimator.name], request.params, "params")
        dtype = self._dtype(request.dtype)

        raw = request.tensors if isinstance(request.tensors, Mapping) else {}
        refuse_params_as_tensors(raw, "advantages", estimator.name)
        required = set(estimator.requires) | {"response_mask"}
        context, hints = f"estimator {estimator.name!r}", {}
        if params.get("kl_coef", 0) > 0:
            required |= KL_TENSORS
            given = isinstance(request.params, Mapping) and "kl_coef" in request.params
            context += f" with kl_coef {params['kl_coef']} > 0" + (
                "" if given else f" (the default of preset {preset.name!r})")
            hints = dict.fromkeys(KL_TENSORS, "send old_logprobs and ref_logprobs [B, T] for the KL penalty, or set "
                                              "params.kl_coef = 0 to leave it out")
        given_rewards = [name for name in REWARD_TENSORS if raw.get(name) is not None]
        if "reward_components" in estimator.optional and raw.get("reward_components") is not None:
            if given_rewards:  # verl's gdpo reads the components alone
                raise InvalidArgument(f"{estimator.name!r} reads its rewards from 'reward_components' [B, K] when "
                                      f"they are given: leave out {given_rewards[0]!r}",
                                      field=f"tensors.{given_rewards[0]}")
            if params.get("kl_coef", 0) > 0:
                raise InvalidArgument("kl_coef > 0 with reward_components: verl's gdpo normalizes the components "
                                      "without the KL penalty of the rewards; set params.kl_coef = 0",
                                      field="params.kl_coef")
        elif len(given_rewards) != 1:
            raise InvalidArgument("give exactly one of 'rewards' [B] and 'token_rewards' [B, T]",
                                  field="tensors.rewards")
        checks = Checks(read_later=defer_checks and not host_reads_are_free(self.device))
        batch = build_batch(
            request.tensors,
            allowed=required | set(estimator.optional) | set(REWARD_TENSORS),
            required=required,
            dtype=dtype,
            device=self.device,
            context=context,
            layout=request.layout or "padded",
            max_tokens=self.max_tokens,
            hints=hints,
            keep_masked=("token_rewards",) if params.get("masked_token_rewards") == "sum" else (),
            checks=checks,
            scan=estimator.scan(params) if self.kernels == "numba" and estimator.scan is not None else None,
            triton=self.kernels == "triton",
        )
        with checks.host_errors_after():
            self._check_estimator_preconditions(estimator, params, batch, checks)
        if checks.read_later and checks.pending:
            return PreparedAdvantages(estimator, preset.name, params, dtype, batch, checks=checks)
        checks.settle()  # every value check of the request: one host read (one device sync on a GPU)
        return PreparedAdvantages(estimator, preset.name, params, dtype, batch)

    def as_shard(self, prepared: PreparedAdvantages, statistics: Mapping[str, Any]) -> PreparedAdvantages:
        """`prepared` as a shard of a larger batch whose `batch_statistics` are `statistics` (numbers or
        arrays by name): its rows are then those of the larger batch's result (advserve.ray.sharding).
        The names must be those the estimator takes with these parameters, the values finite."""
        with prepared.errors_after_checks():
            return self._as_shard(prepared, statistics)

    def _as_shard(self, prepared: PreparedAdvantages, statistics: Mapping[str, Any]) -> PreparedAdvantages:
        field = "batch_statistics"
        if not isinstance(statistics, Mapping):
            raise InvalidArgument("batch_statistics must be a mapping of names to numbers or arrays", field=field)
        with use_kernels(self.kernels):
            expected = batch_statistics(prepared)
        if set(statistics) != set(expected):
            raise InvalidArgument(f"batch_statistics of {prepared.estimator.name!r} with these parameters are "
                                  f"{sorted(expected) or 'none'}, not {sorted(statistics)}", field=field)
        given = {}
        for name, value in statistics.items():
            try:
                tensor = torch.as_tensor(np.asarray(value, dtype=np.float64)).to(prepared.dtype)
            except (TypeError, ValueError):
                raise InvalidArgument(f"batch_statistics.{name} must be a number or an array of numbers",
                                      field=f"{field}.{name}") from None
            if tensor.shape != expected[name].shape or not bool(torch.isfinite(tensor).all()):
                raise InvalidArgument(f"batch_statistics.{name} must be finite, of shape "
                                      f"{list(expected[name].shape)}", field=f"{field}.{name}")
            given[name] = tensor.to(self.device)
        return dataclasses.replace(prepared, statistics=given)

    def run_advantages(self, jobs: list[PreparedAdvantages]) -> list[AdvantageResult]:
        """Compute prepared requests; several with one `coalescing_key` (not None) run as one device
        batch: rows concatenated, groups kept apart, results split back, bit for bit what each gives
        alone (`Estimator.coalescible`). Result tensors are contiguous; each job's stats come from its
        own batch."""
        first = jobs[0]
        if len(jobs) > 1 and (first.coalescing_key is None or any(j.coalescing_key != first.coalescing_key
                                                                   for j in jobs)):
            raise ValueError("run_advantages: only jobs of one (non-None) coalescing key share a batch")
        batch = first.batch if len(jobs) == 1 else Batch.concat([job.batch for job in jobs])
        if batch.scan is not None and batch.scan_spec != first.estimator.scan(first.params):
            raise RuntimeError("this request was prepared (and scanned, its values consumed) with other parameters "
                               "than it is run with: prepare it again with these")
        inputs = advantage_inputs(batch, first.dtype, first.statistics)
        with contextlib.ExitStack() as stack:
            for job in jobs:  # a request whose checks are still to be read: its own mistake comes first
                stack.enter_context(job.errors_after_checks())
            with torch.no_grad(), fits_in_memory(), use_kernels(self.kernels):
                advantages, returns = first.estimator.fn(inputs, first.params)
        results, row = [], 0
        for job in jobs:
            rows, width = job.batch.mask.shape
            adv, ret = advantages[row:row + rows, :width], returns[row:row + rows, :width]
            row += rows
            own_inputs = inputs if len(jobs) == 1 else None
            # a small request's statistics in two Triton kernels (`kernels.stats`): launches are its time
            fused = self.kernels == "triton" and rows * width <= FUSED_STATS_TOKENS
            if job.checks is None and host_reads_are_free(self.device):
                # computed when first read: a caller who never reads them never pays
                stats = functools.partial(advantage_stats, adv, own_inputs, job.batch, job.dtype, fused)
            else:  # queued now, behind this job's kernels: reading them waits for this job, not for later ones
                stats = fetch_advantage_stats(adv, own_inputs, job.batch, job.dtype, job.checks, fused)
            results.append(AdvantageResult(first.estimator.name, job.preset, job.batch.output(adv),
                                           job.batch.output(ret), job.params, stats_fn=stats,
                                           deferred_checks=job.checks is not None))
        return results

    @staticmethod
    def _check_estimator_preconditions(estimator: Estimator, params: Mapping[str, Any], batch: Batch,
                                       checks: Checks) -> None:
        """The estimator's own checks of the batch: those of values go to `checks` (read with the batch's),
        the others raise at once."""
        if params.get("singleton_groups") == "error" and batch.group_index is not None:
            sizes = batch_groups(batch).sizes

            def singleton() -> None:
                label = batch.group_labels[int(torch.nonzero(sizes < 2).flatten()[0])]
                others = " or ".join(repr(c) for c in estimator.param_specs()["singleton_groups"].choices if c != "error")
                raise InvalidArgument(
                    f"group {label!r} has a single response; {estimator.name!r} needs at least 2 per group "
                    f"(or set params.singleton_groups to {others})", field="tensors.group_ids")

            checks.add(sizes.amin() >= 2, singleton)
        whiten_tokens = params.get("whiten") and params.get("whiten_scope", "token") == "token"
        if whiten_tokens and params.get("whiten_ddof") == 1:
            def too_few() -> None:
                raise InvalidArgument("whitening with whiten_ddof=1 needs at least 2 valid tokens in the batch",
                                      field="tensors.response_mask")

            checks.add(batch.lengths.sum() >= 2, too_few)
        if (params.get("whiten") and params.get("whiten_scope") == "sequence"
                and params.get("kl_placement") == "reward_to_go" and params.get("kl_coef", 0) > 0):
            raise InvalidArgument("whiten_scope 'sequence' whitens one advantage per sequence, but kl_placement "
                                  "'reward_to_go' makes it vary along the sequence: use kl_placement 'sequence' "
                                  "or whiten_scope 'token'", field="params.whiten_scope")
        weights = params.get("reward_weights")
        if weights is not None:
            components = batch.tensors.get("reward_components")
            count = 1 if components is None else components.shape[1]
            if len(weights) != count:
                raise InvalidArgument(f"reward_weights has {len(weights)} weights for {count} reward component"
                                      f"{'s' if count != 1 else ''} (reward_components [B, K], else the one "
                                      "reward)", field="params.reward_weights")
        low, high = params.get("reward_clip_low"), params.get("reward_clip_high")
        if low is not None and high is not None and low > high:
            raise InvalidArgument(f"reward_clip_low ({low}) must be <= reward_clip_high ({high})",
                                  field="params.reward_clip_low")

    # --- losses ---------------------------------------------------------------------------------

    def compute_losses(self, request: LossRequest) -> LossResult:
        refuse_params_as_tensors(request.tensors, "losses")
        preset = self.preset(request.preset)
        dtype = self._dtype(request.dtype)
        terms = self._resolve_terms(request, preset)
        if not terms:
            raise InvalidArgument("no loss term requested: give policy_loss, kl_loss, value_loss, entropy_bonus or "
                                  "token_loss", field="policy_loss")
        if "rollout_correction" in terms and "policy_loss" not in terms:
            raise InvalidArgument("rollout_correction weights the policy loss, which is off", field="rollout_correction")
        for name in ("num_tokens", "num_sequences"):
            value = getattr(request, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                      or value == float("inf")):
                raise InvalidArgument(f"{name} must be a positive number", field=name)
        dp_size = _dp_size(request.dp_size)
        return_kl_values = request.return_kl_values
        if return_kl_values is not None and not isinstance(return_kl_values, (bool, np.bool_)):
            raise InvalidArgument(f"return_kl_values must be true or false, got {return_kl_values!r}",
                                  field="return_kl_values")
        if return_kl_values and "kl_loss" not in terms:
            raise InvalidArgument("return_kl_values asks for the KL term's per-token values, but kl_loss is off",
                                  field="return_kl_values")
        # the policy's parameters also define the other terms' default aggregation (and the KL's ratio)
        pol = terms.get("policy_loss") or resolve_params(LOSS_TERMS["policy_loss"], preset.losses["policy_loss"], None,
                                                         "policy_loss")
        aggregations = {term: aggregation_of(terms[term], pol) for term in AGGREGATED_TERMS if term in terms}
        check_normalizers(aggregations, request.num_tokens, request.num_sequences, dp_size)
        given_is_weights = isinstance(request.tensors, Mapping) and request.tensors.get("rollout_is_weights") is not None
        if given_is_weights and "policy_loss" not in terms:
            raise InvalidArgument("rollout_is_weights weight the policy loss, which is off",
                                  field="tensors.rollout_is_weights")
        if given_is_weights and "rollout_correction" in terms:
            raise InvalidArgument("give either tensor rollout_is_weights (precomputed importance weights) or the "
                                  "rollout_correction term (weights from rollout_logprobs), not both",
                                  field="tensors.rollout_is_weights")

        required = {"response_mask"}.union(*(TERM_TENSORS[t] for t in terms))
        optional = set().union(*(TERM_OPTIONAL_TENSORS.get(t, ()) for t in terms))
        needed_by: dict[str, str] = {}  # tensor -> the first term that needs it, for the message
        for term, term_params in terms.items():
            label = f"{term} ({term_params['mode']})" if term == "policy_loss" else term
            for name in TERM_TENSORS[term]:
                needed_by.setdefault(name, label)
        kl_params = terms.get("kl_loss")
        if kl_params and (kl_params["unbiased_gradient"] or kl_params["importance_weighted"]):
            required.add("old_logprobs")
            option = "unbiased_gradient" if kl_params["unbiased_gradient"] else "importance_weighted"
            needed_by.setdefault("old_logprobs", f"kl_loss (with {option})")
        # every value check of the request: one host read; on a GPU, read with the loss's numbers below
        # (the terms are computed whatever the values, and a failed check's error is raised then)
        checks = Checks(read_later=not host_reads_are_free(self.device))
        batch = build_batch(request.tensors, allowed=required | optional, required=required, dtype=dtype,
                            device=self.device, context="the requested loss terms", layout=request.layout or "padded",
                            max_tokens=self.max_tokens, needed_by=needed_by, checks=checks,
                            triton=self.kernels == "triton")
        t, mask = batch.tensors, batch.mask
        if "rollout_is_weights" in t:
            def negative_weights() -> None:
                raise InvalidArgument("rollout_is_weights must be >= 0 (0 drops a token)",
                                      field="tensors.rollout_is_weights")

            # amin is NaN only when NaN sits under the mask (or is refused before): then a closer look
            checks.add(t["rollout_is_weights"].amin() >= 0,
                       lambda: checks.add(~(t["rollout_is_weights"] < 0).any(), negative_weights))
        deferred = checks if checks.read_later and checks.pending else None
        if deferred is None:
            checks.settle()
        lengths = batch.lengths.to(dtype)

        @functools.cache
        def cached_weights(agg: str, loss_scale_factor: float | None, seq_denominator: str) -> Tensor:
            return aggregation_weights(batch.valid, lengths, agg, num_tokens=request.num_tokens,
                                       num_sequences=request.num_sequences, loss_scale_factor=loss_scale_factor,
                                       seq_denominator=seq_denominator, dp_size=dp_size)

        def weights(term: str) -> Tensor:
            """w [B, T] of a term: its agg, loss_scale_factor and seq_denominator, each null the policy's."""
            p = terms[term]
            return cached_weights(aggregations[term], *(pol[k] if p.get(k) is None else p[k]
                                                        for k in ("loss_scale_factor", "seq_denominator")))

        # every number of the response stays a 0-d tensor until `read_numbers` reads them all at once
        components: dict[str, Tensor | None] = {"policy": None, "kl": None, "value": None, "entropy": None,
                                                "token_loss": None}
        metrics: Pending = {}
        grad_logprobs = grad_values = grad_entropy = grad_token_losses = kl_values = None

        def add_grad(grad: Tensor, spread: bool) -> None:
            nonlocal grad_logprobs
            grad_logprobs += spread_over_row(grad, mask, batch.lengths) if spread else grad

        def ratio() -> Ratio:
            return policy_ratio(pol["mode"], t["logprobs"], t["old_logprobs"], mask, ratio_clamp=pol["ratio_clamp"],
                                cispo_level=pol["cispo_level"], sequence_ratio_gradient=pol["sequence_ratio_gradient"],
                                lengths=batch.lengths)

        def importance_weights() -> Tensor | None:
            """The policy term's importance weights [B, T] (rollout_correction's, or the given
            rollout_is_weights, as verl's policy losses apply them; None: neither), their metrics added."""
            outside = None
            if "rollout_correction" in terms:
                rc = terms["rollout_correction"]
                is_weight, outside = rollout_weights(
                    t["old_logprobs"], t["rollout_logprobs"], mask, level=rc["level"], mode=rc["mode"], low=rc["low"],
                    high=rc["high"], log_clamp=rc["log_clamp"], gating=rc["gating"], weight=rc["weight"],
                    lengths=batch.lengths)
            elif "rollout_is_weights" in t:
                is_weight = t["rollout_is_weights"]
            else:
                return None
            metrics["rollout_is_weight_mean"] = (is_weight.sum(), per_token)
            metrics["rollout_is_weight_max"] = (is_weight.max() if is_weight.numel() else 0.0, if_any_token)
            if outside is not None:
                metrics["rollout_is_fraction_outside"] = (torch.count_nonzero(outside), per_token)
            return is_weight

        with checks.host_errors_after(), torch.no_grad(), fits_in_memory():
            rho = None
            fused = self._fused_losses(terms, pol, t, batch, weights, importance_weights, bool(return_kl_values))
            if fused is not None:  # every term in one kernel launch; the metrics as below
                total, components, kl_values = fused.total, fused.components, fused.kl_values
                grad_logprobs, grad_values, grad_entropy = fused.grad_logprobs, fused.grad_values, fused.grad_entropy
                grad_token_losses = fused.grad_token_losses
                if "policy_loss" in terms:
                    metrics.update(policy_metrics(pol, None, t["logprobs"], t["old_logprobs"], t["advantages"],
                                                  mask, batch, fused.policy_term, reduced=fused.policy_reductions))
                metrics.update({name: (value, per_token) for name, value in fused.sums.items()})
            else:  # the torch path adds each term's part to these
                grad_logprobs = torch.zeros_like(t["logprobs"]) if "logprobs" in t else None
                total = torch.zeros((), dtype=dtype, device=self.device)
            if "policy_loss" in terms and fused is None:
                rho = ratio()
                if pol["mode"] == "bypass_mode" and "rollout_is_weights" in t:
                    raise InvalidArgument("bypass_mode computes its own importance weights (policy_loss.bypass_is); "
                                          "verl ignores precomputed ones", field="tensors.rollout_is_weights")
                term = policy_term(pol, rho, t["logprobs"], t["old_logprobs"], t["advantages"], mask, batch.lengths)
                w = weights("policy_loss")
                is_weight = importance_weights()
                if is_weight is not None:  # geo_mean weighs a sequence by its tokens' geometric mean (verl)
                    w = w * (geometric_mean_weight(is_weight, mask, batch.lengths) if pol["mode"] == "geo_mean"
                             else is_weight)
                policy = (w * term.loss).sum()
                total = total + policy
                if term.through is not None:  # a row-level ratio: every token's gradient through its row's sum
                    grad_logprobs += term.through * (w * term.grad).sum(dim=1, keepdim=True)
                else:
                    add_grad(w * term.grad, term.spread)
                components["policy"] = policy
                metrics.update(policy_metrics(pol, rho.value, t["logprobs"], t["old_logprobs"], t["advantages"],
                                              mask, batch, term))
            if kl_params and fused is None:
                p = kl_params
                kl_t, dkl, dkl_spread = kl_loss(
                    t["logprobs"], t["ref_logprobs"], p["estimator"], p["clamp"], old=t.get("old_logprobs"),
                    unbiased_gradient=p["unbiased_gradient"],
                    ratio=(rho or ratio()) if p["importance_weighted"] else None,
                    gradient_estimator=p["gradient_estimator"])
                if return_kl_values:  # the estimate itself (before an importance weight), 0 where masked
                    estimate = kl_t if not p["importance_weighted"] else kl_and_grad(
                        t["logprobs"], t["ref_logprobs"], p["estimator"], p["clamp"])[0]
                    kl_values = torch.where(mask, estimate, 0)
                w = weights("kl_loss")
                kl = (w * kl_t).sum()
                total = total + p["coef"] * kl
                add_grad((p["coef"] * w) * dkl, False)
                if dkl_spread is not None:
                    add_grad((p["coef"] * w) * dkl_spread, True)
                components["kl"] = kl
                metrics["kl_mean"] = (kl_t.sum(), per_token)
            if "value_loss" in terms and fused is None:
                p = terms["value_loss"]
                loss_v, dv, beyond = value_loss(t["values"], t["old_values"], t["returns"], p["clip"],
                                                p["clip_ties"], p["clip_form"])
                w = weights("value_loss")
                value = (w * loss_v).sum()
                total = total + p["coef"] * value
                grad_values = (p["coef"] * w) * dv
                components["value"] = value
                if beyond is not None:
                    metrics["value_clip_fraction"] = (torch.count_nonzero(beyond), per_token)
            if "entropy_bonus" in terms and fused is None:
                p = terms["entropy_bonus"]
                w = weights("entropy_bonus")
                entropy = (w * t["entropy"]).sum()
                total = total - p["coef"] * entropy
                grad_entropy = -p["coef"] * w
                components["entropy"] = entropy
                metrics["entropy_mean"] = (t["entropy"].sum(), per_token)
            if "token_loss" in terms and fused is None:  # verl's agg_loss of any per-token loss matrix
                p = terms["token_loss"]
                w = weights("token_loss")
                token_loss = (w * t["token_losses"]).sum()
                total = total + p["coef"] * token_loss
                grad_token_losses = p["coef"] * w
                components["token_loss"] = token_loss

        pending: Pending = {"loss": (total, as_is), **{f"components.{name}": (value, as_is)
                                                        for name, value in components.items() if value is not None},
                            **{f"metrics.{name}": entry for name, entry in metrics.items()}}
        numbers = read_numbers(pending, batch, deferred)
        if not math.isfinite(numbers["loss"]):
            raise InvalidArgument("the loss is not finite: an importance ratio overflowed (logprobs − old_logprobs "
                                  "too large); bound it with policy_loss.ratio_clamp", field="tensors.logprobs")
        return LossResult(preset.name, numbers["loss"],
                          {name: numbers.get(f"components.{name}") for name in components},
                          {name: numbers[f"metrics.{name}"] for name in metrics},
                          batch.output(grad_logprobs), batch.output(grad_values), batch.output(grad_entropy),
                          params=echoed_params(terms), grad_token_losses=batch.output(grad_token_losses),
                          kl_values=batch.output(kl_values))

    def _fused_losses(self, terms: Mapping[str, Mapping[str, Any]], pol: Mapping[str, Any], tensors: Mapping[str, Tensor],
                      batch: Batch, weights: Callable[[str], Tensor], importance_weights: Callable[[], Tensor | None],
                      return_kl_values: bool) -> Any:
        """The loss terms by the Triton kernel (`kernels.losses.loss_terms`: one launch, the torch path's
        values to rounding) when the kernels setting is "triton" and the kernel covers every requested term
        (`kernels.losses.covers`); else None: the torch path. weights: a term's aggregation weights [B, T];
        importance_weights: the policy term's (their metrics added), called only with a policy term."""
        if self.kernels != "triton":
            return None
        from .kernels import losses as fused  # imports triton

        if not fused.covers(terms, pol, tensors):
            return None
        return fused.loss_terms(terms, pol, tensors, {term: weights(term) for term in terms if term in AGGREGATED_TERMS},
                                batch.mask, batch.lengths, return_kl_values=return_kl_values,
                                importance_weights=importance_weights() if "policy_loss" in terms else None)

    @staticmethod
    def _resolve_terms(request: LossRequest, preset: Preset) -> dict[str, dict[str, Any]]:
        terms: dict[str, dict[str, Any]] = {}
        given_terms: dict[str, Mapping[str, Any]] = {}
        for name, specs in LOSS_TERMS.items():
            given = getattr(request, name)
            if given is False or (given is None and name != "policy_loss"):
                continue
            if given is True:
                given = None
            terms[name] = resolve_params(specs, preset.losses.get(name, {}), given, name)
            given_terms[name] = given if isinstance(given, Mapping) else {}
        check_loss_terms(terms, given_terms)
        return terms

    # --- catalog --------------------------------------------------------------------------------

    @staticmethod
    def catalog() -> dict[str, Any]:
        """Every estimator with its tensors, parameters and defaults per preset; the loss terms likewise."""
        def default(value: Any) -> Any:
            return value.describe() if isinstance(value, DependsOn) else value

        estimators = []
        for e in ESTIMATORS.values():
            estimators.append({
                "name": e.name,
                "summary": e.summary,
                "formula": e.formula,
                "reference": e.reference,
                "tensors": {
                    "required": sorted({"response_mask", *e.requires}),
                    "one_of": list(REWARD_TENSORS),
                    "optional": sorted(e.optional),
                },
                "params": {name: spec.describe() for name, spec in e.param_specs().items()},
                "presets": {
                    p.name: ({"defaults": {k: default(preset_default(spec, p.estimators[e.name]))
                                           for k, spec in e.param_specs().items()}}
                             if e.name in p.estimators else {"unavailable": p.unavailable.get(e.name, "")})
                    for p in PRESETS.values()
                },
            })
        losses = {
            term: {
                "tensors": list(TERM_TENSORS[term]),
                "optional_tensors": list(TERM_OPTIONAL_TENSORS.get(term, ())),
                "params": {name: spec.describe() for name, spec in specs.items()},
                "defaults": {p.name: {k: default(preset_default(spec, p.losses.get(term, {})))
                                      for k, spec in specs.items()}
                             for p in PRESETS.values()},
            }
            for term, specs in LOSS_TERMS.items()
        }
        presets = [{"name": p.name, "description": p.description, "library": p.library, "options": dict(p.options)}
                   for p in PRESETS.values()]
        return {"presets": presets, "default_preset": DEFAULT_PRESET, "estimators": estimators, "losses": losses}


# --- helpers ------------------------------------------------------------------------------------


def aggregation_of(term_params: Mapping[str, Any], policy: Mapping[str, Any]) -> str:
    """A term's aggregation mode: its own agg, or (null) the policy term's."""
    return term_params.get("agg") or policy["agg"]


def _dp_size(value: Any) -> int:
    """The request's dp_size (None: 1), an integer from 1 to 2^31, or InvalidArgument naming it."""
    if value is None:
        return 1
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or not 1 <= value <= 2**31:
        raise InvalidArgument(f"dp_size must be an integer from 1 to 2^31, got {value!r}", field="dp_size")
    return int(value)


def check_normalizers(aggregations: Mapping[str, str], num_tokens: float | None, num_sequences: float | None,
                      dp_size: int) -> None:
    """verl's agg_loss contract over the terms' aggregations (term -> agg): a global normalizer no term
    reads is an error naming it (num_tokens is read by token-mean only, num_sequences by the seq-mean
    modes; token-sum reads neither), and with dp_size > 1 the normalizer each mode needs must be given
    (verl raises without batch_num_tokens / global_batch_size)."""
    uses = {"num_tokens": sorted(t for t, agg in aggregations.items() if agg == "token-mean"),
            "num_sequences": sorted(t for t, agg in aggregations.items() if agg.startswith("seq-mean"))}
    modes = {"num_tokens": "token-mean", "num_sequences": "the seq-mean modes"}
    listed = ", ".join(f"{term} {agg}" for term, agg in aggregations.items())
    for name, value in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if value is not None and not uses[name]:
            raise InvalidArgument(f"{name} normalizes {modes[name]}, which no term of this request aggregates with "
                                  f"({listed}): leave it out", field=name)
        if value is None and uses[name] and dp_size > 1:
            raise InvalidArgument(f"dp_size {dp_size} > 1 needs the global {name} for {modes[name]} ({', '.join(uses[name])}"
                                  "): each rank's loss is divided by the global count and multiplied by dp_size",
                                  field=name)


@dataclass(frozen=True)
class PreparedAdvantages:
    """A validated advantage request, ready for the device. `statistics`: the batch-wide statistics of a
    larger batch this one is a shard of (`Engine.as_shard`); None: the batch's own. `checks`: its value
    checks when they are left to be read with the results (`Engine.prepare_advantages(defer_checks=True)`
    on a device); None when they were read at once."""

    estimator: Estimator
    preset: str
    params: dict[str, Any]
    dtype: torch.dtype
    batch: Batch
    statistics: Mapping[str, Tensor] | None = None
    checks: Checks | None = None

    def errors_after_checks(self) -> contextlib.AbstractContextManager:
        """A block whose errors (a caller's own checks between preparing and computing) come after this
        request's value checks, as they would if those had been read at once (`Checks.host_errors_after`)."""
        return self.checks.host_errors_after() if self.checks is not None else contextlib.nullcontext()

    @functools.cached_property
    def coalescing_key(self) -> tuple | None:
        """Requests with equal keys can share one device batch and get exactly what each gets alone;
        None (run alone) unless the estimator is `coalescible` with these parameters and the rewards
        are outcome rewards [B] (token rewards are summed over T, and that sum's rounding depends on
        the width)."""
        if (not self.estimator.coalescible(self.params) or "rewards" not in self.batch.tensors
                or self.statistics is not None):
            return None
        return (self.estimator.name, self.preset, tuple(sorted(self.params.items())), self.dtype,
                tuple(sorted(self.batch.tensors)), self.batch.group_index is not None)

    @property
    def tokens(self) -> int:
        return self.batch.mask.numel()


def checks_first(prepared: Any) -> contextlib.AbstractContextManager:
    """A prepared advantage request's `errors_after_checks()` (its value checks, if still to be read,
    come before the block's errors); for any other request (a LossRequest, an analysis) a plain block."""
    errors_after_checks = getattr(prepared, "errors_after_checks", None)
    return errors_after_checks() if errors_after_checks is not None else contextlib.nullcontext()


@contextlib.contextmanager
def fits_in_memory() -> Iterator[None]:
    """Running out of memory while computing is the request's size: PayloadTooLarge, not a 500."""
    try:
        yield
    except MemoryError:
        raise PayloadTooLarge("the batch does not fit in the server's memory while computing: send a smaller "
                              "batch", field="tensors.response_mask") from None


def batch_statistics(prepared: PreparedAdvantages) -> dict[str, Tensor]:
    """The batch-wide statistics of `prepared`'s estimator over its batch (`Estimator.statistics`: {}
    when it has none with these parameters), computed as the estimator computes them."""
    statistics = prepared.estimator.statistics
    if statistics is None or not prepared.estimator.has_batch_statistics(prepared.params):
        return {}
    with torch.no_grad(), fits_in_memory():
        return statistics(advantage_inputs(prepared.batch, prepared.dtype), prepared.params)


def advantage_inputs(batch: Batch, dtype: torch.dtype,
                     statistics: Mapping[str, Tensor] | None = None) -> AdvantageInputs:
    """The estimators' view of a validated batch (`statistics`: a larger batch's, see PreparedAdvantages)."""
    t = batch.tensors
    token_rewards = t.get("token_rewards")
    return AdvantageInputs(
        mask=batch.mask,
        valid=batch.valid,
        lengths=batch.lengths.to(dtype),
        given_rewards=t.get("rewards"),
        given_token_rewards=token_rewards,
        groups=batch_groups(batch),
        values=t.get("values"),
        old_logprobs=t.get("old_logprobs"),
        ref_logprobs=t.get("ref_logprobs"),
        greedy_rewards=t.get("greedy_rewards"),
        sum_pi_squared=t.get("sum_pi_squared"),
        rollout_is_weights=t.get("rollout_is_weights"),
        unmasked_token_rewards=t.get("token_rewards:unmasked"),
        reward_components=t.get("reward_components"),
        statistics=statistics,
        scan=batch.scan,
    )


def batch_groups(batch: Batch) -> Groups | None:
    """The batch's groups without reading the device: the count is the number of labels (every label
    has a member), the sizes and layout those computed on the host with the index, or (a coalesced
    batch) the sizes one `index_add_` (a `bincount` would read its maximum on a GPU)."""
    index = batch.group_index
    if index is None:
        return None
    count = len(batch.group_labels)
    if batch.group_layout is not None:
        sizes, order, starts = batch.group_layout
        return Groups(index=index, count=count, sizes=sizes, ordered=(order, starts))
    return Groups(index=index, count=count, sizes=index.new_zeros(count).index_add_(0, index, torch.ones_like(index)))


def known_tokens(batch: Batch) -> int | None:
    """The batch's valid-token count where reading it costs no device sync (the CPU), else None: the
    statistics then fetch it with everything else."""
    return batch.tokens if host_reads_are_free(batch.mask.device) else None


# A response's numbers before they are read: name -> (0-d tensor or number, how to finish the host value
# given the valid-token count). `read_numbers` brings them all to the host with one device sync.
Pending = dict[str, tuple[Any, Callable[[Any, int], Any]]]


def as_is(value: Any, tokens: int) -> Any:
    """The host value itself."""
    return value


def per_token(value: float, tokens: int) -> float:
    """A sum over the valid tokens as their mean (0 when there are none)."""
    return float(value) / max(tokens, 1)


def read_numbers(pending: Pending, batch: Batch, checks: Checks | None = None) -> dict[str, Any]:
    """The host values of `pending`, finished: `fetch_numbers(...)()`."""
    return fetch_numbers(pending, batch, checks)()


def fetch_numbers(pending: Pending, batch: Batch, checks: Checks | None = None,
                  count_in: Callable[[dict[str, Any]], Any] | None = None) -> Callable[[], dict[str, Any]]:
    """Start reading `pending` (one `device.fetch_scalars`: on a GPU one copy queued behind the work so
    far, at most one device sync when read): a function giving the finished host values, and the
    valid-token count under "__tokens__" (fetched with them unless it is known already, or `count_in`
    finds it among the numbers read). `checks`: the request's value checks, still to be read: their
    verdicts come with the numbers, and the function raises the request's validation error where one
    failed."""
    tokens = known_tokens(batch)
    values = {name: value for name, (value, _) in pending.items()}
    if tokens is None and count_in is None:
        values["__tokens__"] = batch.lengths.sum()
    verdicts = checks.verdicts() if checks is not None else None
    if verdicts is not None:
        values["__verdicts__"] = verdicts
    fetch = fetch_scalars(values)

    def finished() -> dict[str, Any]:
        numbers = fetch.result()
        if checks is not None:
            checks.settle(numbers.pop("__verdicts__", ()))
        count = int(numbers.pop("__tokens__") if "__tokens__" in numbers else
                    tokens if tokens is not None else count_in(numbers))
        return {name: finish(numbers[name], count) for name, (_, finish) in pending.items()} | {"__tokens__": count}

    return finished


def moment_entries(prefix: str, x: Tensor, mask: Tensor, batch: Batch) -> Pending:
    """`masked_sums` of x as pending entries, finished together by `take_moments`."""
    return {f"{prefix}.{k}": (v, as_is) for k, v in masked_sums(x, mask, known_tokens(batch)).items()}


def take_moments(numbers: dict[str, Any], prefix: str) -> dict[str, float]:
    """mean, std, min and max from the `moment_entries` of `prefix` read by `fetch_numbers`."""
    return moments({k: numbers[f"{prefix}.{k}"] for k in ("sum", "sumsq", "min", "max")}, numbers["__tokens__"])


def if_any_token(value: float, tokens: int) -> float:
    """A min or max over the valid tokens (0 when there are none)."""
    return value if tokens else 0.0


def policy_metrics(p: Mapping[str, Any], ratio: Tensor | None, logp: Tensor, old: Tensor, adv: Tensor,
                   mask: Tensor, batch: Batch, term: PolicyTerm | None = None,
                   reduced: Mapping[str, Tensor] | None = None) -> Pending:
    """Clip fractions by side (sign-aware for PPO), approximate KL and ratio statistics, as pending
    entries for `read_numbers`. `term`: the mode's `PolicyTerm`, for what only it knows (clip_cov's
    and kl_cov's selected tokens, dppo's trust region, geo_mean's log-space clip, bypass_mode's weights).
    `reduced`: these reductions as the loss kernel made them in its pass (`kernels.losses.FusedLosses`:
    approx_kl, ratio_sum, ratio_min, ratio_max and the count behind each clip fraction, by the same
    conditions); then `ratio`, `logp`, `old` and `adv` are not read."""
    if reduced is None:
        valid_ratio = ratio * mask
        low_ratio, high_ratio = masked_extremes(valid_ratio, mask, known_tokens(batch))
        reduced = {"approx_kl": (old - logp).sum(), "ratio_sum": valid_ratio.sum(), "ratio_min": low_ratio,
                   "ratio_max": high_ratio}

        def fraction(name: str, condition: Callable[[], Tensor]) -> tuple[Tensor, Callable[[Any, int], Any]]:
            """Share of the valid positions where `condition()` [B, T] holds (never on masked ones)."""
            return torch.count_nonzero(condition()), per_token
    else:
        def fraction(name: str, condition: Callable[[], Tensor]) -> tuple[Tensor, Callable[[Any, int], Any]]:
            return reduced[name], per_token
    out: Pending = {"approx_kl": (reduced["approx_kl"], per_token), "ratio_mean": (reduced["ratio_sum"], per_token),
                    "ratio_min": (reduced["ratio_min"], if_any_token), "ratio_max": (reduced["ratio_max"], if_any_token)}

    def high() -> Tensor:
        return ratio > 1 + p["clip_high"]

    def low() -> Tensor:
        return ratio < 1 - p["clip_low"]

    mode = p["mode"]
    clipping = mode in ("ppo_clip", "gspo", "clip_cov") or (mode == "bypass_mode" and p["bypass_loss"] == "ppo_clip")
    if clipping:
        out["clip_fraction_high"] = fraction("clip_fraction_high", lambda: high() & (adv > 0))
        out["clip_fraction_low"] = fraction("clip_fraction_low", lambda: low() & (adv < 0))
        if p["dual_clip"] is not None and mode != "clip_cov":
            out["dual_clip_fraction"] = fraction("dual_clip_fraction", lambda: (ratio > p["dual_clip"]) & (adv < 0))
        if p["ratio_cap"] is not None and mode in ("ppo_clip", "gspo"):
            out["ratio_cap_fraction"] = fraction("ratio_cap_fraction", lambda: (ratio > p["ratio_cap"]) & mask)
    if mode in ("clip_cov", "kl_cov"):  # verl's clip_cov pg_clipfrac
        out["cov_selected_fraction"] = fraction("cov_selected_fraction", lambda: term.dropped)
    elif mode in ("geo_mean", "dppo_tv", "dppo_kl"):
        # geo_mean: lp − old outside its log-space bounds (verl's pg_clipfrac / _lower); dppo: outside the
        # trust region, by the side A's sign tests (the two add up to verl's pg_clipfrac)
        out["clip_fraction_high"] = fraction("clip_fraction_high", lambda: term.dropped & (adv > 0))
        out["clip_fraction_low"] = fraction(
            "clip_fraction_low", lambda: term.dropped & (adv < 0 if mode == "geo_mean" else adv <= 0) & mask)
        if mode != "geo_mean" and p["ratio_cap"] is not None:  # verl's dppo pg_clipfrac_lower
            out["ratio_cap_fraction"] = fraction("ratio_cap_fraction",
                                                 lambda: (ratio > p["ratio_cap"]) & ~term.dropped & mask)
    if term is not None and term.is_weights is not None:
        metrics_w = term.is_weights
        out["rollout_is_weight_mean"] = (metrics_w.sum(), per_token)
        out["rollout_is_weight_max"] = (metrics_w.max() if metrics_w.numel() else 0.0, if_any_token)
        out["rollout_is_fraction_outside"] = (torch.count_nonzero(term.is_outside), per_token)
    if mode == "cispo":  # over the cap, or outside the clip range
        capped = p["cispo_cap"] is not None
        out["clip_fraction_high"] = fraction(
            "clip_fraction_high", lambda: (ratio > p["cispo_cap"] if capped else high()) & mask)
        out["clip_fraction_low"] = fraction(
            "clip_fraction_low", lambda: (torch.zeros_like(mask) if capped else low()) & mask)
    return out


def advantage_stats(advantages: Tensor, inputs: AdvantageInputs | None, batch: Batch,
                    dtype: torch.dtype, fused: bool = False) -> dict[str, Any]:
    """What a trainer logs: advantage moments, reward moments and, for group estimators, per-group
    mean reward (the pass rate for 0/1 rewards) and the share of groups with no learning signal.
    advantages [B, T] padded; `inputs` None rebuilds them from `batch` (a coalesced request). Every
    number is reduced on the device and read with the others at once: `fetch_advantage_stats(...)()`.
    `fused`: by the Triton kernels of `kernels.stats` (two launches; sums in float64)."""
    return fetch_advantage_stats(advantages, inputs, batch, dtype, fused=fused)()


def fetch_advantage_stats(advantages: Tensor, inputs: AdvantageInputs | None, batch: Batch,
                          dtype: torch.dtype, checks: Checks | None = None,
                          fused: bool = False) -> Callable[[], dict[str, Any]]:
    """`advantage_stats` in two steps: the reductions and their copy to the host are queued now (on a
    GPU, right behind the estimator's kernels), the function returned reads them (`fetch_numbers`, with
    the verdicts of `checks`: it raises the request's validation error where one failed)."""
    inputs = inputs or advantage_inputs(batch, dtype)
    mask, groups = inputs.mask, inputs.groups
    if fused:
        from .kernels.stats import advantage_statistics  # imports triton

        vector = advantage_statistics(advantages, mask, inputs.scores, groups)
        fetched_vector = fetch_numbers({"vector": (vector, as_is)}, batch, checks,
                                       count_in=lambda numbers: numbers["vector"][4])

        def fetched() -> dict[str, Any]:  # the vector's entries under the names of the torch path's
            numbers = fetched_vector()
            v = numbers.pop("vector")
            numbers |= {"advantages.sum": v[0], "advantages.sumsq": v[1], "advantages.min": v[2],
                        "advantages.max": v[3], "rewards.mean": v[5], "rewards.std": v[6]}
            if groups is not None:
                numbers |= {"groups.size_min": int(v[7]), "groups.size_max": int(v[8]),
                            "groups.zero_variance_fraction": v[9], "groups.reward_mean": v[10:]}
            return numbers
    else:
        advantages = advantages.contiguous()
        pending: Pending = {**moment_entries("advantages", advantages, mask, batch),
                            "rewards.mean": (inputs.scores.mean(), as_is),
                            "rewards.std": (inputs.scores.std(correction=0), as_is)}
        if groups is not None:
            constant = groups.is_constant(inputs.scores)
            pending |= {"groups.size_min": (groups.sizes.min(), as_is), "groups.size_max": (groups.sizes.max(), as_is),
                        "groups.zero_variance_fraction": (constant.to(inputs.scores.dtype).mean(), as_is),
                        "groups.reward_mean": (groups.mean(inputs.scores), as_is)}
        fetched = fetch_numbers(pending, batch, checks)
    sequences, group_count = int(mask.shape[0]), None if groups is None else groups.count

    def stats() -> dict[str, Any]:
        numbers = fetched()
        out: dict[str, Any] = {
            "sequences": sequences,
            "tokens": numbers["__tokens__"],
            "advantages": take_moments(numbers, "advantages"),
            "rewards": {"mean": numbers["rewards.mean"], "std": numbers["rewards.std"]},
        }
        if group_count is not None:
            out["groups"] = {
                "count": group_count,
                "size_min": numbers["groups.size_min"],
                "size_max": numbers["groups.size_max"],
                "zero_variance_fraction": numbers["groups.zero_variance_fraction"],
                "ids": batch.group_labels,
                "reward_mean": numbers["groups.reward_mean"],
            }
        return out

    return stats
