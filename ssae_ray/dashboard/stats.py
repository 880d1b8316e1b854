"""SAEDashboard's per-feature statistics, from a second streaming pass over the in-domain contexts.

The first pass (`ssae_ray.collect.scan_many`, shared with auto-interp) gives each feature's largest
and smallest non-zero activation. With that range known, this pass computes exactly what
SAEDashboard's neuronpedia runner computes for a feature (github.com/jbloomAus/SAEDashboard, cited
by path below), in bounded memory, for several SAEs in one LM pass:

- the activation histogram: `HistogramData.from_data` (`sae_dashboard/utils_fns.py`) of the
  non-zero activations, i.e. `torch.histc(acts, n_bins)` over [min, max] (`sae_vis_runner.py`,
  `SaeVisRunner.run`: `nonzero_feat_acts`, `ActsHistogramConfig.n_bins = 50`);
- the density (`frac_nonzero`): non-zero activations over all tokens (same place);
- the top activations: the `top_acts_group_size` largest token activations
  (`sequence_data_generator.py`, `get_indices_dict`; `utils_fns.k_largest_indices`);
- `n_quantiles` intervals `torch.linspace(0, max, n_quantiles + 1)`, each with the share of all
  tokens whose activation lies in it, both ends inclusive, and `quantile_group_size` tokens drawn
  uniformly from those (`get_indices_dict`; `utils_fns.random_range_indices`);
- correlated neurons (the SAE's input dimensions) and correlated features (the other features of its
  export batch): Pearson and cosine of the activations (`utils_fns.RollingCorrCoef`,
  `data_parsing_fns.get_features_table_data`, 3 rows).

Tokens are every real position of every context. Position 0 (BOS, or a first token whose norm is an
outlier; `ssae_ray.collect` zeroes its activations) counts in the denominators with activation 0,
as SAEDashboard's masked BOS does, but is never drawn (SAEDashboard never shows position 0);
padding is no token. The correlations run over positions 1.. . Per feature only bounded state is
kept: the histogram, counts, and the kept tokens with their context's activations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ssae_ray.collect import ActivationIndex, encode, histc_bins
from ssae_ray.config import NeuronpediaConfig
from ssae_ray.models import LM, capture, iter_batches

CORR_ROWS = 3
"""Rows of the correlated neurons / features tables (SAEDashboard's `FeatureTablesConfig.n_rows`)."""


class Kept(NamedTuple):
    """Tokens kept per feature and group: [A, G, K] (G = 1 for the top activations, `n_quantiles`
    for the intervals, lowest first)."""

    key: Tensor
    """Activation (top: largest kept) or random key (intervals: smallest kept); +-inf where none."""
    code: Tensor
    """`context * T + position` of the token (-1 where none)."""
    rows: Tensor
    """[A, G, K, T] the feature's activation on every position of that token's context."""


class Corr(NamedTuple):
    index: list[list[int]]
    pearson: list[list[float]]
    cosine: list[list[float]]


class FeatureStats(NamedTuple):
    """One SAE's statistics; per-feature tensors are indexed by position in `features`."""

    features: list[int]
    """The features that fire (activation > 0) on some token, ascending: what is exported."""
    batches: list[list[int]]
    """Positions in `features` per export batch (`np.array_split` into `features_per_batch`
    groups, as SAEDashboard's `get_feature_batches`)."""
    n_tokens: int
    lo: Tensor
    """[A] smallest non-zero activation."""
    hi: Tensor
    """[A] largest activation."""
    hist: Tensor
    """[A, bins] non-zero activations per equal-width bin of [lo, hi] (`torch.histc`)."""
    n_nonzero: Tensor
    bounds: Tensor
    """[A, n_quantiles + 1] `torch.linspace(0, hi, n_quantiles + 1)` (float32, as SAEDashboard)."""
    interval_n: Tensor
    """[A, n_quantiles] tokens with bounds[j] <= activation <= bounds[j + 1]."""
    top: Kept
    samples: Kept
    neurons: Corr | None
    corr_features: Corr | None


def _pad(x: Tensor, k: int, fill: float) -> Tensor:
    """[A, k'] -> [A, k], filled on the right (a batch with fewer than k tokens)."""
    return torch.nn.functional.pad(x, (0, k - x.shape[1]), value=fill) if x.shape[1] < k else x


def _group_bottom_k(group: Tensor, key: Tensor, code: Tensor, n_groups: int, k: int) -> tuple[Tensor, Tensor]:
    """([n_groups, k] the k smallest keys of each group, inf where fewer; their codes, -1 where none)
    of a sparse list of (group, key in [0, 1), code)."""
    out_k = torch.full((n_groups, k), torch.inf, device=key.device)
    out_c = torch.full((n_groups, k), -1, dtype=torch.long, device=key.device)
    if key.numel():
        order = torch.argsort(group.double() * 2 + key.double())  # keys < 1: groups stay apart, in order
        g, kk, cc = group[order], key[order], code[order]
        rank = torch.arange(len(g), device=g.device) - torch.searchsorted(g, g)
        keep = rank < k
        out_k[g[keep], rank[keep]] = kk[keep]
        out_c[g[keep], rank[keep]] = cc[keep]
    return out_k, out_c


def export_batches(n: int, per_batch: int) -> list[list[int]]:
    """SAEDashboard's `NeuronpediaRunner.get_feature_batches`: `np.array_split` of the features into
    ceil(n / per_batch) near-equal groups (none when there are no features)."""
    if n == 0:
        return []
    return [a.tolist() for a in np.array_split(np.arange(n), math.ceil(n / per_batch))]


def _merge(kept: Kept, key: Tensor, code: Tensor, f: Tensor, start: int, largest: bool) -> Kept:
    """Merge a batch's candidates (key / code [A, G, k]) into `kept`; the rows of new entries come
    from the batch's activations `f` [B, Tb, A] (contexts `start`..)."""
    k, t = kept.key.shape[-1], kept.rows.shape[-1]
    new_key, pick = torch.cat([kept.key, key], -1).topk(k, dim=-1, largest=largest)
    new_code = torch.cat([kept.code, code], -1).gather(-1, pick)
    rows = kept.rows.gather(2, pick.clamp(max=k - 1).unsqueeze(-1).expand(-1, -1, -1, t))
    fresh = (pick >= k) & torch.isfinite(new_key)
    if fresh.any():
        a, g, s = fresh.nonzero(as_tuple=True)
        c = new_code[a, g, s]
        rows[a, g, s] = 0.0
        rows[a, g, s, : f.shape[1]] = f[c // t - start, :, a]
    return Kept(new_key, torch.where(torch.isfinite(new_key), new_code, -1), rows)


class _Run:
    """One SAE's running statistics over the alive features `alive` (on the SAE's device)."""

    def __init__(self, index: ActivationIndex, np_cfg: NeuronpediaConfig, d_in: int, device: Any,
                 seed: int, correlations: bool):  # fmt: skip
        assert index.max_act is not None and index.min_act is not None, "scan with ssae_ray.collect"
        alive = (index.max_act > 0).nonzero().flatten()
        self.features = alive.tolist()
        self.batches = export_batches(len(self.features), np_cfg.features_per_batch)
        a, t, dev = len(self.features), index.contexts.input_ids.shape[1], device
        self.alive, self.t, self.bins, self.n_tokens = alive.to(dev), t, np_cfg.hist_bins, 0
        self.lo, self.hi = index.min_act[alive].float().to(dev), index.max_act[alive].float().to(dev)
        nq, kq, kt = np_cfg.n_quantiles, np_cfg.quantile_group_size, np_cfg.top_acts
        bounds = [torch.linspace(0, h, nq + 1) for h in self.hi.tolist()]
        self.bounds = (torch.stack(bounds) if bounds else torch.zeros(0, nq + 1)).to(dev)
        self.hist = torch.zeros(a, self.bins, dtype=torch.long, device=dev)
        self.n_nonzero = torch.zeros(a, dtype=torch.long, device=dev)
        self.interval_n = torch.zeros(a, nq, dtype=torch.long, device=dev)
        self.top = Kept(torch.full((a, 1, kt), -torch.inf, device=dev),
                        torch.full((a, 1, kt), -1, device=dev), torch.zeros(a, 1, kt, t, device=dev))  # fmt: skip
        self.samples = Kept(torch.full((a, nq, kq), torch.inf, device=dev),
                            torch.full((a, nq, kq), -1, device=dev), torch.zeros(a, nq, kq, t, device=dev))  # fmt: skip
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.corr = _CorrSums(a, d_in, self.batches, dev) if correlations else None

    def update(self, f: Tensor, x: Tensor, mask: Tensor, start: int) -> None:
        """Merge a batch: SAE activations `f` [B, Tb, F] (zero at position 0 and on padding), the
        SAE's input `x` [B, Tb, d_in]."""
        fa = f[..., self.alive]
        b, tb, a = fa.shape
        valid = mask.to(fa.device).bool()
        shown = valid.clone()
        shown[:, 0] = False
        n_valid = int(valid.sum())
        self.n_tokens += n_valid
        flat, s_ok = fa.reshape(b * tb, a), shown.reshape(-1)
        nz = flat > 0
        tok, feat = nz.nonzero(as_tuple=True)  # the non-zero activations, sparse
        vals = flat[tok, feat]
        self.n_nonzero += torch.bincount(feat, minlength=a)
        bins = histc_bins(vals, self.lo[feat], self.hi[feat], self.bins)
        self.hist.view(-1).index_add_(0, feat * self.bins + bins, torch.ones_like(bins))
        pos = torch.arange(tb, device=fa.device)
        code = ((start + torch.arange(b, device=fa.device)).unsqueeze(1) * self.t + pos).reshape(-1)
        kt = min(self.top.key.shape[-1], b * tb)
        top = torch.where(nz & s_ok[:, None], flat, -torch.inf).topk(kt, dim=0)
        self.top = _merge(self.top, top.values.T.unsqueeze(1), code[top.indices].T.unsqueeze(1), fa, start,
                          largest=True)  # fmt: skip
        # Interval membership, both ends in: a non-zero activation can be in any interval, the zero
        # tokens (padding aside) all lie in the first, [0, max / n].
        inside = (vals[:, None] >= self.bounds[feat, :-1]) & (vals[:, None] <= self.bounds[feat, 1:])
        self.interval_n.index_add_(0, feat, inside.long())
        self.interval_n[:, 0] += n_valid - torch.bincount(feat, minlength=a)
        keys = torch.rand(b * tb, a, generator=self.gen, device=fa.device)
        self.samples = _merge(self.samples, *self._draws(flat, keys, code, s_ok, tok, feat, inside), fa, start,
                              largest=False)  # fmt: skip
        if self.corr is not None:
            self.corr.update(flat[s_ok], x.reshape(b * tb, -1)[s_ok].to(fa.device, torch.float32))

    def _draws(self, flat: Tensor, keys: Tensor, code: Tensor, s_ok: Tensor, tok: Tensor, feat: Tensor,
               inside: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Each interval's `quantile_group_size` shown tokens with the smallest random keys (a uniform
        draw without replacement): the first interval from all tokens, the others from the non-zero
        activations only. ([A, n_quantiles, k] keys, codes)"""
        a, kq = flat.shape[1], self.samples.key.shape[-1]
        first = (flat >= self.bounds[:, 0]) & (flat <= self.bounds[:, 1]) & s_ok[:, None]
        low = torch.where(first, keys, torch.inf).topk(min(kq, len(flat)), dim=0, largest=False)
        key0, code0 = _pad(low.values.T, kq, torch.inf), _pad(code[low.indices].T, kq, -1)
        nq = inside.shape[1]
        j, n = (inside[:, 1:] & s_ok[tok, None]).nonzero(as_tuple=True)
        t, fe = tok[j], feat[j]
        k_rest, c_rest = _group_bottom_k(fe * (nq - 1) + n, keys[t, fe], code[t], a * (nq - 1), kq)
        keys_all = torch.cat([key0.unsqueeze(1), k_rest.view(a, nq - 1, kq)], 1)
        return keys_all, torch.cat([code0.unsqueeze(1), c_rest.view(a, nq - 1, kq)], 1)

    def result(self) -> FeatureStats:
        cpu = {k: getattr(self, k).cpu() for k in ("lo", "hi", "hist", "n_nonzero", "bounds", "interval_n")}
        top, samples = (Kept(*(t.cpu() for t in k)) for k in (self.top, self.samples))
        neurons = feats = None
        if self.corr is not None:
            neurons, feats = self.corr.tables(self.features)
        return FeatureStats(self.features, self.batches, self.n_tokens, cpu["lo"], cpu["hi"], cpu["hist"],
                            cpu["n_nonzero"], cpu["bounds"], cpu["interval_n"], top, samples, neurons,
                            feats)  # fmt: skip


class _CorrSums:
    """`RollingCorrCoef`'s running sums (`sae_dashboard/utils_fns.py`): feature x input dimension, and
    feature x feature within each export batch (`with_self`), accumulated in float64."""

    def __init__(self, a: int, d_in: int, batches: list[list[int]], dev: Any):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
        self.n, self.f_sum, self.f2_sum, self.x_sum, self.x2_sum = 0, z(a), z(a), z(d_in), z(d_in)
        self.fx = z(a, d_in)
        self.spans = [(bt[0], bt[-1] + 1) for bt in batches]
        self.ff = [z(e - s, e - s) for s, e in self.spans]

    def update(self, f: Tensor, x: Tensor) -> None:
        self.n += f.shape[0]
        self.f_sum += f.sum(0).double()
        self.f2_sum += (f * f).sum(0).double()
        self.x_sum += x.sum(0).double()
        self.x2_sum += (x * x).sum(0).double()
        ft = f.T.contiguous()
        self.fx += (ft @ x).double()
        for (s, e), ff in zip(self.spans, self.ff):
            ff += (ft[s:e] @ ft[s:e].T).double()

    def tables(self, features: list[int]) -> tuple[Corr, Corr]:
        neurons = _top_pearson(self.n, self.f_sum, self.f2_sum, self.x_sum, self.x2_sum, self.fx, False)
        idx: list[list[int]] = []
        pear: list[list[float]] = []
        cos: list[list[float]] = []
        for (s, e), ff in zip(self.spans, self.ff):
            fs, f2 = self.f_sum[s:e], self.f2_sum[s:e]
            i, p, c = _top_pearson(self.n, fs, f2, fs, f2, ff, True)
            idx += [[features[s + j] for j in row] for row in i]
            pear += p
            cos += c
        return neurons, Corr(idx, pear, cos)


def _top_pearson(n: int, xs: Tensor, x2: Tensor, ys: Tensor, y2: Tensor, xy: Tensor, with_self: bool) -> Corr:
    """`RollingCorrCoef.corrcoef` then `topk_pearson(k=3)`: the most Pearson-correlated columns of each
    row, with their Pearson and cosine."""
    cos = xy / (torch.sqrt(torch.outer(x2, y2)) + 1e-6)
    num = n * xy - torch.outer(xs, ys)
    pearson = num / (torch.sqrt(torch.outer(n * x2 - xs**2, n * y2 - ys**2)) + 1e-6)
    pearson = torch.nan_to_num(pearson)  # a zero-variance column under rounding
    if with_self:
        d = torch.arange(cos.shape[0], device=cos.device)
        cos[d, d] = 0.0
        pearson[d, d] = 0.0
    top = pearson.topk(min(CORR_ROWS, pearson.shape[1]), dim=1)
    return Corr(top.indices.tolist(), top.values.tolist(), cos.gather(1, top.indices).tolist())


@torch.no_grad()
def scan_stats(
    lm: LM,
    saes: dict[str, tuple[Any, str]],
    indexes: dict[str, ActivationIndex],
    np_cfg: NeuronpediaConfig,
    batch_size: int,
    seed: int = 0,
    correlations: bool = True,
    progress: bool = True,
) -> dict[str, FeatureStats]:
    """One LM pass over the contexts of `indexes` (the first pass of each SAE in `saes`, `name ->
    (sae, hook)`) computing every SAE's `FeatureStats`."""
    contexts = next(iter(indexes.values())).contexts
    hooks = sorted({hook for _, hook in saes.values()})
    runs = {}
    for name, (sae, _) in saes.items():
        p = next(sae.parameters())
        runs[name] = _Run(indexes[name], np_cfg, int(sae.W_dec.shape[1]), p.device, seed, correlations)
    start = 0
    n_batches = -(-contexts.input_ids.shape[0] // batch_size)
    for batch in tqdm(iter_batches(contexts, batch_size), total=n_batches, desc="dashboard stats",
                      disable=not progress):  # fmt: skip
        acts = capture(lm, batch.input_ids, batch.attention_mask, hooks)
        for name, (sae, hook) in saes.items():
            f = encode(sae, acts[hook], batch.attention_mask)
            runs[name].update(f, acts[hook], batch.attention_mask, start)
        start += batch.input_ids.shape[0]
    return {name: run.result() for name, run in runs.items()}
