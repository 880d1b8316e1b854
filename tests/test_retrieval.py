"""Retrieval: exact sharded search, resumable build, checksums, clear errors, TracIn algebra, ranking."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ssae_ray.config import load_config
from ssae_ray.retrieval import RetrievalError, ShardedIndex, build_index, merge_topk, retrieve
from ssae_ray.retrieval.embed import load_tokenizer, make_tiny_encoder, split_passages
from ssae_ray.retrieval.index import read_emb
from ssae_ray.retrieval.select import Ranking, fill_budget
from ssae_ray.retrieval.tracin import seed_gradient, tracin_scores, tracin_scores_naive, valid_tokens

# ---------------------------------------------------------------------------------------------
# Pure functions (no cluster)


def test_merge_topk_equals_one_flat_index():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    q = rng.standard_normal((7, 24)).astype(np.float32)
    cuts = [0, 100, 1100, 1101, 2500, 3000]  # uneven shards, one with a single vector
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        idx = faiss.IndexFlatIP(24)
        idx.add(x[a:b])
        parts.append(idx.search(q, min(50, b - a)))
    got = merge_topk(parts, np.array(cuts[:-1]), 50)
    flat = faiss.IndexFlatIP(24)
    flat.add(x)
    want_d, want_i = flat.search(q, 50)
    np.testing.assert_array_equal(got.ids, want_i)
    np.testing.assert_allclose(got.scores, want_d, rtol=1e-6)


def _tiny_sae(d=16, d_sae=40, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, d_sae, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(d_sae, d, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


def test_tracin_factorised_equals_per_example_autograd():
    sae = _tiny_sae()
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(6, 9, 16, generator=g)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[4, 2:] = 0
    valid = valid_tokens(mask)
    assert not valid[:, 0].any() and valid[1].sum() == 4
    seed_acts = [torch.randn(3, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)]
    seed_masks = [
        valid_tokens(torch.ones(3, 9, dtype=torch.long)),
        valid_tokens(torch.ones(2, 9, dtype=torch.long)),
    ]
    for lam in (0.0, 0.7):
        seed = seed_gradient(sae, seed_acts, seed_masks, lam)
        fast = tracin_scores(sae, acts, valid, seed, lam)
        slow = tracin_scores_naive(sae, acts, valid, seed, lam)
        assert fast.shape == (6,)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
        assert fast.abs().min() > 0  # a real signal, not zeros
    # the seed gradient is the gradient of the mean token loss over all valid seed tokens
    x = torch.cat([a[m] for a, m in zip(seed_acts, seed_masks, strict=True)])
    from ssae_ray.retrieval.tracin import token_loss

    ref = torch.autograd.grad(token_loss(sae, x, 0.7).mean(), [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    for a, b in zip(seed_gradient(sae, seed_acts, seed_masks, 0.7), ref, strict=True):
        torch.testing.assert_close(a, b)


def test_split_passages_respects_length_and_keeps_text(tmp_path):
    folder = make_tiny_encoder(tmp_path / "enc")
    tok = load_tokenizer(str(folder))
    text = "The quantum electron field interacts with photons. " * 12
    parts = split_passages([text, ""], tok, 16)
    assert parts[1] == []
    assert all(0 < n <= 16 for _, n in parts[0])
    assert sum(n for _, n in parts[0]) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert all(p in text for p, _ in parts[0])


def test_tiny_encoder_is_deterministic(tmp_path):
    a, b = make_tiny_encoder(tmp_path / "a"), make_tiny_encoder(tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


class _FakePassages:
    def __init__(self, texts, n_tokens):
        self._t, self.n_tokens = texts, np.array(n_tokens)

    def texts(self, rows):
        return [self._t[r] for r in rows]


def test_fill_budget_dedups_and_stops_at_budget():
    texts = ["Alpha beta.", "Alpha beta.", "alpha, BETA 2!", "gamma delta", "epsilon", "zeta"]
    p = _FakePassages(texts, [5, 5, 5, 5, 5, 5])
    fill = fill_budget(Ranking(np.arange(6), np.zeros(6), None), p, budget=12)
    assert fill.exact_dups == 1 and fill.near_dups == 1
    assert fill.texts == ["Alpha beta.", "gamma delta", "epsilon"] and fill.tokens == 15
    assert not fill.exhausted
    short = fill_budget(Ranking(np.arange(6), np.zeros(6), None), p, budget=100)
    assert short.exhausted and short.tokens == 20


def test_fill_budget_in_lm_tokens():
    """`budget_unit: lm`: the budget counts what `count` gives each passage (the LM's tokenizer),
    not the retriever's per-passage counts."""
    texts = ["one two three", "four five", "six seven eight nine", "ten"]
    p = _FakePassages(texts, [100, 100, 100, 100])
    words = lambda ts: [len(t.split()) for t in ts]  # noqa: E731
    fill = fill_budget(Ranking(np.arange(4), np.zeros(4), None), p, budget=6, count=words)
    assert fill.texts == texts[:3] and fill.tokens == 9 and not fill.exhausted
    assert fill_budget(Ranking(np.arange(4), np.zeros(4), None), p, budget=6).tokens == 100


# ---------------------------------------------------------------------------------------------
# A built tiny index (real local Ray, real FAISS), shared by the tests below


@pytest.mark.ray
def test_ivf_shards_share_one_trained_quantizer_and_probe_exactly(ray_local, tmp_path):
    from ssae_ray.retrieval.index import _emb_name, _index_shards, _train, _write_emb_shard
    from ssae_ray.stages import write_json_atomic

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    (tmp_path / "emb").mkdir()
    passages = []
    for i, (a, b) in enumerate([(0, 1000), (1000, 2200), (2200, 3000)]):
        _write_emb_shard(
            tmp_path / "emb" / _emb_name(i), [(np.array([f"p{j}" for j in range(a, b)]), x[a:b])]
        )
        passages.append({"file": f"passages/{i}.parquet", "rows": b - a})
    cfg = load_config(
        "tiny", overrides=["retrieval.index_type=ivf", "retrieval.nlist=16", "retrieval.train_sample=2000"]
    )
    trained = _train(cfg.retrieval, tmp_path, passages, 32)
    shards = _index_shards(cfg.retrieval, tmp_path, passages, 32, trained)
    assert [s["count"] for s in shards] == [1000, 1200, 800]
    write_json_atomic(
        tmp_path / "manifest.json", {"dim": 32, "shards": shards, "nprobe": 16, "model_id": "synthetic"}
    )
    index = ShardedIndex(tmp_path)  # nprobe = nlist: IVF-Flat visits every list, so it is exact
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    want_d, want_i = flat.search(x[:5], 20)
    got = index.search(x[:5], 20)
    np.testing.assert_array_equal(got.ids, want_i)
    np.testing.assert_allclose(got.scores, want_d, rtol=1e-5)
    index.set_nprobe(1)
    assert (index.search(x[:5], 20).ids != want_i).any()  # one list: approximate
    # retrieval.nprobe is what a search uses (the selection passes it), not the build's manifest value
    probed = ShardedIndex(tmp_path, verify=False, nprobe=1)
    assert [i.nprobe for i in probed.indexes] == [1, 1, 1] and [i.nprobe for i in index.indexes] == [1] * 3
    np.testing.assert_array_equal(probed.search(x[:5], 20).ids, index.search(x[:5], 20).ids)
    assert [i.nprobe for i in ShardedIndex(tmp_path, verify=False).indexes] == [16] * 3
    assert index.pids()[1500] == "p1500"


_PHYSICS = "energy momentum charge mass force field quantum particle electron photon proton neutron atom nucleus".split()
_OTHER = [
    "river city market bread fish fruit village garden farm wine cheese mountain island ocean".split(),
    "king queen war law history kingdom church election party president army treaty".split(),
    "music painting poetry composer symphony orchestra film actor novel author painter".split(),
]
_STOP = "the of and a to in is was for on with as by at from that".split()


def planted_corpus(folder: Path, n_docs: int = 240, n_domain: int = 16, seed: int = 0) -> Path:
    """A corpus with `n_domain` physics docs planted among other topics, and a physics seed set."""
    rng = np.random.default_rng(seed)

    def doc(vocab: list[str], n: int) -> str:
        words = rng.choice(vocab, n).tolist() + rng.choice(_STOP, n // 2).tolist()
        rng.shuffle(words)
        return " ".join(words).capitalize() + "."

    domain = set(rng.choice(n_docs, n_domain, replace=False).tolist())
    rows = [
        {"id": f"doc{i:04d}", "text": doc(_PHYSICS if i in domain else _OTHER[i % 3], int(rng.integers(20, 90))),
         "source": "planted", "title": f"doc {i}", "topic": "physics" if i in domain else "other",
         "is_domain": i in domain}
        for i in range(n_docs)
    ]  # fmt: skip
    rows[1]["text"] = rows[0]["text"]  # an exact duplicate to dedup
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "corpus.parquet")
    seeds = [{"id": f"seed{i}", "text": doc(_PHYSICS, 60)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(seeds), folder / "seed.parquet")
    return folder


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    cfg = load_config("tiny", overrides=[f"workdir={root / 'work'}", "retrieval.token_budget=800"])
    corpus_dir = planted_corpus(root / "corpus")
    index_dir = build_index(cfg, corpus_dir)
    return cfg, corpus_dir, index_dir


@pytest.mark.ray
def test_index_manifest_counts_and_exact_sharded_search(built):
    cfg, corpus_dir, index_dir = built
    m = json.loads((index_dir / "manifest.json").read_text())
    assert m["dim"] == 64 and m["model_id"] == "tiny-encoder-v2" and m["normalize"] is True
    assert len(m["shards"]) > 3 and all(s["count"] <= cfg.retrieval.shard_size for s in m["shards"])
    assert m["n_vectors"] == m["n_passages"] == sum(s["count"] for s in m["shards"])
    pids, embs = zip(*(read_emb(index_dir / s["embeddings"]) for s in m["shards"]), strict=True)
    pids, x = np.concatenate(pids), np.concatenate(embs)
    assert len(set(pids)) == len(pids) == m["n_vectors"]
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-4)
    index = ShardedIndex(index_dir)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    q = x[[3, 50, 400]] + 0.01 * np.random.default_rng(0).standard_normal((3, x.shape[1])).astype(np.float32)
    want_d, want_i = flat.search(q, 40)
    for parallel in ("threads", "ray"):
        got = index.search(q, 40, parallel=parallel)
        np.testing.assert_allclose(got.scores, want_d, rtol=1e-5)
        # the generated corpus repeats some passages: identical vectors tie, and a tie's order is
        # arbitrary in FAISS; compare ids above the k-th score, each tie group as a set
        for row in range(len(q)):
            above = want_d[row] > want_d[row, -1] + 1e-6
            for score in np.unique(want_d[row][above]):
                assert set(got.ids[row][got.scores[row] == score]) == set(want_i[row][want_d[row] == score])
            assert above.sum() > 20
    with pytest.raises(RetrievalError, match="dim 7"):
        index.search(np.ones((1, 7), np.float32), 3)


@pytest.mark.ray
def test_dense_and_bm25_rank_planted_domain_docs_first(built):
    cfg, corpus_dir, index_dir = built
    corpus = pq.read_table(corpus_dir / "corpus.parquet").to_pandas()
    n_dom = int(corpus["is_domain"].sum())
    for strategy in ("dense", "bm25"):
        sel_dir = retrieve(cfg, corpus_dir, index_dir, strategy)
        sel = pq.read_table(sel_dir / "selection.parquet").to_pandas()
        man = json.loads((sel_dir / "manifest.json").read_text())
        assert man["strategy"] == strategy and man["budget_filled"] and man["tokens"] >= 800
        first_docs = sel.drop_duplicates("doc_id").head(n_dom)
        assert first_docs["is_domain"].all(), f"{strategy}: {first_docs[['doc_id', 'score', 'is_domain']]}"
        assert (np.diff(sel["score"]) <= 1e-6).all()  # best first
        assert sel["text"].is_unique and set(sel["method"]) == {strategy}
    rnd = json.loads((retrieve(cfg, corpus_dir, index_dir, "random") / "manifest.json").read_text())
    assert rnd["precision"] < 0.3 and rnd["base_rate"] < 0.1
    # a stage keyed by config + index + seeds: the same call is cached
    assert retrieve(cfg, corpus_dir, index_dir, "dense") == retrieve(cfg, corpus_dir, index_dir, "dense")


@pytest.mark.ray
def test_tracin_strategy_reranks_first_stage(built, tmp_path):
    from ssae_ray.models import load_lm
    from ssae_ray.saes import make_random_sae

    cfg, corpus_dir, index_dir = built
    cfg = cfg.replace(retrieval={"tracin_fraction": 0.2})
    lm = load_lm(cfg.model, cache_dir=tmp_path / "models")
    sae = make_random_sae(lm.d_model, 32, cfg.sae.hooks[0], seed=0)
    sel_dir = retrieve(cfg, corpus_dir, index_dir, "bm25+tracin", lm=lm, sae=sae)
    sel = pq.read_table(sel_dir / "selection.parquet").to_pandas()
    man = json.loads((sel_dir / "manifest.json").read_text())
    assert man["tracin_hook"] == cfg.sae.hooks[0] and man["lm_tokens"] > 0
    assert (np.diff(sel["score"]) <= 1e-6).all() and sel["first_stage_score"].notna().all()
    assert not np.allclose(sel["score"], sel["first_stage_score"])


@pytest.mark.ray
def test_corrupted_shard_is_detected(built, tmp_path):
    cfg, corpus_dir, index_dir = built
    copy = tmp_path / "index-copy"
    shutil.copytree(index_dir, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["shards"][2]["index"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RetrievalError, match="checksum"):
        ShardedIndex(copy)
    with pytest.raises(RetrievalError, match="checksum"):  # a selection not cached yet opens the index
        retrieve(cfg.replace(retrieval={"token_budget": 700}), corpus_dir, copy, "dense")


@pytest.mark.ray
def test_clear_errors_for_bad_inputs(built, tmp_path):
    cfg, corpus_dir, index_dir = built
    with pytest.raises(RetrievalError, match="no non-empty seed"):
        retrieve(cfg, corpus_dir, index_dir, "dense", seed_texts=[" ", ""])
    no_seed = tmp_path / "no_seed"
    no_seed.mkdir()
    pq.write_table(pa.table({"text": pa.array([" ", ""], pa.string())}), no_seed / "seed.parquet")
    with pytest.raises(RetrievalError, match="seed set .* is empty: set corpus.seed_path"):
        retrieve(cfg, no_seed, index_dir, "dense")
    with pytest.raises(RetrievalError, match="larger than the whole corpus"):
        retrieve(cfg.replace(retrieval={"token_budget": 10**9}), corpus_dir, index_dir, "bm25")
    other = make_tiny_encoder(tmp_path / "enc32", hidden=32)
    with pytest.raises(RetrievalError, match="dim 32.*dim 64"):
        retrieve(cfg.replace(retrieval={"embed_model": str(other)}), corpus_dir, index_dir, "dense")
    with pytest.raises(RetrievalError, match="unknown retrieval strategy"):
        retrieve(cfg, corpus_dir, index_dir, "tfidf")
    with pytest.raises(RetrievalError, match="raise retrieval.tracin_fraction"):
        retrieve(cfg.replace(retrieval={"tracin_fraction": 0.001}), corpus_dir, index_dir, "dense+tracin",
                 lm=object(), sae=_tiny_sae())  # fmt: skip


def _vectors(index_dir: Path, manifest: dict) -> dict[str, np.ndarray]:
    pids, embs = zip(*(read_emb(index_dir / s["embeddings"]) for s in manifest["shards"]), strict=True)
    pids, x = np.concatenate(pids), np.concatenate(embs)
    assert len(set(pids)) == len(pids), "duplicate vectors"
    return dict(zip(pids, x, strict=True))


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import ray
    from ssae_ray.config import load_config
    from ssae_ray.retrieval import build_index
    ray.init(address=sys.argv[1], log_to_driver=False)
    cfg = load_config("tiny", overrides=[f"workdir={sys.argv[2]}"])
    done = []
    def on_shard(i):
        done.append(i)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    build_index(cfg, sys.argv[3], on_shard=on_shard)
    """
)


@pytest.mark.ray
def test_build_resumes_after_sigkill_without_duplicates(built, ray_local, tmp_path):
    cfg0, corpus_dir, ref_dir = built
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, address, str(work), str(corpus_dir)], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = next((work / "index").glob("*.partial"))
    assert not (partial / "manifest.json").exists()
    assert len(list((partial / "emb").glob("emb-*.parquet"))) == 2
    cfg = load_config("tiny", overrides=[f"workdir={work}"])
    index_dir = build_index(cfg, corpus_dir)
    assert index_dir.name == ref_dir.name and not partial.exists()
    got, ref = (json.loads((d / "manifest.json").read_text()) for d in (index_dir, ref_dir))
    assert got["n_vectors"] == ref["n_vectors"] == got["n_passages"]
    a, b = _vectors(index_dir, got), _vectors(ref_dir, ref)
    assert len(a) == got["n_vectors"] and a.keys() == b.keys()  # no duplicates, nothing lost
    # Equal up to the encoder's arithmetic: the resumed build batches the passages differently, which
    # moves an fp32 embedding by a few roundings and a bf16 one (where `auto` picks bf16) within bf16's
    # bound over the encoder's path (the tiny encoder: 2 layers x 6 matmuls; testing/precision.py).
    from ssae_ray.precision import resolve
    from ssae_ray.testing.precision import bf16_rtol, rel_err

    tol = bf16_rtol(12) if resolve(cfg.model.precision).bf16 else 1e-5
    errs = [rel_err(torch.from_numpy(a[pid]), torch.from_numpy(b[pid])) for pid in list(a)[:50]]
    assert max(errs) <= tol, (max(errs), tol)
    assert ShardedIndex(index_dir).ntotal == ref["n_vectors"]
    # Two builds of one corpus (one of them through a crash) hold the same passage files, row for
    # row, so a selection (the random one included) is the same from either.
    names = [s["passages"] for s in ref["shards"]]
    assert names == [s["passages"] for s in got["shards"]] and names[0] == "passages/passages-00000.parquet"
    for name in sorted(set(names)):
        assert pq.read_table(index_dir / name).equals(pq.read_table(ref_dir / name)), name
    picks = [
        pq.read_table(retrieve(c, corpus_dir, d, "random") / "selection.parquet")["id"].to_pylist()
        for c, d in (
            (cfg.replace(retrieval={"token_budget": cfg0.retrieval.token_budget}), index_dir),
            (cfg0, ref_dir),
        )
    ]
    assert picks[0] == picks[1] and len(picks[0]) > 10
