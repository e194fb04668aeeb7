"""Estimator analysis: what each advantage estimator optimizes (the seed's bias analysis).

`theory`: the closed forms (implied per-prompt weights relative to the unbiased policy gradient);
`batch`: those weights on a user's batch, with the sign agreement of the estimators' advantages.
"""

from .batch import AnalysisRequest, PreparedAnalysis, analyze, prepare_analysis, run_analysis
from .theory import ESTIMATOR_BIAS, EXACT_GROUP_ESTIMATORS, WEIGHT_FORMULAS, asymptotic_prompt_weight, exact_group_weight

__all__ = [
    "ESTIMATOR_BIAS", "EXACT_GROUP_ESTIMATORS", "WEIGHT_FORMULAS", "AnalysisRequest", "PreparedAnalysis", "analyze",
    "asymptotic_prompt_weight", "exact_group_weight", "prepare_analysis", "run_analysis",
]
