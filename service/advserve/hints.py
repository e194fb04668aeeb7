"""Where a misplaced name belongs: a parameter passed as a keyword argument of the in-process API (where
tensors go) or as a top-level field of a REST body. The callers raise InvalidArgument with the text."""

from __future__ import annotations

from typing import Any, Callable

from .batch import ALL_TENSORS
from .estimators import ESTIMATORS
from .loss_specs import LOSS_TERMS

TERMS = ", ".join(LOSS_TERMS)


def _owner(name: str, kind: str, estimator: str | None) -> tuple[str, str] | None:
    """(who takes parameter `name`, the field it goes in) for a request to POST /v1/`kind`, e.g.
    ("estimator 'gae'", "params"), ("loss term policy_loss", "policy_loss"); None if nobody does."""
    if kind == "losses":
        terms = [term for term, specs in LOSS_TERMS.items() if name in specs]
        if not terms:
            return None
        return (f"loss term {terms[0]}" if len(terms) == 1 else f"loss terms {', '.join(terms)}"), terms[0]
    owners = [e.name for e in ESTIMATORS.values() if name in e.params]
    if not owners:
        return None
    if estimator in owners:
        return f"estimator {estimator!r}", "params"
    who = f"estimator {owners[0]!r}" if len(owners) == 1 else f"estimators {', '.join(owners)}"
    return who, "params"


def _value(value: Any) -> str:
    return repr(value) if value is None or isinstance(value, (bool, int, float, str)) else "..."


def _example(name: str, value: str, kind: str, quote: Callable[[str], str]) -> str:
    """{name: value} as a Python dict or JSON object (`quote`), inside its estimator's entry for an analysis."""
    given = f"{{{quote(name)}: {value}}}"
    return f"{{{quote('<estimator>')}: {given}}}" if kind == "analysis" else given


def _json_string(text: str) -> str:
    return f'"{text}"'


def keyword_hint(name: str, value: Any, kind: str, estimator: str | None = None) -> str | None:
    """The fix for keyword argument `name`=`value`, read as a tensor, of advserve.compute_advantages
    (kind "advantages", `estimator` the one requested), compute_losses ("losses") or analyze
    ("analysis"); None when `name` is a tensor's name or no parameter (the tensor checks answer)."""
    if name in ALL_TENSORS:
        return None
    if kind == "losses" and name == "params":
        return f"compute_losses has no params: give each term's parameters as its own argument ({TERMS})"
    found = _owner(name, kind, estimator)
    if found is None:
        return None
    who, place = found
    if kind == "advantages" and estimator in ESTIMATORS and name not in ESTIMATORS[estimator].params:
        return f"{name!r} is a parameter of {who}, not of {estimator!r}, and not a tensor: leave it out"
    return f"{name!r} is a parameter of {who}, not a tensor: pass {place}={_example(name, _value(value), kind, repr)}"


def field_hint(name: str, kind: str) -> str | None:
    """The fix for a top-level field `name` that the body of POST /v1/`kind` (advantages, losses,
    analysis) does not have; None when `name` is nothing advserve knows."""
    if name in ALL_TENSORS:
        return f"{name!r} is a tensor: put it in \"tensors\": {{\"{name}\": ...}}"
    if kind == "losses" and name == "params":
        return f"loss parameters go in their term's field: {TERMS}"
    found = _owner(name, kind, None)
    if found is None:
        return None
    who, place = found
    return f"{name!r} is a parameter of {who}: put it in \"{place}\": {_example(name, '...', kind, _json_string)}"
