"""Activations for training: streamed from the LM (one forward feeds every hook) through a
shuffle buffer, or cached once per selection and read back in a seeded order.

Cache layout (a `stages.run_stage` folder keyed by model + hooks + selection + dtype):

    <workdir>/activations/<key>/
        manifest.json              hooks, d, n_tokens, dtype, shards, E||x||^2 per hook
        tokens.npy                 [n_tokens, 3] int64: token id, doc index, position
        <hook>/shard_00000.npy     [<= shard_tokens, d] float16 / bfloat16 (as uint16) / float32

Row i of every hook folder is the same token, so one index reads all hooks of a batch. The
reader's order depends only on (seed, step): epoch e reads a fresh permutation seeded by
(seed, e), so a resumed run reads exactly what an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ssae_ray.config import Config
from ssae_ray.precision import setting_key_part
from ssae_ray.stages import StageError, read_manifest, run_stage, stage_key
from ssae_ray.training.losses import TrainingError

Batch = dict[str, Tensor]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Streaming from the LM


def lm_activations(cfg: Config, lm: Any, texts: Sequence[str], hooks: Sequence[str],
                   max_tokens: int | None = None, progress: bool = False) -> Iterator[tuple[Batch, Tensor]]:  # fmt: skip
    """Per LM batch: ({hook: [n, d]}, [n, 3] token id / doc / position) for real tokens after
    position 0. One `models.capture` forward per batch feeds every hook."""
    from tqdm.auto import tqdm

    from ssae_ray.models import by_length, cap_tokens, capture, iter_batches, tokenize_docs

    # The contexts that hold the first `max_tokens` tokens, longest first (less padding per batch:
    # `models.by_length`); the order of cached rows does not matter, training permutes them.
    tb = by_length(
        cap_tokens(
            # tokenisation stops once the cap is reached (not the whole selection, then a slice)
            tokenize_docs(
                lm.tokenizer,
                texts,
                cfg.model.context_len,
                prepend_bos=cfg.model.prepend_bos,
                max_tokens=max_tokens,
            ),  # fmt: skip
            max_tokens,
            True,
        )
    )
    total = int(tb.attention_mask[:, 1:].sum())
    total = min(total, max_tokens) if max_tokens else total
    done = 0
    with tqdm(total=total, desc="capture", unit="tok", disable=not progress, dynamic_ncols=True) as bar:
        for b in iter_batches(tb, cfg.model.batch_size):
            if max_tokens is not None and done >= max_tokens:
                break
            acts = capture(lm, b.input_ids, b.attention_mask, list(hooks))
            keep = b.attention_mask.bool().clone()
            keep[:, 0] = False  # position 0: norm ~7x the median (docs/CALIBRATION.md)
            pos = torch.arange(keep.shape[1]).expand_as(keep)
            meta = torch.stack([b.input_ids[keep], b.doc_index[:, None].expand_as(keep)[keep], pos[keep]], 1)
            out = {h: a[keep.to(a.device)].cpu() for h, a in acts.items()}
            if max_tokens is not None and done + meta.shape[0] > max_tokens:
                n = max_tokens - done
                out, meta = {h: a[:n] for h, a in out.items()}, meta[:n]
            done += meta.shape[0]
            bar.update(meta.shape[0])
            yield out, meta


def lm_batches(cfg: Config, lm: Any, texts: Sequence[str], hooks: Sequence[str],
               max_tokens: int | None = None) -> Iterator[Batch]:  # fmt: skip
    """{hook: [n, d]} per LM batch, for `finetune(cfg, saes, lm_batches(...))` without a cache."""
    return (acts for acts, _ in lm_activations(cfg, lm, texts, hooks, max_tokens))


def shuffle_buffer(
    batches: Iterator[Batch], batch_tokens: int, buffer_batches: int, seed: int = 0
) -> Iterator[Batch]:
    """Re-cut a stream of {hook: [n, d]} into `batch_tokens` batches through a buffer of
    `buffer_batches` batches: fill, permute (seeded; the same permutation for every hook), emit
    the first half, keep the rest. Tokens of the tail that do not fill a batch are dropped."""
    gen = torch.Generator().manual_seed(seed)
    cap = max(1, buffer_batches) * batch_tokens
    buf: Batch = {}
    done = False
    while not done:
        while not buf or _rows(buf) < cap:
            try:
                nxt = next(batches)
            except StopIteration:
                done = True
                break
            buf = {h: torch.cat([buf[h], a]) if buf else a for h, a in nxt.items()}
        if not buf:
            return
        n = _rows(buf)
        perm = torch.randperm(n, generator=gen)
        buf = {h: a[perm] for h, a in buf.items()}
        keep = 0 if done else max(n - max(cap // 2, batch_tokens) // batch_tokens * batch_tokens, 0)
        while _rows(buf) - batch_tokens >= keep:
            yield {h: a[:batch_tokens] for h, a in buf.items()}
            buf = {h: a[batch_tokens:] for h, a in buf.items()}


def _rows(b: Batch) -> int:
    return next(iter(b.values())).shape[0] if b else 0


# ---------------------------------------------------------------------------------------------
# The cache


class CacheInfo(NamedTuple):
    path: Path
    hooks: list[str]
    d: dict[str, int]
    n_tokens: int
    dtype: str
    shards: list[int]
    """Tokens in each shard (the same for every hook)."""
    mean_sq_norm: dict[str, float]


def cache_key(cfg: Config, texts: Sequence[str], hooks: Sequence[str], max_tokens: int | None) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return stage_key(
        "activations-v1", cfg.model.source, cfg.model.tiny_arch, cfg.model.dtype, cfg.model.context_len,
        sorted(hooks), h.hexdigest(), max_tokens, cfg.train.cache_dtype, cfg.train.cache_shard_tokens,
        # The setting, not what it resolves to here: the driver plans the cache, a GPU task builds it.
        *setting_key_part(cfg.model.precision),
        *(("bos",) if cfg.model.prepend_bos else ()),  # contexts start with BOS: other tokens
    )  # fmt: skip


def cache_activations(cfg: Config, lm: Any, texts: Sequence[str], hooks: Sequence[str],
                      max_tokens: int | None = None, progress: bool = True) -> Path:  # fmt: skip
    """Capture `hooks` on `texts` once (position 0 and padding dropped) into a sharded cache;
    reused when model, hooks, texts, token cap and dtype are unchanged."""
    if cfg.train.cache_dtype not in DTYPES:
        raise TrainingError(
            f"train.cache_dtype must be one of {sorted(DTYPES)}, got {cfg.train.cache_dtype!r}"
        )
    hooks = list(hooks)
    key = cache_key(cfg, texts, hooks, max_tokens)
    dtype = DTYPES[cfg.train.cache_dtype]
    shard = cfg.train.cache_shard_tokens

    def build(tmp: Path) -> dict[str, Any]:
        pending: dict[str, list[Tensor]] = {h: [] for h in hooks}
        metas: list[Tensor] = []
        shards: list[int] = []
        sq = {h: 0.0 for h in hooks}
        n_pending = 0
        for h in hooks:
            (tmp / h).mkdir()

        def flush(final: bool) -> None:
            nonlocal n_pending
            while n_pending >= shard or (final and n_pending > 0):
                n = min(shard, n_pending)
                for h in hooks:
                    a = torch.cat(pending[h])
                    _save(tmp / h / f"shard_{len(shards):05d}.npy", a[:n].to(dtype))
                    pending[h] = [a[n:]]
                shards.append(n)
                n_pending -= n

        for acts, meta in lm_activations(cfg, lm, texts, hooks, max_tokens, progress):
            for h, a in acts.items():
                if not bool(torch.isfinite(a).all()):
                    raise TrainingError(f"the model produced NaN/inf activations at {h}; check model.dtype")
                sq[h] += float(a.double().pow(2).sum())
                pending[h].append(a)
            metas.append(meta)
            n_pending += meta.shape[0]
            flush(False)
        flush(True)
        n = sum(shards)
        if n == 0:
            raise StageError("no tokens to cache: the texts are empty or shorter than 2 tokens")
        np.save(tmp / "tokens.npy", torch.cat(metas).numpy())
        d = {h: int(np.load(tmp / h / "shard_00000.npy", mmap_mode="r").shape[1]) for h in hooks}
        return {"hooks": hooks, "d": d, "n_tokens": n, "dtype": cfg.train.cache_dtype, "shards": shards,
                "mean_sq_norm": {h: sq[h] / n for h in hooks}, "model": cfg.model.source,
                "n_texts": len(texts), "max_tokens": max_tokens,
                "precision": getattr(getattr(lm, "precision", None), "name", None)}  # fmt: skip

    return run_stage(cfg.root, "activations", key, build)


def _save(path: Path, a: Tensor) -> None:
    arr = a.contiguous().view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.contiguous().numpy()
    np.save(path, arr)


def open_cache(path: str | Path) -> CacheInfo:
    path = Path(path)
    m = read_manifest(path)
    if m is None or "hooks" not in m:
        raise TrainingError(
            f"{path} is not an activation cache (no manifest.json); build it with cache_activations"
        )
    return CacheInfo(path, m["hooks"], m["d"], m["n_tokens"], m["dtype"], m["shards"], m["mean_sq_norm"])


class _Reader:
    """Random row access over one hook's shards (memory-mapped)."""

    def __init__(self, info: CacheInfo, hook: str):
        self.arrays = [
            np.load(info.path / hook / f"shard_{i:05d}.npy", mmap_mode="r") for i in range(len(info.shards))
        ]
        self.starts = np.cumsum([0, *info.shards])
        self.bf16 = info.dtype == "bfloat16"

    def rows(self, idx: np.ndarray) -> Tensor:
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        which = np.searchsorted(self.starts, sidx, side="right") - 1
        parts = [self.arrays[s][sidx[which == s] - self.starts[s]] for s in np.unique(which)]
        t = torch.from_numpy(np.concatenate(parts))
        t = t.view(torch.bfloat16) if self.bf16 else t
        out = torch.empty_like(t, dtype=torch.float32)
        out[torch.from_numpy(order)] = t.float()
        return out


def iter_cache_batches(path: str | Path, hooks: Sequence[str], batch_tokens: int, seed: int = 0,
                       start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:  # fmt: skip
    """Endless {hook: [batch_tokens // world, d] float32} batches; step k reads rows
    perm_e[j*B : (j+1)*B] (e, j = divmod(k, batches per epoch), perm_e seeded by (seed, e)),
    and replica `rank` of `world` takes its slice of that batch."""
    info = open_cache(path)
    missing = [h for h in hooks if h not in info.hooks]
    if missing:
        raise TrainingError(
            f"the activation cache at {info.path} has no hook {missing[0]!r}; it holds {info.hooks}"
        )
    if info.n_tokens < batch_tokens:
        raise TrainingError(
            f"the activation cache holds {info.n_tokens} tokens, fewer than one batch of {batch_tokens}; "
            "lower train.batch_tokens or select more text"
        )
    if batch_tokens % world:
        raise TrainingError(f"train.batch_tokens={batch_tokens} must be divisible by the {world} replicas")
    readers = {h: _Reader(info, h) for h in hooks}
    per_epoch = info.n_tokens // batch_tokens
    part = batch_tokens // world
    step = start_step
    epoch, perm = -1, np.empty(0, dtype=np.int64)
    while True:
        e, j = divmod(step, per_epoch)
        if e != epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + e)
            epoch, perm = e, torch.randperm(info.n_tokens, generator=g).numpy()
        idx = perm[j * batch_tokens + rank * part : j * batch_tokens + (rank + 1) * part]
        yield {h: r.rows(idx) for h, r in readers.items()}
        step += 1


def describe(path: str | Path) -> str:
    info = open_cache(path)
    return json.dumps({"tokens": info.n_tokens, "hooks": info.hooks, "dtype": info.dtype})


# ---------------------------------------------------------------------------------------------
# Sizing


class CachePlan(NamedTuple):
    texts: list[str]
    """The texts to capture (seeded-shuffled when the cap binds, so the cap keeps a random subset)."""
    max_tokens: int | None
    """Token cap passed to `cache_activations` (None: the whole selection fits under it)."""
    n_tokens: int
    """Tokens the cache will hold (exact when the tokenizer was given, else the cap)."""
    bytes: int
    """Its size on disk: activations of every hook at `train.cache_dtype` + 24 B/token of ids."""
    cached: bool
    """Already built (nothing to capture, no disk needed)."""
    path: Path


def train_tokens(tokenizer: Any, texts: Sequence[str], context_len: int) -> int:
    """Tokens `lm_activations` yields for `texts`: each context of >= 2 tokens minus its position 0."""
    n = 0
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        for s in range(0, len(ids), context_len):
            k = len(ids[s : s + context_len])
            n += k - 1 if k >= 2 else 0
    return n


def cache_plan(cfg: Config, texts: Sequence[str], hooks: Sequence[str], d_in: dict[str, int],
               tokenizer: Any = None) -> CachePlan:  # fmt: skip
    """What to capture for a sweep: `steps × batch_tokens × (1 + cache_margin)` tokens (what one
    trial reads, plus the margin), or the whole selection when it is smaller; and its disk size."""
    import math
    import random

    tc = cfg.train
    need = math.ceil(tc.steps * tc.batch_tokens * (1 + max(0.0, tc.cache_margin)))
    have = train_tokens(tokenizer, texts, cfg.model.context_len) if tokenizer is not None else None
    texts = list(texts)
    if have is not None and have <= need:
        max_tokens, n = None, have
    else:
        random.Random(cfg.seed).shuffle(texts)  # the cap keeps a random subset, not the top-ranked
        max_tokens, n = need, need if have is None else min(have, need)
    item = 4 if tc.cache_dtype == "float32" else 2
    size = n * (sum(d_in[h] for h in hooks) * item + 24)
    path = Path(cfg.root).expanduser() / "activations" / cache_key(cfg, texts, hooks, max_tokens)
    return CachePlan(texts, max_tokens, n, size, read_manifest(path) is not None, path)
