"""Decoder movement, the random-corpus control criterion and the tail-concept test with bootstrap
CIs, on planted data; then the whole evaluation writes them into the report (tiny LM)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssae_ray.eval.logit_lens import tail_coverage
from ssae_ray.eval.metrics import CI, EvalError
from ssae_ray.eval.movement import control_check, decoder_movement
from ssae_ray.eval.report import tail_findings
from ssae_ray.eval.tail import doc_feature_counts, doc_token_counts, tail_test

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: see conftest


# --------------------------------------------------------------------------------------------- movement


def test_decoder_movement_on_planted_rows():
    g = torch.Generator().manual_seed(0)
    gsae = torch.nn.functional.normalize(torch.randn(200, 64, generator=g), dim=1)
    ssae = gsae * 3.0  # row norms do not matter
    ssae[:20] = torch.randn(20, 64, generator=g)  # 20 rows moved to new random directions
    ssae[20:30] = gsae[100:110] * 2.0  # 10 rows moved onto other GSAE latents' directions
    ssae[30:40] = gsae[30:40] + 0.05 * torch.randn(10, 64, generator=g)  # 10 rows nudged (cos ~0.99)
    m = decoder_movement(ssae, gsae, threshold=0.9)
    assert m.n == 200 and m.moved == 30 and m.unmatched == 20  # moved, and of those: new directions
    assert m.median_cos == pytest.approx(1.0, abs=1e-6) and m.p01_cos < 0.5
    assert m.moved_share == pytest.approx(0.15)
    same = decoder_movement(gsae, gsae)
    assert (same.moved, same.unmatched, same.median_cos) == (0, 0, pytest.approx(1.0))
    with pytest.raises(ValueError, match="same width"):
        decoder_movement(gsae[:100], gsae)


def test_control_check_states_the_criterion():
    good = SimpleNamespace(median_cos=0.97, moved_share=0.02)
    retrained = SimpleNamespace(median_cos=0.64, moved_share=0.9)
    r = control_check(CI(0.01, -0.02, 0.04, 0.95), good, 0.05, 0.95, CI(-0.2, -0.3, -0.1, 0.95))
    assert r["met"] is True and r["ce_equivalent"] is True and r["dense_beats"] is True and "note" not in r
    # the measurement: the random finetune lowered CE by ~0.8 nats and kept a median cosine of 0.74
    r = control_check(CI(-0.83, -0.9, -0.76, 0.95), retrained, 0.05, 0.95, CI(-0.1, -0.25, 0.05, 0.95))
    assert r["met"] is False and r["ce_ok"] is False and r["cos_ok"] is False and r["dense_beats"] is False
    r = control_check(CI(0.03, -0.01, 0.07, 0.95), good, 0.05, 0.95)
    assert r["met"] is True and r["ce_equivalent"] is False and r["dense_beats"] is None
    r = control_check(None, good, 0.05, 0.95)
    assert r["met"] is None and "no CE change" in r["note"]


# --------------------------------------------------------------------------------------------- tail test


def planted_corpus(n_docs: int = 60, seed: int = 0):
    """Zipf-like documents over types 0..99 (type 0 most frequent), 32 tokens each, as contexts."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 101) ** 1.1
    ids = rng.choice(100, size=(n_docs, 32), p=p / p.sum())
    return torch.from_numpy(ids), torch.ones(n_docs, 32, dtype=torch.long), torch.arange(n_docs)


def test_tail_test_finds_the_planted_tail_sae():
    ids, mask, doc = planted_corpus()
    types, counts = doc_token_counts(ids, mask, doc)
    assert counts.shape == (60, len(types)) and counts.sum() == 60 * 32
    total = counts.sum(0)
    order = types[np.argsort(-total, kind="stable")]
    head, rare = order[: len(order) // 2], order[len(order) // 2 :]
    tops = {
        "GSAE": torch.from_numpy(head[:, None]),  # covers exactly the frequent half
        "same": torch.from_numpy(head[:, None]),
        "tail": torch.from_numpy(np.concatenate([head, rare])[:, None]),  # covers every type
    }
    rows = {r["sae"]: r for r in tail_test(types, counts, tops, n_boot=300, seed=1)}
    assert rows["GSAE"]["tail_coverage"] == 0.0 and rows["GSAE"]["coverage"] == pytest.approx(0.5, abs=0.01)
    assert rows["tail"]["tail_coverage"] == 1.0 and rows["tail"]["coverage"] == 1.0
    assert rows["tail"]["d_tail_coverage_lo"] > 0.5  # the CI excludes 0 by far
    assert rows["same"]["d_tail_coverage"] == 0.0 and rows["same"]["d_tail_coverage_hi"] == 0.0
    for r in rows.values():
        assert r["coverage_lo"] <= r["coverage"] <= r["coverage_hi"]
    # the full-set coverage is logit_lens.tail_coverage's
    vocab_counts = np.zeros(100)
    vocab_counts[types] = total
    assert rows["GSAE"]["coverage"] == pytest.approx(tail_coverage(tops["GSAE"], vocab_counts).covered_share)
    found = tail_findings([{**r, "hook": "h", "l0": 10.0} for r in rows.values()])
    assert any("tail (L0 10.0) covers **more**" in s for s in found)
    assert any("same (L0 10.0) is **not distinguishable**" in s for s in found)
    with pytest.raises(EvalError, match="tail_fraction"):
        tail_test(types, counts, tops, tail_fraction=0.0)


def test_activation_count_cis_on_planted_features():
    ids, mask, doc = planted_corpus(n_docs=40)
    types, counts = doc_token_counts(ids, mask, doc)
    rng = np.random.default_rng(0)
    narrow = (rng.random((40, 50)) < 0.02).astype(np.float32)  # rarely firing latents
    broad = narrow + (rng.random((40, 50)) < 0.5) * 3  # every latent fires on about half the docs
    tops = {"GSAE": torch.zeros(50, 1, dtype=torch.long), "broad": torch.zeros(50, 1, dtype=torch.long)}
    rows = {r["sae"]: r for r in tail_test(types, counts, tops, {"GSAE": narrow, "broad": broad}, n_boot=300)}
    assert rows["broad"]["active_latents"] == 1.0 and rows["GSAE"]["active_latents"] < 0.7
    assert rows["broad"]["d_median_count_lo"] > 0 and rows["broad"]["median_count"] > 20
    # doc_feature_counts sums firing tokens per document
    sae = SimpleNamespace(
        cfg=SimpleNamespace(d_sae=3),
        W_dec=torch.zeros(3, 2),
        encode=lambda x: torch.relu(x @ torch.tensor([[1.0, 0, -1], [0, 1, 0]])),
    )
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    out = doc_feature_counts(sae, x, torch.tensor([0, 0, 1, 1]), 2)
    assert out.tolist() == [[1, 1, 0], [1, 1, 1]]


# --------------------------------------------------------------------------------------------- the report


def test_evaluation_report_has_movement_control_and_tail_sections(tiny_cfg, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from ssae_ray.eval import plots

    def no_png(fig, path):  # the figures are tested elsewhere; rendering them here costs ~15 s under load
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_save", no_png)
    from ssae_ray.eval.evaluate import prepare_test_set
    from ssae_ray.eval.runner import evaluate_sweep
    from ssae_ray.models import load_lm
    from ssae_ray.saes import make_random_sae, save_sae
    from ssae_ray.sweep import Trial

    h = "blocks.1.hook_resid_post"
    cfg = tiny_cfg.replace(sae={"hooks": [h]}, sweep={"strategies": ["dense", "random"], "l0_range": [20.0, 60.0],
                                                      "match_l0": 40.0}, eval={"bootstrap": 50})  # fmt: skip
    lm = load_lm(cfg.model, tmp_path / "models")
    gsae = make_random_sae(lm.d_model, 64, h, seed=0)
    texts = [
        f"the quantum field {i} of the electron and a photon in a box near the river" * 3 for i in range(12)
    ]
    test = prepare_test_set(lm, "test", texts, [h], cfg.model.context_len, 300)
    best = {}
    for strategy, shift in (("random", 0.0), ("dense", 0.3)):
        for lam, bias in ((1.0, -0.5), (2.0, 0.5)):  # two points per curve: low and high L0
            sae = make_random_sae(lm.d_model, 64, h, seed=0)
            with torch.no_grad():
                sae.b_enc.fill_(bias)
                sae.W_dec[:8] = torch.nn.functional.normalize(
                    sae.W_dec[:8] + shift * torch.randn(8, lm.d_model), dim=1
                )
            path = tmp_path / "trials" / f"{strategy}{lam}"
            save_sae(sae, path / h)
            best[Trial(strategy, lam, 0.0, 0)] = SimpleNamespace(
                path=str(path), val={"val_l0": 0.0 if bias < 0 else 1e9}
            )
    sweep = SimpleNamespace(best=best, folder=tmp_path / "trials", parent_run_id="-", tracking_uri="-")
    out = evaluate_sweep(cfg, lm, sweep, {h: gsae}, {"test": test}, tmp_path / "eval")
    report = (out.folder / "report.md").read_text()
    for section in ("## Decoder movement from the GSAE", "## Does the random-corpus control change the GSAE little?",
                    "## Tail concepts, with confidence intervals"):  # fmt: skip
        assert section in report, section
    import csv

    moves = list(csv.DictReader(open(out.folder / "movement.csv")))
    assert len(moves) == 4
    for r in moves:  # 8 of 64 rows were perturbed in the dense SSAEs, none in the random ones
        assert int(r["moved"]) == (8 if r["strategy"] == "dense" else 0), r
    tail = list(csv.DictReader(open(out.folder / "tail.csv")))
    assert {r["sae"] for r in tail} == {"GSAE", "dense", "random"}
    assert all(float(r["coverage_lo"]) <= float(r["coverage"]) <= float(r["coverage_hi"]) for r in tail)
    # dense is also compared with the random-corpus finetune (the paper's Fig. 2 comparison), paired
    by = {r["sae"]: r for r in tail}
    dense_vr = float(by["dense"]["vr_tail_coverage"])
    assert math.isclose(
        dense_vr, float(by["dense"]["tail_coverage"]) - float(by["random"]["tail_coverage"]), abs_tol=1e-5
    )
    assert float(by["dense"]["vr_tail_coverage_lo"]) <= dense_vr <= float(by["dense"]["vr_tail_coverage_hi"])
    assert by["random"].get("vr_tail_coverage", "") == "" and by["GSAE"].get("vr_tail_coverage", "") != ""
    assert "Finding (tail coverage vs the random-corpus finetune" in report
    control = list(csv.DictReader(open(out.folder / "control.csv")))
    assert len(control) == 1 and control[0]["hook"] == h
    assert math.isclose(float(control[0]["median_cos"]), 1.0, abs_tol=1e-6)
    # every SSAE against the GSAE at the GSAE's own L0: the random one is the control's own Δ
    vs = {r["strategy"]: r for r in csv.DictReader(open(out.folder / "vs_gsae.csv"))}
    assert set(vs) == {"dense", "random"} and "## Against the GSAE at its own L0" in report
    for r in vs.values():
        d, lo, hi = float(r["d_ce"]), float(r["d_ce_lo"]), float(r["d_ce_hi"])
        assert lo <= d <= hi and math.isclose(
            float(r["ce"]), float(r["gsae_ce"]) + d, abs_tol=1e-4
        )  # CSV: 6 digits
    assert math.isclose(float(vs["random"]["d_ce"]), float(control[0]["d_ce"]), rel_tol=1e-5)
    assert float(vs["dense"]["d_ce"]) != float(vs["random"]["d_ce"])


def test_every_ci_brackets_its_value_on_a_long_tailed_test_set():
    """A resample of test documents holds fewer distinct (rare) types and fewer firing latents than
    the test set, so a document bootstrap put the whole CI of coverage above the value (on `local`:
    0.371 [0.377, 0.412]). The type / latent bootstrap brackets every value, differences included."""
    rng = np.random.default_rng(3)
    n_docs, vocab = 80, 3000
    p = 1.0 / np.arange(1, vocab + 1) ** 1.05  # long tail: most types occur once or twice
    ids = torch.from_numpy(rng.choice(vocab, size=(n_docs, 48), p=p / p.sum()))
    types, counts = doc_token_counts(ids, torch.ones_like(ids), torch.arange(n_docs))
    order = types[np.argsort(-counts.sum(0), kind="stable")]
    tops = {  # GSAE covers a third of the frequent types; the SSAE also some rare ones
        "GSAE": torch.from_numpy(order[: len(order) // 3 : 2][:, None]),
        "SSAE": torch.from_numpy(
            np.concatenate([order[: len(order) // 3 : 2], order[-len(order) // 4 :: 3]])[:, None]
        ),
    }
    fires = rng.random((n_docs, 200)) < np.geomspace(0.2, 0.002, 200)  # many latents fire on 1-2 docs
    feats = {
        "GSAE": fires.astype(np.float32),
        "SSAE": (fires | (rng.random((n_docs, 200)) < 0.004)).astype(np.float32),
    }
    rows = tail_test(types, counts, tops, feats, n_boot=400, seed=0)
    checked = 0
    for r in rows:
        for s in ("coverage", "tail_coverage", "active_latents", "median_count", "d_coverage", "d_tail_coverage",
                  "d_active_latents", "d_median_count"):  # fmt: skip
            if s in r:
                assert r[f"{s}_lo"] <= r[s] <= r[f"{s}_hi"], (r["sae"], s, r[s], r[f"{s}_lo"], r[f"{s}_hi"])
                checked += 1
    assert checked == 12
    ssae = next(r for r in rows if r["sae"] == "SSAE")
    assert ssae["d_tail_coverage_lo"] > 0  # the planted rare coverage is found
