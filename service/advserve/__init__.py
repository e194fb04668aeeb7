"""advserve: token advantages, policy losses and their gradients for RL on language models.

In-process API: `compute_advantages`, `compute_losses`, `analyze`, `catalog`. Server: `advserve serve`.
The formulas: docs/semantics.md; the estimators: `advserve.estimators.ESTIMATORS`.

The names below are imported on first use, so `advserve.cli` and the `--workers` supervisor (which
forks the workers and must not have started torch's threads) never load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"analyze": "api", "catalog": "api", "compute_advantages": "api", "compute_losses": "api",
            "Engine": "engine", "AdvserveError": "errors", "InvalidArgument": "errors", "NotFound": "errors",
            "AdvantageRequest": "model", "AdvantageResult": "model", "LossRequest": "model", "LossResult": "model"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'advserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
