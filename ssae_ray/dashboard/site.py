"""The site's parts from the computed records: feature pages (and their Neuronpedia records), the
index page's table per SAE, the overview and the diff tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from ssae_ray.collect import ActivationIndex
from ssae_ray.config import Config, DashboardConfig
from ssae_ray.dashboard import data as D
from ssae_ray.dashboard import html as H
from ssae_ray.dashboard.data import SAESpec
from ssae_ray.dashboard.stats import FeatureStats
from ssae_ray.eval.features import log2_count_ratio
from ssae_ray.eval.logit_lens import FeatureLogits

Explanations = dict[tuple[str, int], tuple[str | None, float | None]]
"""(SAE name, feature) -> (auto-interp explanation, F1)."""


class SAEView(NamedTuple):
    """Everything computed about one SAE."""

    spec: SAESpec
    index: ActivationIndex
    """The in-domain scan."""
    general: ActivationIndex
    """The general-text scan (counts only)."""
    table: D.FeatureTable
    logits: FeatureLogits
    gsae_index: ActivationIndex | None
    """The in-domain scan of the GSAE it was finetuned from (None for a GSAE)."""
    stats: FeatureStats
    """SAEDashboard's statistics from the second in-domain pass (histogram, export data)."""


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else float(f"{x:.4g}")


def feature_pages(
    cfg: Config,
    v: SAEView,
    strings: dict[int, str],
    tmp: Path,
    explanations: Explanations,
) -> list[int]:
    """Write the page of every feature that fires; returns the features with a page."""
    d, s, index, table, fl = cfg.dashboard, v.spec, v.index, v.table, v.logits
    folder = tmp / "f" / s.name
    folder.mkdir(parents=True, exist_ok=True)
    live: list[int] = []
    if not d.feature_pages:
        return live
    info = D.lookup(index)
    at = {f: i for i, f in enumerate(v.stats.features)}
    for f in range(int(s.sae.W_dec.shape[0])):
        top = D.top_contexts(index, f, d.n_top, info)
        if not top:
            continue
        bands = D.sample_bands(index, f, d.bands, d.per_band, {c.ctx for c in top}, info)
        hist = D.histogram(v.stats, at[f]) if f in at else ([], [], [])
        lg = (
            fl.top_ids[f].tolist(),
            fl.top_values[f].tolist(),
            fl.bottom_ids[f].tolist(),
            fl.bottom_values[f].tolist(),
        )
        mx = float(table.max_act[f])
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
    return live


def _status(s: SAESpec, cos: float, new_cos: float) -> str:
    return "gsae" if s.gsae is None else ("new" if cos < new_cos else "inherited")


def index_entry(
    v: SAEView, strings: dict[int, str], explanations: Explanations, live: list[int], new_cos: float
) -> dict[str, Any]:
    """One SAE's table for the index page (columns + rows; rendered by its script)."""
    s, t, idx, fl = v.spec, v.table, v.index, v.logits
    ratio = (
        log2_count_ratio(idx.n_active_tok, v.gsae_index.n_active_tok) if v.gsae_index is not None else None
    )
    cols = ["feature", "freq_in", "freq_gen", "log10_ratio", "max_act", "status", "nearest_gsae", "cos_gsae",
            "log2_count_vs_gsae", "top_tokens", "logit_top", "explanation", "f1"]  # fmt: skip
    rows = []
    for f in range(len(t.freq_in)):
        expl, f1 = explanations.get((s.name, f), (None, None))
        rows.append([f, _r(t.freq_in[f]), _r(t.freq_gen[f]), _r(t.log_ratio[f]), _r(t.max_act[f]),
                     _status(s, t.near_cos[f], new_cos), int(t.near_idx[f]), _r(t.near_cos[f]),
                     None if ratio is None else _r(ratio[f]), " · ".join(strings.get(i, "?") for i in t.top_tokens[f]),
                     " · ".join(strings[int(i)] for i in fl.top_ids[f, :5]), expl, f1])  # fmt: skip
    meta = (
        f"{s.label} at {s.hook}: {len(rows)} features, {int((idx.n_active_tok > 0).sum())} fire on "
        f"{idx.n_tokens} in-domain test tokens; general text: {v.general.n_tokens} tokens."
    )
    return {"name": s.name, "label": s.label, "columns": cols, "rows": rows, "pages": live, "meta": meta}


def overview(views: list[SAEView]) -> str:
    rows = "".join(
        f"<tr><td>{H.esc(v.spec.label)}</td><td>{H.esc(v.spec.hook)}</td><td class='n'>{len(v.table.freq_in)}</td>"
        f"<td class='n'>{int((v.index.n_active_tok > 0).sum())}</td>"
        f"<td class='n'>{float(v.index.n_active_tok.sum()) / max(v.index.n_tokens, 1):.2f}</td></tr>"
        for v in views
    )
    return ("<p><a href='diff.html'>GSAE → SSAE diff</a></p><table><tr><th>SAE</th><th>hook</th><th>features</th>"
            f"<th>alive in-domain</th><th>L0 in-domain</th></tr>{rows}</table>")  # fmt: skip


def diff_section(
    v: SAEView, strings: dict[int, str], gen_counts: Tensor, n_gen: int, explanations: Explanations,
    d: DashboardConfig,
) -> tuple[str, list[str], list[list[str]]]:  # fmt: skip
    """One SSAE's table of the diff page (cells are escaped HTML)."""
    s, t, idx, g_idx, fl = v.spec, v.table, v.index, v.gsae_index, v.logits
    assert g_idx is not None
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
