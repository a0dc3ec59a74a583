"""Profiling and budgets: parameters, multiply-adds, artifact sizes, and the budget gate.

torch and fvcore are imported only when a model is profiled, so importing this package is cheap.
"""

from toolchain.profile.budgets import (
    BUDGET_KEYS,
    BudgetKey,
    BudgetResult,
    Budgets,
    check_budgets,
    evaluate_budgets,
    load_budgets,
    measure_budgets,
    raise_if_failed,
    register_budget_key,
)
from toolchain.profile.counting import (
    CONVENTION,
    layer_breakdown,
    profile_model,
    profile_with_layers,
)
from toolchain.profile.files import profile_file

__all__ = [
    "BUDGET_KEYS",
    "BudgetKey",
    "BudgetResult",
    "Budgets",
    "CONVENTION",
    "check_budgets",
    "evaluate_budgets",
    "layer_breakdown",
    "load_budgets",
    "measure_budgets",
    "profile_file",
    "profile_model",
    "profile_with_layers",
    "raise_if_failed",
    "register_budget_key",
]
