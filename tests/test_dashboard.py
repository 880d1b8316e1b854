"""The feature dashboard: the shared streaming collector, the site in real headless Chromium, the
GSAE -> SSAE diff on a planted feature, the Neuronpedia export against evaluation's activations,
escaping of corpus text, the sweep's SAE choice and MLflow logging."""

from __future__ import annotations

import copy
import csv
import gzip
import json
import re
import shutil

import numpy as np
import pytest
import torch
from autointerp_fixtures import HOOK, make_texts, sparse_sae, tiny_lm
from browser import Browser

from ssae_ray.collect import encode, feature_acts, scan_many
from ssae_ray.config import load_config
from ssae_ray.dashboard import SAESpec, build_dashboard, scan_contexts
from ssae_ray.dashboard import export as X
from ssae_ray.dashboard.build import diff_order, in_domain_contexts
from ssae_ray.dashboard.export import read_export
from ssae_ray.dashboard.stats import scan_stats
from ssae_ray.dashboard.sweep import matched_ssaes
from ssae_ray.eval.evaluate import prepare_test_set, token_positions
from ssae_ray.eval.logit_lens import feature_logits, final_norm_scale, lm_unembed
from ssae_ray.models import TokenBatch, capture, iter_batches, tokenize_docs
from ssae_ray.stages import StageError

P = 7  # the planted feature: its decoder row replaced in the SSAE, encoder firing on ~10% of tokens
EVIL = '<script>window.__pwned=1</script> & <<quantum>> >> "field" <img src=x onerror=window.__pwned=2>'


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("dash_lm"))


@pytest.fixture(scope="module")
def texts():
    return make_texts(40) + [f"the river {EVIL} market king", f"{EVIL} photon"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    work = tmp_path_factory.mktemp("dash_work")
    over = [f"workdir={work}", "model.context_len=32", "model.batch_size=16", "dashboard.window=16",
            "dashboard.n_top=5", "dashboard.n_samples=12", "dashboard.per_band=2", "dashboard.diff_top=10",
            "autointerp.n_top=5", "autointerp.n_predict=3"]  # fmt: skip
    return load_config("tiny", overrides=over)


@pytest.fixture(scope="module")
def specs(lm, texts):
    gsae = sparse_sae(lm, texts, seed=0)
    ssae = copy.deepcopy(gsae)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        row = torch.randn(lm.d_model, generator=g)
        ssae.W_dec[P] = row / row.norm()
        enc = torch.randn(lm.d_model, generator=g)
        ssae.W_enc[:, P] = enc
        batch = tokenize_docs(lm.tokenizer, texts[:16], 32)
        x = capture(lm, batch.input_ids, batch.attention_mask, [HOOK])[HOOK][:, 1:]
        pre = x[batch.attention_mask[:, 1:].bool()] @ enc
        ssae.b_enc[P] = -torch.quantile(pre, 0.9)
    return [SAESpec("gsae", "GSAE", gsae, HOOK, None), SAESpec("ssae", "dense (λ 1)", ssae, HOOK, "gsae")]


@pytest.fixture(scope="module")
def built(cfg, lm, texts, specs, tmp_path_factory):
    contexts = in_domain_contexts(cfg, lm, texts)
    timings: dict[str, float] = {}
    indexes = scan_contexts(cfg, lm, {s.name: (s.sae, s.hook) for s in specs}, contexts, timings)
    expl = {("ssae", P): (f"fires on {EVIL}", 0.75)}
    out = tmp_path_factory.mktemp("dash") / "site"
    build_dashboard(cfg, lm, specs, indexes, make_texts(30, seed=3), out, expl, "tiny <dashboard>", timings)
    return out, indexes


# ---------------------------------------------------------------------------------------------
# The collector


def test_collector_windows_histogram_and_prefix_property(lm, texts, specs):
    sae = specs[1].sae
    ctx = tokenize_docs(lm.tokenizer, texts, 32)
    big = scan_many(lm, {"s": (sae, HOOK)}, ctx, 6, 10, 8, progress=False, window=12)["s"]
    small = scan_many(lm, {"s": (sae, HOOK)}, ctx, 3, 4, 8, progress=False)["s"]
    head = big.head(3, 4)
    # The same top values (contexts may differ only among ties) and the same random sample.
    assert torch.equal(head.top_acts, small.top_acts) and torch.equal(head.sample_ctx, small.sample_ctx)
    fires = big.n_active_tok > 0  # the range of the dashboard's histograms
    assert torch.equal(big.max_act[fires], big.top_acts[fires, 0]) and (big.max_act[~fires] == 0).all()
    assert (big.min_act[fires] > 0).all() and (big.min_act[fires] <= big.max_act[fires]).all()
    f = P
    k = 0
    c, s = int(big.top_ctx[f, k]), int(big.top_win.start[f, k])
    one = TokenBatch(ctx.input_ids[c : c + 1], ctx.attention_mask[c : c + 1], ctx.doc_index[c : c + 1])
    acts = feature_acts(lm, sae, HOOK, one)[0, :, f]
    n = int(one.attention_mask.sum()) - s
    torch.testing.assert_close(big.top_win.acts[f, k, : min(n, 12)], acts[s : s + min(n, 12)])
    assert float(big.top_win.acts[f, k].max()) == pytest.approx(float(big.top_acts[f, k]))


def test_autointerp_reads_the_shared_scan_with_the_same_examples(cfg, lm, texts, specs, tmp_path):
    from ssae_ray.autointerp.run import build_jobs

    c = cfg.replace(autointerp={"max_features": 3, "diversity_sets": 1})
    saes = {s.name: s.sae for s in specs}
    shared = scan_contexts(
        c, lm, {n: (s, HOOK) for n, s in saes.items()}, in_domain_contexts(c, lm, texts), {}
    )
    assert shared["gsae"].top_acts.shape[1] == max(c.dashboard.n_top, c.autointerp.n_top)
    alone, _ = build_jobs(c, lm, saes, HOOK, texts, tmp_path / "a")
    both, _ = build_jobs(c, lm, saes, HOOK, texts, tmp_path / "b", indexes=shared)
    assert len(alone) == 6 and all(j.examples.status == "ok" and j.examples.top_texts for j in alone)
    assert [j.examples for j in alone] == [j.examples for j in both]


def test_feature_logits_top_bottom_and_vocabulary_histogram():
    from ssae_ray.eval.logit_lens import feature_logits, feature_top_tokens

    g = torch.Generator().manual_seed(0)
    w_dec, w_u, norm = (
        torch.randn(7, 16, generator=g),
        torch.randn(50, 16, generator=g),
        torch.nn.LayerNorm(16),
    )
    fl = feature_logits(w_dec, w_u, norm, k=5, bins=8, chunk=3)
    assert torch.equal(fl.top_ids, feature_top_tokens(w_dec, w_u, norm, 5))
    assert torch.equal(fl.bottom_ids, feature_top_tokens(-w_dec, w_u, norm, 5))  # the folding is linear
    assert (fl.top_values[:, :-1] >= fl.top_values[:, 1:]).all() and (
        fl.bottom_values[:, 0] < fl.top_values[:, 0]
    ).all()
    assert (fl.hist_heights.sum(1) == 50).all() and fl.hist_centres.shape == (7, 8)


# ---------------------------------------------------------------------------------------------
# Diff, export, escaping (no browser)


def test_diff_ranks_the_replaced_decoder_row_first(built, specs, cfg):
    out, indexes = built
    assert diff_order(specs, indexes, cfg.dashboard.new_cos, 10)["ssae"][0] == P
    html = (out / "diff.html").read_text()
    first = re.search(r"<tbody><tr><td>1</td><td>(.*?)</td>", html).group(1)
    assert first == f"<a href='f/ssae/{P}.html'>{P}</a>"


def test_export_one_record_per_feature_with_evaluate_values(built, specs, lm, texts):
    out, indexes = built
    sources = sorted((out / "neuronpedia").glob("*/*"))
    assert [p.parent.name for p in sources] == ["tiny", "tiny"]  # Neuronpedia's model id: model.source
    assert [p.name for p in sources] == ["1-tiny-gsae", "1-tiny-ssae"]
    for name in ("release", "model", "sourceset", "source"):
        assert (sources[1] / f"{name}.jsonl").read_text().count("\n") == 1
    feats, acts = read_export(sources[1])
    alive = (indexes["ssae"].max_act > 0).nonzero().flatten().tolist()
    assert [f["index"] for f in feats] == alive and P in alive
    feat = next(f for f in feats if f["index"] == P)
    assert len(feat["pos_str"]) == 10 and feat["pos_values"] == sorted(feat["pos_values"], reverse=True)
    mine = [a for a in acts if a["index"] == P]
    assert len({a["id"] for a in acts}) == len(acts)
    top = [a for a in mine if a["binMin"] == -1]
    assert top and top[0]["maxValue"] == feat["maxActApprox"]
    # The same feature and tokens through evaluation's test-set capture (an independent path).
    sae, vocab = specs[1].sae, lm.tokenizer.convert_ids_to_tokens
    for rec in top[:3]:
        ts = prepare_test_set(lm, "test", [texts[int(rec["dataIndex"])]], [HOOK], 32)
        x = capture(lm, ts.tokens.input_ids[:1], ts.tokens.attention_mask[:1], [HOOK])[HOOK][0]
        f = sae.encode(x).detach()[:, P] * token_positions(ts)[0]
        strs = [t.replace("Ġ", " ") for t in vocab(ts.tokens.input_ids[0].tolist())]
        n = len(rec["tokens"])
        s = next(i for i in range(len(strs) - n + 1) if strs[i : i + n] == rec["tokens"])
        np.testing.assert_allclose(rec["values"], f[s : s + n].float().numpy(), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The Neuronpedia export: SAEDashboard's definitions, Neuronpedia's importer on a real PostgreSQL


SWAPS = {"âĢĶ": "—", "âĢĵ": "–", "âĢľ": "“", "âĢĿ": "”", "âĢĺ": "‘", "âĢĻ": "’", "âĢĭ": " ", "Ġ": " ", "Ċ": "\n",
         "ĉ": "\t"}  # fmt: skip
"""SAEDashboard's `HTML_ANOMALIES` (`sae_dashboard/neuronpedia/neuronpedia_runner.py`)."""


def _title_float(x: float, fmt: str) -> float:
    """A number as it comes back out of SAEDashboard's sequence-group titles."""
    return float(format(x, fmt).rstrip("%")) / (100 if fmt.endswith("%") else 1)


@pytest.fixture(scope="module")
def planted(built, specs, lm, cfg):
    """The planted SSAE feature's activations on every scanned context, computed as the dashboard's
    pass computes them (same batches: bit-identical in fp32 and bf16), and its exported rows."""
    out, indexes = built
    ctx = indexes["ssae"].contexts
    sae, n, t = specs[1].sae, ctx.input_ids.shape[0], ctx.input_ids.shape[1]
    acts, xs = torch.zeros(n, t, 128), torch.zeros(n, t, lm.d_model)
    s = 0
    for b in iter_batches(ctx, cfg.model.batch_size):
        x = capture(lm, b.input_ids, b.attention_mask, [HOOK])[HOOK]
        acts[s : s + len(x), : x.shape[1]] = encode(sae, x, b.attention_mask)
        xs[s : s + len(x), : x.shape[1]] = x
        s += len(x)
    feats, rows = read_export(out / "neuronpedia" / "tiny" / "1-tiny-ssae")
    return acts, xs, ctx, feats, rows


def test_histograms_follow_saedashboards_definitions(planted, specs, lm):
    acts, _, ctx, feats, _ = planted
    feat = next(f for f in feats if f["index"] == P)
    data = acts[..., P][ctx.attention_mask.bool()]  # every real token; position 0 is 0 (masked, like BOS)
    nz = data[data > 0]
    # sae_vis_runner.py: the density title, and HistogramData.from_data (utils_fns.py) of the non-zero acts.
    assert feat["frac_nonzero"] == _title_float(nz.numel() / data.numel(), ".3%")
    lo, hi = nz.min().item(), nz.max().item()
    edges = torch.linspace(lo, hi, 51)
    assert feat["freq_hist_data_bar_heights"] == torch.histc(nz, bins=50).int().tolist()
    assert feat["freq_hist_data_bar_values"] == [
        round(x, 5) for x in (edges[:-1] + (hi - lo) / 50 / 2).tolist()
    ]
    # The logit histogram over the vocabulary, and the logit table, of the same direction.
    w_u, norm = lm_unembed(lm)
    scale, centre = final_norm_scale(norm)
    d = specs[1].sae.W_dec[P].detach().float()
    logits = ((d - d.mean()) * scale if centre else d * scale) @ w_u.T
    assert feat["logits_hist_data_bar_heights"] == torch.histc(logits, bins=50).int().tolist()
    l_lo, l_hi = logits.min().item(), logits.max().item()
    l_edges = torch.linspace(l_lo, l_hi, 51)
    np.testing.assert_allclose(feat["logits_hist_data_bar_values"], (l_edges[:-1] + (l_hi - l_lo) / 100).tolist(),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(feat["pos_values"], logits.topk(10).values.tolist(), atol=1e-5)
    # Neuron alignment: the decoder row's top 3 and their share of its L1 norm (data_parsing_fns.py).
    top3 = d.topk(3)
    assert feat["neuron_alignment_indices"] == top3.indices.tolist()
    np.testing.assert_allclose(
        feat["neuron_alignment_l1"], (top3.values.abs() / d.abs().sum()).tolist(), atol=1e-5
    )


def test_bins_and_tokens_follow_saedashboards_definitions(planted, lm):
    acts, _, ctx, feats, rows = planted
    feat = next(f for f in feats if f["index"] == P)
    mine = [r for r in rows if r["index"] == P]
    a = acts[..., P]
    valid = ctx.attention_mask.bool()
    data, shown = a[valid], valid.clone()
    shown[:, 0] = False  # SAEDashboard shows every position but the first
    vocab = {i: s for s, i in lm.tokenizer.get_vocab().items()}
    for k in list(vocab):
        for bad, good in SWAPS.items():
            vocab[k] = vocab[k].replace(bad, good)
    # Each row: the whole context but position 0, vocabulary strings, activations to 4 decimals.
    for r in mine:
        cands = [c for c in range(len(a)) if int(ctx.doc_index[c]) == int(r["dataIndex"])]
        c = next(c for c in cands if [vocab[i] for i in ctx.input_ids[c, 1 : len(r["tokens"]) + 1].tolist()]
                 == r["tokens"])  # fmt: skip
        n = int(ctx.attention_mask[c].sum())
        assert len(r["tokens"]) == n - 1 and r["values"] == [round(v, 4) for v in a[c, 1:n].tolist()]
        assert r["maxValue"] == max(r["values"]) and r["values"][r["maxValueTokenIndex"]] == r["maxValue"]
        r["_act"] = a[c, r["qualifyingTokenIndex"] + 1].item()
    assert any(t.startswith(" ") for r in mine for t in r["tokens"])  # `Ġ` swapped, as SAEDashboard does
    assert feat["maxActApprox"] == max(r["maxValue"] for r in mine)
    # Top activations: the 20 largest token activations (get_indices_dict; k_largest_indices).
    top = [r for r in mine if r["binMin"] == -1]
    best = a[shown & (a > 0)].topk(min(20, int((shown & (a > 0)).sum()))).values.tolist()
    assert [r["_act"] for r in top] == best
    assert {(r["binMax"], r["binContains"]) for r in top} == {(_title_float(data.max().item(), ".3f"), -1)}
    # Intervals of linspace(0, max, 6), highest first: the share of all tokens in each (both ends in),
    # and up to 5 of its tokens drawn from it.
    q = torch.linspace(0, data.max().item(), 6)
    groups = [r for r in mine if r["binMin"] != -1]
    want = []
    for i in range(4, -1, -1):
        lower, upper = q[i : i + 2].tolist()
        share = ((data >= lower) & (data <= upper)).float().mean().item()
        inside = [r for r in groups if r["binMin"] == _title_float(lower, ".3f")]
        assert len(inside) == min(5, int(((a >= lower) & (a <= upper) & shown).sum()))
        assert all(
            lower <= r["_act"] <= upper and r["binContains"] == _title_float(share, ".3%") for r in inside
        )
        assert all(r["binMax"] == _title_float(upper, ".3f") for r in inside)
        want += [_title_float(lower, ".3f")] * len(inside)
    assert [r["binMin"] for r in groups] == want  # in that order


def test_correlated_neurons_and_features(planted, built):
    acts, xs, ctx, feats, _ = planted
    feat = next(f for f in feats if f["index"] == P)
    keep = ctx.attention_mask.bool().clone()
    keep[:, 0] = False
    f, x = acts[keep].double().numpy(), xs[keep].double().numpy()
    # Pearson of the feature with each input dimension of the SAE (RollingCorrCoef, utils_fns.py).
    fc, xc = f[:, P] - f[:, P].mean(), x - x.mean(0)
    pearson = (fc @ xc) / np.sqrt((fc @ fc) * (xc * xc).sum(0))
    assert feat["correlated_neurons_indices"] == np.argsort(-pearson)[:3].tolist()
    np.testing.assert_allclose(feat["correlated_neurons_pearson"], np.sort(pearson)[::-1][:3], atol=1e-4)
    cos = (f[:, P] @ x) / np.sqrt((f[:, P] @ f[:, P]) * (x * x).sum(0))
    np.testing.assert_allclose(
        feat["correlated_neurons_l1"], cos[feat["correlated_neurons_indices"]], atol=1e-4
    )
    # ... and with the other features of its batch (the same 128-feature split as the files).
    batch = next(b for b in _batches(built) if P in b)
    g = f[:, batch] - f[:, batch].mean(0)
    p = (g[:, batch.index(P)] @ g) / np.sqrt((g[:, batch.index(P)] ** 2).sum() * (g * g).sum(0))
    p[batch.index(P)] = 0.0
    assert feat["correlated_features_indices"] == [batch[i] for i in np.argsort(-p)[:3]]
    np.testing.assert_allclose(feat["correlated_features_pearson"], np.sort(p)[::-1][:3], atol=1e-4)


def _batches(built) -> list[list[int]]:
    out, _ = built
    folder = out / "neuronpedia" / "tiny" / "1-tiny-ssae" / "features"
    return [[json.loads(x)["index"] for x in gzip.decompress(p.read_bytes()).splitlines()]
            for p in sorted(folder.glob("*.jsonl.gz"))]  # fmt: skip


def _stats(cfg, lm, sae, name, index):
    """One SAE through the dashboard's second pass (what `build_dashboard` runs for every SAE)."""
    stats = scan_stats(lm, {name: (sae, HOOK)}, {name: index}, cfg.dashboard.neuronpedia, cfg.model.batch_size,
                       progress=False)[name]  # fmt: skip
    w_u, norm = lm_unembed(lm)
    fl = feature_logits(sae.W_dec, w_u, norm, 10, cfg.dashboard.neuronpedia.hist_bins)
    return X.SAEInputs(stats, fl, sae.W_dec, index.contexts)


def _export_one(cfg, lm, x, name, out, created_at="2026-01-01T00:00:00.000Z"):
    """One SAE's source folder, written as `build_dashboard` writes it."""
    src = X.source_for(cfg, name, HOOK)._replace(created_at=created_at)
    vocab = X.vocab_strings(lm.tokenizer, int(lm.model.config.vocab_size))
    meta = {"description": name, "d_model": lm.d_model, "n_layers": 2, "n_prompts": 1, "n_ctx": 32}
    return X.write_source(out, cfg, src, x, meta, vocab)


def test_two_saes_exported_in_the_same_second_keep_distinct_ids(cfg, lm, texts, specs, tmp_path):
    """Identical SAEs, exported at the same instant under two names: no id in common (SAEDashboard's
    pid + second + counter ids collide, and the importer's ON CONFLICT DO NOTHING drops the second's);
    the same source exported again: the same ids (so a re-import adds nothing)."""
    ctx = in_domain_contexts(cfg, lm, texts)
    index = scan_many(lm, {"s": (specs[0].sae, HOOK)}, ctx, 1, 1, cfg.model.batch_size, progress=False)["s"]
    x = _stats(cfg, lm, specs[0].sae, "s", index)
    ids = {}
    for name, out in (("a", "x"), ("b", "x"), ("a", "y")):
        ids[name, out] = [r["id"] for r in read_export(_export_one(cfg, lm, x, name, tmp_path / out))[1]]
    assert len(ids["a", "x"]) == len(ids["b", "x"]) > 0 and not set(ids["a", "x"]) & set(ids["b", "x"])
    assert len(set(ids["a", "x"])) == len(ids["a", "x"]) and ids["a", "x"] == ids["a", "y"]
    assert all(len(i) == 25 and i[0] == "c" and i.isalnum() for i in ids["a", "x"])


def test_dead_features_are_skipped_and_no_batch_file_is_empty(cfg, lm, texts, specs, tmp_path):
    ctx = in_domain_contexts(cfg, lm, texts)
    c = cfg.replace(dashboard={"neuronpedia": {"features_per_batch": 32}})
    part, dead = copy.deepcopy(specs[0].sae), copy.deepcopy(specs[0].sae)
    with torch.no_grad():
        part.b_enc[:40] = -1e4  # the first 40 features never fire: a whole batch of them
        dead.b_enc[:] = -1e4
    saes = {"part": (part, HOOK), "dead": (dead, HOOK)}
    idx = scan_many(lm, saes, ctx, 1, 1, c.model.batch_size, progress=False)
    folder = _export_one(c, lm, _stats(c, lm, part, "part", idx["part"]), "part", tmp_path)
    feats, rows = read_export(folder)
    alive = [f for f in range(128) if idx["part"].max_act[f] > 0]
    assert (
        min(alive) >= 40 and [f["index"] for f in feats] == alive and {r["index"] for r in rows} == set(alive)
    )
    n = -(-len(alive) // 32)
    for sub in ("features", "activations"):
        files = sorted((folder / sub).glob("*.jsonl.gz"))
        assert [p.name for p in files] == sorted(f"batch-{i}.jsonl.gz" for i in range(n))
        assert all(gzip.decompress(p.read_bytes()).count(b"\n") >= 1 for p in files)
    skipped = json.loads((folder / "skipped_indexes.json").read_text())["skipped_indexes"]
    assert skipped == [f for f in range(128) if f not in alive]
    none = _export_one(c, lm, _stats(c, lm, dead, "dead", idx["dead"]), "dead", tmp_path)
    assert not list(none.rglob("*.jsonl.gz"))
    assert len(json.loads((none / "skipped_indexes.json").read_text())["skipped_indexes"]) == 128


@pytest.fixture(scope="module")
def neuronpedia_db():
    """A fresh PostgreSQL server per module; each test makes its own database in it."""
    from ssae_ray.testing import postgres

    if postgres.missing():
        pytest.skip(postgres.missing())
    with postgres.PostgresServer() as server:
        yield server


def test_export_imports_into_neuronpedia(built, neuronpedia_db):
    """Neuronpedia's importer, step for step, into its schema on a real PostgreSQL: every exported row
    lands, the counts equal the export's, and a second import adds nothing."""
    from ssae_ray.testing.neuronpedia import DEFAULT_USER, counts, fresh_database, import_source

    out, _ = built
    sources = sorted((out / "neuronpedia").glob("*/*"))
    feats = [f for s in sources for f in read_export(s)[0]]
    acts = [a for s in sources for a in read_export(s)[1]]
    with fresh_database(neuronpedia_db, "sweep") as conn:
        for s in sources:
            import_source(conn, s)
        got = counts(conn)
        assert got == {"User": 1, "Model": 1, "SourceRelease": 1, "SourceSet": 2, "Source": 2,
                       "Neuron": len(feats), "Activation": len(acts)}  # fmt: skip
        neurons = conn.execute('SELECT "modelId", "layer", "index", "frac_nonzero", "freq_hist_data_bar_heights", '
                               '"correlated_features_indices", "creatorId" FROM "Neuron"').fetchall()  # fmt: skip
        want = {(f["modelId"], f["layer"], str(f["index"])): f for f in feats}
        assert {n[:3] for n in neurons} == set(want)
        for n in neurons:
            f = want[n[:3]]
            assert (n[3], n[4], n[5], n[6]) == (f["frac_nonzero"], f["freq_hist_data_bar_heights"],
                                                f["correlated_features_indices"], DEFAULT_USER)  # fmt: skip
        rows = conn.execute('SELECT "id", "tokens", "values", "binMin", "binContains", "qualifyingTokenIndex", '
                            '"creatorId" FROM "Activation"').fetchall()  # fmt: skip
        by_id = {a["id"]: a for a in acts}
        assert {r[0] for r in rows} == set(by_id)
        for r in rows:
            a = by_id[r[0]]
            assert list(r[1:]) == [a["tokens"], a["values"], a["binMin"], a["binContains"],
                                   a["qualifyingTokenIndex"], DEFAULT_USER]  # fmt: skip
        for s in sources:
            import_source(conn, s)
        assert counts(conn) == got


def test_neuronpedias_schema_refuses_what_its_importer_would(built, neuronpedia_db, tmp_path):
    """The database has teeth: a creatorId that is no user (the old export's `ssae-ray`) aborts the
    import at the model, and an empty batch file at its first line, as in Neuronpedia."""
    import psycopg

    from ssae_ray.testing.neuronpedia import fresh_database, import_source

    out, _ = built
    src = sorted((out / "neuronpedia").glob("*/*"))[1]
    bad = tmp_path / "tiny" / src.name
    shutil.copytree(src, bad)
    model = json.loads((bad / "model.jsonl").read_text())
    (bad / "model.jsonl").write_text(json.dumps({**model, "creatorId": "ssae-ray"}) + "\n")
    with fresh_database(neuronpedia_db, "refuse") as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="Model_creatorId_fkey"):
            import_source(conn, bad)
        (bad / "model.jsonl").write_text(json.dumps(model) + "\n")
        (bad / "activations" / "batch-9.jsonl.gz").write_bytes(gzip.compress(b""))
        with pytest.raises(json.JSONDecodeError):
            import_source(conn, bad)


def test_neuronpedia_ids_come_from_the_config_with_neuronpedias_defaults(cfg):
    """The model id as Neuronpedia names it (not slugged), the source set from the config name, the
    creator Neuronpedia's default user; a wrong value or the old key is a clear error."""
    from ssae_ray.config import ConfigError

    assert X.default_model_id("EleutherAI/pythia-70m-deduped") == "pythia-70m-deduped"
    assert X.default_model_id("google/gemma-2-2b") == "gemma-2-2b"
    src = X.source_for(cfg, "dense-tilt0.5-lam2-seed0", HOOK)
    assert (src.model_id, src.set_name, src.source_id, src.release, src.creator_id) == (
        "tiny",
        "tiny-dense-tilt0-5-lam2-seed0",
        "1-tiny-dense-tilt0-5-lam2-seed0",
        "tiny",
        "clkht01d40000jv08hvalcvly",
    )
    mine = cfg.replace(
        dashboard={"neuronpedia": {"model": "llama3.1-8b", "set_name": "res-ssae", "release": "r1"}}
    )
    src = X.source_for(mine, "gsae", "blocks.12.hook_resid_post")
    assert (src.model_id, src.source_id, src.release) == ("llama3.1-8b", "12-res-ssae-gsae", "r1")
    with pytest.raises(ConfigError, match="dashboard.neuronpedia.model"):
        load_config("tiny", overrides=["dashboard.neuronpedia_model=gemma-2-2b"])
    with pytest.raises(ConfigError, match="dashboard.neuronpedia.set_name"):
        load_config("tiny", overrides=["dashboard.neuronpedia.set_name=Res SSAE"])


def test_corpus_text_is_escaped_never_injected(built):
    out, _ = built
    pages = [p.read_text() for p in (out / "f").rglob("*.html")] + [
        (out / n).read_text() for n in ("index.html", "diff.html")
    ]
    assert any("&lt;&lt;" in p for p in pages) and any("&lt;script&gt;" in p for p in pages)
    for p in pages:
        assert "<script>window" not in p and "<img" not in p and "<<" not in p and ">>" not in p
    index = (out / "index.html").read_text()
    data = index[index.index('id="dash-data">') :].split("</script>")[0]
    assert "<" not in data[len('id="dash-data">') :]


# ---------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()


def test_site_in_headless_chromium(built, browser, specs, lm, texts):
    out, indexes = built
    browser.goto((out / "index.html").as_uri())
    assert browser.js("document.querySelectorAll('#rows tr').length") == 128
    assert browser.js("document.title") == "tiny <dashboard>"
    # Sort by max activation (descending, then ascending on a second click).
    col = browser.js("[...document.querySelectorAll('#head th')].findIndex(t => t.dataset.col === 'max_act')")
    read = f"[...document.querySelectorAll('#rows tr')].map(r => parseFloat(r.children[{col}].textContent))"
    browser.js(f"document.querySelectorAll('#head th')[{col}].click()")
    vals = browser.js(read)
    assert vals == sorted(vals, reverse=True) and vals[0] == pytest.approx(
        float(indexes["gsae"].top_acts[:, 0].max()), rel=1e-2
    )
    browser.js(f"document.querySelectorAll('#head th')[{col}].click()")
    assert browser.js(read) == sorted(vals)
    # The SSAE's table, filtered to new features: the planted one is there.
    browser.js("var s = document.getElementById('sae'); s.value = '1'; s.onchange();")
    browser.js("var t = document.getElementById('status'); t.value = 'new'; t.oninput();")
    new = browser.js("[...document.querySelectorAll('#rows tr')].map(r => r.children[0].textContent)")
    assert str(P) in new and len(new) < 128
    assert browser.js("document.body.textContent.includes('fires on <script>window.__pwned=1')")
    assert (
        browser.js("typeof window.__pwned") == "undefined"
        and browser.js("document.querySelectorAll('img').length") == 0
    )
    # The planted feature's page: tokens shaded in the order of their activations.
    browser.goto((out / "f" / "ssae" / f"{P}.html").as_uri())
    spans = browser.js("""[...document.querySelector('.ctx').querySelectorAll('b')].map(e => [
        parseFloat(e.title),
        (m => m.length > 3 ? parseFloat(m[3]) : 1)(getComputedStyle(e).backgroundColor.match(/[0-9.]+/g))])""")
    doc, start = browser.js(
        "[document.querySelector('.ctx').dataset.doc, document.querySelector('.ctx').dataset.start]"
    )
    assert len(spans) >= 2
    ctx = tokenize_docs(lm.tokenizer, [texts[int(doc)]], 32)
    true = feature_acts(lm, specs[1].sae, HOOK, ctx)[0, :, P]
    on = true[int(start) : int(start) + 16]
    np.testing.assert_allclose(sorted(a for a, _ in spans), sorted(on[on > 0].tolist()), rtol=1e-3)
    by_act = [a for _, a in sorted(spans, key=lambda s: -s[0])]
    assert by_act == sorted(by_act, reverse=True) and by_act[0] == pytest.approx(1.0, abs=1e-3)
    for page in ("diff.html", f"f/gsae/{int(indexes['gsae'].top_acts[:, 0].argmax())}.html"):
        browser.goto((out / page).as_uri())
    assert browser.errors == []


def test_index_works_as_mlflow_shows_it(built, browser, tmp_path):
    """MLflow's artifact viewer (ShowArtifactHtmlView in the installed UI bundle) loads an HTML
    artifact as a blob URL into an iframe with sandbox="allow-scripts": an opaque origin, no storage."""
    out, _ = built
    html = json.dumps((out / "index.html").read_text()).replace("</", "<\\/")
    (tmp_path / "viewer.html").write_text(
        '<!doctype html><iframe id="v" sandbox="allow-scripts" width="1200" height="800"></iframe><script>'
        f"document.getElementById('v').src = URL.createObjectURL(new Blob([{html}], {{type: 'text/html'}}));"
        "</script>"
    )
    browser.errors.clear()
    browser.goto((tmp_path / "viewer.html").as_uri())
    rows = "document.querySelectorAll('#rows tr').length"
    assert browser.frame_js(rows, wait_for=rows) == 128
    assert browser.errors == []


# ---------------------------------------------------------------------------------------------
# The sweep's SAEs and MLflow


def test_matched_ssaes_pick_the_lambda_nearest_the_matched_l0(tmp_path, cfg):
    sweep = tmp_path / "sweep"
    (sweep / "eval").mkdir(parents=True)
    with pytest.raises(StageError, match="run `ssae-ray eval`"):
        matched_ssaes(cfg, sweep, HOOK)
    rows = [
        ("dense", 0.0, 0.1, 40.0),
        ("dense", 0.0, 10.0, 24.0),
        ("random", 0.0, 0.1, 26.0),
        ("random", 0.0, 10.0, 5.0),
    ]
    with open(sweep / "sweep_trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "lam", "tilt", "seed", "step", "best_for_lam", "best_path"])
        for s, t, lam, _ in rows:
            w.writerow([s, lam, t, 0, 20, 1, str(tmp_path / f"{s}{lam}")])
    with open(sweep / "eval" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "tilt", "lam", "seed", "test", "hook", "l0"])
        for s, t, lam, l0 in rows:
            w.writerow([s, t, lam, 0, "test", HOOK, l0])
            w.writerow([s, t, lam, 0, "ood", HOOK, 25.0])
    got = matched_ssaes(cfg.replace(sweep={"match_l0": 25.0}), sweep, HOOK)
    assert [(n, p.parent.name) for n, _, p in got] == [
        ("dense-tilt0-lam10-seed0", "dense10.0"),
        ("random-tilt0-lam0.1-seed0", "random0.1"),
    ]


def test_dashboard_logged_to_the_parent_run(built, tmp_path):
    from mlflow.tracking import MlflowClient

    from ssae_ray.dashboard import log_dashboard

    out, _ = built
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("dash", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    log_dashboard(uri, run, out)
    arts = {a.path for a in client.list_artifacts(run, "dashboard")}
    assert {"dashboard/index.html", "dashboard/diff.html", "dashboard/f", "dashboard/neuronpedia"} <= arts
    page = client.download_artifacts(run, "dashboard/index.html", str(tmp_path))
    assert open(page).read() == (out / "index.html").read_text()
