"""What the dashboard shows, computed from the scans: plain records, no HTML.

Per SAE a `FeatureTable` (one entry per feature: frequencies in-domain and on general text, their
log-ratio, max activation, top tokens, logit lens, nearest GSAE feature) and per feature its
contexts (`Context`: token ids and activations of a window), drawn from the top-K and the
uniform sample of `collect.scan_many`. `rank_diff` orders an SSAE's features for the GSAE -> SSAE
diff.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ssae_ray.collect import ActivationIndex, Windows
from ssae_ray.dashboard.stats import FeatureStats


class SAESpec(NamedTuple):
    name: str
    """File-safe id, also auto-interp's name for it (`gsae`, `dense-tilt0-lam2-seed0`)."""
    label: str
    """Shown name, e.g. `dense (λ 2, L0 24.1)`."""
    sae: Any
    hook: str
    gsae: str | None
    """Name of the GSAE this SSAE was finetuned from (same hook); None for a GSAE."""


class Context(NamedTuple):
    ctx: int
    """Context index in the scanned token set."""
    doc: int
    """Index of the document (test-set row) it was cut from."""
    start: int
    """Position of the window's first token in the context."""
    ids: list[int]
    acts: list[float]
    """The feature's activation on each window token."""
    max_act: float


class Band(NamedTuple):
    lo: float
    hi: float
    share: float
    """Share of the sampled activating contexts whose max activation lies in [lo, hi]."""
    contexts: list[Context]


class FeatureTable(NamedTuple):
    freq_in: np.ndarray
    """[F] share of in-domain test tokens on which the feature fires."""
    freq_gen: np.ndarray
    """[F] the same on general text."""
    log_ratio: np.ndarray
    """[F] log10 of in-domain over general frequency (add-one smoothed counts)."""
    max_act: np.ndarray
    top_tokens: list[list[int]]
    """Per feature the most common token ids at the peak of its top contexts."""
    near_idx: np.ndarray
    """[F] nearest GSAE feature by decoder cosine (for the GSAE itself: the nearest other feature)."""
    near_cos: np.ndarray


def token_strings(tokenizer: Any, ids: set[int]) -> dict[int, str]:
    """Each id decoded alone (what a token shows as in a context)."""
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


@torch.no_grad()
def nearest_rows(
    w: Tensor, ref: Tensor, exclude_self: bool = False, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """(cosine, index) of the row of `ref` nearest each row of `w` (decoder directions)."""
    w = w.detach().float()
    ref = ref.detach().float().to(w.device)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ref = ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos, idx = [], []
    for s in range(0, w.shape[0], chunk):
        c = w[s : s + chunk] @ ref.T
        if exclude_self:
            r = torch.arange(s, min(s + chunk, w.shape[0]), device=w.device)
            c[r - s, r] = -2.0
        v, i = c.max(1)
        cos.append(v.cpu())
        idx.append(i.cpu())
    return torch.cat(cos), torch.cat(idx)


class Lookup(NamedTuple):
    """Per-context facts of a scan as Python lists (read once per feature page, so no per-element
    tensor access)."""

    lengths: list[int]
    docs: list[int]
    ids: list[list[int]]


def lookup(index: ActivationIndex) -> Lookup:
    c = index.contexts
    return Lookup(c.attention_mask.sum(1).tolist(), c.doc_index.tolist(), c.input_ids.tolist())


def _window_contexts(win: Windows, ctx: Tensor, acts: Tensor, f: int, n: int, info: Lookup) -> list[Context]:
    out = []
    rows, starts, maxes = ctx[f, :n].tolist(), win.start[f, :n].tolist(), acts[f, :n].tolist()
    wacts = win.acts[f, :n].tolist()
    for c, s, m, a in zip(rows, starts, maxes, wacts):
        if c < 0:
            continue
        k = min(len(a), info.lengths[c] - s)
        out.append(Context(c, info.docs[c], s, info.ids[c][s : s + k], a[:k], m))
    return out


def top_contexts(index: ActivationIndex, f: int, n: int, info: Lookup) -> list[Context]:
    """The feature's `n` top-activating contexts (windows), strongest first."""
    assert index.top_win is not None, "scan with window > 0"
    return _window_contexts(index.top_win, index.top_ctx, index.top_acts, f, n, info)


def sample_bands(
    index: ActivationIndex, f: int, bands: int, per_band: int, skip: set[int], info: Lookup
) -> list[Band]:
    """The uniform sample of activating contexts grouped by max activation into `bands` equal
    intervals of [0, feature max] (highest first), `per_band` shown each; contexts in `skip` (the
    top ones already shown) are left out of the shown ones but counted in the shares."""
    assert index.sample_win is not None and index.sample_acts is not None, "scan with window > 0"
    top = float(index.top_acts[f, 0])
    ctxs = _window_contexts(
        index.sample_win, index.sample_ctx, index.sample_acts, f, index.sample_ctx.shape[1], info
    )
    if not ctxs or top <= 0:
        return []
    out = []
    for j in range(bands):
        hi, lo = top * (1 - j / bands), top * (1 - (j + 1) / bands)
        inside = [c for c in ctxs if (lo < c.max_act <= hi) or (j == bands - 1 and c.max_act <= hi)]
        shown = [c for c in inside if c.ctx not in skip][:per_band]
        out.append(Band(lo, hi, len(inside) / len(ctxs), shown))
    return out


def histogram(stats: FeatureStats, i: int) -> tuple[list[float], list[float], list[int]]:
    """(bin lows, bin highs, counts) of the activation histogram of the `i`-th feature of `stats`
    (SAEDashboard's: equal-width bins over [min, max] of its non-zero activations)."""
    lo, hi = float(stats.lo[i]), float(stats.hi[i])
    if lo == hi:  # histc's range for a single value
        lo, hi = lo - 1, hi + 1
    edges = torch.linspace(lo, hi, stats.hist.shape[1] + 1).tolist()
    return edges[:-1], edges[1:], stats.hist[i].tolist()


def peak_tokens(index: ActivationIndex, n_top: int, most: int = 5) -> list[list[int]]:
    """Per feature the token ids most often at the peak of its top contexts."""
    assert index.top_win is not None
    ids = index.contexts.input_ids
    win = index.top_win
    peak = win.start + win.acts.argmax(-1)  # [F, K]
    out = []
    for f in range(index.top_ctx.shape[0]):
        c = index.top_ctx[f, :n_top]
        ok = c >= 0
        toks = ids[c[ok], peak[f, :n_top][ok]].tolist()
        out.append([t for t, _ in Counter(toks).most_common(most)])
    return out


def log_ratio(n_in: Tensor, tok_in: int, n_gen: Tensor, tok_gen: int) -> np.ndarray:
    """log10 of in-domain over general firing frequency, counts add-one smoothed."""
    p_in = (n_in.double().numpy() + 1) / (tok_in + 1)
    p_gen = (n_gen.double().numpy() + 1) / (tok_gen + 1)
    return np.log10(p_in / p_gen)


def feature_table(
    index: ActivationIndex,
    general: ActivationIndex,
    w_dec: Tensor,
    gsae_w_dec: Tensor,
    is_gsae: bool,
    n_top: int,
) -> FeatureTable:
    cos, idx = nearest_rows(w_dec, gsae_w_dec, exclude_self=is_gsae)
    return FeatureTable(
        freq_in=index.n_active_tok.double().numpy() / max(index.n_tokens, 1),
        freq_gen=general.n_active_tok.double().numpy() / max(general.n_tokens, 1),
        log_ratio=log_ratio(index.n_active_tok, index.n_tokens, general.n_active_tok, general.n_tokens),
        max_act=index.top_acts[:, 0].clamp(min=0).numpy(),
        top_tokens=peak_tokens(index, n_top),
        near_idx=idx.numpy(),
        near_cos=cos.numpy(),
    )


def rank_diff(near_cos: np.ndarray, count_ratio: np.ndarray, new_cos: float, top: int) -> list[int]:
    """The GSAE -> SSAE diff order: features whose decoder moved (nearest-GSAE cosine below
    `new_cos`) first, least similar first; then those whose in-domain count rose (log2 ratio > 0
    against the same GSAE latent), most first. At most `top`."""
    moved = [int(i) for i in np.argsort(near_cos, kind="stable") if near_cos[i] < new_cos]
    rose = [
        int(i)
        for i in np.argsort(-count_ratio, kind="stable")
        if count_ratio[i] > 0 and near_cos[i] >= new_cos
    ]
    return (moved + rose)[:top]
