"""The generated `tiny` corpus (tests): English-like documents from a few topics, physics planted."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ssae_ray.config import CorpusConfig
from ssae_ray.data.schema import DataError, table_of, write_splits
from ssae_ray.tinytext import TOPIC_WORDS, tiny_doc

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
            out.append({"id": f"tiny/{split}/{i:05d}", "text": tiny_doc(rng, topic, style), "source": "tiny",
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
