"""Sharding one batch across replicas so that the result is the one-call result: the pure part of
`advserve.ray.RayClient(shards=k)`, with no Ray in it (tests/test_ray.py checks it against the engine).

Advantages. The request is validated once, in the caller's process, by the engine itself
(`Engine.prepare_advantages` on the CPU): the same errors as one call, the resolved parameters, the
group of every row, the padded tensors in the compute dtype. Whole groups go to shards
(`shard_rows`: a group is never split, shards balanced by valid tokens), each shard sent as the
validated padded rows (same width T, group ids as the engine's group index). Estimators whose rows
depend only on their own group are then exact by construction: the engine adds a group's members in
row order, and the shards keep that order. Whitening over the batch's tokens, which comes
last, takes two passes (`two_pass`): pass 1 on the replicas with whitening off, pass 2 here, the
engine's own `whiten` over the assembled batch, so its two reductions (mean, variance) run over the
very tensor the one call reduces. Other batch-wide statistics (GRPO's std_scope 'batch', RLOO's
whiten_scope 'sequence', FlashREINFORCE's mean score, GPG's factor, GDPO's component stds:
`Estimator.statistics`) enter the rows before the end: they are computed here over the whole batch by
the estimator's own function (`engine.batch_statistics`) and sent with every shard, which the replica
computes as a shard of that batch (`Engine.as_shard`). Either way the result is the one-call result
computed in this process, bit for bit (a one-call on a machine with another torch thread count may
differ in the last bits of the moments, as two one-calls do). A token-whitening estimator not listed
in WHITENED_RETURNS is sent whole to one replica (`plan` says "whole").

Losses. Rows are cut into contiguous shards; each is computed with the global normalizers of the whole
batch (`loss_normalizers`: num_tokens = Σ L_i, num_sequences per the terms' seq_denominator), so every
token's gradient is the one-call gradient bit for bit (its weight w = 1/N or 1/(S·L_i) is the same
number); the loss and its components are sums of the shards' sums (`combine_losses`): the one call sums
all tokens in one reduction, so they agree to the last bits (float64: a few ulps), not bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine import Engine, PreparedAdvantages, aggregation_of, batch_statistics
from ..functional.masks import whiten
from ..functional.scan import use_kernels
from ..kernels import resolve_kernels
from ..loss_specs import AGGREGATED_TERMS, LOSS_TERMS
from ..model import LossRequest
from ..params import resolve_params

# estimator -> what its returns are once whitened: "whitened" (the whitened advantages), "pass1" (the
# returns of pass 1, computed before whitening), or a parameter naming the choice ("returns_whitened").
# An estimator that whitens and is not listed here is sent whole.
WHITENED_RETURNS = {"gae": "pass1", "orz": "pass1", "reinforce_pp": "pass1", "rloo": "whitened",
                    "gdpo": "whitened", "reinforce_pp_baseline": "returns_whitened"}


@dataclass(frozen=True)
class AdvantagePlan:
    """How to shard one advantage request: `mode` "rows" (every row depends on its group and
    `statistics` only), "two_pass" (the same, then token whitening after pass 1) or "whole" (one
    replica); `shards`: row indices per shard; `statistics`: the whole batch's batch-wide statistics
    every shard is computed with (numpy, by name; empty: none)."""

    mode: str
    shards: list[np.ndarray]
    statistics: dict[str, np.ndarray] = field(default_factory=dict)


def plan(prepared: PreparedAdvantages, shards: int) -> AdvantagePlan:
    """The plan for `prepared` (validated by the engine) over at most `shards` shards."""
    estimator, params, batch = prepared.estimator, prepared.params, prepared.batch
    rows = batch.mask.shape[0]
    if shards <= 1 or rows < 2:
        return AdvantagePlan("whole", [np.arange(rows)])
    mode = "rows"
    if estimator.whitens_tokens(params):
        if estimator.name not in WHITENED_RETURNS:
            return AdvantagePlan("whole", [np.arange(rows)])
        mode = "two_pass"
    if estimator.has_batch_statistics(params) and estimator.statistics is None:
        return AdvantagePlan("whole", [np.arange(rows)])
    parts = shard_rows(batch.lengths.numpy(), None if batch.group_index is None else batch.group_index.numpy(), shards)
    if len(parts) < 2:
        return AdvantagePlan("whole", parts)
    statistics = {name: value.cpu().numpy() for name, value in batch_statistics(prepared).items()}
    return AdvantagePlan(mode, parts, statistics)


def shard_rows(lengths: np.ndarray, group_index: np.ndarray | None, shards: int) -> list[np.ndarray]:
    """Row indices of each shard (in row order): whole groups (`group_index` [B], None: each row its own
    group, shards then contiguous), about the same number of valid tokens (+1 per row, so that empty
    rows count) per shard, at most `shards` shards, none empty."""
    rows = lengths.shape[0]
    unit = group_index if group_index is not None else np.arange(rows)
    count = int(unit.max()) + 1 if rows else 0
    weight = np.bincount(unit, weights=lengths.astype(np.float64) + 1.0, minlength=count)
    before = np.cumsum(weight) - weight  # tokens of the groups before each group (in group order)
    shard_of_group = np.minimum((before * shards / max(weight.sum(), 1.0)).astype(np.int64), shards - 1)
    shard_of_row = shard_of_group[unit]
    used = np.unique(shard_of_row)
    return [np.flatnonzero(shard_of_row == s) for s in used]


def shard_request(prepared: PreparedAdvantages, rows: np.ndarray, *, two_pass: bool,
                  statistics: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The document and tensors of one shard ("estimator", "preset", "params", "dtype", "tensors", and
    "batch_statistics" when `statistics` are given): the validated padded rows (numpy, the compute
    dtype), group ids as the engine's group index; whitening off in pass 1 of `two_pass`."""
    batch = prepared.batch
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:  # a run of rows: views, serialized once by Ray
        def take(value: Tensor) -> np.ndarray:
            return value[int(rows[0]):int(rows[-1]) + 1].numpy()
    else:
        index = torch.from_numpy(rows)

        def take(value: Tensor) -> np.ndarray:
            return value.index_select(0, index).numpy()
    tensors: dict[str, Any] = {name: take(value) for name, value in batch.tensors.items()}
    tensors["response_mask"] = take(batch.mask)
    if batch.group_index is not None:
        tensors["group_ids"] = take(batch.group_index)
    params = dict(prepared.params)
    if two_pass:
        params["whiten"] = False
    document = {"estimator": prepared.estimator.name, "preset": prepared.preset, "params": params,
                "dtype": _dtype_name(prepared.dtype), "tensors": tensors}
    return document | ({"batch_statistics": dict(statistics)} if statistics else {})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assemble(prepared: PreparedAdvantages, shards: Sequence[np.ndarray], parts: Sequence[Mapping[str, Any]],
             name: str) -> Tensor:
    """The padded [B, T] tensor `name` of the whole batch from the shards' padded results."""
    out = np.zeros(tuple(prepared.batch.mask.shape), dtype=torch.empty(0, dtype=prepared.dtype).numpy().dtype)
    for rows, part in zip(shards, parts):
        out[rows] = part[name]  # the shards' arrays may be read-only views of the object store: only read
    return torch.from_numpy(out)


def second_pass(prepared: PreparedAdvantages, advantages: Tensor, returns: Tensor) -> tuple[Tensor, Tensor]:
    """Pass 2 of `two_pass`: the engine's whitening (functional.masks.whiten, as estimators._whiten
    calls it) over the assembled pass-1 advantages [B, T], and the returns WHITENED_RETURNS says. With
    the kernels a replica on the CPU takes by default (numba where it imports: its whitening takes
    float64 row moments, which the torch path does not), so the bits are those of one such call."""
    p, batch = prepared.params, prepared.batch
    valid = batch.mask.to(prepared.dtype)
    with use_kernels(resolve_kernels("auto", torch.device("cpu"))):  # a CPU replica's default: numba
        whitened = whiten(advantages, valid, ddof=p["whiten_ddof"], eps=p["whiten_eps"],
                          eps_mode=p["whiten_eps_mode"], use_std=p["whiten_std"])
    rule = WHITENED_RETURNS[prepared.estimator.name]
    follows = rule == "whitened" or (rule not in ("whitened", "pass1") and bool(p[rule]))
    return whitened, (whitened if follows else returns)


# --- losses -------------------------------------------------------------------------------------


def loss_normalizers(request: LossRequest, lengths: np.ndarray) -> dict[str, float] | None:
    """The global {"num_tokens", "num_sequences"} each shard of `request` is given (only those its terms'
    aggregations read, as the engine requires), from the valid tokens per row `lengths` [B]; the
    request's own when it gives them (it is itself a micro-batch of a larger batch). None: the terms'
    seq-mean modes count sequences differently (one 'all', another 'nonempty') and the batch has empty
    rows, which one num_sequences cannot express: send it whole. Errors of the request are left to
    the engine (it refuses the request the same way, whole or sharded)."""
    preset = Engine.preset(request.preset)
    terms = Engine._resolve_terms(request, preset)
    policy = terms.get("policy_loss") or resolve_params(LOSS_TERMS["policy_loss"], preset.losses["policy_loss"],
                                                        None, "policy_loss")
    aggregations = {term: aggregation_of(terms[term], policy) for term in AGGREGATED_TERMS if term in terms}
    out: dict[str, float] = {}
    if any(agg == "token-mean" for agg in aggregations.values()):
        out["num_tokens"] = (request.num_tokens if request.num_tokens is not None
                             else max(float(lengths.sum()), 1.0))
    seq_terms = [term for term, agg in aggregations.items() if agg.startswith("seq-mean")]
    if seq_terms:
        if request.num_sequences is not None:
            out["num_sequences"] = request.num_sequences
        else:
            denominators = {terms[t].get("seq_denominator") or policy["seq_denominator"] for t in seq_terms}
            rows, nonempty = float(lengths.shape[0]), float((lengths > 0).sum())
            if len(denominators) > 1 and rows != nonempty:
                return None
            out["num_sequences"] = max(rows if denominators == {"all"} else nonempty, 1.0)
    return out


def loss_shards(rows: int, shards: int) -> list[slice]:
    """Contiguous row ranges of about equal size, at most `shards`, none empty."""
    bounds = np.linspace(0, rows, min(shards, rows) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def combine_losses(parts: Sequence[Mapping[str, Any]], tokens: Sequence[int]) -> dict[str, Any]:
    """One loss document from the shards' ({"loss", "components", "metrics", "params", "preset"}),
    `tokens`: each shard's valid tokens. loss and components: the sums (math.fsum); metrics: "*_min" the
    minimum and "*_max" the maximum over shards with tokens, the others (means over the valid tokens)
    the token-weighted mean."""
    first = parts[0]
    components = {name: (None if value is None else math.fsum(p["components"][name] for p in parts))
                  for name, value in first["components"].items()}
    total = max(sum(tokens), 1)
    metrics: dict[str, float] = {}
    for name in first["metrics"]:
        values = [p["metrics"][name] for p in parts]
        having = [v for v, n in zip(values, tokens) if n] or [0.0]
        if name.endswith("_min"):
            metrics[name] = min(having)
        elif name.endswith("_max"):
            metrics[name] = max(having)
        else:
            metrics[name] = math.fsum(v * n for v, n in zip(values, tokens)) / total
    return {"preset": first["preset"], "loss": math.fsum(p["loss"] for p in parts), "components": components,
            "metrics": metrics, "params": first["params"]}
