"""Figures as PNG files (matplotlib, Agg backend): Pareto curves, logit-lens coverage, activation
counts, log-ratio distributions and the TERM diagnostics. Each function writes one file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def pareto(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: Path,
    title: str,
    ylabel: str = "perplexity with SAE spliced in",
    l0_range: tuple[float, float] | None = None,
    refs: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Lines of (L0, y, y_err) per label; `refs` are single points (e.g. the GSAE, clean model)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (x, y, err) in curves.items():
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, label=label)
    for label, (x, y) in (refs or {}).items():
        ax.scatter([x], [y], marker="*", s=120, zorder=5, label=label)
    if l0_range:
        ax.axvspan(*l0_range, color="grey", alpha=0.12, label="AUC range")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def coverage_buckets(cov: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """Figure 2: share of token types covered per frequency bucket, one bar group per bucket."""
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(cov)
    n = max(len(v) for v in cov.values())
    w = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        v = cov[label]
        ax.bar(np.arange(len(v)) + i * w, 100 * v, width=w, label=label)
    ax.set_xticks(np.arange(n) + 0.4 - w / 2, [f"{i}" for i in range(n)])
    ax.set_xlabel("token frequency bucket (0 = most frequent types)")
    ax.set_ylabel("% of token types in top-k logit lens of a latent")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def lines(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str, xlabel: str, ylabel: str,
    logx: bool = False, logy: bool = False, diagonal: bool = False,
) -> Path:  # fmt: skip
    """Generic line plot (Figure 6 cumulative coverage, Figure 7 rank curves, error vs frequency,
    PCA cumulative variance)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def histograms(
    values: Mapping[str, np.ndarray], path: Path, title: str, xlabel: str, bins: int = 50, logy: bool = False
) -> Path:
    """Overlaid density histograms (Figure 17 log ratios, Figure 5 entropy / max activation, Figure
    22 reconstruction error)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    finite = [v[np.isfinite(v)] for v in values.values() if len(v)]
    if finite:
        lo = min(float(v.min()) for v in finite)
        hi = max(float(v.max()) for v in finite)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        for label, v in values.items():
            ax.hist(v[np.isfinite(v)], bins=edges, density=True, histtype="step", lw=1.5, label=label)
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def density_lines(
    dens: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str, xlabel: str
) -> Path:
    """Pre-binned densities (Figure 20 decoder cosine similarities): label -> (density, edges)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (d, edges) in dens.items():
        ax.plot((edges[1:] + edges[:-1]) / 2, d, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
