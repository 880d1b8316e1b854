"""Streaming per-feature statistics of SAE activations: one LM pass over a token set, many SAEs.

`scan_many` runs the LM over the contexts once (each batch one forward capturing every hook) and
keeps, per SAE and feature, only bounded state (never a dense tokens x features matrix): the
top-K contexts by max activation (a running `torch.topk` merge), a uniform sample of activating
contexts (a bottom-k merge of random keys: priority sampling without replacement), counts, the
sparse set of activating (context, feature) pairs, each feature's largest and smallest non-zero
activation (the range of the dashboard's histograms, `ssae_ray/dashboard/stats.py`), and optionally
the token activations of a `window` around each kept context's strongest token.

Auto-interp's example builder and the feature dashboard both read these indexes. Position 0 of
every context is excluded (its norm is an outlier).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ssae_ray.models import LM, TokenBatch, capture, iter_batches


def histc_bins(v: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """The bin `torch.histc(x, bins)` puts each value of `v` in, where x (one row of values) has
    min `lo` and max `hi` (broadcast with `v`, e.g. one range per feature): histc's linear
    interpolation in the values' dtype, `int((v - lo) * bins / (hi - lo))`, the top edge in the last
    bin, and `lo == hi` widened to [lo - 1, hi + 1] as histc does (PyTorch's
    `aten/src/ATen/native/cpu/HistogramKernel.cpp`, `histc_select_outer_bin_edges`). Values
    outside [lo, hi] are clamped into the end bins (histc would drop them)."""
    same = lo == hi
    lo, hi = torch.where(same, lo - 1, lo), torch.where(same, hi + 1, hi)
    pos = ((v - lo) * bins / (hi - lo)).long()
    return pos.clamp(0, bins - 1)


def histc_centres(lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """[R, bins] bar values of SAEDashboard's `HistogramData.from_data` (`sae_dashboard/utils_fns.py`)
    for rows with data range [lo, hi] ([R] each): `torch.linspace(lo, hi, bins + 1)[:-1]` plus half
    a bin, as it computes them (float32, unrounded)."""
    rows = [
        torch.linspace(a, b, bins + 1)[:-1] + (b - a) / bins / 2 for a, b in zip(lo.tolist(), hi.tolist())
    ]
    return torch.stack(rows) if rows else torch.zeros(0, bins)


class Windows(NamedTuple):
    start: Tensor
    """[F, K] first position of each kept context's window (-1 where none)."""
    acts: Tensor
    """[F, K, W] the feature's activation on each window token (0 past the context's end)."""


class ActivationIndex(NamedTuple):
    contexts: TokenBatch
    """The scanned contexts."""
    top_acts: Tensor
    """[F, K] max activation of each feature's top contexts, descending (-inf where fewer)."""
    top_ctx: Tensor
    """[F, K] context index of each top context (-1 where fewer)."""
    sample_ctx: Tensor
    """[F, S] a uniform random sample of the contexts where the feature activates (-1 where fewer)."""
    n_active_ctx: Tensor
    """[F] contexts in which the feature activates on some token (position 0 excluded)."""
    n_active_tok: Tensor
    """[F] tokens on which it activates."""
    pairs: Tensor
    """Sorted codes `context * F + feature` of every activating (context, feature) pair."""
    n_tokens: int
    """Tokens scanned (positions 1.. of real tokens)."""
    sample_acts: Tensor | None = None
    """[F, S] max activation of each sampled context (-inf where fewer)."""
    max_act: Tensor | None = None
    """[F] largest activation on any scanned token (0 where it never fires)."""
    min_act: Tensor | None = None
    """[F] smallest non-zero (> 0) activation (inf where it never fires)."""
    top_win: Windows | None = None
    """Windows of the top contexts (when scanned with `window > 0`)."""
    sample_win: Windows | None = None

    def head(self, k_top: int, k_sample: int) -> ActivationIndex:
        """The index a scan with smaller `k_top` / `k_sample` gives (same seed: the bottom-k of the
        same random keys and the top-k of the same values are prefixes of the larger ones)."""
        return self._replace(
            top_acts=self.top_acts[:, :k_top],
            top_ctx=self.top_ctx[:, :k_top],
            sample_ctx=self.sample_ctx[:, :k_sample],
            sample_acts=None if self.sample_acts is None else self.sample_acts[:, :k_sample],
        )


def encode(sae: Any, x: Tensor, mask: Tensor) -> Tensor:
    """[B, T, F] SAE feature activations on the SAE's device, zero at position 0 and on padding."""
    p = next(sae.parameters())
    with torch.no_grad():
        f = sae.encode(x.to(device=p.device, dtype=p.dtype)).float()
    valid = mask.to(f.device).bool().clone()
    valid[:, 0] = False
    return f * valid.unsqueeze(-1)


def feature_acts(lm: LM, sae: Any, hook: str, batch: TokenBatch) -> Tensor:
    """`encode` of one batch's activations at `hook`."""
    x = capture(lm, batch.input_ids, batch.attention_mask, [hook])[hook]
    return encode(sae, x, batch.attention_mask)


def window_start(length: Tensor, center: Tensor, width: int) -> Tensor:
    """First position of a `width`-token window around `center` (a quarter of it after the
    centre) that stays inside a context of `length` tokens."""
    start = (center - (width - width // 4)).clamp(min=0)
    end = torch.minimum(length, start + width)
    return (end - width).clamp(min=0)


def _gather_windows(f: Tensor, mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """([F, B] window starts, [F, B, W] activations) of a batch [B, T, F] around each context's
    strongest token per feature."""
    b, t, d = f.shape
    if t < width:
        f = torch.nn.functional.pad(f, (0, 0, 0, width - t))
    length = mask.sum(1).to(f.device)  # [B]
    start = window_start(length.unsqueeze(1), f.argmax(1), width)  # [B, F]
    idx = start.unsqueeze(1) + torch.arange(width, device=f.device).view(1, width, 1)  # [B, W, F]
    win = f.gather(1, idx)
    return start.T.cpu(), win.permute(2, 0, 1).cpu()


def _merge(old: Tensor, new: Tensor, pick: Tensor) -> Tensor:
    """Gather rows `pick` [F, K] of cat(old, new) along dim 1 (extra dims follow)."""
    both = torch.cat([old, new], 1)
    if both.dim() == 3:
        pick = pick.unsqueeze(-1).expand(-1, -1, both.shape[2])
    return both.gather(1, pick)


class _Running:
    """One SAE's running top-k, bottom-k sample, counts, pairs, histogram and windows."""

    def __init__(self, d_sae: int, k_top: int, k_sample: int, threshold: float, seed: int, window: int):
        self.d_sae, self.k_top, self.k_sample, self.threshold = d_sae, k_top, k_sample, threshold
        self.window = window
        self.gen = torch.Generator().manual_seed(seed)
        self.top_acts = torch.full((d_sae, k_top), -torch.inf)
        self.top_ctx = torch.full((d_sae, k_top), -1, dtype=torch.long)
        self.keys = torch.full((d_sae, k_sample), torch.inf)
        self.sample_ctx = torch.full((d_sae, k_sample), -1, dtype=torch.long)
        self.sample_acts = torch.full((d_sae, k_sample), -torch.inf)
        self.n_ctx = torch.zeros(d_sae, dtype=torch.long)
        self.n_tok = torch.zeros(d_sae, dtype=torch.long)
        self.max_act = torch.zeros(d_sae)
        self.min_act = torch.full((d_sae,), torch.inf)
        self.pairs: list[Tensor] = []
        if window:
            self.top_win = Windows(torch.full((d_sae, k_top), -1), torch.zeros(d_sae, k_top, window))
            self.sample_win = Windows(torch.full((d_sae, k_sample), -1), torch.zeros(d_sae, k_sample, window))

    def update(self, f: Tensor, mask: Tensor, start: int) -> None:
        """Merge a batch's activations [B, T, F] (reduced on their device; only [B, F] moves)."""
        b, d = f.shape[0], self.d_sae
        active = f > self.threshold
        self.n_tok += active.sum((0, 1)).cpu()
        self.max_act = torch.maximum(self.max_act, f.amax((0, 1)).cpu())
        pos_min = torch.where(f > 0, f, torch.inf).amin((0, 1)).cpu()
        self.min_act = torch.minimum(self.min_act, pos_min)
        ctx_max = f.amax(1).cpu()
        ctx_active = active.any(1).cpu()
        self.n_ctx += ctx_active.sum(0)
        ids = torch.arange(start, start + b).unsqueeze(0).expand(d, b)
        vals = torch.where(ctx_active, ctx_max, -torch.inf).T
        self.top_acts, top_pick = torch.cat([self.top_acts, vals], 1).topk(self.k_top, dim=1)
        self.top_ctx = _merge(self.top_ctx, ids, top_pick)
        r = torch.where(ctx_active, torch.rand(b, d, generator=self.gen), torch.inf).T
        self.keys, s_pick = torch.cat([self.keys, r], 1).topk(self.k_sample, dim=1, largest=False)
        self.sample_ctx = _merge(self.sample_ctx, ids, s_pick)
        self.sample_acts = _merge(self.sample_acts, vals, s_pick)
        if self.window:
            w_start, w_acts = _gather_windows(f, mask, self.window)
            self.top_win = Windows(
                _merge(self.top_win.start, w_start, top_pick), _merge(self.top_win.acts, w_acts, top_pick)
            )
            self.sample_win = Windows(
                _merge(self.sample_win.start, w_start, s_pick), _merge(self.sample_win.acts, w_acts, s_pick)
            )
        c, feat = ctx_active.nonzero(as_tuple=True)
        self.pairs.append((c + start) * d + feat)

    def index(self, contexts: TokenBatch, n_tokens: int) -> ActivationIndex:
        self.top_ctx[self.top_acts == -torch.inf] = -1
        self.sample_ctx[self.keys == torch.inf] = -1
        pairs = torch.cat(self.pairs).sort().values if self.pairs else torch.zeros(0, dtype=torch.long)
        top_win = sample_win = None
        if self.window:
            top_win = self.top_win._replace(start=self.top_win.start.masked_fill(self.top_ctx < 0, -1))
            sample_win = self.sample_win._replace(
                start=self.sample_win.start.masked_fill(self.sample_ctx < 0, -1)
            )
        return ActivationIndex(contexts, self.top_acts, self.top_ctx, self.sample_ctx, self.n_ctx, self.n_tok,
                               pairs, n_tokens, self.sample_acts, self.max_act, self.min_act, top_win,
                               sample_win)  # fmt: skip


def scan_many(
    lm: LM,
    saes: dict[str, tuple[Any, str]],
    contexts: TokenBatch,
    k_top: int,
    k_sample: int,
    batch_size: int = 16,
    threshold: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    window: int = 0,
    timings: dict[str, float] | None = None,
) -> dict[str, ActivationIndex]:
    """One pass over `contexts` for several SAEs (`name -> (sae, hook)`): each batch is one LM
    forward capturing every hook, then each SAE's features are merged into its running index.
    `window > 0` also keeps each kept context's `window` token activations. `timings`, when given,
    receives the seconds spent in the LM forwards (`lm`) and in the whole scan (`scan`)."""
    hooks = sorted({hook for _, hook in saes.values()})
    runs = {
        n: _Running(int(sae.W_dec.shape[0]), k_top, k_sample, threshold, seed, window)
        for n, (sae, _) in saes.items()
    }
    n_tokens, start, t_lm, t0 = 0, 0, 0.0, time.perf_counter()
    n_batches = -(-contexts.input_ids.shape[0] // batch_size)
    batches = iter_batches(contexts, batch_size)
    for batch in tqdm(batches, total=n_batches, desc="feature scan", disable=not progress):
        t1 = time.perf_counter()
        acts = capture(lm, batch.input_ids, batch.attention_mask, hooks)
        t_lm += time.perf_counter() - t1
        n_tokens += int(batch.attention_mask[:, 1:].sum())
        for name, (sae, hook) in saes.items():
            runs[name].update(encode(sae, acts[hook], batch.attention_mask), batch.attention_mask, start)
        start += batch.input_ids.shape[0]
    if timings is not None:
        timings["lm"] = timings.get("lm", 0.0) + t_lm
        timings["scan"] = timings.get("scan", 0.0) + time.perf_counter() - t0
    return {name: run.index(contexts, n_tokens) for name, run in runs.items()}


def scan(
    lm: LM,
    sae: Any,
    hook: str,
    contexts: TokenBatch,
    k_top: int,
    k_sample: int,
    batch_size: int = 16,
    threshold: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> ActivationIndex:
    """One pass over `contexts`: per-feature top-k, random sample, counts and activating pairs."""
    return scan_many(
        lm, {"sae": (sae, hook)}, contexts, k_top, k_sample, batch_size, threshold, seed, progress
    )["sae"]
