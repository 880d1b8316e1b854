"""The tail-concept test with confidence intervals: logit-lens tail coverage (Figures 2, 6) and
activation counts (Figure 7) of several SAEs on one test set, each with a percentile bootstrap CI
over test documents and a paired CI of its difference from a reference SAE (the GSAE).

A bootstrap resample draws the test documents with replacement; the token-type counts are
recomputed from the drawn documents, so which types are "tail" varies with the resample as it
would with another test set of the same size. For each resample and SAE:

- coverage: share of the present token types among the top-k logit-lens tokens of some latent
  (as `logit_lens.tail_coverage`'s `covered_share`);
- tail coverage: the same share over the rarest `tail_fraction` of the present types (ranked by
  count, ties broken by token id as `logit_lens.tail_coverage` does);
- active latents: share of latents that fire on at least one drawn token;
- median count: the median over latents of their activation counts on the drawn tokens (Fig. 7:
  broader features have higher counts).

Every SAE sees the same resamples, so differences are paired.
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


def _stats(counts_types: np.ndarray, covered: dict[str, np.ndarray], feats: dict[str, np.ndarray],
           tail_fraction: float) -> dict[str, dict[str, float]]:  # fmt: skip
    present = np.flatnonzero(counts_types > 0)
    order = present[np.argsort(-counts_types[present], kind="stable")]  # most frequent first
    n_tail = max(int(np.ceil(tail_fraction * len(order))), 1)
    tail = order[-n_tail:]
    out: dict[str, dict[str, float]] = {}
    for label, cov in covered.items():
        row = {"coverage": float(cov[present].mean()), "tail_coverage": float(cov[tail].mean())}
        if label in feats:
            c = feats[label]
            row.update(active_latents=float((c > 0).mean()), median_count=float(np.median(c)))
        out[label] = row
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
    ids; `feature_doc_counts`: label -> [n_docs, d_sae] (`doc_feature_counts`)."""
    if not 0 < tail_fraction <= 1:
        raise EvalError(f"eval.tail_fraction must be in (0, 1], got {tail_fraction}")
    feature_doc_counts = feature_doc_counts or {}
    n_docs = doc_counts.shape[0]
    for label, f in feature_doc_counts.items():
        if f.shape[0] != n_docs:
            raise EvalError(f"{label}: feature counts for {f.shape[0]} documents, token counts for {n_docs}")
    pos = {int(t): i for i, t in enumerate(types)}
    covered = {}
    for label, top in top_tokens.items():
        cov = np.zeros(len(types), dtype=bool)
        for t in np.unique(top.reshape(-1).numpy()):
            i = pos.get(int(t))
            if i is not None:
                cov[i] = True
        covered[label] = cov
    full = _stats(
        doc_counts.sum(0), covered, {k: v.sum(0) for k, v in feature_doc_counts.items()}, tail_fraction
    )
    rng = np.random.default_rng(seed)
    boots: dict[str, dict[str, list[float]]] = {k: {s: [] for s in STATS} for k in covered}
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n_docs, n_docs), minlength=n_docs).astype(np.float32)
        st = _stats(w @ doc_counts, covered, {k: w @ v for k, v in feature_doc_counts.items()}, tail_fraction)
        for label, row in st.items():
            for s, v in row.items():
                boots[label][s].append(v)
    a = (1 - level) / 2
    rows = []
    for label in covered:
        row: dict[str, Any] = {"sae": label}
        for s, v in full[label].items():
            b = np.asarray(boots[label][s])
            row[s], row[f"{s}_lo"], row[f"{s}_hi"] = v, *np.quantile(b, [a, 1 - a]).tolist()
            if label != ref and ref in full and s in full[ref]:
                d = b - np.asarray(boots[ref][s])
                row[f"d_{s}"] = v - full[ref][s]
                row[f"d_{s}_lo"], row[f"d_{s}_hi"] = np.quantile(d, [a, 1 - a]).tolist()
        rows.append(row)
    return rows
