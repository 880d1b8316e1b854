"""BM25 (Okapi, via bm25s) over the passages; the seed set, concatenated, is the query."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ssae_ray.stages import atomic_dir, write_json_atomic


def _tokenize(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


def build_bm25(texts: Iterable[str], folder: Path) -> Path:
    """Index `texts` (row i = passage i in shard order) and save to `folder` atomically."""
    import bm25s

    texts = list(texts)
    with atomic_dir(folder) as tmp:
        retriever = bm25s.BM25()
        retriever.index(_tokenize(texts), show_progress=False)
        retriever.save(str(tmp))
        write_json_atomic(tmp / "done.json", {"n": len(texts)})
    return folder


def bm25_scores(folder: Path, query_texts: list[str]) -> np.ndarray:
    """BM25 score of every indexed passage for the query made of all `query_texts` (a term
    repeated in the seed counts once per occurrence)."""
    import bm25s

    retriever = bm25s.BM25.load(str(folder), mmap=False, show_progress=False)
    query = bm25s.tokenize([" ".join(query_texts)], stopwords="en", return_ids=False, show_progress=False)[0]
    known = [t for t in query if t in retriever.vocab_dict]
    n = int(retriever.scores["num_docs"])
    if not known:
        return np.zeros(n, dtype=np.float32)
    return np.asarray(retriever.get_scores(known), dtype=np.float32)
