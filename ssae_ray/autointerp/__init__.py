"""Auto-interpretability (paper section 3.2.3, appendices J, K, N.6): an Interpreter explains each
feature from its top activating examples, a Predictor labels held-out examples from the
explanation, and the F1 of its labels is the feature's interpretability score.

Entry point: `run_autointerp(cfg, lm, saes, hook, texts, out_dir) -> Path`.

Names are imported lazily: Ray actors unpickle classes from the light submodules (client, cache,
ratelimit, score, actors) without importing torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_autointerp": "run",
    "build_jobs": "run",
    "AutoInterpError": "client",
    "SpendCapReached": "client",
    "FeatureExamples": "score",
    "Scores": "score",
    "f1_score": "score",
    "mark": "examples",
    "render": "examples",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssae_ray.autointerp' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ssae_ray.autointerp.{_EXPORTS[name]}"), name)
