"""BM25 build memory: the streaming on-disk build (`retrieval/bm25.py`) vs bm25s on all passages in
memory (what the index stage did before), each in a fresh process, on synthetic passages read from
Parquet; peak resident memory (ru_maxrss) and build time, and what they come to at OpenWebText's
~35M passages (bm25s: linear in the passages; streaming: one chunk of `CHUNK` passages plus 4 bytes
of length per passage). Use more passages than one chunk (200k) to see the streaming peak stay flat.

    python benchmarks/bench_bm25.py [--passages 200000] [--words 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import resource, sys, time
from pathlib import Path
import pyarrow.parquet as pq
sys.path.insert(0, sys.argv[3])
mode, path = sys.argv[1], Path(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "bm25s":
    import bm25s
    texts = pq.read_table(path / "p.parquet", columns=["text"]).column("text").to_pylist()
    r = bm25s.BM25()
    r.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    r.save(str(path / "bm25s"))
else:
    from ssae_ray.retrieval.bm25 import build_bm25
    def texts():
        for b in pq.ParquetFile(path / "p.parquet").iter_batches(batch_size=10_000, columns=["text"]):
            yield from b.column(0).to_pylist()
    build_bm25(texts(), path / "stream")
secs = time.perf_counter() - t0
print(secs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--passages", type=int, default=200_000)
    p.add_argument("--words", type=int, default=100)
    a = p.parse_args()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    ranks = np.minimum(rng.zipf(1.2, size=(a.passages, a.words)) - 1, len(vocab) - 1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        texts = [" ".join(vocab[r]) for r in ranks]
        mb_text = sum(len(t) for t in texts) / 1e6
        pq.write_table(pa.table({"text": texts}), d / "p.parquet")
        del texts, ranks
        rows = []
        for mode in ("bm25s", "streaming"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(d), str(ROOT)], capture_output=True,
                                 text=True, check=True).stdout.split()  # fmt: skip
            secs, peak_kb = float(out[0]), int(out[1])
            rows.append((mode, secs, peak_kb / 1024))
    print(f"\nBM25 build, {a.passages:,} synthetic passages x {a.words} words ({mb_text:.0f} MB of text), "
          "peak RSS of a fresh process (python + imports included)\n")  # fmt: skip
    print("| build | seconds | peak RSS MB | at 35M passages (GB) |")
    print("| --- | --- | --- | --- |")
    for mode, secs, mb in rows:
        if mode == "bm25s":  # every passage's tokens at once: grows with the corpus
            at = f"{mb / a.passages * 35e6 / 1024:.0f} (linear)"
        else:  # one chunk of passages at a time; only the 4-byte passage lengths grow
            at = f"{(mb + (35e6 - a.passages) * 4 / 2**20) / 1024:.1f} (peak + 4 B/passage)"
        print(f"| {mode} | {secs:.1f} | {mb:.0f} | {at} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
