"""English-like documents from a few topics: the text of the `tiny` corpus (`data/tiny.py`) and of the
`tiny` LM's optional pretraining (`models.make_tiny_model`). Standard library only."""

from __future__ import annotations

import random

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


def sentence(rng: random.Random, words: list[str]) -> str:
    w = rng.sample(words, 4)
    c = rng.sample(_COMMON, 2)
    s = f"{c[0]} {rng.choice(_ADJS)} {w[0]} {rng.choice(_VERBS)} {c[1]} {w[1]} and {w[2]} with {w[3]}"
    return s[0].upper() + s[1:] + "."


def tiny_doc(rng: random.Random, topic: str, style: str = "prose") -> str:
    words = TOPIC_WORDS[topic].split()
    n = rng.randint(4, 9)
    if style == "ood":
        return " ".join(
            rng.choice(_OOD_TEMPLATES).format(**dict(zip(("w1", "w2", "w3", "w4"), rng.sample(words, 4))))
            for _ in range(n)
        )
    return " ".join(sentence(rng, words) for _ in range(n))


def tiny_docs(n: int, seed: int = 0) -> list[str]:
    """`n` documents over every topic, in prose and (one in five) API-docs style."""
    rng = random.Random(seed)
    topics = list(TOPIC_WORDS)
    return [tiny_doc(rng, topics[i % len(topics)], "ood" if i % 5 == 4 else "prose") for i in range(n)]
