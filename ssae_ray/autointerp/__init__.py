"""Auto-interpretability (paper section 3.2.3, appendices J, K, N.6): an Interpreter explains each
feature from its top activating examples, a Predictor labels held-out examples from the
explanation, and the F1 of its labels is the feature's interpretability score.

Entry point: `run_autointerp(cfg, lm, saes, hook, texts, out_dir) -> Path`.
"""

from ssae_ray.autointerp.client import AutoInterpError, SpendCapReached
from ssae_ray.autointerp.examples import FeatureExamples, mark, render
from ssae_ray.autointerp.run import run_autointerp
from ssae_ray.autointerp.score import Scores, f1_score

__all__ = [
    "AutoInterpError",
    "FeatureExamples",
    "Scores",
    "SpendCapReached",
    "f1_score",
    "mark",
    "render",
    "run_autointerp",
]
