"""Selection: rank passages by a strategy, optionally rerank by SAE-TracIn, fill the token budget.

Strategies: `dense` (similarity to the seed embeddings, `dense_score` mean or max), `bm25` (the
seed set as one query), `dense+tracin` / `bm25+tracin` (keep the top `tracin_fraction` of the
passages, rerank by grad L(z) . grad L(seed) of the GSAE at the first hook of `cfg.sae.hooks`)
and `random` (the paper's full-corpus baseline). The budget is counted in retriever tokens, or
in LM tokens (`retrieval.budget_unit: lm`, as the paper counts its 13.9M).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssae_ray.config import STRATEGIES, Config
from ssae_ray.precision import choose
from ssae_ray.retrieval.embed import (
    EmbedModel,
    RetrievalError,
    encode,
    load_encoder,
    load_tokenizer,
    resolve_model,
    split_passages,
)
from ssae_ray.retrieval.index import ShardedIndex
from ssae_ray.stages import read_manifest, run_stage, stage_key

log = logging.getLogger("ssae_ray")


class Ranking(NamedTuple):
    rows: np.ndarray
    """Passage rows (order of the index's passages files), best first."""
    scores: np.ndarray
    """The strategy's score of each row (TracIn score for +tracin strategies)."""
    first_scores: np.ndarray | None
    """The first-stage (dense / bm25) score, for +tracin strategies."""
    act_scale: float | None = None
    """TracIn: the activation scale c the scores were computed at."""


class Passages:
    """The index's passages: metadata in memory, texts read per file on demand and kept in a
    least-recently-used cache of at most `cache_bytes` bytes of Arrow text buffers (a random
    selection touches every passage file: an unbounded cache would end up holding the corpus)."""

    DEFAULT_CACHE_BYTES = 512 * 2**20

    def __init__(self, index_dir: Path, manifest: dict[str, Any], cache_bytes: int | None = None) -> None:
        self.dir = index_dir
        self.files = sorted({s["passages"] for s in manifest["shards"]})
        cols = ["pid", "doc_id", "n_tokens"] + (["is_domain"] if manifest.get("has_is_domain") else [])
        tables = [pq.read_table(index_dir / f, columns=cols) for f in self.files]
        self.offsets = np.cumsum([0] + [len(t) for t in tables])
        self.meta = pa.concat_tables(tables)
        self.n_tokens = self.meta["n_tokens"].to_numpy().astype(np.int64)
        self.is_domain = (
            self.meta["is_domain"].to_numpy(zero_copy_only=False) if "is_domain" in cols else None
        )
        if cache_bytes is None:  # not a config field: it changes memory, never the selection's key
            mb = os.environ.get("SSAE_RAY_PASSAGE_CACHE_MB")
            cache_bytes = int(float(mb) * 2**20) if mb else self.DEFAULT_CACHE_BYTES
        self.cache_bytes = int(cache_bytes)
        self._texts: OrderedDict[int, pa.ChunkedArray] = OrderedDict()
        self.cached_bytes = 0
        """Bytes of text held now (never above `cache_bytes`)."""
        self.peak_cached_bytes = 0
        self.reads = 0
        """Passage files read so far (re-reads of evicted files included)."""

    def __len__(self) -> int:
        return len(self.meta)

    def _file(self, f: int) -> pa.ChunkedArray:
        col = self._texts.get(f)
        if col is not None:
            self._texts.move_to_end(f)
            return col
        col = pq.read_table(self.dir / self.files[f], columns=["text"])["text"]
        self.reads += 1
        size = int(col.nbytes)
        if size <= self.cache_bytes:
            while self._texts and self.cached_bytes + size > self.cache_bytes:
                _, old = self._texts.popitem(last=False)
                self.cached_bytes -= int(old.nbytes)
            self._texts[f] = col
            self.cached_bytes += size
            self.peak_cached_bytes = max(self.peak_cached_bytes, self.cached_bytes)
        return col

    def texts(self, rows: np.ndarray) -> list[str]:
        """The texts of passage rows `rows`, in that order (rows grouped by file: one read each)."""
        rows = np.asarray(rows, dtype=np.int64)
        out: list[str] = [""] * len(rows)
        files = np.searchsorted(self.offsets, rows, side="right") - 1
        for f in dict.fromkeys(files.tolist()):
            at = np.flatnonzero(files == f)
            got = self._file(int(f)).take(pa.array(rows[at] - self.offsets[f])).to_pylist()
            for j, t in zip(at.tolist(), got, strict=True):
                out[j] = t
        return out


def load_seed_texts(cfg: Config, corpus_dir: str | Path) -> list[str]:
    """The seed documents retrieval starts from: the built corpus's `seed.parquet` (the corpus
    stage reads `corpus.seed_path` / `corpus.sources.seed` into it, capped and normalised)."""
    path = Path(corpus_dir) / "seed.parquet"
    if not path.is_file():
        raise RetrievalError(f"no seed set at {path}; build the corpus first (`ssae-ray corpus`)")
    texts = [t for t in pq.read_table(path, columns=["text"])["text"].to_pylist() if t and t.strip()]
    if not texts:
        raise RetrievalError(
            f"the seed set {path} is empty: set corpus.seed_path or corpus.sources.seed (a few in-domain "
            "documents to retrieve from)"
        )
    return texts


def embed_seeds(cfg: Config, manifest: dict[str, Any], texts: list[str]) -> np.ndarray:
    """Seed passages (cut like the corpus) embedded with the retriever named by the config, which
    must be the one the index was built with."""
    model = resolve_model(cfg.retrieval, cfg.root / "models")
    tok = load_tokenizer(model.path)
    passages = [p for doc in split_passages(texts, tok, cfg.retrieval.passage_tokens) for p, _ in doc]
    emb = encode(load_encoder(model, cfg.retrieval.passage_tokens), passages, cfg.retrieval.embed_batch_size,
                 cfg.retrieval.normalize, choose(cfg.model.precision, "cpu", "retriever embedding"))  # fmt: skip
    if emb.shape[1] != manifest["dim"]:
        raise RetrievalError(
            f"seed embeddings have dim {emb.shape[1]} ({model.model_id}) but the index holds dim {manifest['dim']} "
            f"({manifest['model_id']}): set retrieval.embed_model to the index's retriever or rebuild the index"
        )
    if model.model_id != manifest["model_id"]:
        raise RetrievalError(
            f"the index was built with {manifest['model_id']} but retrieval.embed_model is {model.model_id}: "
            "seeds and corpus must share one embedding space; rebuild the index or change the config"
        )
    return emb


# ---------------------------------------------------------------------------------------------
# Rankings


def dense_rank(index: ShardedIndex, vec_to_row: np.ndarray, seed_emb: np.ndarray, how: str, k: int,
               normalize: bool) -> Ranking:  # fmt: skip
    """Top-k passages by similarity to the mean seed embedding, or by max similarity to any seed
    (exact: a passage in the top-k by max is in its best seed's top-k)."""
    if how == "mean":
        q = seed_emb.mean(0, keepdims=True)
        if normalize:
            q = q / max(float(np.linalg.norm(q)), 1e-12)
        res = index.search(q, k)
        ids, scores = res.ids[0], res.scores[0]
    elif how == "max":
        res = index.search(seed_emb, k)
        ids, scores = res.ids.reshape(-1), res.scores.reshape(-1)
        order = np.lexsort((ids, -scores))
        ids, scores = ids[order], scores[order]
        _, first = np.unique(ids, return_index=True)
        keep = np.sort(first)[:k]
        ids, scores = ids[keep], scores[keep]
    else:
        raise RetrievalError(f"retrieval.dense_score must be mean or max, got {how!r}")
    ok = ids >= 0
    return Ranking(vec_to_row[ids[ok]], scores[ok].astype(np.float32), None)


def bm25_rank(index_dir: Path, manifest: dict[str, Any], seed_texts: list[str]) -> Ranking:
    from ssae_ray.retrieval.bm25 import bm25_scores

    if not manifest.get("bm25"):
        raise RetrievalError(
            "the index was built without BM25 (retrieval.build_bm25=false); rebuild it with BM25"
        )
    scores = bm25_scores(index_dir / manifest["bm25"], seed_texts)
    rows = np.lexsort((np.arange(len(scores)), -scores))
    return Ranking(rows, scores[rows], None)


def tracin_rerank(cfg: Config, first: Ranking, passages: Passages, seed_texts: list[str], lm: Any,
                  sae: Any) -> Ranking:  # fmt: skip
    """Rerank the first stage's passages by SAE-TracIn on the LM's activations at `cfg.sae.hooks[0]`."""
    import torch
    from tqdm.auto import tqdm

    from ssae_ray.models import capture, tokenize_docs
    from ssae_ray.retrieval.tracin import seed_gradient, tracin_token_terms, training_view, valid_tokens

    hook, lam = cfg.sae.hooks[0], cfg.train.lam
    T, B = cfg.model.context_len, cfg.model.batch_size

    def batches(texts: list[str]):
        tb = tokenize_docs(lm.tokenizer, texts, T, prepend_bos=cfg.model.prepend_bos)
        for s in range(0, len(tb.input_ids), B):
            ids, mask = tb.input_ids[s : s + B], tb.attention_mask[s : s + B]
            yield (
                capture(lm, ids, mask, [hook])[hook].to(sae.W_enc.device),
                valid_tokens(mask),
                tb.doc_index[s : s + B],
            )

    acts, masks = [], []
    for x, m, _ in batches(seed_texts):
        acts.append(x)
        masks.append(m.to(x.device))
    # Score in the space the finetune trains in: c·x with c from the GSAE (or, as training does
    # without one, from the activations: E||c·x||^2 = d_in), biases times c.
    from ssae_ray.training.loop import act_scale_for

    c = act_scale_for(cfg.train, sae, torch.cat([a[m] for a, m in zip(acts, masks, strict=True)]))
    view = training_view(sae, c)
    seed = seed_gradient(view, [a * c for a in acts], masks, lam)
    del acts, masks
    texts = passages.texts(first.rows)
    total = torch.zeros(len(texts), dtype=torch.float64)
    count = torch.zeros(len(texts), dtype=torch.float64)
    bar = tqdm(total=len(texts), unit="passage", desc="tracin")
    for x, m, doc in batches(texts):
        terms = tracin_token_terms(view, x * c, seed, lam).cpu().double() * m
        total.index_add_(0, doc, terms.sum(1))
        count.index_add_(0, doc, m.sum(1).double())
        bar.n = int(doc.max()) + 1
        bar.refresh()
    bar.close()
    score = (total / count.clamp_min(1)).numpy()
    score[count.numpy() == 0] = -np.inf  # a passage of one LM token has no valid position
    order = np.lexsort((np.arange(len(score)), -score))
    return Ranking(first.rows[order], score[order].astype(np.float32), first.scores[order], c)


# ---------------------------------------------------------------------------------------------
# Budget


class Fill(NamedTuple):
    picks: np.ndarray
    """Positions in the ranking that were selected."""
    texts: list[str]
    tokens: int
    exact_dups: int
    near_dups: int
    exhausted: bool
    """The ranking ran out before the budget was filled."""


def _near_key(text: str) -> str:
    return hashlib.sha1(" ".join(re.findall(r"[a-z]+", text.lower())).encode()).hexdigest()


def fill_budget(ranking: Ranking, passages: Passages, budget: int, chunk: int = 4096,
                count: Callable[[list[str]], list[int]] | None = None) -> Fill:  # fmt: skip
    """Walk the ranking best first, skipping exact and near duplicates (same words ignoring case,
    digits and punctuation), until `budget` tokens are selected (the last passage may cross it):
    retriever tokens, or the tokens `count` gives each passage text (the LM's, `budget_unit: lm`)."""
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    picks: list[int] = []
    texts: list[str] = []
    tokens = exact = near = 0
    for start in range(0, len(ranking.rows), chunk):
        rows = ranking.rows[start : start + chunk]
        chunk_texts = passages.texts(rows)
        sizes = count(chunk_texts) if count is not None else [int(passages.n_tokens[r]) for r in rows]
        for j, (text, size) in enumerate(zip(chunk_texts, sizes, strict=True)):
            if tokens >= budget:
                return Fill(np.array(picks, dtype=np.int64), texts, tokens, exact, near, False)
            h = hashlib.sha1(text.strip().encode()).hexdigest()
            if h in seen_exact:
                exact += 1
                continue
            n = _near_key(text)
            if n in seen_near:
                near += 1
                continue
            seen_exact.add(h)
            seen_near.add(n)
            picks.append(start + j)
            texts.append(text)
            tokens += int(size)
    return Fill(np.array(picks, dtype=np.int64), texts, tokens, exact, near, tokens < budget)


# ---------------------------------------------------------------------------------------------
# The stage


def retrieve(cfg: Config, corpus_dir: str | Path, index_dir: str | Path, strategy: str | None = None,
             lm: Any = None, sae: Any = None, seed_texts: list[str] | None = None) -> Path:  # fmt: skip
    """Select `cfg.retrieval.token_budget` tokens of passages by `strategy` (default
    `cfg.retrieval.strategy`); writes `<workdir>/selection/<key>/selection.parquet` + manifest.
    TracIn strategies use `lm` / `sae` (the GSAE at `cfg.sae.hooks[0]`) or load them from the config.
    The seed is the corpus's `seed.parquet`, or `seed_texts` when given (SHIFT's seed bios)."""
    r = cfg.retrieval
    strategy = strategy or r.strategy
    if strategy not in STRATEGIES:
        raise RetrievalError(
            f"unknown retrieval strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise RetrievalError(f"no finished index at {index_dir}; run build_index (`ssae-ray index`) first")
    if seed_texts is None:
        seed_texts = load_seed_texts(cfg, corpus_dir)
    elif not [t for t in seed_texts if t and t.strip()]:
        raise RetrievalError("retrieve(seed_texts=...) got no non-empty seed text")
    if r.budget_unit not in ("retriever", "lm"):
        raise RetrievalError(f"retrieval.budget_unit={r.budget_unit!r}: choose retriever or lm")
    if r.budget_unit == "retriever" and r.token_budget > manifest["n_tokens"]:
        raise RetrievalError(
            f"retrieval.token_budget={r.token_budget} is larger than the whole corpus ({manifest['n_tokens']} "
            "retriever tokens): lower the budget or use a larger corpus"
        )
    tracin = strategy.endswith("+tracin")
    extra: list[Any] = []
    if tracin:
        lm, sae = _lm_and_sae(cfg, lm, sae)
        from ssae_ray.saes import sae_hash

        extra = [cfg.train.lam, cfg.sae.hooks[0], cfg.model, sae_hash(sae)]
    if r.budget_unit == "lm":  # the LM's tokenizer counts the budget
        extra.append([cfg.model.source, cfg.model.gguf_file, cfg.model.tiny_arch])
    seed_sha = hashlib.sha256("\x00".join(seed_texts).encode()).hexdigest()
    key = stage_key("retrieve-v1", strategy, r, manifest["key"], seed_sha, cfg.seed, *extra)

    def build(tmp: Path) -> dict[str, Any]:
        return _select(cfg, index_dir, manifest, strategy, seed_texts, lm, sae, tmp)

    return run_stage(cfg.root, "selection", key, build)


def _lm_and_sae(cfg: Config, lm: Any, sae: Any) -> tuple[Any, Any]:
    if lm is None:
        from ssae_ray.models import load_lm

        lm = load_lm(cfg.model)
    if sae is None:
        from ssae_ray.saes import load_gsaes

        try:
            sae = load_gsaes(cfg, lm)[cfg.sae.hooks[0]]
        except Exception as e:
            raise RetrievalError(
                f"TracIn needs the GSAE at {cfg.sae.hooks[0]} (the first of sae.hooks) and could not load it: {e}. "
                "Pass sae= to retrieve(), or run the GSAE stage first."
            ) from e
    return lm, sae


def _lm_counter(cfg: Config, lm: Any) -> Callable[[list[str]], list[int]]:
    """LM tokens of each passage (no special tokens), with the LM's tokenizer loaded alone if needed."""
    if lm is not None:
        tok = lm.tokenizer
    else:
        from ssae_ray.data.prepare import lm_tokenizer

        tok = lm_tokenizer(cfg)
    return lambda texts: [len(i) for i in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _select(cfg: Config, index_dir: Path, manifest: dict[str, Any], strategy: str, seed_texts: list[str],
            lm: Any, sae: Any, out: Path) -> dict[str, Any]:  # fmt: skip
    r = cfg.retrieval
    passages = Passages(index_dir, manifest)
    n = len(passages)
    first, _, rerank = strategy.partition("+")
    mean_tokens = max(1.0, float(passages.n_tokens.mean()))
    pool = math.ceil(r.tracin_fraction * n) if rerank else None
    index = vec_to_row = seed_emb = None
    if first == "dense":
        seed_emb = embed_seeds(cfg, manifest, seed_texts)
        index = ShardedIndex(index_dir, nprobe=r.nprobe)  # the selection is keyed on r, nprobe included
        vec_to_row = pc.index_in(pa.array(index.pids()), value_set=passages.meta["pid"]).to_numpy()
    k = pool or min(n, max(100, 2 * math.ceil(r.token_budget / mean_tokens)))
    counter = _lm_counter(cfg, lm) if r.budget_unit == "lm" else None
    while True:
        if first == "dense":
            ranking = dense_rank(index, vec_to_row, seed_emb, r.dense_score, k, r.normalize)
            if r.threshold is not None:
                keep = ranking.scores >= r.threshold
                ranking = Ranking(ranking.rows[keep], ranking.scores[keep], None)
        elif first == "bm25":
            ranking = bm25_rank(index_dir, manifest, seed_texts)
            ranking = Ranking(ranking.rows[:k], ranking.scores[:k], None)
        else:
            # A permutation of the passages in pid order: the same draw whatever order the index holds them in.
            by_pid = np.argsort(passages.meta["pid"].to_numpy(zero_copy_only=False), kind="stable")
            rows = by_pid[np.random.default_rng(cfg.seed).permutation(n)]
            ranking = Ranking(rows, np.zeros(n, dtype=np.float32), None)
        if rerank:
            pool_tokens = int(passages.n_tokens[ranking.rows].sum())
            if r.budget_unit == "retriever" and pool_tokens < r.token_budget:
                raise RetrievalError(
                    f"the {first} first stage keeps {len(ranking.rows)} passages ({pool_tokens} tokens, "
                    f"tracin_fraction={r.tracin_fraction}) but the budget is {r.token_budget} tokens: raise "
                    "retrieval.tracin_fraction or lower retrieval.token_budget"
                )
            ranking = tracin_rerank(cfg, ranking, passages, seed_texts, lm, sae)
        fill = fill_budget(ranking, passages, r.token_budget, count=counter)
        grown = first != "random" and not rerank and fill.exhausted and k < n
        if grown and (r.threshold is None or len(ranking.rows) == k):
            k = min(n, 4 * k)
            continue
        break
    if fill.exhausted:
        log.warning(
            "selection %s: only %d of %d tokens could be selected", strategy, fill.tokens, r.token_budget
        )
    rows = ranking.rows[fill.picks]
    meta = passages.meta.take(pa.array(rows))
    cols: dict[str, Any] = {
        "id": meta["pid"], "doc_id": meta["doc_id"], "text": pa.array(fill.texts, pa.string()),
        "score": pa.array(ranking.scores[fill.picks], pa.float32()), "rank": pa.array(np.arange(len(rows))),
        "method": pa.array([strategy] * len(rows), pa.string()), "n_tokens": meta["n_tokens"],
    }  # fmt: skip
    if ranking.first_scores is not None:
        cols["first_stage_score"] = pa.array(ranking.first_scores[fill.picks], pa.float32())
    if passages.is_domain is not None:
        label = meta["is_domain"]
        cols["is_domain"] = pc.if_else(pc.less(label, 0), pa.scalar(None, pa.bool_()), pc.equal(label, 1))
    pq.write_table(pa.table(cols), out / "selection.parquet")
    result: dict[str, Any] = {
        "strategy": strategy, "index_key": manifest["key"], "model_id": manifest["model_id"],
        "n_seed_docs": len(seed_texts), "n_passages": n, "n_candidates": int(len(ranking.rows)),
        "n_selected": int(len(rows)), "n_docs_selected": int(len(set(meta["doc_id"].to_pylist()))),
        "tokens": fill.tokens, "token_unit": r.budget_unit, "token_budget": r.token_budget,
        "retriever_tokens": int(passages.n_tokens[rows].sum()),
        "budget_filled": not fill.exhausted, "exact_duplicates_dropped": fill.exact_dups,
        "near_duplicates_dropped": fill.near_dups, "dense_score": r.dense_score if first == "dense" else None,
        "threshold": r.threshold, "tracin_fraction": r.tracin_fraction if rerank else None,
        "tracin_hook": cfg.sae.hooks[0] if rerank else None, "tracin_lam": cfg.train.lam if rerank else None,
        "tracin_act_scale": ranking.act_scale,
    }  # fmt: skip
    if passages.is_domain is not None and (passages.is_domain >= 0).any():
        dom = passages.is_domain[rows]
        dom = dom[dom >= 0].astype(bool)  # labelled passages only
        result.update(precision=float(dom.mean()) if len(dom) else 0.0,
                      precision_at_100=float(dom[:100].mean()) if len(dom) else 0.0,
                      base_rate=float((passages.is_domain[passages.is_domain >= 0] == 1).mean()))  # fmt: skip
    if lm is not None:
        result["lm_tokens"] = int(
            sum(len(ids) for ids in lm.tokenizer(fill.texts, add_special_tokens=False)["input_ids"])
        )
    log.info("selection %s: %d passages, %d tokens%s", strategy, len(rows), fill.tokens,
             f", precision {result['precision']:.3f}" if "precision" in result else "")  # fmt: skip
    return result


__all__ = ["STRATEGIES", "EmbedModel", "Ranking", "retrieve", "fill_budget", "dense_rank"]
