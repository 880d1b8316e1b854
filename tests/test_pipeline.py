"""Pipeline wiring that the end-to-end job tests do not pin down."""

from __future__ import annotations

from pathlib import Path


def test_validation_set_has_its_own_size_and_keys_the_sweep(tiny_cfg):
    from ssae_ray.pipeline import _lm, _test_sets, stage_corpus, sweep_key

    cfg = tiny_cfg.replace(eval={"test_tokens": 300, "val_tokens": 120})
    lm = _lm(cfg)
    sets = _test_sets(cfg, lm, stage_corpus(cfg, lm), ("val", "test"))
    ctx = cfg.model.context_len
    n = {k: int(s.tokens.attention_mask.sum()) for k, s in sets.items()}
    assert 120 <= n["val"] < 120 + ctx  # the contexts holding the first 120 tokens
    assert 300 <= n["test"] < 300 + ctx and n["val"] < n["test"]

    def key(**ev):
        return sweep_key(cfg.replace(eval=ev), Path("gsaes"), {"dense": Path("cache")})

    # validation size changes the trials' scores, so it keys the sweep; None means test_tokens
    assert key(val_tokens=120) != key(val_tokens=200)
    assert key(val_tokens=None, test_tokens=300) == key(val_tokens=300, test_tokens=300)
