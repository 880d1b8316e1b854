"""`build_dashboard`: the static site (and Neuronpedia export) of a set of SAEs from one scan.

<out>/index.html              feature index of every SAE (sortable, filterable; self-contained)
<out>/diff.html               GSAE -> SSAE diff (static)
<out>/f/<sae>/<feature>.html  a static page per feature that fires
<out>/neuronpedia/<model>/<layer>-<set>/...   the export (see `export.py`)
<out>/manifest.json           what was built, timings, sizes (written last)
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ssae_ray.collect import ActivationIndex, scan_many
from ssae_ray.config import Config
from ssae_ray.dashboard import data as D
from ssae_ray.dashboard import html as H
from ssae_ray.dashboard.export import NeuronpediaWriter
from ssae_ray.eval.features import log2_count_ratio
from ssae_ray.eval.logit_lens import FeatureLogits, feature_logits, lm_unembed
from ssae_ray.models import LM, TokenBatch, tokenize_docs
from ssae_ray.stages import atomic_dir, write_json_atomic

log = logging.getLogger("ssae_ray")


class SAESpec(NamedTuple):
    name: str
    """File-safe id, also auto-interp's name for it (`gsae`, `dense-tilt0-lam2`)."""
    label: str
    """Shown name, e.g. `dense (λ 2, L0 24.1)`."""
    sae: Any
    hook: str
    gsae: str | None
    """Name of the GSAE this SSAE was finetuned from (same hook); None for a GSAE."""


def in_domain_contexts(cfg: Config, lm: LM, texts: list[str]) -> TokenBatch:
    """The in-domain contexts both auto-interp and the dashboard read (`autointerp.max_contexts`)."""
    return tokenize_docs(lm.tokenizer, texts, cfg.model.context_len, cfg.autointerp.max_contexts)


def scan_contexts(
    cfg: Config, lm: LM, saes: dict[str, tuple[Any, str]], contexts: TokenBatch, timings: dict[str, float]
) -> dict[str, ActivationIndex]:
    """The one in-domain LM pass: enough top contexts, samples and windows for the dashboard and for
    auto-interp's examples (`run_autointerp(..., indexes=...)` takes the same indexes)."""
    from ssae_ray.autointerp.run import sample_size

    d, ai = cfg.dashboard, cfg.autointerp
    k_top, k_sample = max(d.n_top, ai.n_top), max(d.n_samples, sample_size(ai))
    return scan_many(lm, saes, contexts, k_top, k_sample, cfg.model.batch_size, ai.act_threshold, cfg.seed,
                     window=d.window, timings=timings)  # fmt: skip


def explanations_from(results: Path | None) -> dict[tuple[str, int], tuple[str | None, float | None]]:
    """(sae, feature) -> (explanation, F1) from auto-interp's `results.parquet`, when present."""
    if results is None or not results.is_file():
        return {}
    import pandas as pd

    df = pd.read_parquet(results, columns=["sae", "feature", "explanation", "f1"])
    out = {}
    for r in df.itertuples():
        f1 = None if r.f1 is None or (isinstance(r.f1, float) and math.isnan(r.f1)) else float(r.f1)
        out[(str(r.sae), int(r.feature))] = (r.explanation if isinstance(r.explanation, str) else None, f1)
    return out


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else float(f"{x:.4g}")


def build_dashboard(
    cfg: Config,
    lm: LM,
    specs: list[SAESpec],
    indexes: dict[str, ActivationIndex],
    general_texts: list[str],
    out: str | Path,
    explanations: dict[tuple[str, int], tuple[str | None, float | None]] | None = None,
    title: str = "SSAE feature dashboard",
    timings: dict[str, float] | None = None,
    key: str | None = None,
) -> Path:
    """Write the site for `specs` (each with its in-domain scan in `indexes`, made with `window > 0`)
    into `out`, atomically. `general_texts` are scanned once for each feature's general frequency."""
    d, t0 = cfg.dashboard, time.perf_counter()
    timings = {} if timings is None else timings
    explanations = explanations or {}
    targets = {s.name: (s.sae, s.hook) for s in specs}
    gen_ctx = tokenize_docs(lm.tokenizer, general_texts, cfg.model.context_len, d.general_contexts)
    if gen_ctx.input_ids.shape[0] == 0:
        raise ValueError("the dashboard got no general text to measure feature frequencies on; give the "
                         "corpus a general test split (corpus.general_test_path)")  # fmt: skip
    general = scan_many(lm, targets, gen_ctx, 1, 1, cfg.model.batch_size, cfg.autointerp.act_threshold,
                        cfg.seed, progress=False, timings=timings)  # fmt: skip
    t_tab = time.perf_counter()
    gen_mask = gen_ctx.attention_mask.bool().clone()
    gen_mask[:, 0] = False
    gen_counts = torch.bincount(gen_ctx.input_ids[gen_mask], minlength=lm.tokenizer.vocab_size + 1)
    n_gen = int(gen_mask.sum())
    w_u, norm = lm_unembed(lm)
    by_name = {s.name: s for s in specs}
    tables, logits = {}, {}
    for s in specs:
        ref = by_name[s.gsae].sae if s.gsae else s.sae
        tables[s.name] = D.feature_table(indexes[s.name], general[s.name], s.sae.W_dec, ref.W_dec, s.gsae is None,
                                         d.n_top)  # fmt: skip
        logits[s.name] = feature_logits(s.sae.W_dec, w_u, norm, d.logit_k, chunk=256)
    ids = {int(i) for i in next(iter(indexes.values())).contexts.input_ids.unique()}
    ids |= {int(i) for fl in logits.values() for i in torch.cat([fl.top_ids, fl.bottom_ids]).unique()}
    strings = D.token_strings(lm.tokenizer, ids)
    timings["tables"] = time.perf_counter() - t_tab
    with atomic_dir(Path(out)) as tmp:
        t1 = time.perf_counter()
        sae_data, pages = [], 0
        for s in specs:
            live = _feature_pages(cfg, s, indexes[s.name], tables[s.name], logits[s.name], strings, tmp,
                                  explanations, _meta(cfg, lm, s, indexes[s.name]))  # fmt: skip
            pages += len(live)
            sae_data.append(
                _index_entry(s, indexes, general, tables, logits[s.name], strings, explanations, live, d)
            )
        overview = _overview(specs, indexes, general)
        (tmp / "index.html").write_text(H.index_page(title, {"saes": sae_data}, overview))
        sections = [_diff_section(s, indexes, general, tables, logits[s.name], strings, gen_counts, n_gen,
                                  explanations, d) for s in specs if s.gsae]  # fmt: skip
        intro = (f"<p>Per SSAE: features whose decoder direction moved (cosine to the nearest GSAE decoder row "
                 f"below {d.new_cos:g}), least similar first, then those whose in-domain activation count rose most "
                 f"against the same GSAE latent (log2 (M+1)/(B+1), Fig. 17). Peak tokens show how often each "
                 f"occurs per million tokens of general text ({n_gen} scanned).</p>")  # fmt: skip
        (tmp / "diff.html").write_text(H.diff_page(f"{title}: GSAE → SSAE diff", sections, intro))
        timings["pages"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
        files = [p for p in tmp.rglob("*") if p.is_file()]
        write_json_atomic(tmp / "manifest.json", {
            "stage": "dashboard", "key": key, "saes": [{"name": s.name, "label": s.label, "hook": s.hook,
                                            "d_sae": int(s.sae.W_dec.shape[0])} for s in specs],
            "feature_pages": pages, "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "n_contexts": int(next(iter(indexes.values())).contexts.input_ids.shape[0]),
            "n_tokens": next(iter(indexes.values())).n_tokens, "general_tokens": n_gen,
            "seconds": {k: round(v, 2) for k, v in timings.items()},
        })  # fmt: skip
    return Path(out)


def _meta(cfg: Config, lm: LM, s: SAESpec, index: ActivationIndex) -> dict[str, Any]:
    return {"description": f"{cfg.name}: {s.label} at {s.hook}", "model": cfg.model.source,
            "d_model": lm.d_model, "n_layers": getattr(lm.model.config, "num_hidden_layers", 0),
            "n_prompts": int(index.contexts.input_ids.shape[0]), "n_ctx": cfg.model.context_len,
            "dataset": f"{cfg.corpus.kind} in-domain test split"}  # fmt: skip


def _feature_pages(
    cfg: Config, s: SAESpec, index: ActivationIndex, table: D.FeatureTable, fl: FeatureLogits,
    strings: dict[int, str], tmp: Path, explanations: dict, meta: dict[str, Any],
) -> list[int]:  # fmt: skip
    """Write the pages (and export records) of every feature; returns the features with a page."""
    d = cfg.dashboard
    model_id = d.neuronpedia_model or cfg.model.source
    writer = NeuronpediaWriter(tmp / "neuronpedia", model_id, f"{cfg.name}-{s.name}", s.hook, meta) \
        if d.export else None  # fmt: skip
    folder = tmp / "f" / s.name
    folder.mkdir(parents=True, exist_ok=True)
    live = []
    info = D.lookup(index)
    for f in range(int(s.sae.W_dec.shape[0])):
        top = D.top_contexts(index, f, d.n_top, info)
        bands = D.sample_bands(index, f, d.bands, d.per_band, {c.ctx for c in top}, info) if top else []
        hist = D.histogram(index, f)
        lg = (
            fl.top_ids[f].tolist(),
            fl.top_values[f].tolist(),
            fl.bottom_ids[f].tolist(),
            fl.bottom_values[f].tolist(),
        )
        mx = float(table.max_act[f])
        if d.feature_pages and top:
            expl, f1 = explanations.get((s.name, f), (None, None))
            facts = [
                ("in-domain frequency", f"{table.freq_in[f]:.4g}"), ("general frequency", f"{table.freq_gen[f]:.4g}"),
                ("log10 ratio", f"{table.log_ratio[f]:.3f}"), ("max activation", f"{mx:.4g}"),
                ("nearest other GSAE feature" if s.gsae is None else "nearest GSAE feature",
                 f"{int(table.near_idx[f])} (decoder cosine {table.near_cos[f]:.3f})"),
                ("explanation", H.esc(expl) if expl else "<span class='muted'>none</span>"),
                ("F1", f"{f1:.3f}" if f1 is not None else ""),
            ]  # fmt: skip
            (folder / f"{f}.html").write_text(
                H.feature_page(s.label, f, facts, top, bands, hist, lg, strings, mx)
            )
            live.append(f)
        if writer:
            recs = [_act_record(c, strings, -1.0, mx, -1.0) for c in top]
            recs += [_act_record(c, strings, b.lo, b.hi, b.share) for b in bands for c in b.contexts]
            writer.add(f, {
                "maxActApprox": mx, "frac_nonzero": float(table.freq_in[f]),
                "pos_str": [strings[i] for i in lg[0]], "pos_values": [round(v, 5) for v in lg[1]],
                "neg_str": [strings[i] for i in lg[2]], "neg_values": [round(v, 5) for v in lg[3]],
                "freq_hist_data_bar_heights": hist[2],
                "freq_hist_data_bar_values": [round(math.sqrt(a * b), 5) for a, b in zip(hist[0], hist[1])],
                "logits_hist_data_bar_heights": fl.hist_heights[f].tolist(),
                "logits_hist_data_bar_values": [round(v, 5) for v in fl.hist_centres[f].tolist()],
            }, recs)  # fmt: skip
    if writer:
        writer.flush()
    return live


def _act_record(c: D.Context, strings: dict[int, str], lo: float, hi: float, share: float) -> dict[str, Any]:
    return {"tokens": [strings[i] for i in c.ids], "values": [round(v, 5) for v in c.acts], "binMin": lo,
            "binMax": hi, "binContains": share, "dataIndex": str(c.doc), "dataSource": None}  # fmt: skip


def _status(s: SAESpec, cos: float, new_cos: float) -> str:
    return "gsae" if s.gsae is None else ("new" if cos < new_cos else "inherited")


def _index_entry(s, indexes, general, tables, fl, strings, explanations, live, d) -> dict[str, Any]:
    t, idx = tables[s.name], indexes[s.name]
    ratio = log2_count_ratio(idx.n_active_tok, indexes[s.gsae].n_active_tok) if s.gsae else None
    cols = ["feature", "freq_in", "freq_gen", "log10_ratio", "max_act", "status", "nearest_gsae", "cos_gsae",
            "log2_count_vs_gsae", "top_tokens", "logit_top", "explanation", "f1"]  # fmt: skip
    rows = []
    for f in range(len(t.freq_in)):
        expl, f1 = explanations.get((s.name, f), (None, None))
        rows.append([f, _r(t.freq_in[f]), _r(t.freq_gen[f]), _r(t.log_ratio[f]), _r(t.max_act[f]),
                     _status(s, t.near_cos[f], d.new_cos), int(t.near_idx[f]), _r(t.near_cos[f]),
                     None if ratio is None else _r(ratio[f]), " · ".join(strings.get(i, "?") for i in t.top_tokens[f]),
                     " · ".join(strings[int(i)] for i in fl.top_ids[f, :5]), expl, f1])  # fmt: skip
    meta = (
        f"{s.label} at {s.hook}: {len(rows)} features, {int((idx.n_active_tok > 0).sum())} fire on "
        f"{idx.n_tokens} in-domain test tokens; general text: {general[s.name].n_tokens} tokens."
    )
    return {"name": s.name, "label": s.label, "columns": cols, "rows": rows, "pages": live, "meta": meta}


def _overview(specs, indexes, general) -> str:
    rows = "".join(
        f"<tr><td>{H.esc(s.label)}</td><td>{H.esc(s.hook)}</td><td class='n'>{int(s.sae.W_dec.shape[0])}</td>"
        f"<td class='n'>{int((indexes[s.name].n_active_tok > 0).sum())}</td>"
        f"<td class='n'>{float(indexes[s.name].n_active_tok.sum()) / max(indexes[s.name].n_tokens, 1):.2f}</td></tr>"
        for s in specs
    )
    return ("<p><a href='diff.html'>GSAE → SSAE diff</a></p><table><tr><th>SAE</th><th>hook</th><th>features</th>"
            f"<th>alive in-domain</th><th>L0 in-domain</th></tr>{rows}</table>")  # fmt: skip


def _diff_section(s, indexes, general, tables, fl, strings, gen_counts, n_gen, explanations, d):
    t, idx, g_idx = tables[s.name], indexes[s.name], indexes[s.gsae]
    ratio = log2_count_ratio(idx.n_active_tok, g_idx.n_active_tok)
    order = D.rank_diff(t.near_cos, ratio, d.new_cos, d.diff_top)
    cols = ["rank", "feature", "status", "nearest GSAE (cos)", "in-domain freq SSAE / GSAE", "log2 count ratio",
            "general freq", "peak tokens (per M general tokens)", "logit lens top", "explanation"]  # fmt: skip
    rows = []
    for r, f in enumerate(order, 1):
        g_freq = g_idx.n_active_tok[f].item() / max(g_idx.n_tokens, 1)
        toks = ", ".join(f"<span class='tag'>{H.esc(strings.get(i, '?'))}</span>"
                         f"{1e6 * int(gen_counts[i]) / max(n_gen, 1):.0f}" for i in t.top_tokens[f])  # fmt: skip
        expl = explanations.get((s.name, f), (None, None))[0]
        link = f"<a href='f/{s.name}/{f}.html'>{f}</a>" if idx.n_active_ctx[f] > 0 else str(f)
        rows.append([str(r), link, _status(s, t.near_cos[f], d.new_cos), f"{int(t.near_idx[f])} ({t.near_cos[f]:.3f})",
                     f"{t.freq_in[f]:.4g} / {g_freq:.4g}", f"{ratio[f]:.2f}", f"{t.freq_gen[f]:.4g}", toks,
                     " ".join(f"<span class='tag'>{H.esc(strings[int(i)])}</span>" for i in fl.top_ids[f, :5]),
                     H.esc(expl or "")])  # fmt: skip
    return (f"{s.label} vs {s.gsae}", cols, rows)


def diff_order(
    specs: list[SAESpec], indexes: dict[str, ActivationIndex], new_cos: float, top: int
) -> dict[str, list[int]]:
    """The diff page's feature order of every SSAE (what `diff.html` lists)."""
    by = {s.name: s for s in specs}
    out = {}
    for s in specs:
        if s.gsae:
            cos, _ = D.nearest_rows(s.sae.W_dec, by[s.gsae].sae.W_dec)
            ratio = log2_count_ratio(indexes[s.name].n_active_tok, indexes[s.gsae].n_active_tok)
            out[s.name] = D.rank_diff(np.asarray(cos), ratio, new_cos, top)
    return out
