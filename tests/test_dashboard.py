"""The feature dashboard: the shared streaming collector, the site in real headless Chromium, the
GSAE -> SSAE diff on a planted feature, the Neuronpedia export against evaluation's activations,
escaping of corpus text, the sweep's SAE choice and MLflow logging."""

from __future__ import annotations

import copy
import csv
import json
import re

import numpy as np
import pytest
import torch
from autointerp_fixtures import HOOK, make_texts, sparse_sae, tiny_lm
from browser import Browser

from ssae_ray.collect import feature_acts, scan_many
from ssae_ray.config import load_config
from ssae_ray.dashboard import SAESpec, build_dashboard, scan_contexts
from ssae_ray.dashboard.build import diff_order, in_domain_contexts
from ssae_ray.dashboard.export import read_export
from ssae_ray.dashboard.sweep import matched_ssaes
from ssae_ray.eval.evaluate import prepare_test_set, token_positions
from ssae_ray.models import TokenBatch, capture, tokenize_docs
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
        f = sae.encode(ts.acts[HOOK][0]).detach()[:, P] * token_positions(ts)[0]
        strs = [t.replace("Ġ", " ") for t in vocab(ts.tokens.input_ids[0].tolist())]
        n = len(rec["tokens"])
        s = next(i for i in range(len(strs) - n + 1) if strs[i : i + n] == rec["tokens"])
        np.testing.assert_allclose(rec["values"], f[s : s + n].float().numpy(), rtol=1e-2, atol=1e-3)


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
