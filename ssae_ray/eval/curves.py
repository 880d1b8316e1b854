"""Seed-averaged Pareto curves and comparisons at matched L0.

A curve is one (strategy, tilt, hook, test set): one point per λ, the mean over seeds of L0 and
CE, plus the seeds' per-token losses averaged (so a CE difference between two curves at one L0
can be bootstrapped over the test documents, which dominate the noise: docs/CALIBRATION.md).
Values between λ points are linear interpolations in L0, never extrapolations.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ssae_ray.eval.metrics import CI, EvalError, ce_diff_ci


class Point(NamedTuple):
    lam: float
    l0: float
    ce: float
    ce_std: float
    """Spread (standard deviation) of CE over seeds; 0 for one seed."""
    l0_std: float
    n_seeds: int
    loss: Tensor
    """[N, T-1] per-token CE averaged over seeds, or (streaming evaluation) its per-document sums
    [n_docs]: linear in the tokens, so seed averages and interpolations carry over unchanged."""


class Curve(NamedTuple):
    points: list[Point]
    """Sorted by L0."""

    @property
    def l0(self) -> np.ndarray:
        return np.array([p.l0 for p in self.points])

    @property
    def ce(self) -> np.ndarray:
        return np.array([p.ce for p in self.points])

    def span(self) -> tuple[float, float]:
        return float(self.l0.min()), float(self.l0.max())


def build_curve(rows: list[tuple[float, int, float, float, Tensor]]) -> Curve:
    """Rows (lam, seed, l0, ce, per-token loss) of one strategy/tilt/hook/test -> seed-averaged curve."""
    by_lam: dict[float, list[tuple[float, float, Tensor]]] = defaultdict(list)
    for lam, _seed, l0, ce, loss in rows:
        by_lam[lam].append((l0, ce, loss))
    pts = []
    for lam, rs in by_lam.items():
        l0s = np.array([r[0] for r in rs])
        ces = np.array([r[1] for r in rs])
        loss = torch.stack([r[2] for r in rs]).mean(0)
        pts.append(
            Point(
                lam, float(l0s.mean()), float(ces.mean()), float(ces.std()), float(l0s.std()), len(rs), loss
            )
        )
    return Curve(sorted(pts, key=lambda p: p.l0))


class AtL0(NamedTuple):
    ce: float
    ce_std: float
    loss: Tensor
    """Interpolated per-token losses (their masked mean is `ce`)."""


def at_l0(curve: Curve, l0: float) -> AtL0:
    """The curve at L0 = `l0` by linear interpolation between its two neighbouring λ points."""
    xs = curve.l0
    lo, hi = curve.span()
    if not lo - 1e-9 <= l0 <= hi + 1e-9:
        raise EvalError(
            f"L0 {l0:.2f} is outside this curve's L0 span [{lo:.2f}, {hi:.2f}]; widen sweep.lams to match L0"
        )
    j = int(np.clip(np.searchsorted(xs, l0), 1, max(len(xs) - 1, 1))) if len(xs) > 1 else 0
    if len(xs) == 1:
        p = curve.points[0]
        return AtL0(p.ce, p.ce_std, p.loss)
    a, b = curve.points[j - 1], curve.points[j]
    w = 0.0 if b.l0 == a.l0 else (l0 - a.l0) / (b.l0 - a.l0)
    return AtL0((1 - w) * a.ce + w * b.ce, (1 - w) * a.ce_std + w * b.ce_std, (1 - w) * a.loss + w * b.loss)


def diff_at_l0(
    a: Curve, b: Curve, l0: float, mask: Tensor, doc: Tensor, n_boot: int, level: float, seed: int = 0
) -> CI:
    """CE(a) - CE(b) at matched L0, CI by bootstrapping test documents."""
    return ce_diff_ci(at_l0(a, l0).loss, at_l0(b, l0).loss, mask, doc, n_boot, level, seed)


def diff_vs_loss(
    a: Curve, l0: float, ref_loss: Tensor, mask: Tensor, doc: Tensor, n_boot: int, level: float
) -> CI:
    """CE(a at `l0`) - CE of a fixed reference (per-token `ref_loss`, e.g. the GSAE)."""
    return ce_diff_ci(at_l0(a, l0).loss, ref_loss, mask, doc, n_boot, level)
