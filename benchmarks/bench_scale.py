"""Peak memory and disk per stage as the data grows: synthetic corpora and test sets at 1x, 4x and
16x through the index (FAISS shards from embedding shards), BM25, a random selection (every
passage file touched), activation capture (fixed token cap) and evaluation (two SAEs on the tiny
LM). Each stage at each scale runs in a fresh process: its peak RSS (ru_maxrss), the RSS it
started from (after imports), the bytes it wrote and its time; then the ratios to 1x.

    python benchmarks/bench_scale.py [--passages 50000] [--test-tokens 10000] [--scales 1 4 16]

A stage whose output is not proportional to its input should keep its peak within 1.2x from 1x to
16x; the index and BM25 write output proportional to the corpus (their disk grows, their memory
should not beyond one shard / one chunk). The embedding step itself (Ray Data actors running the
retriever) is not in this table: its memory is one actor batch per actor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("energy momentum charge mass force field quantum particle electron photon proton neutron atom "
         "river city market bread fish fruit village garden king queen war law history music painting "
         "poetry composer symphony orchestra film actor novel author the of and a to in is was for on").split()  # fmt: skip

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
import numpy as np
stage, work, n, tokens = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import torch, pyarrow as pa, pyarrow.parquet as pq
torch.set_num_threads(1)
from ssae_ray.config import load_config
cfg = load_config("tiny", overrides=[f"workdir={work / 'wd'}"])
manifest = json.loads((work / "corpus" / "manifest.json").read_text())
files = [work / "corpus" / s["passages"] for s in manifest["shards"]]
def texts():
    for f in files:
        yield from pq.read_table(f, columns=["text"])["text"].to_pylist()
out = work / f"out-{stage}"
out.mkdir()
if stage in ("capture", "eval"):
    from ssae_ray.models import load_lm
    from ssae_ray.saes import make_random_sae
    lm = load_lm(cfg.model, work / "models")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
info = {}
if stage == "index":
    from ssae_ray.retrieval.index import _build_one_shard, _write_emb_shard
    rng = np.random.default_rng(0)
    for i, s in enumerate(manifest["shards"]):
        k = s["rows"]
        e = rng.standard_normal((k, 64)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        p = out / f"emb-{i:05d}.parquet"
        _write_emb_shard(p, [(np.arange(k) + i * 10**7, e)])
        _build_one_shard(str(p), str(out / f"shard-{i:05d}.faiss"), 64, None)
elif stage == "bm25":
    from ssae_ray.retrieval.bm25 import build_bm25
    build_bm25(texts(), out / "bm25")
elif stage == "select":
    from ssae_ray.retrieval.select import Passages, Ranking, fill_budget
    man = {"shards": [{"passages": f"../corpus/{s['passages']}"} for s in manifest["shards"]]}
    p = Passages(out, man)
    order = np.random.default_rng(0).permutation(len(p))
    fill = fill_budget(Ranking(order, np.zeros(len(order), np.float32), None), p, 200_000)
    pq.write_table(pa.table({"text": fill.texts}), out / "selection.parquet")
    info = {"cache_peak_mb": round(p.peak_cached_bytes / 2**20, 1), "files_read": p.reads}
elif stage == "capture":
    from ssae_ray.training.cache import cache_activations
    path = cache_activations(cfg, lm, list(texts()), list(cfg.sae.hooks), max_tokens=tokens, progress=False)
    info = {"cached_tokens": json.loads((path / "manifest.json").read_text())["n_tokens"]}
    os.rename(path, out / "cache")
elif stage == "eval":
    from ssae_ray.eval.evaluate import evaluate_saes_on, prepare_test_set
    docs = []
    held = 0
    for t in texts():
        docs.append(t)
        held += len(t.split())
        if held >= tokens * 1.2:
            break
    hooks = list(cfg.sae.hooks)
    saes = [(make_random_sae(lm.d_model, 256, h, seed=i), h) for i, h in enumerate(hooks)]
    ts = prepare_test_set(lm, "test", docs, hooks, cfg.model.context_len, max_tokens=tokens, batch_size=8)
    evs = evaluate_saes_on(lm, saes, ts, batch_size=8, per_token=False)
    info = {"test_tokens": int(ts.tokens.attention_mask.sum()), "l0": round(evs[0].l0, 2)}
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
print(json.dumps({"peak_mb": peak / 1024, "base_mb": base / 1024, "disk_mb": disk / 2**20, "s": secs, **info}))
"""


def make_corpus(folder: Path, n: int, per_file: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards = []
    for f, s in enumerate(range(0, n, per_file)):
        k = min(per_file, n - s)
        lens = rng.integers(30, 90, k)
        words = rng.choice(WORDS, int(lens.sum()))
        cuts = np.cumsum(lens)[:-1]
        texts = [" ".join(w) + f" #{s + j}." for j, w in enumerate(np.split(words, cuts))]
        rows = {"pid": [f"p{s + j}" for j in range(k)], "doc_id": [f"d{(s + j) // 3}" for j in range(k)],
                "n_tokens": lens.astype(np.int64), "text": texts}  # fmt: skip
        name = f"passages-{f:05d}.parquet"
        pq.write_table(pa.table(rows), folder / name)
        shards.append({"passages": name, "rows": k})
    (folder / "manifest.json").write_text(json.dumps({"shards": shards}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=50_000, help="passages at 1x")
    ap.add_argument("--test-tokens", type=int, default=10_000, help="test tokens evaluated at 1x")
    ap.add_argument("--capture-tokens", type=int, default=20_000, help="token cap of the capture (fixed)")
    ap.add_argument("--per-file", type=int, default=10_000, help="passages per passage file / index shard")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--stages", nargs="+", default=["index", "bm25", "select", "capture", "eval"])
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for s in a.scales:
            work = Path(tmp) / f"x{s}"
            make_corpus(work / "corpus", a.passages * s, a.per_file)
            (work / "models").mkdir()
            for stage in a.stages:
                tokens = a.test_tokens * s if stage == "eval" else a.capture_tokens
                r = subprocess.run([sys.executable, "-c", CHILD, stage, str(work), str(a.passages * s), str(tokens)],
                                   env=env, capture_output=True, text=True)  # fmt: skip
                if r.returncode != 0:
                    print(r.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"stage {stage} at {s}x failed")
                rows[(stage, s)] = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{stage:8s} {s:3d}x {json.dumps(rows[(stage, s)])}", flush=True)
    lo = a.scales[0]
    print(
        f"\npassages at 1x: {a.passages:,}; test tokens at 1x: {a.test_tokens:,}; capture cap: {a.capture_tokens:,}"
    )
    print(f"CPU: {_cpu()}; load average before: {os.getloadavg()[0]:.1f}\n")
    head = "| stage | scale | input | peak RSS MB | above start MB | peak / 1x | disk MB | disk / 1x | s |"
    print(head)
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in a.stages:
        b = rows[(stage, lo)]
        for s in a.scales:
            r = rows[(stage, s)]
            inp = f"{a.test_tokens * s:,} test tokens" if stage == "eval" else f"{a.passages * s:,} passages"
            print(f"| {stage} | {s}x | {inp} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} | "
                  f"{r['peak_mb'] / b['peak_mb']:.2f} | {r['disk_mb']:.1f} | "
                  f"{r['disk_mb'] / max(b['disk_mb'], 1e-9):.2f} | {r['s']:.1f} |")  # fmt: skip


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
