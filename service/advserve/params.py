"""The parameter vocabulary shared by every estimator and loss, and its validation.

A preset gives each parameter a default (`presets.py`); a request may override any of them. Unknown
or inapplicable names are an error that lists the valid ones.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import InvalidArgument


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its type, allowed values and meaning."""

    name: str
    kind: type  # float, int, bool, str, or list (of finite numbers, at least one: a list of floats)
    doc: str
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    default: Any = None  # used where a preset's table omits the parameter (only when `has_default`)
    has_default: bool = False

    def check(self, value: Any, field: str) -> Any:
        """Return `value` converted to this parameter's type, or raise InvalidArgument naming `field`."""
        if value is None:
            if self.nullable:
                return None
            raise InvalidArgument(f"{field} must not be null", field=field)
        if self.kind is list:
            if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
                raise InvalidArgument(f"{field} must be a list of numbers, got {value!r}", field=field)
            items = list(value)
            if not items or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)
                                or not math.isfinite(v) for v in items):
                raise InvalidArgument(f"{field} must be a non-empty list of finite numbers, got {value!r}",
                                      field=field)
            return [float(v) for v in items]
        if self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise InvalidArgument(f"{field} must be true or false, got {value!r}", field=field)
            return bool(value)
        if self.kind in (int, float):  # numpy scalars too (np.float32(0.5)), as every transport takes them
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise InvalidArgument(f"{field} must be a number, got {value!r}", field=field)
            if self.kind is int and not float(value).is_integer():
                raise InvalidArgument(f"{field} must be an integer, got {value!r}", field=field)
            value = self.kind(value)
            if not math.isfinite(value):
                raise InvalidArgument(f"{field} must be finite, got {value!r}", field=field)
            if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
                bound = ">" if self.exclusive_minimum else ">="
                raise InvalidArgument(f"{field} must be {bound} {self.minimum}, got {value!r}", field=field)
            if self.maximum is not None and value > self.maximum:
                raise InvalidArgument(f"{field} must be <= {self.maximum}, got {value!r}", field=field)
        elif self.kind is str and not isinstance(value, str):
            raise InvalidArgument(f"{field} must be a string, got {value!r}", field=field)
        if self.choices is not None and value not in self.choices:
            valid = ", ".join(repr(c) for c in self.choices)
            from .hints import verl_hint  # (imported here: hints imports the catalog, which imports this)

            raise InvalidArgument(f"{field} must be one of {valid}, got {value!r}{verl_hint('value', value, field)}",
                                  field=field)
        return value

    def describe(self) -> dict:
        out: dict[str, Any] = {"type": self.kind.__name__, "doc": self.doc, "nullable": self.nullable}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


@dataclass(frozen=True)
class DependsOn:
    """A preset default that depends on another resolved parameter (e.g. verl clamps only k3)."""

    param: str
    values: Mapping[Any, Any]
    otherwise: Any = None

    def resolve(self, resolved: Mapping[str, Any]) -> Any:
        return self.values.get(resolved[self.param], self.otherwise)

    def describe(self) -> dict:
        return {"depends_on": self.param, "values": dict(self.values), "otherwise": self.otherwise}


def neutral(name: str, kind: type, doc: str, default: Any, **kwargs: Any) -> ParamSpec:
    """A parameter with a default of its own: the behaviour before a library preset needed it, used by
    every preset whose table does not name it."""
    return ParamSpec(name, kind, doc, default=default, has_default=True, **kwargs)


def preset_default(spec: ParamSpec, defaults: Mapping[str, Any]) -> Any:
    """The preset table's default for `spec`, else the parameter's own (a preset table lacking a
    parameter without one is a bug in presets.py)."""
    if spec.name in defaults:
        return defaults[spec.name]
    if not spec.has_default:
        raise KeyError(f"the preset table has no default for {spec.name!r}")
    return spec.default


def resolve_params(
    specs: Mapping[str, ParamSpec], defaults: Mapping[str, Any], given: Mapping[str, Any] | None, field: str
) -> dict[str, Any]:
    """Preset defaults overridden by `given`, each checked; `field` prefixes error locations.

    `specs` are the parameters that apply; a key of `given` outside them is an error listing them.
    """
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise InvalidArgument(f"{field} must be an object", field=field)
    unknown = sorted(set(given) - set(specs))
    if unknown:
        valid = ", ".join(sorted(specs)) or "none"
        from .hints import verl_hint  # (imported here: hints imports the catalog, which imports this)

        raise InvalidArgument(f"{field}: unknown or inapplicable parameter {unknown[0]!r}"
                              f"{verl_hint('parameter', unknown[0])}; valid: {valid}", field=f"{field}.{unknown[0]}")
    resolved: dict[str, Any] = {}
    deferred = []
    for name, spec in specs.items():
        default = preset_default(spec, defaults)
        if name in given:
            resolved[name] = spec.check(given[name], f"{field}.{name}")
        elif isinstance(default, DependsOn):
            deferred.append(name)
        else:
            resolved[name] = default
    for name in deferred:
        resolved[name] = preset_default(specs[name], defaults).resolve(resolved)
    return resolved
