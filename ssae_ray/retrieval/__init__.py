"""Retrieval at scale: Ray Data embedding, sharded FAISS, BM25, SAE-TracIn, budget selection.

index_dir = build_index(cfg, corpus_dir)                       # <workdir>/index/<key>/
sel_dir = retrieve(cfg, corpus_dir, index_dir, "dense")        # <workdir>/selection/<key>/selection.parquet
"""

from ssae_ray.retrieval.embed import RetrievalError
from ssae_ray.retrieval.index import SearchResult, ShardedIndex, build_index, merge_topk
from ssae_ray.retrieval.select import STRATEGIES, retrieve

__all__ = [
    "STRATEGIES",
    "RetrievalError",
    "SearchResult",
    "ShardedIndex",
    "build_index",
    "merge_topk",
    "retrieve",
]
