"""Differential fuzzing of advserve's transports: every transport is the same function as the in-process API.

    .venv/bin/python scripts/fuzz_transports.py --requests 5000 --seed 1 --json fuzz.json
    .venv/bin/python scripts/fuzz_transports.py --requests 200 --transports rest-json grpc --burst-share 0.5

It starts its own `advserve serve` on free loopback ports (advserve.testing.ServerProcess), draws random
requests (valid and invalid: every estimator under every preset that has it, every loss term and policy
loss mode, padded and packed, float32 and float64, ragged rows, interior mask gaps, scattered int and
string group ids, ties, garbage at masked positions), sends each over every transport asked for, alone
or in a concurrent burst of compatible requests (which the server may coalesce), and compares each answer
with the in-process API's answer to the same request alone (`advserve.compute_advantages` /
`compute_losses`):

* a result: the same tensors bit for bit (dtype, shape, every bit, -0.0 included), the same loss,
  components, metrics, resolved parameters and statistics (the transports carry floats exactly: JSON
  prints the shortest repr, the others send the bytes);
* an error: the same code and field (on /v2 in the protocol's words: `inputs.<name>`,
  `parameters.<name>`, `model_name`; docs/oip.md).

What a transport does not carry is not compared: /v2 returns no statistics and leaves out parameters
resolved to null; native gRPC returns group ids as strings (client/README.md); /v2 JSON cannot carry
NaN or Inf (docs/oip.md: send them binary), so requests holding them are skipped there.

Transports: rest-json, rest-binary, grpc (advserve_client.Client), v2-http (tritonclient.http, binary
tensors), v2-json (the /v2 JSON body over httpx), v2-grpc (tritonclient.grpc).

The summary counts, per transport, agreements, disagreements by kind, 5xx answers (a separate count:
also a disagreement) and client-side exceptions; `--json` writes it with a repro of the first cases of
each kind (the case's seed: `--replay SEED` re-runs that one case and prints both answers). The
generators and the comparison are also used by tests/test_transport_equivalence.py (through the `Draw`
interface, which Hypothesis or a seeded random source implement).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

TRANSPORTS = ("rest-json", "rest-binary", "grpc", "rest-shm", "grpc-shm", "v2-http", "v2-json", "v2-grpc")
PRESETS = ("paper", "verl", "openrlhf", "trl")
LOSS_TERMS = ("policy_loss", "kl_loss", "value_loss", "entropy_bonus", "rollout_correction", "token_loss")
LOSS_OUTPUTS = ("grad_logprobs", "grad_values", "grad_entropy", "grad_token_losses", "kl_values")
LOSS_FIELDS = ("num_tokens", "num_sequences", "dp_size", "return_kl_values")  # the request's own, besides the terms
TOKEN_TENSORS = ("token_rewards", "values", "old_logprobs", "ref_logprobs", "logprobs", "advantages", "old_values",
                 "returns", "entropy", "rollout_logprobs", "token_losses", "rollout_is_weights", "sum_pi_squared")
SEQUENCE_TENSORS = ("rewards", "greedy_rewards")
GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30, -7.5)
SCAN_CHUNK = 16


# --- the source of choices: Hypothesis or a seeded random generator ------------------------------------


class Draw:
    """Choices a generator makes. `integer(lo, hi)` and `choice(seq)` prefer their first/smallest value
    when shrunk; `flip(p)` is True with probability p and shrinks to False; `seed()` seeds the numpy
    generator of the bulk values (tensor contents)."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def flip(self, p: float) -> bool:
        return self.integer(0, 999) >= round(1000 * (1 - p))

    def seed(self) -> int:
        return self.integer(0, 2**32 - 1)


class RandomDraw(Draw):
    def __init__(self, seed: int):
        self.random = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.random.randint(lo, hi)


class HypothesisDraw(Draw):
    """Choices drawn from Hypothesis' `st.data()` (so that failures shrink)."""

    def __init__(self, data: Any):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))


# --- requests -------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One request: "advantages" (document: estimator, preset, params, dtype, layout) or "losses"
    (document: preset, the terms, num_tokens, num_sequences, dtype, layout); tensors as numpy arrays
    (group ids: an int64 array or a list of str). `variant`: "valid", or the kind of damage done."""

    kind: str
    document: dict[str, Any]
    tensors: dict[str, Any]
    variant: str = "valid"
    seed: int | None = None
    deadline_us: int | None = None  # /v2's `timeout` parameter: a caller that gives up (may expire queued)

    def describe(self) -> str:
        shapes = {k: (list(v.shape) if isinstance(v, np.ndarray) else f"list[{len(v)}]")
                  for k, v in self.tensors.items()}
        return f"{self.kind} {self.variant} {json.dumps(self.document, default=str)} {shapes}"

    def repro(self, most: int = 400) -> str:
        """The request as a Python call of the in-process API (tensors written out when small)."""
        if sum(np.size(v) for v in self.tensors.values()) > most:
            return self.describe()
        doc = dict(self.document)
        head = f"advserve.compute_advantages({doc.pop('estimator')!r}, " if self.kind == "advantages" else \
            "advserve.compute_losses("
        args = [f"{k}={v!r}" for k, v in doc.items()]
        args += [f"{k}=np.array({v.tolist()!r}, {v.dtype.name!r}).reshape({v.shape})" if isinstance(v, np.ndarray)
                 else f"{k}={v!r}" for k, v in self.tensors.items()]
        return head + ", ".join(args) + ")"

    def mixed_ids(self) -> bool:
        """Group ids of more than one kind, or null: no /v2 tensor can hold them."""
        ids = self.tensors.get("group_ids")
        return isinstance(ids, list) and {type(i) for i in ids} != {str} and len(ids) > 0

    def non_finite(self) -> bool:
        return any(isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all()
                   for v in self.tensors.values())


@functools.lru_cache(maxsize=1)
def catalog() -> dict[str, Any]:
    """The engine's catalog (estimators, their tensors, parameters and preset defaults; the loss terms)."""
    import advserve

    return advserve.catalog()


def estimator_presets() -> list[tuple[str, str]]:
    """Every (estimator, preset) pair the catalog serves."""
    return [(e["name"], p) for p in PRESETS for e in catalog()["estimators"] if "defaults" in e["presets"][p]]


def _estimator(name: str) -> dict[str, Any]:
    return next(e for e in catalog()["estimators"] if e["name"] == name)


@dataclass
class Layout:
    """A padded batch: mask [B, T] and each row's span (its last valid token + 1)."""

    mask: np.ndarray
    spans: np.ndarray

    @property
    def b(self) -> int:
        return self.mask.shape[0]


def draw_layout(draw: Draw, rng: np.random.Generator) -> Layout:
    """B in 1-40, T in 1-70 (often > 16 and not a multiple of the scan chunk), ragged rows, rows of
    one token, interior gaps (multi-turn observation tokens), now and then an empty row."""
    b = draw.integer(1, 40)
    t = draw.integer(1, 70)
    if draw.flip(0.3) and t > SCAN_CHUNK and t % SCAN_CHUNK == 0:
        t += 1
    spans = np.full(b, t)
    if draw.flip(0.75):  # ragged
        spans = rng.integers(1, t + 1, size=b)
        spans[rng.integers(0, b)] = t  # the widest row fills T
    if draw.flip(0.3):  # rows of one token
        spans[rng.random(b) < 0.3] = 1
    mask = np.arange(t)[None, :] < spans[:, None]
    if draw.flip(0.4):  # interior gaps: zeros strictly inside a row
        for i in np.flatnonzero(spans >= 3):
            if rng.random() < 0.5:
                start = rng.integers(1, spans[i] - 1)
                mask[i, start:rng.integers(start + 1, spans[i])] = False
    if b > 1 and draw.flip(0.05):  # an empty row
        i = rng.integers(0, b)
        mask[i] = False
        spans[i] = 0
    return Layout(mask, spans)


def draw_group_ids(draw: Draw, rng: np.random.Generator, b: int) -> Any:
    """Scattered groups (int64 or str ids): singletons, all equal, or at least two per group."""
    style = draw.choice(["scattered", "pairs", "all_equal", "singletons"])
    if style == "all_equal":
        groups = np.zeros(b, np.int64)
    elif style == "singletons":
        groups = np.arange(b)
    else:
        groups = rng.integers(0, max(1, b // 2 if style == "pairs" else b), size=b)
        if style == "pairs":  # every group at least two rows (where B allows)
            counts = np.bincount(groups, minlength=groups.max() + 1)
            lonely = np.flatnonzero(counts[groups] == 1)
            if len(lonely) and b > 1:
                partner = (lonely + 1) % b
                groups[lonely] = groups[partner]
    rng.shuffle(groups)
    if draw.flip(0.5):
        labels = rng.integers(-(2**40), 2**40, size=int(groups.max()) + 1)
        return labels[groups].astype(np.int64)
    words = [f"prompt-{i}" for i in rng.integers(0, 10**6, size=int(groups.max()) + 1)]
    if draw.flip(0.2):
        words = [w + "-é✓" for w in words]
    if draw.flip(0.05):  # long ids: at the limit (1024 bytes in UTF-8), in ASCII or not
        words[0] = draw.choice(["x" * 1024, "é" * 512, "✓" * 341 + "x", "x" * 300])
    return [words[g] for g in groups]


def draw_rewards(draw: Draw, rng: np.random.Generator, b: int) -> np.ndarray:
    style = draw.choice(["binary", "normal", "ties", "integers"])
    if style == "binary":
        return rng.integers(0, 2, size=b).astype(np.float64)
    if style == "ties":
        return rng.choice([0.25, -1.0, 3.0], size=b)
    if style == "integers":
        return rng.integers(-3, 4, size=b).astype(np.float64)
    return rng.normal(size=b)


def _param_value(draw: Draw, rng: np.random.Generator, spec: dict[str, Any]) -> Any:
    if spec.get("nullable") and draw.flip(0.2):
        return None
    kind = spec["type"]
    if "choices" in spec:
        return draw.choice(spec["choices"])
    if kind == "bool":
        return draw.choice([False, True])
    if kind == "list":  # gdpo's reward_weights: one weight per component (a wrong count is an error)
        return [round(float(v), 3) for v in rng.normal(size=draw.integer(1, 3))]
    lo, hi = spec.get("minimum"), spec.get("maximum")
    if lo is None:
        return draw.choice([-1.0, 1.0, 0.0, round(float(rng.normal()) * 3, 3)])
    hi = lo + 2.0 if hi is None else hi
    return draw.choice([float(lo), float(hi), float(lo + hi) / 2, float(rng.uniform(lo, hi))])


def draw_params(draw: Draw, rng: np.random.Generator, specs: dict[str, Any], most: int = 3) -> dict[str, Any]:
    names = list(specs)
    params = {}
    for _ in range(draw.integer(0, most)):
        name = draw.choice(names)
        params[name] = _param_value(draw, rng, specs[name])
    return params


def _cast(draw: Draw, tensors: dict[str, Any]) -> dict[str, Any]:
    """Float tensors as float64 or float32 (one choice for the request); now and then the mask as 0/1
    numbers and integral rewards as int64 (every transport accepts both)."""
    dtype = draw.choice([np.float64, np.float32, np.float64, np.float32, np.float16])
    out = {k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for k, v in tensors.items()}
    if draw.flip(0.15):
        out["response_mask"] = out["response_mask"].astype(draw.choice([np.uint8, np.int64, np.float32]))
    rewards = out.get("rewards")
    if rewards is not None and draw.flip(0.15) and np.array_equal(rewards, np.round(rewards)):
        out["rewards"] = rewards.astype(np.int64)
    return out


def _garbage(draw: Draw, rng: np.random.Generator, tensors: dict[str, Any], mask: np.ndarray) -> None:
    """Anything at masked positions of token tensors (NaN, Inf, huge): every path ignores it."""
    if mask.all() or not draw.flip(0.3):
        return
    value = draw.choice(GARBAGE)
    for name in TOKEN_TENSORS:
        if name in tensors and rng.random() < 0.7:
            tensors[name] = tensors[name].copy()
            with np.errstate(over="ignore"):  # (1e30 is Inf in float16)
                tensors[name][~mask] = value


def _pack(draw: Draw, tensors: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """The packed layout: token tensors flat [N] (each row up to its span), cu_seqlens [B + 1], and the
    mask flat (optional when it has no zeros)."""
    keep = np.arange(layout.mask.shape[1])[None, :] < layout.spans[:, None]
    packed = {k: (v[keep] if k in TOKEN_TENSORS or k == "response_mask" else v) for k, v in tensors.items()}
    packed["cu_seqlens"] = np.concatenate([[0], np.cumsum(layout.spans)]).astype(draw.choice([np.int64, np.int32]))
    if "response_mask" in packed and packed["response_mask"].all() and draw.flip(0.5):
        del packed["response_mask"]
    return packed


def advantage_case(draw: Draw, estimator: str | None = None, preset: str | None = None,
                   like: Case | None = None) -> Case:
    """A valid-looking advantage request (the in-process API decides whether it is valid); `like`: take
    its estimator, preset, parameters and dtype (a burst's compatible requests)."""
    if like is not None:
        estimator, preset = like.document["estimator"], like.document["preset"]
    if estimator is None or preset is None:
        estimator, preset = draw.choice(estimator_presets())
    rng = np.random.default_rng(draw.seed())
    layout = draw_layout(draw, rng)
    b, t = layout.mask.shape
    entry = _estimator(estimator)
    defaults = entry["presets"][preset]["defaults"]
    params = draw_params(draw, rng, entry["params"]) if like is None else dict(like.document.get("params") or {})
    tensors: dict[str, Any] = {"response_mask": layout.mask}
    if draw.flip(0.2):
        tokens = np.zeros((b, t))
        last = np.maximum(layout.spans - 1, 0)
        tokens[np.arange(b), last] = draw_rewards(draw, rng, b)
        if draw.flip(0.3):
            tokens += rng.normal(scale=0.1, size=(b, t)) * layout.mask
        tensors["token_rewards"] = tokens
    else:
        tensors["rewards"] = draw_rewards(draw, rng, b)
    needs = set(entry["tensors"]["required"])
    if "group_ids" in needs:
        tensors["group_ids"] = draw_group_ids(draw, rng, b)
    if "values" in needs:
        tensors["values"] = rng.normal(size=(b, t))
    if "greedy_rewards" in needs:
        tensors["greedy_rewards"] = draw_rewards(draw, rng, b)
    if "sum_pi_squared" in needs:  # the optimal token baselines: π of the sampled token and Σ_v π_v²
        old = np.log(rng.uniform(0.05, 0.95, size=(b, t)))
        tensors["old_logprobs"] = old
        tensors["sum_pi_squared"] = np.exp(2 * old) + rng.uniform(0.0, 0.1, size=(b, t))
        if draw.flip(0.3):
            tensors["rollout_is_weights"] = rng.uniform(0.0, 2.0, size=(b, t))
    kl = params.get("kl_coef", defaults.get("kl_coef", 0.0))
    if "ref_logprobs" in entry["tensors"]["optional"] and (kl or draw.flip(0.1)):
        old = tensors.get("old_logprobs", np.log(rng.uniform(0.05, 0.95, size=(b, t))))
        tensors["old_logprobs"] = old
        tensors["ref_logprobs"] = old + rng.normal(scale=0.2, size=(b, t))
    tensors = _cast(draw, tensors)
    _garbage(draw, rng, tensors, layout.mask)
    layout_name = draw.choice(["padded", "packed"])
    if layout_name == "packed":
        tensors = _pack(draw, tensors, layout)
    document = {"estimator": estimator, "preset": preset, "params": params or None,
                "dtype": draw.choice([None, "float32", "float64"]), "layout": None if layout_name == "padded" else "packed"}
    return Case("advantages", {k: v for k, v in document.items() if v is not None}, tensors)


MODES = tuple(catalog()["losses"]["policy_loss"]["params"]["mode"]["choices"])  # every policy loss mode
CLASSIC_MODES = ("ppo_clip", "gspo", "cispo", "reinforce")  # the modes every preset's library has


def loss_case(draw: Draw, mode: str | None = None, preset: str | None = None) -> Case:
    """A valid-looking loss request: a policy loss mode (or no policy term), any other terms."""
    rng = np.random.default_rng(draw.seed())
    preset = preset or draw.choice(PRESETS)
    layout = draw_layout(draw, rng)
    b, t = layout.mask.shape
    specs = catalog()["losses"]
    document: dict[str, Any] = {"preset": preset}
    if mode is not None or not draw.flip(0.1):
        policy = draw_params(draw, rng, specs["policy_loss"]["params"])
        policy["mode"] = mode or draw.choice(MODES)
        if policy["mode"] == "dro" and "dro_beta" not in policy and draw.flip(0.9):  # verl requires it
            policy["dro_beta"] = draw.choice([0.01, 0.1, 1.0])
        document["policy_loss"] = policy
    else:
        document["policy_loss"] = False
    for term in LOSS_TERMS[1:]:
        policy_off = document["policy_loss"] is False and term == "rollout_correction"
        if draw.flip(0.05 if policy_off else 0.35):  # a rollout correction without a policy term is an error
            document[term] = draw_params(draw, rng, specs[term]["params"], most=2)
    aggs = _aggregations(document, specs, preset)
    reads = {"num_tokens": "token-mean" in aggs, "num_sequences": any(a.startswith("seq-mean") for a in aggs)}
    counts = {"num_tokens": float(draw.choice([1.0, 100.0, float(layout.mask.sum() + 3)])),
              "num_sequences": float(draw.choice([1.0, 7.0, float(b + 2)]))}
    for key in ("num_tokens", "num_sequences"):  # one no term reads is an error (now and then)
        if draw.flip(0.12 if reads[key] else 0.02):
            document[key] = counts[key]
    if draw.flip(0.1):  # verl's dp_size: > 1 needs the counts the aggregations read (an error without)
        document["dp_size"] = draw.choice([1, 2, 4])
        for key in ("num_tokens", "num_sequences"):
            if reads[key] and document["dp_size"] > 1 and draw.flip(0.9):
                document[key] = counts[key]
    if draw.flip(0.3 if "kl_loss" in document else 0.03):  # kl_values: an error without kl_loss
        document["return_kl_values"] = draw.flip(0.8)
    lp = np.log(rng.uniform(0.05, 0.95, size=(b, t)))
    old = lp + rng.normal(scale=0.3, size=(b, t))
    if draw.flip(0.2):  # ratios exactly 1 (ties at the clip's centre)
        old = lp.copy()
    tensors: dict[str, Any] = {"response_mask": layout.mask}
    on = {term for term in LOSS_TERMS if document.get(term) not in (None, False)}
    wanted = set()
    if "policy_loss" in on or document.get("policy_loss") is None:
        wanted |= {"logprobs", "old_logprobs", "advantages"}
    if "kl_loss" in on:
        wanted |= {"logprobs", "ref_logprobs"}
        kl_defaults = specs["kl_loss"]["defaults"][preset]
        if any(document["kl_loss"].get(k, kl_defaults[k]) for k in ("unbiased_gradient", "importance_weighted")):
            wanted |= {"old_logprobs"}  # (without them and without a policy term, old_logprobs is an error)
    if "value_loss" in on:
        wanted |= {"values", "old_values", "returns"}
    if "entropy_bonus" in on:
        wanted |= {"entropy"}
    if "rollout_correction" in on:
        wanted |= {"old_logprobs", "rollout_logprobs"}
    if "token_loss" in on:
        wanted |= {"token_losses"}
    if ("policy_loss" in on or document.get("policy_loss") is None) and "rollout_correction" not in on \
            and draw.flip(0.2):
        wanted |= {"rollout_is_weights"}  # precomputed importance weights, zeros included
    values = rng.normal(size=(b, t))
    clip = (document.get("value_loss") or {}).get("clip") or 0.5
    candidates = {
        "logprobs": lp, "old_logprobs": old, "advantages": rng.normal(size=(b, t)),
        "ref_logprobs": lp + rng.normal(scale=0.1, size=(b, t)), "values": values,
        "old_values": values + rng.choice([-clip, clip, 0.1, -0.3], size=(b, t)),  # value-clip ties too
        "returns": rng.normal(size=(b, t)), "entropy": rng.uniform(0, 2, size=(b, t)),
        "rollout_logprobs": old + rng.normal(scale=0.2, size=(b, t)),
        "token_losses": rng.normal(size=(b, t)),
        "rollout_is_weights": rng.uniform(0, 2, size=(b, t)) * (rng.uniform(size=(b, t)) > 0.25),
    }
    tensors.update({name: candidates[name] for name in sorted(wanted)})
    tensors = _cast(draw, tensors)
    _garbage(draw, rng, tensors, layout.mask)
    if draw.flip(0.5):
        document["dtype"] = draw.choice(["float32", "float64"])
    if draw.flip(0.4):
        tensors = _pack(draw, tensors, layout)
        document["layout"] = "packed"
    return Case("losses", document, tensors)


def _aggregations(document: dict[str, Any], specs: dict[str, Any], preset: str) -> set[str]:
    """The aggregation modes the request's terms use (a term's own agg, else the policy's; the preset's
    defaults where the request sets none), to draw mostly the global counts they read."""
    def default(term: str, name: str, resolved: dict[str, Any]) -> Any:
        value = specs[term]["defaults"][preset][name]
        if isinstance(value, dict) and "depends_on" in value:  # a DependsOn default (the policy's agg by mode)
            value = value["values"].get(resolved.get(value["depends_on"]), value["otherwise"])
        return value

    policy = document.get("policy_loss") if isinstance(document.get("policy_loss"), dict) else {}
    mode = policy.get("mode") or default("policy_loss", "mode", {})
    policy_agg = policy.get("agg") or default("policy_loss", "agg", {"mode": mode})
    aggs = {policy_agg} if document.get("policy_loss") is not False else set()
    for term in ("kl_loss", "value_loss", "entropy_bonus", "token_loss"):
        if isinstance(document.get(term), dict):
            given = document[term]
            aggs.add((given["agg"] if "agg" in given else default(term, "agg", given)) or policy_agg)
    return aggs


INVALID = ("nan_unmasked", "inf_unmasked", "wrong_shape", "unknown_estimator", "unknown_preset", "unknown_param",
           "bad_param_value", "empty_batch", "missing_tensor", "unknown_tensor", "singleton_refused", "bad_mask",
           "estimator_not_in_preset", "unknown_choice", "mixed_ids", "long_id", "bad_rank", "bad_cu_seqlens",
           "text_tensor", "wrong_type_param")


def _numbers(case: Case) -> list[str]:
    """The case's float tensors (made float64 where a request has only integral ones: int64 rewards)."""
    names = sorted(k for k, v in case.tensors.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f")
    if not names:
        names = [k for k in ("rewards", "token_rewards") if k in case.tensors]
        for name in names:
            case.tensors[name] = case.tensors[name].astype(np.float64)
    return names


def valid_case(draw: Draw, make: Callable[[], Case], tries: int = 8) -> Case:
    """A case from `make` that the in-process API computes (the last one drawn if none of `tries` does)."""
    for _ in range(tries):
        case = make()
        if in_process(case).error is None:
            break
    return case


def _without_bad_params(case: Case) -> Case:
    """`case` without its drawn parameters when they are what the in-process API refuses: a case damaged in its
    group ids must not carry a second error (which error comes first may differ by transport: the clients
    check ids before sending, the server checks parameters before tensors)."""
    refused = in_process(case).error
    if refused is not None and (refused[1] or "").startswith("params."):
        case.document.pop("params", None)
    return case


def invalid_case(draw: Draw, variant: str | None = None) -> Case:
    """A valid request damaged one way (`INVALID`): every transport must refuse it as the in-process API
    does. (Damaged twice, which error a transport reports first may legitimately differ: the gRPC client
    must turn names into enums before anything is sent.)"""
    variant = variant or draw.choice(INVALID)
    if variant == "singleton_refused":
        estimator = draw.choice(["rloo", "grpo", "dr_grpo", "reinforce_pp_baseline"])
        case = valid_case(draw, lambda: advantage_case(draw, estimator, "openrlhf"))
        case.document.setdefault("params", {})["singleton_groups"] = "error"
        ids = case.tensors["group_ids"]
        case.tensors["group_ids"] = (np.arange(len(ids), dtype=np.int64) if isinstance(ids, np.ndarray)
                                     else [f"s{i}" for i in range(len(ids))])
        case.variant = variant
        return case
    if variant == "mixed_ids":  # ["a", 1, ...]: the wire has one kind per tensor; refused everywhere
        estimator, preset = draw.choice([pair for pair in estimator_presets()
                                         if "group_ids" in _estimator(pair[0])["tensors"]["required"]])
        case = _without_bad_params(valid_case(draw, lambda: advantage_case(draw, estimator, preset)))
        ids = [str(i) for i in case.tensors["group_ids"]]  # strings, and every other one an int (one row: null)
        case.tensors["group_ids"] = [n if n % 2 else i for n, i in enumerate(ids)] if len(ids) > 1 else [None]
        case.variant = variant
        return case
    if variant == "long_id":  # one id past the limit (1024 bytes in UTF-8)
        estimator, preset = draw.choice([pair for pair in estimator_presets()
                                         if "group_ids" in _estimator(pair[0])["tensors"]["required"]])
        case = _without_bad_params(valid_case(draw, lambda: advantage_case(draw, estimator, preset)))
        ids = [str(i) for i in case.tensors["group_ids"]]
        ids[draw.integer(0, len(ids) - 1)] = draw.choice(["x" * 1025, "é" * 513, "✓" * 342, "x" * 5000])
        case.tensors["group_ids"] = ids
        case.variant = variant
        return case
    if variant == "estimator_not_in_preset":
        estimator, preset = draw.choice([(e["name"], p) for p in PRESETS for e in catalog()["estimators"]
                                         if "unavailable" in e["presets"][p]])
        home = next(p for p in PRESETS if "defaults" in _estimator(estimator)["presets"][p])
        case = valid_case(draw, lambda: advantage_case(draw, estimator, home))
        case.document["preset"] = preset
        case.document.pop("params", None)
        case.variant = variant
        return case
    advantages = draw.flip(0.6)
    case = valid_case(draw, lambda: advantage_case(draw) if advantages else loss_case(draw))
    case.variant = variant
    rng = np.random.default_rng(draw.seed())
    doc, tensors = case.document, case.tensors
    if variant in ("nan_unmasked", "inf_unmasked"):
        name = draw.choice(_numbers(case))
        array = tensors[name].copy()
        mask = tensors.get("response_mask")
        if array.ndim == 2 or (mask is not None and mask.shape == array.shape and name not in SEQUENCE_TENSORS):
            where = np.flatnonzero(np.asarray(mask, bool).reshape(-1)) if mask is not None else np.arange(array.size)
        else:
            where = np.arange(array.size)
        if len(where) == 0:
            where = np.arange(array.size)
        array.reshape(-1)[where[rng.integers(0, len(where))]] = np.nan if variant == "nan_unmasked" else np.inf
        tensors[name] = array
    elif variant == "wrong_shape":
        name = draw.choice(sorted(k for k in tensors if k != "cu_seqlens"))
        value = tensors[name]
        tensors[name] = value[:-1] if len(value) > 1 else (np.concatenate([value, value]) if isinstance(value, np.ndarray)
                                                           else value * 2)
        if isinstance(tensors[name], np.ndarray) and tensors[name].ndim == 2 and draw.flip(0.5):
            tensors[name] = value[:, :-1] if value.shape[1] > 1 else value[:, :0]
    elif variant == "unknown_estimator":
        if case.kind == "advantages":
            doc["estimator"] = "nope"
        else:
            doc["policy_loss"] = {"mode": "trpo"}
    elif variant == "unknown_preset":
        doc["preset"] = "nope"
    elif variant == "unknown_param":
        if case.kind == "advantages":
            doc.setdefault("params", {})["bogus"] = 1.0
        else:
            term = draw.choice(["policy_loss", "kl_loss"])
            doc[term] = {**(doc.get(term) or {}), "bogus": 1.0}
    elif variant == "bad_param_value":
        if case.kind == "advantages":
            spec = _estimator(doc["estimator"])["params"]
            name = draw.choice(sorted(spec))
            doc.setdefault("params", {})[name] = -5.0 if spec[name]["type"] == "float" else 7
            if name.startswith("reward_clip"):
                doc["params"].update(reward_clip_low=1.0, reward_clip_high=-1.0)
        else:
            doc["policy_loss"] = {**(doc.get("policy_loss") or {}), "clip_low": 1.5}
    elif variant == "wrong_type_param":  # a bool for a number, a number for a bool or a choice
        if case.kind == "advantages":
            specs, where = _estimator(doc["estimator"])["params"], doc.setdefault("params", {})
        else:
            term = draw.choice(LOSS_TERMS)
            specs, where = catalog()["losses"][term]["params"], {}
            doc[term] = where = {**(doc.get(term) or {})} if isinstance(doc.get(term), dict) else where
        name = draw.choice(sorted(specs))
        where[name] = {"bool": draw.choice([0, 1, 7]), "str": 3}.get(specs[name]["type"], True)
    elif variant == "unknown_choice":
        if case.kind == "advantages":
            doc["dtype"] = "float16"
        else:
            doc["kl_loss"] = {"estimator": "k9"}
    elif variant == "empty_batch":
        for name, value in list(tensors.items()):
            if name == "cu_seqlens":
                tensors[name] = value[:1]
            elif isinstance(value, np.ndarray):
                tensors[name] = value[:0]
            else:
                tensors[name] = []
    elif variant == "bad_rank":  # a token tensor 3-D, a row tensor 2-D, or a scalar
        name = draw.choice(_numbers(case))
        value = tensors[name]
        other_rank = value.reshape(-1) if value.ndim == 2 else value.reshape(1, -1)  # [1, 1] -> [1, 1] was no damage
        tensors[name] = draw.choice([value[..., None], other_rank, np.asarray(value.reshape(-1)[:1][0])]) \
            if value.size else value[..., None]
    elif variant == "bad_cu_seqlens":  # packed: not starting at 0, decreasing, the wrong end, floats
        cu = tensors.get("cu_seqlens")
        if cu is None:
            tensors["cu_seqlens"] = np.arange(len(next(iter(tensors.values()))) + 1)  # cu_seqlens with padded
        else:
            kind = draw.choice(["first", "decreasing", "end", "floats"])
            if kind == "end" and not any(name in tensors for name in (*TOKEN_TENSORS, "response_mask")):
                kind = "first"  # no flat token tensor whose length the end must match: one more token is valid
            cu = cu.copy()
            if kind == "first":
                cu[0] = 1
            elif kind == "decreasing":  # (one sequence, [0, N]: its end below its start)
                cu[1] = cu[-1] + 1 if len(cu) > 2 else -1
            elif kind == "floats":
                cu = cu.astype(np.float64)
            else:
                cu[-1] += 1
            tensors["cu_seqlens"] = cu
    elif variant == "text_tensor":  # strings where numbers belong
        name = draw.choice(_numbers(case))
        tensors[name] = tensors[name].astype(str)
    elif variant == "missing_tensor":
        name = draw.choice(sorted(k for k in tensors if k != "cu_seqlens"))
        del tensors[name]
    elif variant == "unknown_tensor":
        name = draw.choice(["bogus", "values", "entropy"])
        if name in tensors:
            name = "bogus"
        tensors[name] = np.zeros(np.asarray(tensors.get("response_mask", np.zeros((1, 1)))).shape)
    elif variant == "bad_mask":
        if "response_mask" not in tensors:
            tensors["response_mask"] = np.ones(int(tensors["cu_seqlens"][-1]), bool)
        mask = np.asarray(tensors["response_mask"]).astype(np.int64)
        if mask.size:
            mask.reshape(-1)[rng.integers(0, mask.size)] = 2
        tensors["response_mask"] = mask
    return case


def any_case(draw: Draw, invalid_share: float = 0.25) -> Case:
    if draw.flip(invalid_share):
        return invalid_case(draw)
    return advantage_case(draw) if draw.flip(0.6) else loss_case(draw)


# --- outcomes -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """A transport's answer, normalised: an error (code, field; status: the HTTP status or gRPC code
    name, for the 5xx count) or a result (tensors by name; scalars: everything else, flattened)."""

    error: tuple[str | None, str | None] | None = None
    status: Any = None
    message: str = ""
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    exception: str | None = None  # a client-side failure (not an answer of the server)

    @property
    def timed_out(self) -> bool:
        """No answer within the client's timeout (the server's own 504 has a status)."""
        return self.error is not None and self.error[0] == "deadline_exceeded" and self.status is None

    @property
    def server_error(self) -> bool:
        return self.status in (500, 501, 502, 503, 504, "INTERNAL", "UNKNOWN") or (
            isinstance(self.status, int) and self.status >= 500)

    def brief(self) -> str:
        if self.exception:
            return f"client exception {self.exception}"
        if self.error:
            return f"error {self.error} status {self.status}: {self.message[:300]}"
        return "ok " + ", ".join(f"{k}{list(v.shape)}{v.dtype}" for k, v in self.tensors.items())


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def _result_outcome(kind: str, result: Any) -> Outcome:
    """The outcome of an AdvantageResult / LossResult (in-process or the client's, the same fields)."""
    scalars: dict[str, Any] = {}
    if kind == "advantages":
        tensors = {"advantages": result.advantages, "returns": result.returns}
        _flatten("params", result.params, scalars)
        _flatten("stats", result.stats, scalars)
        scalars["preset"], scalars["estimator"] = result.preset, result.estimator
    else:
        tensors = {name: getattr(result, name) for name in LOSS_OUTPUTS}
        scalars["loss"], scalars["preset"] = result.loss, result.preset
        _flatten("components", result.components, scalars)
        _flatten("metrics", result.metrics, scalars)
        _flatten("params", result.params, scalars)
    return Outcome(tensors={k: np.asarray(v) for k, v in tensors.items() if v is not None}, scalars=scalars)


def in_process(case: Case) -> Outcome:
    """The reference: the in-process API on the same arrays (on the device the server picks too: auto)."""
    import advserve
    from advserve.errors import AdvserveError

    try:
        if case.kind == "advantages":
            doc = dict(case.document)
            result = advserve.compute_advantages(doc.pop("estimator"), **doc, **case.tensors)
        else:
            result = advserve.compute_losses(**case.document, **case.tensors)
    except AdvserveError as exc:
        return Outcome(error=(exc.code, exc.field), status="in-process", message=str(exc))
    return _result_outcome(case.kind, result)


# --- the transports -----------------------------------------------------------------------------------


class Transports:
    """Clients of one server, one per transport (each thread-safe)."""

    def __init__(self, http_url: str, grpc_address: str, names: Sequence[str] = TRANSPORTS, timeout: float = 60.0):
        import httpx
        from advserve_client import Client

        self.names = tuple(names)
        self.http_url, self.grpc_address = http_url, grpc_address
        self.native = {"rest-json": Client(http_url, binary=False, timeout=timeout, max_retries=0),
                       "rest-binary": Client(http_url, timeout=timeout, max_retries=0),
                       "grpc": Client(grpc_address, transport="grpc", timeout=timeout, max_retries=0),
                       # tensors in shared-memory regions the client manages (docs/shared-memory.md)
                       "rest-shm": Client(http_url, shared_memory=True, timeout=timeout, max_retries=0),
                       "grpc-shm": Client(grpc_address, transport="grpc", shared_memory=True, timeout=timeout,
                                          max_retries=0)}
        self.httpx = httpx.Client(base_url=http_url, timeout=timeout)
        self._triton_grpc = None
        self._local = threading.local()  # tritonclient.http runs on gevent: one client per thread
        self._triton_http: list[Any] = []
        self.timeout = timeout

    def triton_http(self) -> Any:
        client = getattr(self._local, "triton_http", None)
        if client is None:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(self.http_url.removeprefix("http://"),
                                                      network_timeout=self.timeout)
            self._local.triton_http = client
            self._triton_http.append(client)
        return client

    def triton_grpc(self) -> Any:
        if self._triton_grpc is None:
            import tritonclient.grpc as grpcclient

            self._triton_grpc = grpcclient.InferenceServerClient(self.grpc_address)
        return self._triton_grpc

    def close(self) -> None:
        for client in self.native.values():
            client.close()
        self.httpx.close()
        for client in (*self._triton_http, self._triton_grpc):
            if client is not None:
                client.close()

    def call(self, transport: str, case: Case) -> Outcome:
        """The case over one transport; a client-side exception becomes Outcome.exception."""
        try:
            if transport in self.native:
                return self._native(transport, case)
            if transport == "v2-json":
                return self._v2_json(case)
            return self._triton(transport, case)
        except Exception as exc:  # noqa: BLE001 - a client-side failure is a finding, not a crash of the fuzzer
            return Outcome(exception=f"{type(exc).__name__}: {str(exc)[:300]}")

    def _native(self, transport: str, case: Case) -> Outcome:
        from advserve_client import AdvserveError

        client = self.native[transport]
        try:
            if case.kind == "advantages":
                doc = dict(case.document)
                result = client.compute_advantages(doc.pop("estimator"), **doc, **case.tensors)
            else:
                result = client.compute_losses(**case.document, **case.tensors)
        except AdvserveError as exc:
            return Outcome(error=(exc.code, exc.field), status=exc.status or exc.grpc_code, message=exc.message)
        return _result_outcome(case.kind, result)

    # /v2 ---------------------------------------------------------------------------------------------

    def _triton(self, transport: str, case: Case) -> Outcome:
        from tritonclient.utils import InferenceServerException

        grpc_ = transport == "v2-grpc"
        module = __import__("tritonclient.grpc" if grpc_ else "tritonclient.http", fromlist=["InferInput"])
        inputs = []
        for name, array in oip_inputs(case):
            item = module.InferInput(name, list(array.shape), _triton_dtype(array))
            if grpc_:
                item.set_data_from_numpy(array)
            else:
                item.set_data_from_numpy(array, binary_data=True)
            inputs.append(item)
        client = self.triton_grpc() if grpc_ else self.triton_http()
        model, parameters = oip_model(case), oip_parameters(case)
        try:
            if grpc_:
                result = client.infer(model, inputs, parameters=parameters, client_timeout=self.timeout)
            else:
                result = client.infer(model, inputs, parameters=parameters)
        except InferenceServerException as exc:
            status = exc.status() or ""
            status = status.removeprefix("StatusCode.") if grpc_ else int(status) if status.isdigit() else status
            return _oip_error(status, exc.message() or "")
        response = result.get_response()
        if grpc_:
            names = [o.name for o in response.outputs]
            params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
        else:
            names = [o["name"] for o in response["outputs"]]
            params = dict(response.get("parameters", {}))
        return Outcome(tensors={name: result.as_numpy(name) for name in names}, scalars=params)

    def _v2_json(self, case: Case) -> Outcome:
        body = {"parameters": oip_parameters(case),
                "inputs": [{"name": name, "datatype": _triton_dtype(array), "shape": list(array.shape),
                            "data": [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]}
                           for name, array in oip_inputs(case)]}
        response = self.httpx.post(f"/v2/models/{oip_model(case)}/infer", content=json.dumps(body).encode(),
                                   headers={"content-type": "application/json"})
        if response.status_code != 200:
            try:
                message = response.json()["error"]
            except Exception:  # noqa: BLE001
                message = response.text[:300]
            return _oip_error(response.status_code, message)
        document = response.json()
        dtypes = {"FP32": np.float32, "FP64": np.float64}
        tensors = {o["name"]: np.asarray(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
                   for o in document["outputs"]}
        return Outcome(tensors=tensors, scalars=dict(document.get("parameters", {})))


HTTP_CODES = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found", 413: "payload_too_large",
              503: "unavailable", 504: "deadline_exceeded", 500: "internal"}
GRPC_CODES = {"INVALID_ARGUMENT": "invalid_argument", "UNAUTHENTICATED": "unauthenticated", "NOT_FOUND": "not_found",
              "RESOURCE_EXHAUSTED": "payload_too_large", "UNAVAILABLE": "unavailable",
              "DEADLINE_EXCEEDED": "deadline_exceeded", "INTERNAL": "internal"}
_FIELD = re.compile(r"^([A-Za-z_][\w.\-]*)(?:$|[ :,])")  # errors.error_message: the field leads


def _oip_error(status: Any, message: str) -> Outcome:
    """An OIP error: the code from the status, the field from the message's start (the message leads with
    the field: "<field>: ..." or "<field> must be ...")."""
    code = HTTP_CODES.get(status) if isinstance(status, int) else GRPC_CODES.get(status)
    match = _FIELD.match(message)
    return Outcome(error=(code, match.group(1) if match else None), status=status, message=message)


def _triton_dtype(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    return {"f": {2: "FP16", 4: "FP32", 8: "FP64"}, "i": {4: "INT32", 8: "INT64"}, "b": {1: "BOOL"},
            "u": {1: "UINT8"}}[array.dtype.kind][array.dtype.itemsize]


def oip_model(case: Case) -> str:
    return case.document["estimator"] if case.kind == "advantages" else "losses"


def oip_inputs(case: Case) -> list[tuple[str, np.ndarray]]:
    """The inputs as /v2 takes them: strings (group ids, or text where numbers belong) as BYTES."""
    out = []
    for name, value in case.tensors.items():
        if isinstance(value, list) or value.dtype.kind in "US":
            flat = np.asarray(value, dtype=object).reshape(-1)
            array = np.array([str(v).encode() for v in flat], dtype=object).reshape(np.shape(value))
            out.append((name, array))
        else:
            out.append((name, np.require(value, requirements="C")))  # (ascontiguousarray makes 0-d [1])
    return out


def _oip_value(value: Any) -> Any:
    if isinstance(value, list):  # a list parameter (gdpo's reward_weights) as JSON text: the protocol's are scalars
        return json.dumps(value)
    return "null" if value is None else value  # docs/oip.md: "null" sets a nullable parameter to none


def oip_parameters(case: Case) -> dict[str, Any]:
    """The request parameters of docs/oip.md: preset, dtype, layout, the estimator's parameters by name,
    or "<term>" on/off and "<term>.<param>" for losses."""
    doc = case.document
    params = {key: doc[key] for key in ("preset", "dtype", "layout", *LOSS_FIELDS) if key in doc}
    if case.deadline_us is not None:
        params["timeout"] = case.deadline_us
    if case.kind == "advantages":
        params.update({k: _oip_value(v) for k, v in (doc.get("params") or {}).items()})
        return params
    for term in LOSS_TERMS:
        spec = doc.get(term)
        if spec is None:
            continue
        if isinstance(spec, dict) and spec:
            params.update({f"{term}.{k}": _oip_value(v) for k, v in spec.items()})
        else:  # {} or True: on with the defaults; False: off; anything else as it is (an error)
            params[term] = True if spec == {} else spec
    return params


def oip_field(field_: str | None) -> str | None:
    """A native error field in the protocol's words (docs/oip.md)."""
    if field_ is None:
        return None
    if field_.startswith("tensors."):
        return "inputs." + field_[len("tensors."):]
    if field_.startswith("params."):
        return "parameters." + field_[len("params."):]
    if field_ == "estimator":
        return "model_name"
    if field_.split(".", 1)[0] in ("preset", "dtype", "layout", *LOSS_FIELDS, *LOSS_TERMS):
        return "parameters." + field_
    return field_


def oip_view(case: Case, expected: Outcome) -> Outcome:
    """What /v2 carries of an in-process outcome: the errors' fields renamed; the tensors (and "loss"
    as an FP64 [1] output); scalars as response parameters (no statistics, no nulls)."""
    if expected.error:
        return Outcome(error=(expected.error[0], oip_field(expected.error[1])), message=expected.message)
    tensors = dict(expected.tensors)
    s = expected.scalars
    params: dict[str, Any] = {"preset": s["preset"]}
    if case.kind == "advantages":
        params.update({k[len("params."):]: json.dumps(v) if isinstance(v, list) else v  # a list: JSON text
                       for k, v in s.items() if k.startswith("params.") and v is not None})
    else:
        tensors["loss"] = np.array([s["loss"]], np.float64)
        params["loss"] = s["loss"]
        for key, value in s.items():
            if value is None:
                continue
            if key.startswith(("components.", "metrics.")):
                params[key] = value
            elif key.startswith("params."):
                params[key[len("params."):]] = value
    return Outcome(tensors=tensors, scalars=params)


def native_view(transport: str, expected: Outcome) -> Outcome:
    """What a native transport carries: everything; over gRPC the group ids as strings."""
    if not transport.startswith("grpc") or expected.error:
        return expected
    scalars = dict(expected.scalars)
    if "stats.groups.ids" in scalars:
        scalars["stats.groups.ids"] = [str(i) for i in scalars["stats.groups.ids"]]
    return dataclasses.replace(expected, scalars=scalars)


def expected_over(transport: str, case: Case, expected: Outcome) -> Outcome:
    return oip_view(case, expected) if transport.startswith("v2") else native_view(transport, expected)


def applicable(transport: str, case: Case) -> bool:
    """/v2 JSON carries no NaN or Inf (docs/oip.md) and no /v2 tensor mixes ints and strings (one datatype
    per input); the other transports carry every case (the native clients refuse mixed ids themselves)."""
    if transport.startswith("v2") and case.mixed_ids():
        return False
    return not (transport == "v2-json" and case.non_finite())


# --- comparison -------------------------------------------------------------------------------------


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _same_scalar(a: Any, b: Any) -> bool:
    """Equal values of the same type (an int is not a float); floats to the bit (NaN equals NaN)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_scalar(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


def differences(expected: Outcome, got: Outcome) -> list[str]:
    """Every way `got` differs from `expected` ([] when they agree), each "<kind>: <detail>"."""
    if got.exception:
        return [f"client_exception: {got.exception}"]
    if got.server_error:
        return [f"5xx: {got.status} {got.message[:200]}"]
    if expected.error or got.error:
        if not got.error:
            return [f"ok_instead_of_error: expected {expected.error} ({expected.message[:150]})"]
        if not expected.error:
            return [f"error_instead_of_ok: {got.error} {got.message[:200]}"]
        if got.error != expected.error:
            return [f"error_mismatch: expected {expected.error}, got {got.error}: {got.message[:200]}"]
        return []
    found = []
    for name in sorted(set(expected.tensors) | set(got.tensors)):
        a, b = expected.tensors.get(name), got.tensors.get(name)
        if a is None or b is None:
            found.append(f"tensor_presence:{name}: expected {a is not None}, got {b is not None}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            found.append(f"tensor_dtype_shape:{name}: expected {a.dtype}{list(a.shape)}, got {b.dtype}{list(b.shape)}")
        elif _bits(a) != _bits(b):
            differ = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
            worst = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if differ.size else 0.0
            found.append(f"tensor_bits:{name}: {differ.size or 'signs of zero:'} elements differ, max |diff| {worst:.3g}"
                         f", first at {differ[:3].tolist()}")
    for key in sorted(set(expected.scalars) | set(got.scalars)):
        a, b = expected.scalars.get(key, "<absent>"), got.scalars.get(key, "<absent>")
        if not _same_scalar(a, b):
            found.append(f"scalar:{key}: expected {a!r}, got {b!r}")
    return found


def kind_of(difference: str) -> str:
    """The disagreement's kind for the summary ("tensor_bits:advantages", "5xx", ...)."""
    head = difference.split(": ", 1)[0]
    if head.startswith("scalar:"):
        key = head[len("scalar:"):]
        return "scalar:" + re.sub(r"\.\d+", "", key)
    return head


# --- the campaign -----------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    agree: int = 0
    skipped: int = 0
    server_errors: int = 0
    exceptions: int = 0
    timeouts: int = 0  # no answer within the client's timeout (a hung server)
    impatient: int = 0  # requests with a 1 ms deadline (not counted in `requests` when they expired: 504)
    kinds: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, case: Case, expected: Outcome, got: Outcome, found: list[str], burst: bool) -> None:
        self.requests += 1
        if got.server_error:
            self.server_errors += 1
        if got.timed_out:
            self.timeouts += 1
        if got.exception:
            self.exceptions += 1
        if not found:
            self.agree += 1
            return
        for kind in dict.fromkeys(kind_of(d) for d in found):
            kind = f"burst/{kind}" if burst else kind  # (in a burst the server may have coalesced it)
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            shelf = self.examples.setdefault(kind, [])
            if len(shelf) < 3:
                shelf.append({"seed": case.seed, "burst": burst, "case": case.describe(),
                              "expected": expected.brief(), "got": got.brief(), "differences": found[:6]})


def draw_burst(draw: Draw, size: int) -> list[Case]:
    """Compatible requests sent at once (the server may coalesce them): one estimator, preset, params and
    dtype, different batches; or different requests altogether."""
    template = advantage_case(draw)
    if draw.flip(0.25):
        return [any_case(draw) for _ in range(size)]
    cases = [template]
    for _ in range(size - 1):
        other = advantage_case(draw, like=template)
        other.document.pop("dtype", None)
        if "dtype" in template.document:
            other.document["dtype"] = template.document["dtype"]
        cases.append(other)
    return cases


def draw_request(case_seed: int, burst_share: float, invalid_share: float) -> tuple[bool, list[Case]]:
    """(burst, cases) of one draw of the campaign; each case carries its seed (a burst's n-th member:
    case_seed * 100 + n)."""
    draw = RandomDraw(case_seed)
    burst = draw.flip(burst_share)
    cases = draw_burst(draw, draw.integer(2, 8)) if burst else [any_case(draw, invalid_share)]
    for n, case in enumerate(cases):
        case.seed = case_seed if not burst else case_seed * 100 + n
    return burst, cases


def run_campaign(transports: Transports, requests: int, seed: int, burst_share: float = 0.3,
                 invalid_share: float = 0.25, max_seconds: float | None = None,
                 progress: Callable[[str], None] | None = None, max_timeouts: int = 10) -> dict[str, Any]:
    """At least `requests` requests per transport (alone, or in bursts of 2-8 sent at once over one
    transport or over all of them), each compared with the in-process answer to the same request alone.
    Stops early (summary["aborted"]) after `max_timeouts` unanswered requests: a hung server. Returns the
    summary."""
    tallies = {name: Tally() for name in transports.names}
    start = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    index = 0
    aborted = None
    try:
        while min(t.requests for t in tallies.values()) < requests:  # answered and compared, each
            if max_seconds is not None and time.monotonic() - start > max_seconds:
                break
            if sum(t.timeouts for t in tallies.values()) >= max_timeouts:
                aborted = f"the server stopped answering: {max_timeouts} requests timed out (see its log)"
                break
            burst, cases = draw_request(seed * 1_000_003 + index, burst_share, invalid_share)
            index += 1
            expected = [in_process(case) for case in cases]
            calls = [(name, case, exp) for name in transports.names for case, exp in zip(cases, expected)
                     if applicable(name, case)]
            if burst and index % 2 and "v2-json" in transports.names and applicable("v2-json", cases[0]):
                # and a caller that gives up after 1 ms: its job may expire in the queue, which must
                # change nothing for the others (finding F13)
                calls.append(("v2-json", dataclasses.replace(cases[0], deadline_us=1000), expected[0]))
            for name in transports.names:
                tallies[name].skipped += len(cases) - sum(call[0] == name for call in calls)
            if not burst:
                answers = [transports.call(name, case) for name, case, _ in calls]
            elif index % 2:  # a burst over every transport at once (they share the compute thread)
                answers = list(pool.map(lambda call: transports.call(call[0], call[1]), calls))
            else:  # a burst per transport
                answers = []
                for name in transports.names:
                    mine = [call for call in calls if call[0] == name]
                    answers += pool.map(lambda call: transports.call(call[0], call[1]), mine)
            for (name, case, exp), got in zip(calls, answers):
                if case.deadline_us is not None:
                    tallies[name].impatient += 1
                    if got.error is not None and got.error[0] == "deadline_exceeded" and got.status == 504:
                        continue  # it gave up, as asked
                tallies[name].add(case, exp, got, differences(expected_over(name, case, exp), got), burst)
            if progress is not None and index % 50 == 0:
                done = min(t.requests for t in tallies.values())
                progress(f"{index} draws, {done} requests per transport, {time.monotonic() - start:.0f} s")
    finally:
        pool.shutdown(wait=True)
    elapsed = time.monotonic() - start
    return {"seed": seed, "requests_per_transport": requests, "burst_share": burst_share,
            "invalid_share": invalid_share, "elapsed_s": round(elapsed, 1), "draws": index, "aborted": aborted,
            "transports": {name: dataclasses.asdict(t) for name, t in tallies.items()}}


def replay(case_seed: int, burst_share: float = 0.3, invalid_share: float = 0.25) -> Case:
    """The case of one seed as the campaign drew it (with the campaign's shares)."""
    if case_seed < 100 * 1_000_003 and not draw_request(case_seed, burst_share, invalid_share)[0]:
        return draw_request(case_seed, burst_share, invalid_share)[1][0]
    base, n = divmod(case_seed, 100)
    return draw_request(base, burst_share, invalid_share)[1][n]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"seed {summary['seed']}, {summary['draws']} draws, {summary['elapsed_s']} s"]
    if summary.get("aborted"):
        lines.append(f"ABORTED: {summary['aborted']}")
    lines.append(f"{'transport':<12} {'requests':>8} {'agree':>8} {'5xx':>5} {'timeouts':>8} {'client-exc':>10} "
                 f"{'skipped':>7}  disagreements by kind")
    for name, t in summary["transports"].items():
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(t["kinds"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"{name:<12} {t['requests']:>8} {t['agree']:>8} {t['server_errors']:>5} {t['timeouts']:>8} "
                     f"{t['exceptions']:>10} {t['skipped']:>7}  {kinds}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="requests per transport (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--burst-share", type=float, default=0.3, help="share of draws sent as a concurrent burst")
    parser.add_argument("--invalid-share", type=float, default=0.25, help="share of invalid requests")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after this long whatever the count")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--server-args", default="", help="extra `advserve serve` flags (one string)")
    parser.add_argument("--replay", type=int, default=None, help="re-run one case seed and print every answer")
    parser.add_argument("--server-log", type=Path, default=None, help="keep the server's log here")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take (default 30)")
    args = parser.parse_args(argv)

    from advserve.testing import ServerProcess

    server = ServerProcess(*args.server_args.split(), name="fuzz", log_path=args.server_log).start()
    transports = Transports(server.url, server.grpc_address, args.transports, timeout=args.timeout)
    try:
        if args.replay is not None:
            case = replay(args.replay, args.burst_share, args.invalid_share)
            expected = in_process(case)
            print(case.describe())
            print("in-process:", expected.brief())
            for name in transports.names:
                got = transports.call(name, case)
                print(f"{name}: {got.brief()}")
                for d in differences(expected_over(name, case, expected), got):
                    print("   ", d)
            return 0
        summary = run_campaign(transports, args.requests, args.seed, args.burst_share, args.invalid_share,
                               args.max_seconds, progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        transports.close()
        server.stop()
        problems = server.problems()
        if args.server_log is None:
            server.remove_log()
    summary["server_log_problems"] = problems[:20]
    summary["command"] = " ".join(["scripts/fuzz_transports.py", *(argv if argv is not None else sys.argv[1:])])
    print("\n".join(summary_lines(summary)))
    if problems:
        print(f"server log: {len(problems)} error lines, first: {problems[0][:200]}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    bad = sum(t["server_errors"] + sum(t["kinds"].values()) for t in summary["transports"].values())
    return 1 if bad or summary["aborted"] else 0


if __name__ == "__main__":
    sys.exit(main())
