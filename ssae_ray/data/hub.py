"""Hugging Face datasets as corpus sources: a hub id or a local dataset folder opened with
`datasets` in streaming mode (no download of the whole dataset), at a `revision` and with
`data_files` where the Parquet lives apart from the main branch, and the errors a user can act on
(a split that does not exist, a loading-script dataset, a gated or missing repo) turned into one
`DataError` line before any heavy work."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ssae_ray.data.schema import OPTIONAL, DataError, normalise

PARQUET_REVISION = "refs/convert/parquet"


def is_local(path: str) -> bool:
    return Path(str(path)).expanduser().exists()


def open_hf(
    path: str,
    split: str = "train",
    *,
    name: str | None = None,
    revision: str | None = None,
    data_files: tuple[str, ...] | list[str] = (),
    where: str = "",
) -> Any:
    """`datasets.load_dataset(path, name, split=split, streaming=True, revision=..., data_files=...)`,
    with its failures rewritten as a `DataError` saying what to change (`where` names the config
    key, e.g. `corpus.sources.ood`)."""
    import datasets

    where = where or "the corpus source"
    at = f" at revision {revision!r}" if revision else ""
    kwargs: dict[str, Any] = {"split": split, "streaming": True}
    if revision:
        kwargs["revision"] = revision
    if data_files:
        kwargs["data_files"] = {split: list(data_files)}
    local = is_local(path)
    try:
        return datasets.load_dataset(str(Path(path).expanduser()) if local else path, name, **kwargs)
    except Exception as e:  # datasets raises RuntimeError / ValueError / FileNotFoundError ... by case
        msg = f"{type(e).__name__}: {e}"
        if "scripts are no longer supported" in msg:
            raise DataError(
                f"{where}: the dataset {path!r}{at} is a loading script ({e}), which datasets "
                f"{datasets.__version__} no longer runs; read the Hub's Parquet conversion instead with "
                f"`revision: {PARQUET_REVISION}` (and `data_files` if its folder layout needs it)"
            ) from e
        bad = re.search(
            r"(?:Bad split: .*?Available splits: |Unknown split .*?Should be one of )(\[.*?\])", msg
        )
        if bad:
            raise DataError(
                f"{where}: the dataset {path!r}{at} has no split {split!r}; its splits are {bad.group(1)}. "
                "Set `split` to one of them (or `part` to cut val/test from a single split)."
            ) from e
        if "gated" in msg.lower():
            raise DataError(
                f"{where}: the dataset {path!r} is gated on the Hub: accept its licence at "
                f"https://huggingface.co/datasets/{path} and set HF_TOKEN on every node"
            ) from e
        if "doesn't exist" in msg or "not found" in msg.lower() or isinstance(e, FileNotFoundError):
            raise DataError(
                f"{where}: cannot find the dataset {path!r}{at} ({msg}); check the id, `revision` and "
                "`data_files` (a local dataset folder or Parquet/JSONL files also work)"
            ) from e
        raise DataError(
            f"{where}: cannot open the Hugging Face dataset {path!r}{at} (split {split!r}): {msg}. "
            "On a machine without the Hub, give a local dataset folder or Parquet/JSONL files."
        ) from e


def iter_hf(
    ds: Any, text_field: str, source: str, batch_size: int = 10_000, where: str = ""
) -> Iterator[pa.Table]:
    """Normalised batches of a streamed dataset; a missing text field fails on the first row."""
    rows: list[dict[str, Any]] = []
    first = True
    for rec in ds:
        if first and text_field not in rec:
            raise DataError(
                f"{where or source}: the dataset {source!r} has no field {text_field!r}; its fields are: "
                f"{', '.join(rec) or '(none)'}. Set `text_field` to the field holding the text."
            )
        first = False
        rows.append({k: rec.get(k) for k in ("id", text_field, *OPTIONAL) if k in rec or k == text_field})
        if len(rows) >= batch_size:
            yield _batch(rows, text_field, source)
            rows = []
    if rows:
        yield _batch(rows, text_field, source)


def _batch(rows: list[dict[str, Any]], text_field: str, source: str) -> pa.Table:
    from ssae_ray.data.files import rows_table

    return normalise(rows_table(rows), text_field, source=source, where=f"hf:{source}")


def iter_hf_path(path: str, split: str, text_field: str, batch_size: int = 10_000) -> Iterator[pa.Table]:
    """`hf:<dataset>[:split]` short form: the dataset's `split` streamed in normalised batches."""
    yield from iter_hf(open_hf(path, split), text_field, path, batch_size)
