"""The tail-concept test with confidence intervals: logit-lens tail coverage (Figures 2, 6) and
activation counts (Figure 7) of several SAEs on one test set, each with a percentile bootstrap CI
and a paired CI of its difference from a reference SAE (the GSAE).

The statistics, on the whole test set:

- coverage: share of the test set's token types among the top-k logit-lens tokens of some latent
  (as `logit_lens.tail_coverage`'s `covered_share`);
- tail coverage: the same share over the rarest `tail_fraction` of those types (ranked by count,
  ties broken by token id as `logit_lens.tail_coverage` does);
- active latents: share of latents that fire on at least one test token;
- median count: the median over latents of their activation counts on the test set (Fig. 7:
  broader features have higher counts).

What is resampled. Coverage is a mean over token types and the activation statistics are over
latents, so the bootstrap resamples those units: token types (the present types for coverage, the
tail types for tail coverage) and latents, each with replacement. Every SAE sees the same draws,
so differences are paired: by token type, and by latent index (an SSAE's latent j is finetuned
from the GSAE's latent j; SAEs of another width get their own draws). Resampling test documents
instead is biased for these statistics: a resample holds fewer distinct types and fewer firing
latents than the test set (the rare ones drop out), so its coverage is systematically higher and
its active share lower, and on the `local` test set the 95% interval did not contain the value
it was meant to bracket (GSAE coverage 0.371, document-bootstrap CI [0.377, 0.412]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssae_ray.eval.metrics import EvalError

STATS = ("coverage", "tail_coverage", "active_latents", "median_count")


def doc_token_counts(
    input_ids: Tensor, attention_mask: Tensor, doc_index: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """(types [n_types] token ids present, counts [n_docs, n_types]) from tokenised contexts
    ([N, T] ids and mask, [N] document of each context)."""
    m = attention_mask.bool()
    ids = input_ids[m].long().numpy()
    docs = doc_index[:, None].expand_as(input_ids)[m].long().numpy()
    if ids.size == 0:
        raise EvalError("the test set has no tokens to count")
    types, col = np.unique(ids, return_inverse=True)
    _, doc_row = np.unique(docs, return_inverse=True)
    counts = np.zeros((int(doc_row.max()) + 1, len(types)), dtype=np.float32)
    np.add.at(counts, (doc_row, col), 1.0)
    return types, counts


@torch.no_grad()
def doc_feature_counts(sae: Any, x: Tensor, doc: Tensor, n_docs: int, chunk: int = 4096) -> np.ndarray:
    """[n_docs, d_sae] tokens of each document on which each latent of `sae` fires; `x` [M, d_in]
    activations and `doc` [M] their document (0..n_docs-1)."""
    out = torch.zeros(n_docs, sae.cfg.d_sae, dtype=torch.float32)
    dev, dtype = sae.W_dec.device, sae.W_dec.dtype
    for s in range(0, x.shape[0], chunk):
        f = sae.encode(x[s : s + chunk].to(dev, dtype)).float().cpu()
        out.index_add_(0, doc[s : s + chunk].long(), (f != 0).float())
    return out.numpy()


def _mean_ci(values: dict[str, np.ndarray], idx: np.ndarray, draws: np.ndarray, ref: str,
             q: list[float]) -> dict[str, tuple[float, ...]]:  # fmt: skip
    """For each label: (value, lo, hi, and against `ref`: d, d_lo, d_hi) of the mean of `values`
    over the units `idx`, bootstrapped over those units: `draws` [B, len(idx)] positions in `idx`,
    the same for every label (paired)."""
    out = {}
    for label, v in values.items():
        m = v[idx].mean()
        b = v[idx][draws].mean(1)
        lo, hi = np.quantile(b, q).tolist()
        if label != ref and ref in values:
            dv = v[idx] - values[ref][idx]
            db = dv[draws].mean(1)
            out[label] = (float(m), lo, hi, float(dv.mean()), *np.quantile(db, q).tolist())
        else:
            out[label] = (float(m), lo, hi)
    return out


def tail_test(
    types: np.ndarray,
    doc_counts: np.ndarray,
    top_tokens: dict[str, Tensor],
    feature_doc_counts: dict[str, np.ndarray] | None = None,
    ref: str = "GSAE",
    tail_fraction: float = 0.5,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per SAE (label): each statistic of `STATS` on the full test set with its bootstrap
    CI (`<stat>_lo`, `<stat>_hi`) and, for SAEs other than `ref`, the paired difference from `ref`
    (`d_<stat>`, `d_<stat>_lo`, `d_<stat>_hi`). `top_tokens`: label -> [d_sae, k] logit-lens token
    ids; `feature_doc_counts`: label -> [n_docs, d_sae] (`doc_feature_counts`). What is resampled:
    the module docstring."""
    if not 0 < tail_fraction <= 1:
        raise EvalError(f"eval.tail_fraction must be in (0, 1], got {tail_fraction}")
    if not 0 < level < 1:
        raise EvalError(f"eval.ci_level must be in (0, 1), got {level}")
    feature_doc_counts = feature_doc_counts or {}
    n_docs = doc_counts.shape[0]
    for label, f in feature_doc_counts.items():
        if f.shape[0] != n_docs:
            raise EvalError(f"{label}: feature counts for {f.shape[0]} documents, token counts for {n_docs}")
    pos = {int(t): i for i, t in enumerate(types)}
    covered = {}
    for label, top in top_tokens.items():
        cov = np.zeros(len(types), dtype=np.float64)
        for t in np.unique(top.reshape(-1).numpy()):
            i = pos.get(int(t))
            if i is not None:
                cov[i] = 1.0
        covered[label] = cov
    total = doc_counts.sum(0)
    present = np.flatnonzero(total > 0)
    order = present[np.argsort(-total[present], kind="stable")]  # most frequent first
    tail = order[-max(int(np.ceil(tail_fraction * len(order))), 1) :]
    a = (1 - level) / 2
    q = [a, 1 - a]
    rng = np.random.default_rng(seed)
    res: dict[str, dict[str, tuple[float, ...]]] = {k: {} for k in covered}
    for stat, units in (("coverage", present), ("tail_coverage", tail)):
        draws_t = rng.integers(0, len(units), (n_boot, len(units)))
        for label, r in _mean_ci(covered, units, draws_t, ref, q).items():
            res[label][stat] = r
    counts = {k: v.sum(0).astype(np.float64) for k, v in feature_doc_counts.items()}
    draws: dict[int, np.ndarray] = {}  # one set of latent draws per width: paired by latent index
    for label, c in counts.items():
        d = len(c)
        if d not in draws:
            draws[d] = rng.integers(0, d, (n_boot, d))
        act, med = (c > 0).astype(np.float64), c
        bact, bmed = act[draws[d]].mean(1), np.median(med[draws[d]], axis=1)
        res[label]["active_latents"] = (float(act.mean()), *np.quantile(bact, q).tolist())
        res[label]["median_count"] = (float(np.median(med)), *np.quantile(bmed, q).tolist())
        if label != ref and ref in counts:
            r = counts[ref]
            if len(r) == d:  # paired by latent
                ract, rmed = (r > 0)[draws[d]].mean(1), np.median(r[draws[d]], axis=1)
            else:  # another width: the reference's own draws
                rd = draws.setdefault(len(r), rng.integers(0, len(r), (n_boot, len(r))))
                ract, rmed = (r > 0)[rd].mean(1), np.median(r[rd], axis=1)
            res[label]["active_latents"] += (
                float(act.mean() - (r > 0).mean()),
                *np.quantile(bact - ract, q).tolist(),
            )
            res[label]["median_count"] += (
                float(np.median(med) - np.median(r)),
                *np.quantile(bmed - rmed, q).tolist(),
            )
    rows = []
    for label in covered:
        row: dict[str, Any] = {"sae": label}
        for s in STATS:
            if s not in res[label]:
                continue
            v = res[label][s]
            row[s], row[f"{s}_lo"], row[f"{s}_hi"] = v[:3]
            if len(v) == 6:
                row[f"d_{s}"], row[f"d_{s}_lo"], row[f"d_{s}_hi"] = v[3:]
        rows.append(row)
    return rows
