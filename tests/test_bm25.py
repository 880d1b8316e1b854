"""BM25 built streaming from disk: the same scores as bm25s on the whole corpus in memory, across
chunk boundaries, empty passages and terms first seen in a later chunk; texts are consumed lazily."""

from __future__ import annotations

import random

import bm25s
import numpy as np

from ssae_ray.retrieval.bm25 import bm25_scores, build_bm25


def test_streaming_bm25_equals_bm25s(tmp_path):
    rnd = random.Random(0)
    words = "the quantum field electron photon river city bread fish king queen music energy momentum".split()
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randint(0, 30))) for _ in range(300)]
    texts += ["", "zebra unicorn zebra"]  # an empty passage; terms only in the last chunk
    pulled = []

    def lazy():
        for t in texts:
            pulled.append(t)
            yield t

    build_bm25(lazy(), tmp_path / "bm25", chunk=64)
    assert len(pulled) == len(texts)
    query = ["quantum electron electron photon", "zebra king", "absent-word"]
    got = bm25_scores(tmp_path / "bm25", query)
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    q = bm25s.tokenize([" ".join(query)], stopwords="en", return_ids=False, show_progress=False)[0]
    want = ref.get_scores([t for t in q if t in ref.vocab_dict])
    assert got.shape == (len(texts),) and np.abs(got - want).max() < 1e-5
    assert got[-1] > 0 and got[-2] == 0
    assert not bm25_scores(tmp_path / "bm25", ["nothing-indexed"]).any()


def test_indexes_built_by_bm25s_are_still_read(tmp_path):
    texts = ["quantum electron photon", "river city bread", "quantum field"]
    folder = tmp_path / "old"
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    ref.save(str(folder))
    (folder / "done.json").write_text('{"n": 3}')  # what the bm25s-based build wrote
    build_bm25(iter(texts), tmp_path / "new")
    old, new = bm25_scores(folder, ["quantum"]), bm25_scores(tmp_path / "new", ["quantum"])
    assert np.allclose(old, new) and old[0] > 0 and old[1] == 0
