"""Bounded memory in retrieval and capture: the byte-capped passage cache, tokenisation that stops
at the token cap, vectorised padding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ssae_ray.models import cap_tokens, pad_rows, tokenize_docs
from ssae_ray.retrieval.select import Passages, Ranking, fill_budget


def _passage_files(folder, n_files=12, per_file=300, seed=0):
    rng = np.random.default_rng(seed)
    words = "energy field photon river king music atom bread war law quantum mass".split()
    shards, pid = [], 0
    for f in range(n_files):
        rows = []
        for _ in range(per_file):
            n = int(rng.integers(5, 40))
            rows.append({"pid": f"p{pid}", "doc_id": f"d{pid // 3}", "n_tokens": n,
                         "text": " ".join(rng.choice(words, n).tolist()) + f" #{pid}"})  # fmt: skip
            pid += 1
        name = f"passages-{f:03d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), folder / name)
        shards.append({"passages": name})
    return {"shards": shards}


def test_passage_cache_stays_under_its_byte_cap_on_a_random_selection(tmp_path):
    """A random ranking touches every passage file: the capped cache never holds more than its cap
    (it evicts least recently used files and re-reads them), and every text and the budget fill are
    identical to the uncapped cache's."""
    manifest = _passage_files(tmp_path)
    full = Passages(tmp_path, manifest, cache_bytes=1 << 40)
    one_file = max(int(pq.read_table(tmp_path / s["passages"], columns=["text"])["text"].nbytes)
                   for s in manifest["shards"])  # fmt: skip
    cap = 3 * one_file
    small = Passages(tmp_path, manifest, cache_bytes=cap)
    order = np.random.default_rng(1).permutation(len(full))
    for s in range(0, len(order), 97):
        rows = order[s : s + 97]
        assert small.texts(rows) == full.texts(rows)
        assert small.cached_bytes <= cap
    assert full.cached_bytes > 3 * cap  # the uncapped cache held the whole corpus
    assert small.peak_cached_bytes <= cap < full.peak_cached_bytes
    assert small.reads > len(manifest["shards"])  # evicted files were read again
    ranking = Ranking(order, np.zeros(len(order), np.float32), None)
    a, b = fill_budget(ranking, full, 5000, chunk=50), fill_budget(ranking, small, 5000, chunk=50)
    assert a.texts == b.texts and a.tokens == b.tokens and np.array_equal(a.picks, b.picks)
    tiny = Passages(tmp_path, manifest, cache_bytes=10)  # smaller than any file: nothing is kept
    assert tiny.texts(order[:20]) == full.texts(order[:20]) and tiny.cached_bytes == 0


class _CountingTok:
    """A whitespace tokenizer that counts the texts it was asked to tokenise."""

    pad_token_id, bos_token_id = 0, 1

    def __init__(self):
        self.seen = 0

    def __call__(self, texts, add_special_tokens=False):
        self.seen += len(texts)
        return {"input_ids": [[2 + (hash(w) % 50) for w in t.split()] for t in texts]}


def test_tokenisation_stops_at_the_token_cap():
    texts = [" ".join(f"w{i}_{j}" for j in range(30 + i % 17)) for i in range(5000)]
    tok = _CountingTok()
    everything = tokenize_docs(_CountingTok(), texts, 16)
    for skip_first in (False, True):
        tok = _CountingTok()
        capped = tokenize_docs(tok, texts, 16, max_tokens=2000, chunk_docs=64)
        want, got = cap_tokens(everything, 2000, skip_first), cap_tokens(capped, 2000, skip_first)
        assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.doc_index, got.doc_index)
        assert tok.seen <= 128  # two chunks of 64 texts, not 5000
    bos = tokenize_docs(_CountingTok(), texts, 16, prepend_bos=True, max_tokens=100)
    assert (bos.input_ids[:, 0] == 1).all() and int((bos.attention_mask.sum(1) - 1).sum()) >= 100


def test_pad_rows_vectorised_equals_row_by_row():
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 100, int(rng.integers(1, 20))).tolist() for _ in range(200)]
    ids, mask = pad_rows(rows, pad_id=7)
    assert ids.shape == (200, max(len(r) for r in rows))
    for j, r in enumerate(rows):
        assert ids[j, : len(r)].tolist() == r and (ids[j, len(r) :] == 7).all()
        assert mask[j].sum() == len(r) and mask[j, : len(r)].all()
    ids0, _ = pad_rows([[3, 4], [5]], None)
    assert ids0.tolist() == [[3, 4], [5, 0]]
