"""Estimator analysis: what each advantage estimator optimizes (the seed's bias analysis).

`theory`: the closed forms (implied per-prompt weights relative to the unbiased policy gradient).
"""

from .theory import ESTIMATOR_BIAS, EXACT_GROUP_ESTIMATORS, asymptotic_prompt_weight, exact_group_weight

__all__ = ["ESTIMATOR_BIAS", "EXACT_GROUP_ESTIMATORS", "asymptotic_prompt_weight", "exact_group_weight"]
