"""TERM vs ERM comparison statistics (ssae_ray/term.py) on synthetic per-token measurements; the
whole job runs end to end in tests/test_paper_presets.py (slow) and as `--preset term-local`."""

from __future__ import annotations

import numpy as np
import pytest

from ssae_ray.config import load_config
from ssae_ray.term import THRESHOLDS, TermError, Tokens, arms, bootstrap, compare, detection


def _tokens(sse, seed=0, n_docs=20):
    rng = np.random.default_rng(seed)
    n = len(sse)
    return Tokens(np.asarray(sse, float), rng.integers(10, 20, n).astype(float), rng.random(n) * 2,
                  rng.random(n) + 3, np.arange(n) % n_docs, rng.integers(0, 50, n))  # fmt: skip


def test_arms_need_a_tilt():
    assert arms(load_config("tinystories-term")) == {"ERM": 0.0, "TERM": 1e9}
    with pytest.raises(TermError, match="no tilt > 0"):
        arms(load_config("tiny", overrides=["sweep.tilts=[0]"]))


def test_bootstrap_ci_brackets_and_collapses():
    doc = np.repeat(np.arange(10), 5)
    v, lo, hi = bootstrap(lambda i: 3.0, doc, 50, 0.95, 0)
    assert v == lo == hi == 3.0
    x = np.random.default_rng(1).normal(size=50)
    v, lo, hi = bootstrap(lambda i: float(x[i].mean()), doc, 200, 0.95, 0)
    assert lo < v < hi and hi - lo < 1.5


def test_compare_finds_a_lighter_tail_and_pairs_the_difference():
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, 2000)
    erm = _tokens(np.where(np.arange(2000) % 50 == 0, base * 20, base))  # a heavy tail on some tokens
    term = erm._replace(sse=np.minimum(erm.sse, 4.0) * 1.05)  # max error capped, mean a little higher
    covered = {"ERM": np.zeros(50, bool), "TERM": np.zeros(50, bool)}
    covered["TERM"][40:] = True  # TERM covers the rare types only
    rows = {r["stat"]: r for r in compare({"ERM": erm, "TERM": term}, covered, 100, 0.95, 0)}
    assert rows["error_max"]["diff"] < 0 and rows["error_max"]["diff_hi"] < 0
    assert rows["error_p99"]["diff"] < 0
    assert rows["l0"]["diff"] == rows["l0"]["diff_lo"] == rows["l0"]["diff_hi"] == 0  # same tokens, same L0
    assert rows["coverage"]["ERM"] == 0 and rows["coverage"]["TERM"] > 0
    assert rows["tail_coverage"]["TERM"] > rows["tail_coverage"]["ERM"] == 0
    for stat in ("coverage", "tail_coverage", "l0", "ce", "error_mean", "error_p99"):  # CIs bracket the value
        assert rows[stat]["TERM_lo"] <= rows[stat]["TERM"] <= rows[stat]["TERM_hi"], stat
    for r in rows.values():
        assert r["diff_lo"] <= r["diff"] <= r["diff_hi"]


def test_detection_share_per_threshold():
    t = _tokens(np.ones(4))._replace(max_act=np.array([0.0, 0.05, 0.5, 5.0]))
    det = detection({"ERM": t}, THRESHOLDS)["ERM"]
    assert det[0] == 0.75 and det[THRESHOLDS.index(0.1)] == 0.5 and det[THRESHOLDS.index(3.0)] == 0.25
    assert det == sorted(det, reverse=True)
