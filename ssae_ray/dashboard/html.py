"""HTML of the dashboard pages. Corpus text is always escaped (`esc`), data for the index page is
embedded as JSON with `<`, `>` and `&` written as `\\u003c`... (`json_script`), and the index's
script writes cells with `textContent`, so no corpus string is ever parsed as markup."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from ssae_ray.dashboard.data import Band, Context
from ssae_ray.dashboard.static import CSS, INDEX_JS


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def json_script(obj: Any, element_id: str) -> str:
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}{js}</body></html>\n")  # fmt: skip


def index_page(title: str, data: dict[str, Any], overview: str) -> str:
    """The feature index: one sortable, filterable table per SAE (rendered from embedded JSON)."""
    controls = (
        '<div class="controls"><label>SAE <select id="sae"></select></label>'
        '<label>min in-domain freq <input id="minfreq" type="number" step="any" value="0" size="8"></label>'
        '<label>status <select id="status"><option value="all">all</option><option value="new">new</option>'
        '<option value="inherited">inherited</option><option value="gsae">gsae</option></select></label>'
        '<label>explained <select id="explained"><option value="all">all</option><option value="yes">yes</option>'
        '<option value="no">no</option></select></label><label>search <input id="q" size="16"></label>'
        '<span id="count" class="muted"></span></div><p id="meta" class="muted"></p>'
    )
    body = (f"<h1>{esc(title)}</h1>{overview}<h2>Feature index</h2>{controls}"
            f'<table><thead id="head"></thead><tbody id="rows"></tbody></table>{json_script(data, "dash-data")}')  # fmt: skip
    return page(title, body, INDEX_JS)


def alpha(act: float, top: float) -> float:
    """A token's shading: its activation as a share of the feature's max, in [0, 1]."""
    return 0.0 if top <= 0 else max(0.0, min(1.0, act / top))


def context_html(ctx: Context, strings: dict[int, str], top: float) -> str:
    """One context: activating tokens are `<b>` shaded by activation / feature max (`--a`; the
    activation in `title`), the others plain escaped text."""
    parts = []
    for t, a in zip(ctx.ids, ctx.acts):
        s = esc(strings[t])
        parts.append(f'<b style="--a:{alpha(a, top):.3f}" title="{a:.4g}">{s}</b>' if a > 0 else s)
    return (f'<div class="ctx" data-doc="{ctx.doc}" data-start="{ctx.start}" title="doc {ctx.doc}, max '
            f'{ctx.max_act:.4g}">{"".join(parts)}</div>')  # fmt: skip


def hist_svg(lows: Sequence[float], highs: Sequence[float], counts: Sequence[int]) -> str:
    if not counts:
        return '<p class="muted">never fires on the scanned tokens</p>'
    w, h, n, peak = 360, 90, len(counts), max(counts)
    bw = w / n
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - h * c / peak:.1f}" width="{max(bw - 1, 1):.1f}" height="{h * c / peak:.1f}"'
        f' fill="#e0643c"><title>[{lo:.3g}, {hi:.3g}): {c}</title></rect>'
        for i, (lo, hi, c) in enumerate(zip(lows, highs, counts))
    )
    axis = (f'<text x="0" y="{h + 14}" font-size="11">{lows[0]:.3g}</text>'
            f'<text x="{w}" y="{h + 14}" font-size="11" text-anchor="end">{highs[-1]:.3g}</text>')  # fmt: skip
    return f'<svg width="{w}" height="{h + 18}" role="img">{bars}{axis}</svg><div class="muted">activation (log bins)</div>'


def tokens_table(strings: dict[int, str], ids: Sequence[int], values: Sequence[float]) -> str:
    rows = "".join(f'<tr><td><span class="tag">{esc(strings[i])}</span></td><td class="n">{v:.3f}</td></tr>'
                   for i, v in zip(ids, values))  # fmt: skip
    return f"<table>{rows}</table>"


def feature_page(
    sae_label: str,
    f: int,
    facts: list[tuple[str, str]],
    top: list[Context],
    bands: list[Band],
    hist: tuple[list[float], list[float], list[int]],
    logits: tuple[list[int], list[float], list[int], list[float]],
    strings: dict[int, str],
    max_act: float,
) -> str:
    """A static page (no script) for one feature."""
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in facts)
    tops = "".join(context_html(c, strings, max_act) for c in top)
    band_html = "".join(
        f"<h3>activation {b.lo:.3g} to {b.hi:.3g} <span class='muted'>({100 * b.share:.0f}% of sampled "
        f"activating contexts)</span></h3>" + ("".join(context_html(c, strings, max_act) for c in b.contexts)
                                              or "<p class='muted'>none sampled</p>")
        for b in bands
    )  # fmt: skip
    top_ids, top_v, bot_ids, bot_v = logits
    body = (
        f'<p><a href="../../index.html">index</a> · <a href="../../diff.html">GSAE → SSAE diff</a></p>'
        f"<h1>{esc(sae_label)} · feature {f}</h1><div class='grid'><table>{fact_rows}</table>"
        f"<div><h2>Activation histogram</h2>{hist_svg(*hist)}</div>"
        f"<div><h2>Logit lens: top</h2>{tokens_table(strings, top_ids, top_v)}</div>"
        f"<div><h2>bottom</h2>{tokens_table(strings, bot_ids, bot_v)}</div></div>"
        f"<h2>Top activating contexts</h2>{tops}"
        f"<h2>Samples by activation band</h2><p class='muted'>Drawn uniformly from the contexts where the feature "
        f"fires (the upper half is what the paper's appendix N.6 samples explanations from).</p>{band_html}"
    )
    return page(f"{sae_label} feature {f}", body)


def diff_page(title: str, sections: list[tuple[str, list[str], list[list[str]]]], intro: str) -> str:
    """Static tables; cells are pre-escaped HTML."""
    out = [f"<p><a href='index.html'>index</a></p><h1>{esc(title)}</h1>{intro}"]
    for heading, cols, rows in sections:
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) or (
            f"<tr><td colspan='{len(cols)}' class='muted'>no feature's decoder moved and none fires more often "
            "than its GSAE latent on the in-domain test set</td></tr>"
        )
        out.append(
            f"<h2>{esc(heading)}</h2><table class='diff'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
    return page(title, "".join(out))
