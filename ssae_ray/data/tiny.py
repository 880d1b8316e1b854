"""The generated `tiny` corpus (tests): English-like documents from a few topics, physics planted."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ssae_ray.config import CorpusConfig
from ssae_ray.data.schema import DataError, table_of, write_splits

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


def build_tiny(c: CorpusConfig, out: Path) -> dict[str, Any]:
    splits = generate_tiny_corpus(c.n_docs, c.n_seed, c.split_seed)
    info = write_splits(out, {k: table_of(v) for k, v in splits.items()})
    return {
        "kind": "tiny",
        "splits": info,
        "tokens": {},
        "tokens_note": "no tokenizer was given: counts are words",
        "split_rule": TINY_SPLIT_RULE.format(topics=", ".join(TOPIC_WORDS)),
    }
