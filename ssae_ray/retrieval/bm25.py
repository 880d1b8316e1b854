"""BM25 (Okapi, bm25s' Lucene variant and tokeniser) over the passages, built and queried from disk;
the seed set, concatenated, is the query.

Built in one streaming pass: passages are tokenised a chunk at a time (bm25s' tokeniser, English
stop words) and each chunk's term counts are written as a term-major sparse matrix
(`chunk_00000.npz`: for every term id t, the passages holding it and how often), with the vocabulary,
document frequencies and passage lengths kept beside them. Only one chunk of passage texts (and
the vocabulary) is ever in memory, so an OpenWebText-sized corpus (~35M passages, ~40 GB of text)
indexes on a machine with a few GB; bm25s itself needs every passage's tokens in memory at once.
A query reads, per chunk, only the rows of its own terms (memory-mapped) and returns the score of
every passage (one float32 each: 140 MB for 35M passages). The scores are bm25s' (k1 = 1.5,
b = 0.75, idf = log(1 + (N - df + 0.5) / (df + 0.5))), checked against it in the tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ssae_ray.stages import atomic_dir, write_json_atomic

K1, B = 1.5, 0.75
CHUNK = 200_000
"""Passages tokenised and written per chunk (bounds the build's memory)."""


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def build_bm25(texts: Iterable[str], folder: Path, chunk: int = CHUNK) -> Path:
    """Index `texts` (row i = passage i in shard order), streamed, into `folder` atomically."""
    vocab: dict[str, int] = {}
    df = np.zeros(0, dtype=np.int64)
    lengths: list[np.ndarray] = []
    n = 0
    with atomic_dir(folder) as tmp:
        for c, part in enumerate(_chunks(texts, chunk)):
            docs, terms, counts = [], [], []
            lens = np.zeros(len(part), dtype=np.int32)
            for i, toks in enumerate(_tokenize(part)):
                lens[i] = len(toks)
                if not toks:
                    continue
                ids = np.fromiter(
                    (vocab.setdefault(t, len(vocab)) for t in toks), dtype=np.int64, count=len(toks)
                )
                u, k = np.unique(ids, return_counts=True)
                docs.append(np.full(len(u), i, dtype=np.int32))
                terms.append(u)
                counts.append(k.astype(np.int32))
            t = np.concatenate(terms) if terms else np.zeros(0, dtype=np.int64)
            d = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32)
            k = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int32)
            order = np.argsort(t, kind="stable")  # term-major: the rows of one term are contiguous
            t, d, k = t[order], d[order], k[order]
            v = len(vocab)
            indptr = np.searchsorted(t, np.arange(v + 1)).astype(np.int64)
            if len(df) < v:
                df = np.concatenate([df, np.zeros(v - len(df), dtype=np.int64)])
            df[:v] += np.diff(indptr)
            np.savez(tmp / f"chunk_{c:05d}.npz", indptr=indptr, docs=d, tf=k, offset=np.int64(n))
            lengths.append(lens)
            n += len(part)
        doc_len = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
        np.save(tmp / "doc_len.npy", doc_len)
        np.save(tmp / "df.npy", df)
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        write_json_atomic(tmp / "done.json", {"n": n, "chunks": len(lengths), "vocab": len(vocab),
                                              "avg_len": float(doc_len.mean()) if n else 0.0,
                                              "format": "ssae-bm25-v1", "k1": K1, "b": B})  # fmt: skip
    return folder


def bm25_scores(folder: Path, query_texts: list[str]) -> np.ndarray:
    """BM25 score of every indexed passage for the query made of all `query_texts` (a term
    repeated in the seed counts once per occurrence)."""
    meta = json.loads((folder / "done.json").read_text())
    if meta.get("format") != "ssae-bm25-v1":
        return _bm25s_scores(folder, query_texts)  # an index built by bm25s (before the streaming build)
    n = int(meta["n"])
    scores = np.zeros(n, dtype=np.float32)
    vocab = json.loads((folder / "vocab.json").read_text())
    query = [vocab[t] for t in _tokenize([" ".join(query_texts)])[0] if t in vocab]
    if not query or n == 0:
        return scores
    qids, qcount = np.unique(np.asarray(query, dtype=np.int64), return_counts=True)
    df = np.load(folder / "df.npy", mmap_mode="r")
    doc_len = np.load(folder / "doc_len.npy", mmap_mode="r")
    norm = K1 * ((1 - B) + B * np.asarray(doc_len, dtype=np.float64) / max(meta["avg_len"], 1e-12))
    idf = {int(q): math.log(1 + (n - int(df[q]) + 0.5) / (int(df[q]) + 0.5)) for q in qids}
    for c in range(int(meta["chunks"])):
        z = np.load(folder / f"chunk_{c:05d}.npz")
        indptr, docs, tf, off = z["indptr"], z["docs"], z["tf"], int(z["offset"])
        for q, m in zip(qids.tolist(), qcount.tolist(), strict=True):
            if q + 1 >= len(indptr):
                continue  # a term first seen in a later chunk
            lo, hi = int(indptr[q]), int(indptr[q + 1])
            if lo == hi:
                continue
            rows = docs[lo:hi].astype(np.int64) + off
            f = tf[lo:hi].astype(np.float64)
            scores[rows] += (m * idf[q] * f / (norm[rows] + f)).astype(np.float32)
    return scores


def _bm25s_scores(folder: Path, query_texts: list[str]) -> np.ndarray:
    """Scores from a bm25s index folder (indexes built before the streaming format)."""
    import bm25s

    retriever = bm25s.BM25.load(str(folder), mmap=False, show_progress=False)
    query = _tokenize([" ".join(query_texts)])[0]
    known = [t for t in query if t in retriever.vocab_dict]
    if not known:
        return np.zeros(int(retriever.scores["num_docs"]), dtype=np.float32)
    return np.asarray(retriever.get_scores(known), dtype=np.float32)
