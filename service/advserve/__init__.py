"""advserve: token advantages, policy losses and their gradients for RL on language models.

In-process API: `compute_advantages`, `compute_losses`, `analyze`, `catalog`. Server: `advserve serve`.
The formulas: docs/semantics.md; the estimators: `advserve.estimators.ESTIMATORS`.
"""

from .api import analyze, catalog, compute_advantages, compute_losses
from .engine import Engine
from .errors import AdvserveError, InvalidArgument, NotFound
from .model import AdvantageRequest, AdvantageResult, LossRequest, LossResult

__version__ = "0.1.0"

__all__ = [
    "AdvantageRequest", "AdvantageResult", "AdvserveError", "Engine", "InvalidArgument", "LossRequest", "LossResult",
    "NotFound", "analyze", "catalog", "compute_advantages", "compute_losses",
]
