"""User corpora on disk: Parquet / JSONL files, folders and globs, streamed in normalised batches
with bounded memory (`iter_docs`) or read whole when small (`read_docs`)."""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ssae_ray.data.schema import OPTIONAL, DataError, normalise


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
        cols = [c for c in ("id", text_field, *OPTIONAL) if c in names]
        for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
            yield pa.Table.from_batches([rb])
        return
    fields = ("id", text_field, *OPTIONAL)
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
                yield rows_table(rows)
                rows = []
    if rows:
        yield rows_table(rows)


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
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
        from ssae_ray.data.hub import iter_hf_path

        batches = iter_hf_path(name, split or "train", text_field)
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
