"""Evaluation: metrics, spliced CE, Pareto curves and AUC, logit-lens coverage, feature statistics,
TERM diagnostics, plots and the report. See `runner.evaluate_sweep` for the whole stage."""

from ssae_ray.eval.evaluate import SAEEval, TestSet, evaluate_sae, evaluate_saes, prepare_test_set
from ssae_ray.eval.metrics import EvalError, pareto_auc

__all__ = [
    "EvalError",
    "SAEEval",
    "TestSet",
    "evaluate_sae",
    "evaluate_saes",
    "pareto_auc",
    "prepare_test_set",
]
