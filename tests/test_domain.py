"""`ssae-ray run --seed FILE [--ood FILE] [--name NAME]`: any domain from one text file."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from ssae_ray import cli, domain


def test_read_documents_lines_and_jsonl(tmp_path):
    p = tmp_path / "seed.txt"
    p.write_text("first doc\n\n  second doc  \nfirst doc\nthird\n", encoding="utf-8")
    assert domain.read_documents(p) == ["first doc", "second doc", "third"]  # blank and duplicate dropped
    j = tmp_path / "seed.jsonl"
    j.write_text('{"text": "a b"}\n{"text": "c", "id": 3}\n\n', encoding="utf-8")
    assert domain.read_documents(j) == ["a b", "c"]
    # UTF-16 with a BOM and UTF-8 with a BOM decode
    u = tmp_path / "u16.txt"
    u.write_bytes("é one\nzwei\n".encode("utf-16"))
    assert domain.read_documents(u) == ["é one", "zwei"]
    b = tmp_path / "bom.txt"
    b.write_bytes(b"\xef\xbb\xbfx\ny\n")
    assert domain.read_documents(b) == ["x", "y"]


def test_split_is_stable_disjoint_and_sized():
    docs = [f"document number {i}" for i in range(20)]
    s = domain.split_seed_docs(docs)
    assert {k: len(v) for k, v in s.items()} == {"test": 6, "val": 4, "seed": 10}
    assert sorted(sum(s.values(), [])) == sorted(docs)  # a partition
    assert domain.split_seed_docs(list(reversed(docs))) == s  # order of the file does not matter
    small = domain.split_seed_docs(docs[:6])
    assert {k: len(v) for k, v in small.items()} == {"test": 2, "val": 2, "seed": 2}


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["has no documents"]),
        (b"\n  \n\n", ["has no documents"]),
        (b"one\ntwo\nthree\n", ["has 3 documents", "at least 6"]),
        (b"caf\xe9 au lait\nthe second\n", ["not UTF-8", "0xe9", "iconv"]),
        (b'{"text": "a"}\n{"txt": "b"}\n', ["line 2", "'text'"]),
        (b'{"text": "a"}\n{oops\n', ["line 2", "not valid JSON"]),
    ],
)
def test_bad_seed_files_are_one_line_and_exit_2(tmp_path, capsys, content, words):
    p = tmp_path / "seed.txt"
    p.write_bytes(content)
    rc = cli.main(["run", "--preset", "tiny", "--seed", str(p), f"workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ssae-ray run: error:")
    for w in words:
        assert w in err
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").glob("sweep/*"))  # no work started


def test_missing_seed_and_bad_ood(tmp_path, capsys):
    assert cli.main(["run", "--preset", "tiny", "--seed", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    seed = tmp_path / "seed.txt"
    seed.write_text("\n".join(f"doc {i}" for i in range(8)))
    ood = tmp_path / "ood.txt"
    ood.write_bytes(b"\xff\x00\x01binary")
    assert cli.main(["run", "--preset", "tiny", "--seed", str(seed), "--ood", str(ood)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("NUL" in err or "UTF" in err), err


def _seed_from_tiny(tmp_path, over):
    """A seed file drawn from the tiny corpus itself: its seed and val documents plus in-domain
    documents of its retrieval corpus (retrievable unless the run removes them)."""
    from ssae_ray.config import load_config
    from ssae_ray.data import load_split
    from ssae_ray.pipeline import stage_corpus

    base = stage_corpus(load_config("tiny", overrides=over))
    pool = load_split(base, "seed").to_pylist() + load_split(base, "val").to_pylist()
    corpus_docs = [r["text"] for r in load_split(base, "corpus").to_pylist() if r["is_domain"]][:6]
    docs = [r["text"] for r in pool] + corpus_docs
    seed = tmp_path / "music.jsonl"
    seed.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(docs)))
    ood = tmp_path / "ood.txt"
    ood.write_text("\n".join(r["text"] for r in load_split(base, "ood").to_pylist()[:8]))
    return base, seed, ood, corpus_docs


def test_domain_corpus_holds_the_seed_file_out_of_retrieval(tmp_path):
    """Fast: the domain's corpus stage has the seed file's splits and a retrieval corpus (all that
    retrieval reads) without any of the seed file's documents, the preset's corpus otherwise."""
    from ssae_ray.data import load_split
    from ssae_ray.pipeline import stage_corpus

    over = [f"workdir={tmp_path / 'work'}"]
    base, seed, ood, corpus_docs = _seed_from_tiny(tmp_path, over)
    cfg, summary = domain.domain_config("tiny", seed, ood, "music", overrides=over)
    assert cfg.name == "music" and summary["docs"] == summary["seed"] + summary["val"] + summary["test"]
    split = domain.split_seed_docs(domain.read_documents(seed))
    assert set(split["test"]) & set(corpus_docs), "no held-out document was in the preset's corpus"
    dom = stage_corpus(cfg)
    assert dom != base
    for s in ("seed", "val", "test"):
        assert sorted(load_split(dom, s).column("text").to_pylist()) == sorted(split[s])
    assert load_split(dom, "ood").num_rows == 8
    retrieval = set(load_split(dom, "corpus").column("text").to_pylist())
    before = set(load_split(base, "corpus").column("text").to_pylist())
    mine = set(sum(split.values(), []))
    assert not mine & retrieval
    assert retrieval == before - mine  # nothing else removed
    assert load_split(dom, "general_test").num_rows == load_split(base, "general_test").num_rows


@pytest.mark.slow
def test_run_on_tiny_titles_the_report_and_holds_the_test_set_out_of_retrieval(tmp_path, capsys):
    """The seed file is drawn from the tiny corpus itself (its in-domain documents, several of them
    retrievable), so only removing the held-out part from the corpus keeps them out of retrieval."""
    from ssae_ray.data import load_split

    work = tmp_path / "work"
    over = [f"workdir={work}", "sweep.lams=[0.3,3.0]", "dashboard.enabled=true"]
    _, seed, ood, corpus_docs = _seed_from_tiny(tmp_path, over)
    rc = cli.main(
        ["run", "--preset", "tiny", "--seed", str(seed), "--ood", str(ood), "--name", "music", *over]
    )
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "domain 'music'" in out
    split = domain.split_seed_docs(domain.read_documents(seed))
    held = set(split["test"]) | set(split["val"])
    assert set(split["test"]) & set(corpus_docs), "no held-out document was in the corpus"
    # the domain's corpus: its test split is the held-out part, none of which is in the retrieval corpus
    (dom,) = [
        d for d in work.glob("corpus/*") if pq.read_table(d / "test.parquet").num_rows == len(split["test"])
    ]
    assert set(load_split(dom, "test").column("text").to_pylist()) == set(split["test"])
    retrieval = set(load_split(dom, "corpus").column("text").to_pylist())
    assert not (set(split["test"]) | set(split["val"]) | set(split["seed"])) & retrieval
    sels = list(work.glob("selection/*/selection.parquet"))
    assert sels
    for s in sels:
        assert not held & set(pq.read_table(s, columns=["text"]).column("text").to_pylist())
    # the report and dashboard are titled by the name, with the OOD set evaluated
    (report,) = [p for p in work.glob("sweep/*/eval/report.md")]
    text = report.read_text()
    assert text.splitlines()[0] == "# SSAE report: music"
    assert "ood" in text
    page = report.parent.parent / "dashboard" / "index.html"
    assert page.is_file() and "music" in page.read_text()
