"""Sharded FAISS index: build (Ray Data embedding, resumable per shard) and exact merged search.

Layout of `<workdir>/index/<key>/` (built in `<key>.partial/`, renamed when complete):

    passages/part-*.parquet   pid, doc_id, chunk, text, n_tokens[, is_domain]; one file per shard
    emb/emb-00000.parquet     pid, emb (float32[dim]); the embedding shard of passages file 0
    shards/shard-00000.faiss  the FAISS index of that shard (+ shard-00000.json: count, checksums)
    trained.faiss             the empty trained IVF / IVF-PQ index every shard starts from
    bm25/                     the bm25s index of all passages (row order = the shards' order)
    manifest.json             shard files, vector counts, dim, model id, normalisation, checksums

A crash leaves `<key>.partial/` behind; the next `build_index` keeps its finished shards (each
written atomically, with its checksum record last) and builds only the rest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssae_ray.config import INDEX_TYPES, Config, RetrievalConfig
from ssae_ray.precision import setting_key_part
from ssae_ray.retrieval.embed import Embedder, RetrievalError, chunk_batch, resolve_model
from ssae_ray.stages import (
    MANIFEST,
    atomic_dir,
    file_sha256,
    read_manifest,
    stage_key,
    swap_in,
    write_json_atomic,
)

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("ssae_ray")


class SearchResult(NamedTuple):
    scores: np.ndarray
    """[nq, k] inner products (cosine when normalised), best first; -inf where fewer than k exist."""
    ids: np.ndarray
    """[nq, k] global vector ids (shard offset + row), -1 where missing."""


# ---------------------------------------------------------------------------------------------
# Build


def corpus_file(cfg: Config, corpus_dir: str | Path) -> Path:
    path = Path(corpus_dir) / "corpus.parquet"
    if not path.is_file():
        raise RetrievalError(
            f"no corpus.parquet in {corpus_dir}; run `ssae-ray corpus` first (data.build_corpus)"
        )
    return path


def index_key(cfg: Config, corpus_path: Path) -> str:
    """The index's cache key. The precision part is the *setting* (`precision.setting_key_part`), not
    what `auto` resolves to on the calling process: the embedding actors resolve it on their own
    devices (bf16 on a GPU or an AVX-512-bf16 CPU, fp32 elsewhere), so a key resolved on a CPU head
    named a precision the index was not built in, and the same work dir read from another head
    computed another key and rebuilt the index."""
    r = cfg.retrieval
    model = resolve_model(r, cfg.root / "models")
    parts = {k: getattr(r, k) for k in ("passage_tokens", "normalize", "index_type", "nlist", "pq_m",
                                        "shard_size", "train_sample", "build_bm25")}  # fmt: skip
    return stage_key("index-v1", model.model_id, model.pooling, parts, cfg.corpus.text_field,
                     cfg.corpus.max_docs, file_sha256(corpus_path),
                     *setting_key_part(cfg.model.precision))  # fmt: skip


def build_index(cfg: Config, corpus_dir: str | Path, on_shard: Callable[[int], None] | None = None) -> Path:
    """Embed `<corpus_dir>/corpus.parquet` with Ray Data and write the sharded FAISS index (and
    BM25). Cached by content hash; resumes a crashed build. `on_shard(i)` is called after each
    embedding shard is written (progress hooks, tests)."""
    r = cfg.retrieval
    if r.index_type not in INDEX_TYPES:
        raise RetrievalError(
            f"retrieval.index_type must be one of {', '.join(INDEX_TYPES)}, got {r.index_type!r}"
        )
    if r.passage_tokens < 1 or r.shard_size < 1:
        raise RetrievalError("retrieval.passage_tokens and retrieval.shard_size must be positive")
    corpus = corpus_file(cfg, corpus_dir)
    key = index_key(cfg, corpus)
    final = cfg.root / "index" / key
    if read_manifest(final) is not None:
        log.info("index: cached at %s", final)
        return final
    if not final.with_name(f"{key}.partial").exists():  # a resumed build planned when it started
        _disk_plan(cfg, final.parent, *_corpus_estimate(cfg, corpus), estimated=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per index; a second one waits, then reuses it
        if read_manifest(final) is not None:
            return final
        return _build(cfg, corpus, key, final, on_shard)


def _build(cfg: Config, corpus: Path, key: str, final: Path, on_shard: Callable[[int], None] | None) -> Path:
    from ssae_ray.runtime import init_ray

    r = cfg.retrieval
    work = final.with_name(f"{key}.partial")
    work.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    _quiet_ray_data()
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str, t: float) -> float:
        phases[name] = round(time.perf_counter() - t, 3)
        log.info("index: %s took %.1fs", name, phases[name])
        return time.perf_counter()

    model = resolve_model(r, cfg.root / "models")
    passages = _write_passages(cfg, corpus, work, model.path)
    t = phase("passages", t0)
    info = json.loads((work / "passages" / "_passages.json").read_text())
    _disk_plan(
        cfg, work, sum(p["rows"] for p in passages), int(info["n_tokens"]), 0, model.path, estimated=False
    )
    dim = _embed_shards(cfg, work, passages, model.as_dict(), on_shard)
    t = phase("embed", t)
    trained = _train(r, work, passages, dim) if r.index_type != "flat" else None
    shards = _index_shards(r, work, passages, dim, trained)
    t = phase("faiss", t)
    bm25_dir = None
    if r.build_bm25:
        from ssae_ray.retrieval.bm25 import build_bm25

        bm25_dir = "bm25"
        if not (work / "bm25" / "done.json").is_file():
            build_bm25(_iter_texts(work, passages), work / "bm25")
        phase("bm25", t)
    manifest = {
        "stage": "index", "key": key, "model_id": model.model_id, "model": model.as_dict(), "dim": dim,
        "normalize": r.normalize, "metric": "inner_product", "index_type": r.index_type,
        "nlist": r.nlist, "nprobe": r.nprobe, "pq_m": r.pq_m, "passage_tokens": r.passage_tokens,
        "n_vectors": sum(s["count"] for s in shards), "n_passages": sum(p["rows"] for p in passages),
        "n_docs": json.loads((work / "passages" / "_passages.json").read_text())["n_docs"],
        "n_tokens": json.loads((work / "passages" / "_passages.json").read_text())["n_tokens"],
        "has_is_domain": "is_domain" in pq.read_schema(work / passages[0]["file"]).names,
        "shards": shards, "trained": "trained.faiss" if trained else None, "bm25": bm25_dir,
        "corpus": str(corpus), "corpus_sha256": file_sha256(corpus), "seconds": round(time.perf_counter() - t0, 3),
        "phase_seconds": phases, "created": time.time(),
    }  # fmt: skip
    write_json_atomic(work / MANIFEST, manifest)
    swap_in(work, final)
    log.info("index: %d vectors in %d shards at %s", manifest["n_vectors"], len(shards), final)
    return final


def _corpus_estimate(cfg: Config, corpus: Path) -> tuple[int, int, int]:
    """(passages, retriever tokens, passage-file bytes) estimated from the corpus file's metadata
    alone: its uncompressed text bytes at ~4 bytes per token, one partial passage per document."""
    meta = pq.read_metadata(corpus)
    names = meta.schema.names
    field = "text" if "text" in names else cfg.corpus.text_field
    text_bytes = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            if rg.column(c).path_in_schema == field:
                text_bytes += rg.column(c).total_uncompressed_size
    docs = meta.num_rows if not cfg.corpus.max_docs else min(meta.num_rows, cfg.corpus.max_docs)
    if cfg.corpus.max_docs and meta.num_rows:
        text_bytes = text_bytes * docs // meta.num_rows
    tokens = text_bytes // 4
    return docs + tokens // max(cfg.retrieval.passage_tokens, 1), tokens, text_bytes


def _embed_dim(model_path: Any) -> int | None:
    """The retriever's output width from its config (None when it does not say)."""
    for f in (Path(str(model_path)) / "config.json", Path(str(model_path)) / "0_Transformer" / "config.json"):
        try:
            c = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for k in ("hidden_size", "dim", "d_model"):
            if isinstance(c.get(k), int):
                return int(c[k])
    return None


def index_bytes(r: RetrievalConfig, n: int, tokens: int, dim: int) -> dict[str, int]:
    """What the index build writes for `n` passages of `tokens` retriever tokens in all: the float32
    embedding shards, the FAISS shards (flat / IVF: the vectors; IVF-PQ: pq_m bytes a vector) with
    8-byte ids, and the BM25 postings (at most one int32 doc + int32 count per token)."""
    out = {"embeddings (float32)": n * dim * 4 + n * 16}
    code = r.pq_m if r.index_type == "ivfpq" else dim * 4
    out[f"FAISS shards ({r.index_type})"] = n * (code + 8) + (
        r.nlist * dim * 4 if r.index_type != "flat" else 0
    )
    if r.build_bm25:
        out["BM25 postings"] = tokens * 8 + n * 4
    return out


def _disk_plan(cfg: Config, where: Path, n: int, tokens: int, passage_bytes: int, model_path: Any = None,
               estimated: bool = True) -> None:  # fmt: skip
    """Print what the index build will write and refuse at once when `where` lacks the space."""
    from ssae_ray.resources import disk_plan

    dim = _embed_dim(model_path) if model_path is not None else None
    if dim is None:
        try:
            dim = _embed_dim(resolve_model(cfg.retrieval, cfg.root / "models").path)
        except Exception:  # the model is fetched later; plan with a typical retriever width
            dim = None
    items = [("passage files", passage_bytes)] if passage_bytes else []
    items += list(index_bytes(cfg.retrieval, n, tokens, dim or 768).items())
    how = "estimated from the corpus size" if estimated else "exact passage count"
    disk_plan(where, items, f"index: {n:,} passages, dim {dim or '768 (assumed)'}, {how}")


def _quiet_ray_data() -> None:
    """Our own tqdm bar reports progress; Ray Data's per-operator log lines would drown it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _corpus_stream(cfg: Config, corpus: Path) -> ray.data.Dataset:
    """The corpus as a streaming Ray Dataset (the data part's reader when present)."""
    try:
        from ssae_ray.data import read_dataset
    except ImportError:
        import ray.data

        ds = ray.data.read_parquet(str(corpus))
        return ds.limit(cfg.corpus.max_docs) if cfg.corpus.max_docs else ds
    return read_dataset(cfg.corpus, corpus.parent)


def _write_passages(cfg: Config, corpus: Path, work: Path, model_path: str) -> list[dict[str, Any]]:
    """Documents -> passages with Ray Data, one Parquet file of <= shard_size rows per shard."""

    r = cfg.retrieval
    out = work / "passages"
    done = out / "_passages.json"
    if done.is_file():
        return json.loads(done.read_text())["files"]
    schema = pq.read_schema(corpus)
    # The corpus stage normalises every source to `text`; a hand-made corpus.parquet may use text_field.
    text_field = "text" if "text" in schema.names else cfg.corpus.text_field
    missing = [c for c in ("id", text_field) if c not in schema.names]
    if missing:
        raise RetrievalError(f"{corpus} lacks column(s) {missing}; the corpus needs `id` and `{text_field}`")
    cols = ["id", text_field] + (["is_domain"] if "is_domain" in schema.names else [])
    import ray.data

    with atomic_dir(out) as tmp:
        # Passages in corpus order, in files named by position: the same corpus gives byte-identical
        # passage files and shards on every build (Ray Data otherwise emits blocks as they finish).
        ctx = ray.data.DataContext.get_current()
        ordered = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True
        try:
            ds = _corpus_stream(cfg, corpus).select_columns(cols)
            ds = ds.map_batches(chunk_batch, batch_size=512, batch_format="numpy",
                                fn_kwargs=dict(model_path=model_path, passage_tokens=r.passage_tokens,
                                               text_field=text_field))  # fmt: skip
            ds.write_parquet(str(tmp), min_rows_per_file=r.shard_size, max_rows_per_file=r.shard_size)
        finally:
            ctx.execution_options.preserve_order = ordered
        files = []
        n_tokens = 0
        for f in sorted(tmp.glob("*.parquet"), key=_write_order):
            meta = pq.read_metadata(f)
            if meta.num_rows == 0:
                f.unlink()
                continue
            f = f.rename(tmp / f"passages-{len(files):05d}.parquet")
            n_tokens += int(pc.sum(pq.read_table(f, columns=["n_tokens"])["n_tokens"]).as_py())
            files.append({"file": f"passages/{f.name}", "rows": meta.num_rows})
        if not files:
            raise RetrievalError(f"the corpus {corpus} has no text to index")
        n_docs = pq.read_metadata(corpus).num_rows
        n_docs = min(n_docs, cfg.corpus.max_docs) if cfg.corpus.max_docs else n_docs
        write_json_atomic(tmp / done.name, {"files": files, "n_docs": n_docs, "n_tokens": n_tokens})
    return files


def _write_order(path: Path) -> tuple[int, ...]:
    """Ray Data names files `<write uuid>_<task>-<file>.parquet`: order by task, then file."""
    return tuple(int(x) for x in re.findall(r"\d+", path.stem.rsplit("_", 1)[-1])) or (0,)


def _embed_shards(cfg: Config, work: Path, passages: list[dict[str, Any]], model: dict[str, str],
                  on_shard: Callable[[int], None] | None) -> int:  # fmt: skip
    """Embed every passages file whose embedding shard is missing, streaming through an actor pool."""
    import ray
    import ray.data
    from tqdm.auto import tqdm

    r = cfg.retrieval
    emb_dir = work / "emb"
    emb_dir.mkdir(exist_ok=True)
    pending = {
        str(work / p["file"]): i for i, p in enumerate(passages) if not (emb_dir / _emb_name(i)).is_file()
    }
    if pending:
        from ssae_ray.resources import check_schedulable, cluster_has_gpus

        check_schedulable(cfg, parts=("index",))  # the actor pool must fit at once, or it waits forever
        n_gpus = 1 if cluster_has_gpus() else 0  # GPUs now or at the autoscaler's maximum
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = r.embed_threads or max(1, cpus // r.num_embed_actors)
        rows = {path: passages[i]["rows"] for path, i in pending.items()}
        # Blocks of about one actor batch: results stream back (progress, bounded driver memory)
        # instead of one block per passages file.
        blocks = max(1, math.ceil(sum(rows.values()) / r.actor_batch_size))
        ds = ray.data.read_parquet(
            list(pending), columns=["pid", "text"], include_paths=True, override_num_blocks=blocks
        )
        ds = ds.map_batches(
            Embedder, batch_size=r.actor_batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=r.num_embed_actors),
            num_gpus=1 if n_gpus else 0, num_cpus=1,
            fn_constructor_kwargs=dict(model=model, max_tokens=r.passage_tokens, batch_size=r.embed_batch_size,
                                       normalize=r.normalize, fp16=r.fp16_on_gpu, threads=threads,
                                       precision=cfg.model.precision),
        )  # fmt: skip
        buffers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {p: [] for p in pending}
        counts = dict.fromkeys(pending, 0)
        total = sum(rows.values())
        n_docs = json.loads((work / "passages" / "_passages.json").read_text())["n_docs"]
        docs_per_passage = n_docs / max(1, sum(p["rows"] for p in passages))
        t0 = time.perf_counter()
        bar = tqdm(total=total, unit="passage", desc="embed", smoothing=0.1)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            paths = np.array([_match_path(str(p), rows) for p in batch["path"]])
            for path in np.unique(paths):
                sel = paths == path
                buffers[path].append((batch["pid"][sel], np.asarray(batch["emb"][sel], dtype=np.float32)))
                counts[path] += int(sel.sum())
                if counts[path] == rows[path]:
                    _write_emb_shard(emb_dir / _emb_name(pending[path]), buffers.pop(path))
                    if on_shard is not None:
                        on_shard(pending[path])
            bar.update(len(batch["pid"]))
            rate = bar.n * docs_per_passage / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix_str(f"{rate:.0f} docs/s")
        bar.close()
        if buffers:
            raise RetrievalError(f"embedding lost rows of {sorted(buffers)}; re-run build_index to resume")
    return pq.read_schema(emb_dir / _emb_name(0)).field("emb").type.list_size


def _match_path(path: str, known: dict[str, Any]) -> str:
    """Ray Data reports paths without a scheme / possibly resolved; map back to our key."""
    if path in known:
        return path
    for key in known:
        if key.endswith(path) or path.endswith(key):
            return key
    raise RetrievalError(f"unexpected passage file {path!r} from Ray Data")


def _emb_name(i: int) -> str:
    return f"emb-{i:05d}.parquet"


def _write_emb_shard(path: Path, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    pids = np.concatenate([p for p, _ in parts])
    emb = np.concatenate([e for _, e in parts])
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    table = pa.table(
        {"pid": pa.array(pids.astype(str)), "emb": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}
    )
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_emb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    col = table["emb"].combine_chunks()
    emb = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return table["pid"].to_numpy(zero_copy_only=False), np.ascontiguousarray(emb, dtype=np.float32)


def _train(r: RetrievalConfig, work: Path, passages: list[dict[str, Any]], dim: int) -> Path:
    """Train the IVF / IVF-PQ index once on a sample drawn evenly from every shard."""
    import faiss

    path = work / "trained.faiss"
    if path.is_file():
        return path
    n = sum(p["rows"] for p in passages)
    rng = np.random.default_rng(0)
    sample = []
    for i, p in enumerate(passages):
        take = int(np.ceil(r.train_sample * p["rows"] / n))
        _, emb = read_emb(work / "emb" / _emb_name(i))
        sample.append(emb[rng.choice(len(emb), size=min(take, len(emb)), replace=False)])
    x = np.concatenate(sample)
    nlist = min(r.nlist, max(1, len(x) // 39))
    if nlist < r.nlist:
        log.warning("index: nlist %d lowered to %d for %d training vectors", r.nlist, nlist, len(x))
    if r.index_type == "ivfpq" and dim % r.pq_m:
        raise RetrievalError(f"retrieval.pq_m={r.pq_m} must divide the embedding dim {dim}")
    spec = f"IVF{nlist},Flat" if r.index_type == "ivf" else f"IVF{nlist},PQ{r.pq_m}"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if _num_gpus() > 0:
        gpu = faiss.index_cpu_to_all_gpus(index)
        gpu.train(x)
        index = faiss.index_gpu_to_cpu(gpu)
    else:
        index.train(x)
    tmp = path.with_name(".trained.faiss.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return path


def _num_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _build_one_shard(emb_path: str, out: str, dim: int, trained: str | None) -> dict[str, Any]:
    import faiss

    _, emb = read_emb(Path(emb_path))
    index = faiss.read_index(trained) if trained else faiss.IndexFlatIP(dim)
    index.add(emb)
    tmp = f"{out}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out)
    return {"count": int(index.ntotal), "sha256": file_sha256(out), "emb_sha256": file_sha256(emb_path)}


def _index_shards(r: RetrievalConfig, work: Path, passages: list[dict[str, Any]], dim: int,
                  trained: Path | None) -> list[dict[str, Any]]:  # fmt: skip
    """One FAISS index per embedding shard, built in parallel Ray tasks; finished ones are kept."""
    import ray

    sdir = work / "shards"
    sdir.mkdir(exist_ok=True)
    task = ray.remote(num_cpus=1)(_build_one_shard)
    futures = {}
    for i in range(len(passages)):
        if not (sdir / f"shard-{i:05d}.json").is_file():
            futures[i] = task.remote(str(work / "emb" / _emb_name(i)), str(sdir / f"shard-{i:05d}.faiss"), dim,
                                     str(trained) if trained else None)  # fmt: skip
    for i, fut in futures.items():
        write_json_atomic(sdir / f"shard-{i:05d}.json", ray.get(fut))
    shards = []
    for i, p in enumerate(passages):
        rec = json.loads((sdir / f"shard-{i:05d}.json").read_text())
        if rec["count"] != p["rows"]:
            raise RetrievalError(
                f"shard {i} holds {rec['count']} vectors for {p['rows']} passages; delete {work}"
            )
        shards.append({"index": f"shards/shard-{i:05d}.faiss", "embeddings": f"emb/{_emb_name(i)}",
                       "passages": p["file"], "count": rec["count"], "sha256": rec["sha256"],
                       "emb_sha256": rec["emb_sha256"]})  # fmt: skip
    return shards


def _iter_texts(work: Path, passages: list[dict[str, Any]]):
    for p in passages:
        yield from pq.read_table(work / p["file"], columns=["text"])["text"].to_pylist()


# ---------------------------------------------------------------------------------------------
# Search


class ShardedIndex:
    """All shards of a built index, checksums verified on open; `search` queries every shard in
    parallel (threads, or one Ray task per shard) and merges exactly."""

    def __init__(self, index_dir: str | Path, verify: bool = True, nprobe: int | None = None) -> None:
        """`nprobe`: IVF lists visited per query (`retrieval.nprobe`); None keeps the build's value."""
        import faiss

        self.dir = Path(index_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise RetrievalError(f"no finished index at {self.dir} (manifest.json missing); run build_index")
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.shards = manifest["shards"]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards])
        if verify:
            self.verify()
        self.indexes = [faiss.read_index(str(self.dir / s["index"])) for s in self.shards]
        self.set_nprobe(int(nprobe if nprobe is not None else manifest.get("nprobe", 1)))
        self._pids: np.ndarray | None = None

    def verify(self) -> None:
        for s in self.shards:
            for key, rel in (("sha256", s["index"]), ("emb_sha256", s["embeddings"])):
                path = self.dir / rel
                if not path.is_file():
                    raise RetrievalError(
                        f"index shard file {path} is missing; rebuild the index (delete {self.dir})"
                    )
                if file_sha256(path) != s[key]:
                    raise RetrievalError(
                        f"index shard file {path} fails its checksum (corrupted or changed since the build); "
                        f"delete {self.dir} and run build_index again"
                    )

    @property
    def ntotal(self) -> int:
        return int(self.offsets[-1])

    def pids(self) -> np.ndarray:
        """Passage id of every global vector id."""
        if self._pids is None:
            cols = [pq.read_table(self.dir / s["embeddings"], columns=["pid"])["pid"] for s in self.shards]
            self._pids = np.concatenate([c.to_numpy(zero_copy_only=False) for c in cols])
        return self._pids

    def set_nprobe(self, nprobe: int) -> None:
        for idx in self.indexes:
            if hasattr(idx, "nprobe"):
                idx.nprobe = nprobe

    def search(self, queries: np.ndarray, k: int, parallel: str = "threads") -> SearchResult:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise RetrievalError(
                f"query embeddings have dim {q.shape[1]} but the index holds dim {self.dim} "
                f"(built with {self.manifest['model_id']}); embed the seeds with the index's retriever"
            )
        k = min(k, self.ntotal)
        if parallel == "ray":
            parts = _search_ray(self, q, k)
        else:
            with ThreadPoolExecutor(max_workers=min(len(self.indexes), os.cpu_count() or 1)) as pool:
                parts = list(pool.map(lambda idx: idx.search(q, min(k, idx.ntotal)), self.indexes))
        return merge_topk([(d, i) for d, i in parts], self.offsets[:-1], k)


def _search_ray(index: ShardedIndex, q: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    import ray

    @ray.remote(num_cpus=1)
    def one(path: str, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        idx = faiss.read_index(path)
        if hasattr(idx, "nprobe"):
            idx.nprobe = nprobe
        return idx.search(q, min(k, idx.ntotal))

    nprobe = int(getattr(index.indexes[0], "nprobe", 1))
    qref = ray.put(q)
    return ray.get([one.remote(str(index.dir / s["index"]), qref, k, nprobe) for s in index.shards])


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], offsets: np.ndarray, k: int) -> SearchResult:
    """Merge per-shard top-k lists (local ids) into the global top-k: by score, then by id, as one
    index over all vectors ranks them."""
    scores = np.concatenate([d for d, _ in parts], axis=1)
    ids = np.concatenate(
        [np.where(i >= 0, i + off, -1) for (_, i), off in zip(parts, offsets, strict=True)], axis=1
    )
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return SearchResult(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1))
