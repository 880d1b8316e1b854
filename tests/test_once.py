"""What the code says once: one SAE hash, one activation-scale formula."""

from __future__ import annotations

import math

import pytest
import torch

from ssae_ray.saes import make_random_sae, sae_hash


def test_one_sae_hash_for_retrieval_and_shift():
    import ssae_ray.retrieval.select as select
    import ssae_ray.shift.sae_sets as sae_sets

    a = make_random_sae(8, 16, "blocks.0.hook_resid_post", seed=0)
    b = make_random_sae(8, 16, "blocks.0.hook_resid_post", seed=0)
    assert sae_hash(a) == sae_hash(b) and len(sae_hash(a)) == 16
    with torch.no_grad():
        b.b_dec[0] += 1e-3
    assert sae_hash(a) != sae_hash(b)
    assert not hasattr(select, "_sae_sha") and not hasattr(sae_sets, "_sae_sha")  # no private copies
    assert sae_sets.sae_hash is sae_hash


def test_one_activation_scale():
    from ssae_ray.training.loop import (
        TrainConfig,
        TrainingError,
        act_scale,
        act_scale_for,
        estimate_act_scale,
    )

    x = torch.randn(100, 8) * 3
    ms = float(x.double().pow(2).sum(-1).mean())
    assert act_scale(8, ms) == pytest.approx(math.sqrt(8 / ms))
    assert estimate_act_scale(x) == act_scale(8, ms)
    assert float((estimate_act_scale(x) * x).pow(2).sum(-1).mean()) == pytest.approx(8, rel=1e-4)
    for bad in (0.0, math.nan, math.inf):
        with pytest.raises(TrainingError, match="cannot scale activations"):
            act_scale(8, bad)
    sae = make_random_sae(8, 16, "h")
    assert act_scale_for(TrainConfig(), sae, x) == estimate_act_scale(x)
    sae.cfg.metadata.act_scale = 0.5  # a recorded scale wins, so λ means what it meant in pretraining
    assert act_scale_for(TrainConfig(), sae, x) == 0.5
    assert act_scale_for(TrainConfig(scale_activations=False), sae, x) == 1.0


def test_dead_functions_are_gone():
    import ssae_ray.eval.metrics as metrics
    import ssae_ray.models as models
    import ssae_ray.shift.sae_sets as sae_sets
    import ssae_ray.training.cache as cache

    for mod, name in ((metrics, "pareto_front"), (metrics, "interp_at_l0"), (models, "hook_names"),
                      (cache, "cache_tokens"), (sae_sets, "save_sets")):  # fmt: skip
        assert not hasattr(mod, name), f"{mod.__name__}.{name}"
