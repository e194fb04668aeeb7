"""advserve: token advantages, policy losses and their gradients for RL on language models.

In-process API: `compute_advantages`, `compute_losses`, `analyze`, `catalog`. Server: `advserve serve`.
The formulas: docs/semantics.md; the estimators: `advserve.estimators.ESTIMATORS`.

The names below are imported on first use, so `advserve.cli` and the `--workers` supervisor (which
forks the workers and must not have started torch's threads) never load torch.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

_EXPORTS = {"analyze": "api", "catalog": "api", "compute_advantages": "api", "compute_losses": "api",
            "Engine": "engine", "AdvserveError": "errors", "InvalidArgument": "errors", "NotFound": "errors",
            "AdvantageRequest": "model", "AdvantageResult": "model", "LossRequest": "model", "LossResult": "model"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """An exported name, or a submodule (`advserve.estimators.ESTIMATORS` after `import advserve`)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'advserve' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
