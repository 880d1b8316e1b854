"""Evaluation math: sparsity and reconstruction, spliced cross-entropy, Pareto curves and their
area, bootstrap confidence intervals over documents. Plain tensors in, numbers out; no LM, no Ray.

Conventions: per-token quantities come as `[B, T-1]` tensors aligned with `models.TokenLoss`
(position t predicts token t+1; `mask` False on padding and on position 0), or as flat `[N]`
token vectors with a `doc` vector naming each token's document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class EvalError(ValueError):
    """An evaluation that cannot be computed from what it was given (empty set, bad L0 range...)."""


class Recon(NamedTuple):
    l0: float
    """Mean number of active latents per token, E ||f(x)||_0."""
    mse: float
    """Mean squared error per token, summed over the d dimensions: E ||x - x_hat||^2."""
    fvu: float
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""


def l0(f: Tensor) -> float:
    """Mean number of active latents per token of latents `f` [N, d_sae]."""
    return float((f != 0).sum(-1).double().mean())


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of ||x - x_hat||^2 (summed over the d dimensions)."""
    return float((x.double() - x_hat.double()).pow(2).sum() / max(x.shape[0], 1))


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def recon_metrics(x: Tensor, x_hat: Tensor, f: Tensor) -> Recon:
    """L0, MSE and FVU of reconstructions `x_hat` [N, d] of `x` with latents `f` [N, d_sae]."""
    if x.shape[0] == 0:
        raise EvalError("no tokens to evaluate")
    return Recon(l0(f), mse(x, x_hat), fvu(x, x_hat))


def mean_ce(loss: Tensor, mask: Tensor) -> float:
    """Mean cross-entropy over the valid targets."""
    n = int(mask.sum())
    if n == 0:
        raise EvalError("no valid target tokens (every context is shorter than 3 tokens?)")
    return float(loss[mask].double().sum() / n)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean): 1 when splicing costs nothing, 0 when it is
    as bad as zero-ablating the hook."""
    denom = ce_zero - ce_clean
    if abs(denom) < 1e-12:
        return float("nan")
    return (ce_zero - ce_spliced) / denom


def doc_sums(
    loss: Tensor, mask: Tensor, doc: Tensor, n_docs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-document sum of token losses and count of valid tokens. `doc` is [B] (one document per
    context, as `TokenBatch.doc_index`) or the same shape as `loss`."""
    if doc.dim() == 1 and loss.dim() == 2:
        doc = doc[:, None].expand_as(loss)
    m = mask.reshape(-1).bool()
    d = doc.reshape(-1)[m].long()
    n = int(n_docs if n_docs is not None else (int(d.max()) + 1 if d.numel() else 0))
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, d, loss.reshape(-1)[m].double())
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, d, torch.ones_like(d, dtype=torch.float64))
    return sums.numpy(), counts.numpy()


class CI(NamedTuple):
    value: float
    """The statistic on the full test set."""
    lo: float
    hi: float
    level: float


def bootstrap_mean_ci(
    sums: np.ndarray, counts: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> CI:
    """Token-weighted mean (sum of sums / sum of counts) with a percentile bootstrap CI, resampling
    documents with replacement. For a CE difference pass the per-document sums of the difference
    (both models scored on the same tokens)."""
    keep = counts > 0
    sums, counts = np.asarray(sums, dtype=np.float64)[keep], np.asarray(counts, dtype=np.float64)[keep]
    if len(counts) == 0:
        raise EvalError("no documents with valid tokens to bootstrap over")
    value = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    stats = sums[idx].sum(1) / counts[idx].sum(1)
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return CI(value, float(lo), float(hi), level)


def ce_diff_ci(
    loss_a: Tensor,
    loss_b: Tensor,
    mask: Tensor,
    doc: Tensor | None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> CI:
    """CE(a) - CE(b) on the same tokens, with a bootstrap CI over documents. With `doc` None,
    `loss_a` / `loss_b` are already per-document sums [n_docs] and `mask` the documents' token
    counts (what streaming evaluation keeps instead of per-token CE)."""
    if doc is None:
        sums = (loss_a.double() - loss_b.double()).numpy()
        return bootstrap_mean_ci(sums, mask.double().numpy(), n_boot, level, seed)
    sums, counts = doc_sums(loss_a.double() - loss_b.double(), mask, doc)
    return bootstrap_mean_ci(sums, counts, n_boot, level, seed)


# ---------------------------------------------------------------------------------------------
# Pareto curves (perplexity vs L0) and their area over an L0 range


def _curve(l0: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(l0, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    # Equal L0 (rare): average their y so the curve is a function.
    ux, inv = np.unique(xs, return_inverse=True)
    uy = np.bincount(inv, weights=ys) / np.bincount(inv)
    return ux, uy


def pareto_auc(l0: Sequence[float], y: Sequence[float], l0_range: tuple[float, float]) -> float:
    """Area under the piecewise-linear curve through the (L0, y) points (sorted by L0), restricted
    to `l0_range` = (lo, hi) and divided by hi - lo: the curve's mean y over the range (for y =
    perplexity, the mean perplexity over the L0 range; lower is better).

    The curve must cover the whole range: a range that the points do not span is an `EvalError`
    (the paper's range 60-140 needs lambdas whose L0 reach both ends)."""
    lo, hi = float(l0_range[0]), float(l0_range[1])
    if not hi > lo:
        raise EvalError(f"L0 range {l0_range} is empty: give (lo, hi) with hi > lo (sweep.l0_range)")
    xs, ys = _curve(l0, y)
    if len(xs) < 2 or xs[0] > lo + 1e-9 or xs[-1] < hi - 1e-9:
        span = f"[{xs[0]:.1f}, {xs[-1]:.1f}]" if len(xs) else "no points"
        raise EvalError(
            f"the curve's L0 values span {span} but the AUC range is [{lo:g}, {hi:g}]: no lambda reaches "
            "one end of it. Widen sweep.lams (smaller lambda -> higher L0) or set sweep.l0_range inside "
            "the span."
        )
    inner = (xs > lo) & (xs < hi)
    px = np.concatenate([[lo], xs[inner], [hi]])
    py = np.interp(px, xs, ys)
    return float(np.trapezoid(py, px) / (hi - lo))


def perplexity(ce: float) -> float:
    return float(math.exp(ce))
