"""Real-dataset preparation (ssae_ray/data/prepare.py) on small local datasets shaped like the
paper's: arXiv physics (one `train` split, 60/20/20), physics-instruct (`question` / `answer`),
Pile toxicity (`train` / `test`, `text` / `score`), OpenWebText as the Hub's Parquet conversion
(`plain_text/train/*.parquet`) and as a loading script. Read through `datasets` streaming."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssae_ray.config import load_config
from ssae_ray.data import DataError, build_corpus, content_id, load_split, sources_of
from ssae_ray.data.prepare import cap_tokens, cut_to_tokens, lm_tokenizer

WORDS = ("energy momentum photon electron quantum field particle wave charge mass velocity force gravity "
         "magnetic spin neutron proton relativity entropy frequency laser the a of and to in is").split()  # fmt: skip


def _docs(n: int, seed: int, prefix: str, lo: int = 20, hi: int = 90) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)
    ]


def _write(folder, rel: str, cols: dict) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory):
    """Local dataset folders with the real datasets' splits, columns and file layouts."""
    root = tmp_path_factory.mktemp("datasets")
    arxiv = _docs(50, 1, "paper")
    arxiv[7] = arxiv[3]  # a duplicate row: counted once
    _write(root / "arxiv-physics", "data/train-00000-of-00001.parquet", {"text": arxiv})
    q = _docs(20, 2, "question", 8, 30)
    _write(
        root / "instruct", "data/train-00000-of-00001.parquet", {"question": q, "answer": _docs(20, 3, "ans")}
    )
    _write(root / "toxicity", "data/train-00000-of-00001.parquet",
           {"text": _docs(40, 4, "tox"), "score": [0.1 * (i % 10) for i in range(40)]})  # fmt: skip
    _write(
        root / "toxicity",
        "data/test-00000-of-00001.parquet",
        {"text": _docs(10, 5, "toxtest"), "score": [0.5] * 10},
    )
    _write(root / "owt", "plain_text/train/0000.parquet", {"text": _docs(30, 6, "web", 100, 200)})
    _write(root / "owt", "plain_text/train/0001.parquet", {"text": _docs(30, 7, "web2", 100, 200)})
    script = root / "owt-script"
    script.mkdir()
    (script / "owt-script.py").write_text("import datasets\n")
    return root


def physics_cfg(tmp_path, root, **corpus_src):
    sources = {
        "corpus": {"path": str(root / "owt"), "data_files": ["plain_text/train/*.parquet"], "max_docs": 50,
                   "first_tokens": 24},
        "val": {"path": str(root / "arxiv-physics"), "part": "val"},
        "seed": {"from_split": "val", "max_tokens": 150},
        "test": {"path": str(root / "arxiv-physics"), "part": "test", "max_tokens": 400},
        "ood": {"path": str(root / "instruct"), "text_field": "question", "max_tokens": 120},
    } | corpus_src  # fmt: skip
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path}"])
    return cfg.replace(corpus={"kind": "hf", "sources": sources})


def ntok(tok, texts) -> int:
    return sum(len(i) for i in tok(list(texts), add_special_tokens=False)["input_ids"])


def test_physics_like_preparation(hub_like, tmp_path):
    cfg = physics_cfg(tmp_path / "a", hub_like)
    tok = lm_tokenizer(cfg)
    folder = build_corpus(cfg)
    m = json.loads((folder / "manifest.json").read_text())
    val, seed, test, ood = (load_split(folder, s) for s in ("val", "seed", "test", "ood"))
    corpus = load_split(folder, "corpus")
    # 60/20/20 of the 49 distinct documents: val 39-29 = 10, test 49-39 = 10 (before the cap).
    assert m["prepared"]["val"]["source_docs"] == 49
    assert m["prepared"]["val"]["part_docs"] == 10 == val.num_rows
    assert m["prepared"]["test"]["part_docs"] == 10
    # Caps in LM tokens: exact (the last document cut), recorded.
    assert ntok(tok, seed["text"].to_pylist()) == 150 == m["prepared"]["seed"]["lm_tokens"]
    assert ntok(tok, test["text"].to_pylist()) == 400 and test.num_rows < 10
    assert ntok(tok, ood["text"].to_pylist()) == 120 and ood["text"][0].as_py().startswith("question")
    # The seed is drawn from validation: its first documents, the last one possibly cut.
    vals = dict(zip(val["id"].to_pylist(), val["text"].to_pylist(), strict=True))
    assert seed["id"].to_pylist() == val["id"].to_pylist()[: seed.num_rows]
    assert all(
        vals[i].startswith(t) for i, t in zip(seed["id"].to_pylist(), seed["text"].to_pylist(), strict=True)
    )
    # Test disjoint from seed and validation; labels by role.
    assert not set(test["id"].to_pylist()) & set(val["id"].to_pylist())
    assert set(seed["is_domain"].to_pylist()) == {True} and corpus.num_rows == 50
    # Pretraining-corpus rule: max_docs documents, each cut to its first 24 LM tokens.
    lens = [len(i) for i in tok(corpus["text"].to_pylist(), add_special_tokens=False)["input_ids"]]
    assert max(lens) == 24 and all(n <= 24 for n in lens)
    # Same output twice: byte-identical files in another work dir; the same folder when cached.
    again = build_corpus(physics_cfg(tmp_path / "b", hub_like), tok)
    m2 = json.loads((again / "manifest.json").read_text())
    assert {k: v["sha256"] for k, v in m["splits"].items()} == {
        k: v["sha256"] for k, v in m2["splits"].items()
    }
    assert build_corpus(cfg) == folder
    # The split seed changes the draw.
    other = build_corpus(cfg.replace(corpus={"split_seed": 1}), tok)
    assert load_split(other, "val")["id"].to_pylist() != val["id"].to_pylist()


def test_held_out_documents_leave_the_corpus(hub_like, tmp_path):
    """Corpus and test from one dataset: the val/test parts (whole, even where a cap cut them)
    are not in the retrieval corpus."""
    arxiv = str(hub_like / "arxiv-physics")
    cfg = physics_cfg(tmp_path, hub_like, corpus={"path": arxiv, "first_tokens": 8})
    folder = build_corpus(cfg)
    m = json.loads((folder / "manifest.json").read_text())
    corpus_ids = set(load_split(folder, "corpus")["id"].to_pylist())
    src = pq.read_table(hub_like / "arxiv-physics" / "data" / "train-00000-of-00001.parquet")[
        "text"
    ].to_pylist()
    # 49 distinct documents: 29 in the train part stay, the 10 val + 10 test ones (whole) leave.
    assert len(corpus_ids) == 29 and len({content_id(t) for t in src} - corpus_ids) == 20
    assert m["splits"]["corpus"]["dropped_held_out"] == 50 - load_split(folder, "corpus").num_rows
    for split in ("seed", "val", "test"):
        assert not corpus_ids & set(load_split(folder, split)["id"].to_pylist()), split


def test_toxicity_like_two_split_dataset(hub_like, tmp_path):
    """Pile toxicity ships train / test: the 60/20/20 parts are cut from `train`, its `test` split
    can be named directly; the seed (4,072 tokens in the paper) comes from validation."""
    tox = str(hub_like / "toxicity")
    cfg = physics_cfg(tmp_path, hub_like, val={"path": tox, "part": "val"}, seed={"from_split": "val", "max_tokens": 100},
                      test={"path": tox, "split": "test", "max_tokens": 200}, ood=None)  # fmt: skip
    folder = build_corpus(cfg)
    assert load_split(folder, "val").num_rows == 8  # 20% of 40
    assert load_split(folder, "test")["text"][0].as_py().startswith("toxtest")
    assert load_split(folder, "ood").num_rows == 0


def test_errors_before_any_work(hub_like, tmp_path):
    # A split the dataset does not have.
    cfg = physics_cfg(
        tmp_path, hub_like, test={"path": str(hub_like / "arxiv-physics"), "split": "validation"}
    )
    with pytest.raises(
        DataError, match=r"corpus.sources.test: .* has no split 'validation'; its splits are \['train'\]"
    ):
        build_corpus(cfg)
    # A loading-script dataset (OpenWebText's main branch) without its Parquet revision.
    cfg = physics_cfg(tmp_path, hub_like, corpus={"path": str(hub_like / "owt-script")})
    with pytest.raises(DataError, match=r"loading script .* `revision: refs/convert/parquet`"):
        build_corpus(cfg)
    # A wrong text field (the instruct set has question / answer).
    cfg = physics_cfg(tmp_path, hub_like, ood={"path": str(hub_like / "instruct")})
    with pytest.raises(DataError, match=r"no field 'text'; its fields are: question, answer"):
        build_corpus(cfg)
    # Config mistakes.
    for bad, msg in [({"seed": {"from_split": "general_test"}}, "that split has no source"),
                     ({"seed": {"path": "x", "from_split": "val"}}, "exactly one of"),
                     ({"val": {"path": "x", "part": "dev"}}, "part='dev'"),
                     ({"val": {"path": "x", "fractions": [0.5, 0.2, 0.2]}}, "sum to 1"),
                     ({"corpus": {"path": "x", "max_tokens": 5}}, "not part/from_split/max_tokens")]:  # fmt: skip
        with pytest.raises(DataError, match=msg):
            sources_of(physics_cfg(tmp_path, hub_like, **bad).corpus)
    assert not list((tmp_path / "corpus").glob("*/manifest.json"))  # nothing finished, nothing streamed


def test_cap_and_cut_tokens(tiny_cfg):
    tok = lm_tokenizer(tiny_cfg)
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "energy and momentum", "a"]
    cut = cut_to_tokens(tok, texts, 5)
    assert [len(i) for i in tok(cut, add_special_tokens=False)["input_ids"]] == [
        5,
        min(5, ntok(tok, texts[1:2])),
        1,
    ]
    assert all(t.startswith(c) for t, c in zip(texts, cut, strict=True))
    table = pa.table({"id": ["a", "b", "c"], "text": texts})
    capped, n = cap_tokens(table, tok, ntok(tok, texts[:1]) + 2)
    assert n == ntok(tok, capped["text"].to_pylist()) == ntok(tok, texts[:1]) + 2 and capped.num_rows == 2
    whole, n = cap_tokens(table, tok, 10**6)
    assert whole.num_rows == 3 and n == ntok(tok, texts)


def test_short_form_still_works(tmp_path):
    """`path` / `seed_path` / `text_field` (the short form) become sources: whole files."""
    seed = tmp_path / "s.parquet"
    pq.write_table(pa.table({"body": ["seed one", "seed two"]}), seed)
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": [f"doc {i}" for i in range(12)]}), corpus)
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path / 'w'}"])
    cfg = cfg.replace(corpus={"kind": "parquet", "path": str(corpus), "seed_path": str(seed), "text_field": "body",
                              "max_docs": 5})  # fmt: skip
    src = sources_of(cfg.corpus)
    assert src["corpus"].max_docs == 5 and src["seed"].text_field == "body" and "val" not in src
    folder = build_corpus(cfg)
    assert sorted(load_split(folder, "seed")["text"].to_pylist()) == ["seed one", "seed two"]
    assert load_split(folder, "corpus").num_rows == 5
