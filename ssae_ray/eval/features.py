"""Feature statistics (Figures 7, 17) and TERM diagnostics (section 3.2, appendix N).

All functions take plain tensors (an SAE's decoder, the per-token statistics of `evaluate_sae`), so
they run and test without an LM.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


def activation_rank_curve(feature_counts: Tensor) -> np.ndarray:
    """Figure 7: activation counts sorted in decreasing order (index = feature rank)."""
    return np.sort(feature_counts.numpy())[::-1].copy()


def log2_count_ratio(counts_ssae: Tensor, counts_gsae: Tensor) -> np.ndarray:
    """Appendix I / Figure 17: log2((M + 1) / (B + 1)) per latent, M the SSAE's activation count and
    B the GSAE's for the same latent (an SSAE is a finetuned GSAE, so latents correspond)."""
    if counts_ssae.shape != counts_gsae.shape:
        raise ValueError(
            f"latent counts differ ({counts_ssae.shape[0]} vs {counts_gsae.shape[0]}): the SSAE must be a "
            "finetune of this GSAE (same width) for a per-latent ratio"
        )
    return np.log2((counts_ssae.double().numpy() + 1) / (counts_gsae.double().numpy() + 1))


def dead_fraction(feature_counts: Tensor) -> float:
    return float((feature_counts == 0).double().mean())


@torch.no_grad()
def decoder_cosines(
    w_dec: Tensor, max_latents: int = 4096, bins: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Figure 20: histogram (density, bin edges over [-1, 1]) of the pairwise cosine similarities
    between distinct decoder rows; a random subset of `max_latents` rows for wide SAEs."""
    w = w_dec.detach().float()
    if w.shape[0] > max_latents:
        g = torch.Generator().manual_seed(seed)
        w = w[torch.randperm(w.shape[0], generator=g)[:max_latents]]
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    edges = np.linspace(-1, 1, bins + 1)
    hist = np.zeros(bins)
    for s in range(0, w.shape[0], 1024):
        c = w[s : s + 1024] @ w.T
        rows = torch.arange(s, min(s + 1024, w.shape[0]))
        keep = torch.ones_like(c, dtype=torch.bool)
        keep[rows - s, rows] = False
        hist += np.histogram(c[keep].clamp(-1, 1).numpy(), bins=edges)[0]
    return hist / max(hist.sum(), 1) / (edges[1] - edges[0]), edges


@torch.no_grad()
def pca_components(w_dec: Tensor, var: float = 0.9) -> tuple[int, np.ndarray]:
    """Figure 21: number of principal components of the (centred) decoder rows that explain `var`
    of their variance, and the cumulative explained-variance curve."""
    w = w_dec.detach().double()
    s = torch.linalg.svdvals(w - w.mean(0))
    ev = (s**2).numpy()
    cum = np.cumsum(ev) / ev.sum()
    return int(np.searchsorted(cum, var - 1e-12) + 1), cum


class ErrByFreq(NamedTuple):
    bucket_mean: np.ndarray
    """[n_buckets] mean squared reconstruction error of the tokens of each frequency bucket."""
    bucket_p99: np.ndarray
    bucket_min_rank: np.ndarray
    """[n_buckets] frequency rank (0 = most frequent type) where each bucket starts."""


def error_by_frequency(token_ids: Tensor, sse: Tensor, n_buckets: int = 10) -> ErrByFreq:
    """Reconstruction error against the test-set frequency rank of each token's type, in buckets of
    equal numbers of token occurrences (bucket 0: the most frequent types)."""
    ids = token_ids.long().numpy()
    err = sse.double().numpy()
    types, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    rank_of_type = np.empty(len(types), dtype=np.int64)
    rank_of_type[np.argsort(-counts, kind="stable")] = np.arange(len(types))
    rank = rank_of_type[inv]
    order = np.argsort(rank, kind="stable")
    parts = np.array_split(order, min(n_buckets, len(order)))
    return ErrByFreq(
        np.array([err[p].mean() for p in parts]),
        np.array([np.quantile(err[p], 0.99) for p in parts]),
        np.array([rank[p[0]] for p in parts]),
    )


class Diagnostics(NamedTuple):
    pca90: int
    """Principal components of the decoder rows for 90% of their variance."""
    cos_mean: float
    """Mean pairwise cosine similarity of decoder rows."""
    cos_p99: float
    err_mean: float
    err_p99: float
    err_max: float
    entropy_mean: float
    max_act_mean: float
    dead: float
    """Share of latents that never fire on the test set."""


def diagnostics(
    w_dec: Tensor, feature_counts: Tensor, sse: Tensor, entropy: Tensor, max_act: Tensor
) -> Diagnostics:
    """The scalar TERM diagnostics of one SAE on one test set."""
    dens, edges = decoder_cosines(w_dec)
    mid = (edges[1:] + edges[:-1]) / 2
    p = dens * (edges[1] - edges[0])
    cdf = np.cumsum(p)
    err = sse.double().numpy()
    return Diagnostics(
        pca90=pca_components(w_dec, 0.9)[0],
        cos_mean=float((p * mid).sum()),
        cos_p99=float(mid[min(np.searchsorted(cdf, 0.99), len(mid) - 1)]),
        err_mean=float(err.mean()),
        err_p99=float(np.quantile(err, 0.99)),
        err_max=float(err.max()),
        entropy_mean=float(entropy.double().mean()),
        max_act_mean=float(max_act.double().mean()),
        dead=dead_fraction(feature_counts),
    )
