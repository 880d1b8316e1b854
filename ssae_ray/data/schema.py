"""The corpus schema, its splits and the helpers every builder shares: normalising a table to
`SCHEMA`, content ids, writing split files with their counts, and reading a built split."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ssae_ray.stages import file_sha256

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
VERSION = 2  # bump when a builder's output changes for the same config (it is part of the stage key)
OPTIONAL = ("title", "topic", "source", "is_domain")


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


def content_id(text: str) -> str:
    """The id of a document that has none: a hash of its text (stable across readers and runs)."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def text_key(text: str) -> str:
    """The key two documents are the same document by (exact text, surrounding space ignored)."""
    return hashlib.sha1(text.strip().encode()).hexdigest()


def normalise(table: pa.Table, text_field: str = "text", source: str = "", where: str = "input") -> pa.Table:
    """`table` with the columns of `SCHEMA`: text from `text_field`, ids kept (as strings) or made
    from the text, optional columns kept or filled; rows with an empty text dropped."""
    if text_field not in table.column_names:
        raise DataError(
            f"{where} has no field {text_field!r}; its fields are: {', '.join(table.column_names) or '(none)'}. "
            "Set corpus.text_field (or corpus.sources.<split>.text_field) to the field holding the text."
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
    for k in OPTIONAL:
        if k in table.column_names and k != "is_domain":
            cols[k] = ["" if v is None else str(v) for v in table.column(k).to_pylist()]
        elif k == "is_domain" and k in table.column_names:
            cols[k] = [None if v is None else bool(v) for v in table.column(k).to_pylist()]
        else:
            cols[k] = [source if k == "source" else ("" if k != "is_domain" else None)] * len(text)
    return pa.Table.from_pydict({f.name: cols[f.name] for f in SCHEMA}, schema=SCHEMA)


def table_of(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def split_info(table: pa.Table) -> dict[str, Any]:
    texts = table.column("text").to_pylist()
    dom = table.column("is_domain").to_pylist()
    return {
        "docs": len(texts),
        "words": sum(len(t.split()) for t in texts),
        "domain_docs": sum(d is True for d in dom),
    }


def write_splits(out: Path, splits: dict[str, pa.Table], names: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Write each split (empty when absent) as `<name>.parquet`; their counts and checksums."""
    info = {}
    for name in names:
        table = splits.get(name, SCHEMA.empty_table())
        path = out / f"{name}.parquet"
        pq.write_table(table.cast(SCHEMA), path)
        info[name] = split_info(table) | {"file": path.name, "sha256": file_sha256(path)}
    return info
