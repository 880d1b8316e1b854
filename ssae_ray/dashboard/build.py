"""`build_dashboard`: the static site (and Neuronpedia export) of a set of SAEs from one scan.

<out>/index.html              feature index of every SAE (sortable, filterable; self-contained)
<out>/diff.html               GSAE -> SSAE diff (static)
<out>/f/<sae>/<feature>.html  a static page per feature that fires
<out>/neuronpedia/<model>/<layer>-<set>/...   the Neuronpedia export (see `export.py`)
<out>/manifest.json           what was built, timings, sizes (written last)
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssae_ray.collect import ActivationIndex, scan_many
from ssae_ray.config import Config
from ssae_ray.dashboard import data as D
from ssae_ray.dashboard import export as X
from ssae_ray.dashboard import html as H
from ssae_ray.dashboard import site
from ssae_ray.dashboard.data import SAESpec
from ssae_ray.dashboard.site import Explanations, SAEView
from ssae_ray.dashboard.stats import scan_stats
from ssae_ray.eval.features import log2_count_ratio
from ssae_ray.eval.logit_lens import feature_logits, lm_unembed
from ssae_ray.models import LM, TokenBatch, tokenize_docs
from ssae_ray.stages import atomic_dir, write_json_atomic

log = logging.getLogger("ssae_ray")


def in_domain_contexts(cfg: Config, lm: LM, texts: list[str]) -> TokenBatch:
    """The in-domain contexts both auto-interp and the dashboard read (`autointerp.max_contexts`)."""
    return tokenize_docs(
        lm.tokenizer,
        texts,
        cfg.model.context_len,
        cfg.autointerp.max_contexts,
        prepend_bos=cfg.model.prepend_bos,
    )


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


def explanations_from(results: Path | None) -> Explanations:
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


def build_dashboard(
    cfg: Config,
    lm: LM,
    specs: list[SAESpec],
    indexes: dict[str, ActivationIndex],
    general_texts: list[str],
    out: str | Path,
    explanations: Explanations | None = None,
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
    gen_ctx = tokenize_docs(
        lm.tokenizer,
        general_texts,
        cfg.model.context_len,
        d.general_contexts,
        prepend_bos=cfg.model.prepend_bos,
    )
    if gen_ctx.input_ids.shape[0] == 0:
        raise ValueError("the dashboard got no general text to measure feature frequencies on; give the "
                         "corpus a general test split (corpus.general_test_path)")  # fmt: skip
    general = scan_many(lm, targets, gen_ctx, 1, 1, cfg.model.batch_size, cfg.autointerp.act_threshold,
                        cfg.seed, progress=False, timings=timings)  # fmt: skip
    t_stats = time.perf_counter()
    stats = scan_stats(lm, targets, {s.name: indexes[s.name] for s in specs}, d.neuronpedia, cfg.model.batch_size,
                       cfg.seed, correlations=d.export and d.neuronpedia.correlations)  # fmt: skip
    timings["stats"] = time.perf_counter() - t_stats
    t_tab = time.perf_counter()
    gen_mask = gen_ctx.attention_mask.bool().clone()
    gen_mask[:, 0] = False
    gen_counts = torch.bincount(gen_ctx.input_ids[gen_mask], minlength=lm.tokenizer.vocab_size + 1)
    n_gen = int(gen_mask.sum())
    w_u, norm = lm_unembed(lm)
    by_name = {s.name: s for s in specs}
    views = []
    for s in specs:
        ref = by_name[s.gsae].sae if s.gsae else s.sae
        table = D.feature_table(
            indexes[s.name], general[s.name], s.sae.W_dec, ref.W_dec, s.gsae is None, d.n_top
        )
        fl = feature_logits(s.sae.W_dec, w_u, norm, d.logit_k, d.neuronpedia.hist_bins, chunk=256)
        gsae_index = indexes[s.gsae] if s.gsae else None
        views.append(SAEView(s, indexes[s.name], general[s.name], table, fl, gsae_index, stats[s.name]))
    ids = {int(i) for i in next(iter(indexes.values())).contexts.input_ids.unique()}
    ids |= {int(i) for v in views for i in torch.cat([v.logits.top_ids, v.logits.bottom_ids]).unique()}
    strings = D.token_strings(lm.tokenizer, ids)
    timings["tables"] = time.perf_counter() - t_tab
    with atomic_dir(Path(out)) as tmp:
        t1 = time.perf_counter()
        sae_data, pages = [], 0
        for v in views:
            live = site.feature_pages(cfg, v, strings, tmp, explanations)
            pages += len(live)
            sae_data.append(site.index_entry(v, strings, explanations, live, d.new_cos))
        t_export = time.perf_counter()
        exported = _export(cfg, lm, views, tmp / "neuronpedia") if d.export else []
        timings["export"] = time.perf_counter() - t_export
        overview = site.overview(views)
        (tmp / "index.html").write_text(H.index_page(title, {"saes": sae_data}, overview))
        sections = [
            site.diff_section(v, strings, gen_counts, n_gen, explanations, d) for v in views if v.spec.gsae
        ]
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
            "feature_pages": pages, "neuronpedia": exported, "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "n_contexts": int(next(iter(indexes.values())).contexts.input_ids.shape[0]),
            "n_tokens": next(iter(indexes.values())).n_tokens, "general_tokens": n_gen,
            "seconds": {k: round(v, 2) for k, v in timings.items()},
        })  # fmt: skip
    return Path(out)


def _export(cfg: Config, lm: LM, views: list[SAEView], out: Path) -> list[dict[str, Any]]:
    """Every SAE's Neuronpedia source folder (`export.py`); what each holds, for the manifest."""
    vocab = X.vocab_strings(lm.tokenizer, int(lm.model.config.vocab_size))
    done = []
    for v in views:
        src = X.source_for(cfg, v.spec.name, v.spec.hook)
        x = X.SAEInputs(v.stats, v.logits, v.spec.sae.W_dec, v.index.contexts)
        folder = X.write_source(out, cfg, src, x, _meta(cfg, lm, v.spec, v.index), vocab)
        done.append({"sae": v.spec.name, "path": str(folder.relative_to(out.parent)), "features": len(v.stats.features),
                     "skipped": int(v.spec.sae.W_dec.shape[0]) - len(v.stats.features)})  # fmt: skip
    return done


def _meta(cfg: Config, lm: LM, s: SAESpec, index: ActivationIndex) -> dict[str, Any]:
    return {"description": f"{cfg.name}: {s.label} at {s.hook}", "d_model": lm.d_model,
            "n_layers": getattr(lm.model.config, "num_hidden_layers", 0),
            "n_prompts": int(index.contexts.input_ids.shape[0]), "n_ctx": cfg.model.context_len}  # fmt: skip


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
