"""Logit-lens tail coverage (section 3.1.2, Figures 2, 6, 11, 14).

Each latent's decoder direction is read through the unembedding: its top-k tokens are the k largest
entries of `W_U · norm(d)`. The final norm is folded in as TransformerLens' `fold_ln` does (the
convention the public SAE releases are read with): its elementwise scale multiplies the direction,
a LayerNorm also centres it, and its bias is dropped (the bias adds the same logit vector to every
latent, so it would only put the same tokens in every top-k). The norm's division by the RMS is a
positive scale and leaves the ranking unchanged.

Coverage: the test set's token types are ranked by count and cut into `n_buckets` buckets of equal
numbers of types (bucket 0 the most frequent); a bucket's coverage is the share of its types that
are among the top-k tokens of at least one latent. Figure 6's curve orders tokens from the rarest
type to the most frequent: x is the cumulative share of token occurrences, y the cumulative share
of the occurrences of covered types, normalised to end at 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ssae_ray.collect import histc_bins, histc_centres


def final_norm_scale(norm: nn.Module | None) -> tuple[Tensor | None, bool]:
    """(elementwise scale, centre?) of a final LayerNorm / RMSNorm, None for no norm."""
    if norm is None:
        return None, False
    w = getattr(norm, "weight", None)
    if w is not None and type(norm).__name__.startswith("Gemma"):
        w = 1 + w  # Gemma's RMSNorm scales by (1 + weight)
    return (None if w is None else w.detach().float()), isinstance(norm, nn.LayerNorm)


def lm_unembed(lm: Any) -> tuple[Tensor, nn.Module | None]:
    """(W_U [vocab, d], final norm module) of a loaded `models.LM`."""
    w_u = lm.model.get_output_embeddings().weight.detach().float()
    inner = {"gpt_neox": "gpt_neox", "gpt_neo": "transformer"}.get(lm.arch, "model")
    inner = getattr(lm.model, inner)
    norm = (
        getattr(inner, "final_layer_norm", None)
        or getattr(inner, "norm", None)
        or getattr(inner, "ln_f", None)
    )
    return w_u, norm


def _fold(d: Tensor, scale: Tensor | None, centre: bool) -> Tensor:
    """A decoder direction with the final norm folded in (see the module docstring)."""
    if centre:
        d = d - d.mean(-1, keepdim=True)
    return d if scale is None else d * scale.to(d.device)


@torch.no_grad()
def feature_top_tokens(
    w_dec: Tensor, w_u: Tensor, norm: nn.Module | None = None, k: int = 10, chunk: int = 1024
) -> Tensor:
    """[d_sae, k] token ids with the largest logit-lens logits of each decoder row."""
    scale, centre = final_norm_scale(norm)
    w_u = w_u.float()
    out = []
    for s in range(0, w_dec.shape[0], chunk):
        d = _fold(w_dec[s : s + chunk].detach().float().to(w_u.device), scale, centre)
        out.append((d @ w_u.T).topk(k, dim=-1).indices.cpu())
    return torch.cat(out)


class FeatureLogits(NamedTuple):
    top_values: Tensor
    """[d_sae, k] the largest logit-lens logits of each decoder row, descending."""
    top_ids: Tensor
    bottom_values: Tensor
    """[d_sae, k] the smallest, ascending."""
    bottom_ids: Tensor
    hist_heights: Tensor
    """[d_sae, bins] histogram of each row's logits over the whole vocabulary."""
    hist_centres: Tensor
    """[d_sae, bins] centre of each row's bins (equal-width over the row's [min, max]; SAEDashboard's
    `HistogramData` bar values)."""


@torch.no_grad()
def feature_logits(
    w_dec: Tensor, w_u: Tensor, norm: nn.Module | None = None, k: int = 10, bins: int = 50, chunk: int = 512
) -> FeatureLogits:
    """Top and bottom logit-lens tokens (ids and logits) of every decoder row, and the histogram of
    its logits over the vocabulary (the logits table and histogram of SAE dashboards)."""
    scale, centre = final_norm_scale(norm)
    w_u = w_u.float()
    parts: list[tuple[Tensor, ...]] = []
    for s in range(0, w_dec.shape[0], chunk):
        logits = _fold(w_dec[s : s + chunk].detach().float().to(w_u.device), scale, centre) @ w_u.T
        top, bot = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        lo, hi = logits.amin(-1, keepdim=True), logits.amax(-1, keepdim=True)
        b = histc_bins(logits, lo, hi, bins)  # SAEDashboard's histogram: torch.histc over [min, max]
        heights = torch.zeros(logits.shape[0], bins, device=logits.device).scatter_add_(
            1, b, torch.ones_like(logits)
        )
        centres = histc_centres(lo.flatten().cpu(), hi.flatten().cpu(), bins)
        parts.append(
            tuple(t.cpu() for t in (top.values, top.indices, bot.values, bot.indices, heights, centres))
        )
    return FeatureLogits(*(torch.cat([p[i] for p in parts]) for i in range(6)))


class Coverage(NamedTuple):
    bucket_coverage: np.ndarray
    """[n_buckets] share of each bucket's token types covered (bucket 0: most frequent)."""
    bucket_types: np.ndarray
    """[n_buckets] token types per bucket."""
    bucket_max_count: np.ndarray
    """[n_buckets] the largest count of a type in each bucket."""
    cum_tokens: np.ndarray
    """Figure 6 x: cumulative share of token occurrences, rarest type first."""
    cum_covered: np.ndarray
    """Figure 6 y: cumulative share of covered occurrences (ends at 1; 0s if nothing is covered)."""
    covered_share: float
    """Share of the test set's token types covered by at least one latent."""


def token_counts(token_ids: Tensor, vocab: int) -> np.ndarray:
    return torch.bincount(token_ids.reshape(-1).long(), minlength=vocab).numpy()


def tail_coverage(top_tokens: Tensor, counts: np.ndarray, n_buckets: int = 10) -> Coverage:
    """Coverage of the token types with counts > 0 in `counts` [vocab] by `top_tokens` [d_sae, k]."""
    types = np.flatnonzero(counts > 0)
    if len(types) == 0:
        raise ValueError("the test set has no tokens to measure coverage on")
    covered_vocab = np.zeros(len(counts), dtype=bool)
    covered_vocab[top_tokens.reshape(-1).numpy()] = True
    order = types[np.argsort(-counts[types], kind="stable")]  # most frequent first
    cov = covered_vocab[order]
    buckets = np.array_split(np.arange(len(order)), min(n_buckets, len(order)))
    bucket_cov = np.array([cov[b].mean() for b in buckets])
    bucket_n = np.array([len(b) for b in buckets])
    bucket_max = np.array([counts[order[b[0]]] for b in buckets])
    rare = order[::-1]
    c = counts[rare].astype(np.float64)
    cum_tokens = np.cumsum(c) / c.sum()
    cc = np.cumsum(c * covered_vocab[rare])
    cum_covered = cc / cc[-1] if cc[-1] > 0 else cc
    return Coverage(bucket_cov, bucket_n, bucket_max, cum_tokens, cum_covered, float(cov.mean()))
