"""TERM vs ERM comparison statistics (ssae_ray/term.py) on synthetic per-token measurements; the
whole job runs end to end on the tiny model below, on the Hub's TinyStories in
tests/test_paper_presets.py (slow), and as `--preset term-local`."""

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


def test_term_job_on_the_tiny_model_end_to_end(tmp_path):
    """The fast variant of the TERM-vs-ERM job (`jobs/tinystories_term.py`; the Hub run is slow, in
    tests/test_paper_presets.py): ERM and TERM GSAEs of width 32 pretrained from scratch on the tiny
    model, compared with CIs and the paired difference, the figures, and auto-interp of both."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "w"
    args = [f"workdir={work}", "sae.hooks=[blocks.1.hook_resid_post]", "sae.d_sae=32", "sae.source=pretrain",
            "train.pretrain_steps=40", "train.pretrain_tokens=4000", "train.batch_tokens=64",
            "sweep.tilts=[0,1.0e9]", "sweep.match_l0=8", "train.l0_band=[7.5,8.5]", "eval.test_tokens=500",
            "eval.bootstrap=50", "autointerp.enabled=true", "autointerp.backend=offline",
            "autointerp.max_features=8"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(root / "jobs" / "tinystories_term.py"), "--preset", "tiny", *args],
                          capture_output=True, text=True, timeout=600, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = next(work.glob("term/*/report.md"))
    m = json.loads((report.parent / "metrics.json").read_text())
    assert (
        m["hook"] == "blocks.1.hook_resid_post"
        and m["d_sae"] == 32
        and m["arms"] == {"ERM": 0.0, "TERM": 1e9}
    )
    stats = {r["stat"]: r for r in m["rows"]}
    assert {"error_mean", "error_p99", "error_max", "l0", "ce", "coverage", "tail_coverage"} <= set(stats)
    for r in stats.values():
        for arm in ("ERM", "TERM", "diff"):
            if r["stat"] != "error_max":  # a max has no percentile-bootstrap CI around it
                assert r[f"{arm}_lo"] <= r[arm] <= r[f"{arm}_hi"], (r["stat"], arm, r)
        assert r["diff"] == pytest.approx(r["TERM"] - r["ERM"], abs=1e-9), r[
            "stat"
        ]  # paired on the same tokens
    det = m["detection"]
    assert det["thresholds"] == list(THRESHOLDS)
    for arm in ("ERM", "TERM"):  # the share of tokens detected falls as the threshold rises
        assert len(det[arm]) == len(THRESHOLDS) and all(a >= b for a, b in zip(det[arm], det[arm][1:])), det
    for f in ("fig22_error_distribution.png", "fig23_detection.png", "fig3_error_by_frequency.png",
              "autointerp/report.md", "term_vs_erm.csv"):  # fmt: skip
        assert (report.parent / f).stat().st_size > 0, f
    assert "TERM" in report.read_text() and "ERM" in report.read_text()
