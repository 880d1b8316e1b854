"""Hugging Face datasets as corpus sources: a hub id or a local dataset folder opened with
`datasets` in streaming mode (no download of the whole dataset), at a `revision` and with
`data_files` where the Parquet lives apart from the main branch, and the errors a user can act on
(a split that does not exist, a loading-script dataset, a gated or missing repo) turned into one
`DataError` line before any heavy work."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ssae_ray.data.schema import OPTIONAL, DataError, normalise

PARQUET_REVISION = "refs/convert/parquet"
log = logging.getLogger("ssae_ray")


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


# ---------------------------------------------------------------------------------------------
# Whole corpora: partial Parquet conversions refused, raw archives read

KNOWN_DOCS = {"Skylion007/openwebtext": 8_013_769}
"""Documents of the paper corpora (the dataset cards' `num_examples`), where a card does not say."""


def _hf_root(path: str, revision: str | None) -> str:
    from urllib.parse import quote

    return f"datasets/{path}" + (f"@{quote(revision, safe='')}" if revision else "")


def expected_docs(path: str, split: str = "train") -> int | None:
    """The documents the dataset's card says `split` has (`dataset_info.splits[].num_examples` on
    the main branch), else `KNOWN_DOCS`; None when neither says."""
    try:
        from huggingface_hub import HfApi

        card = HfApi().dataset_info(path).card_data
        infos = (card.to_dict() if card is not None else {}).get("dataset_info") or []
        for info in infos if isinstance(infos, list) else [infos]:
            for s in info.get("splits") or []:
                if s.get("name") == split and s.get("num_examples"):
                    return int(s["num_examples"])
    except Exception:  # no card, offline: the table below
        pass
    return KNOWN_DOCS.get(path)


def check_parquet_conversion(
    path: str, revision: str, split: str, name: str | None, max_docs: int | None, where: str
) -> None:
    """Refuse a Hub Parquet conversion that holds only part of the dataset. The Hub converts a
    loading-script dataset larger than its limit (~5 GB) only partly, into a split folder named
    `partial-<split>`, which `datasets` reads as `<split>` without a word: OpenWebText's covers a
    small share of its 8M documents, so retrieval (and the random baseline) would draw from its first
    part. Counts the conversion's rows from the Parquet footers and compares them with the size the
    dataset should have. Taking `max_docs` documents the conversion holds is allowed (logged)."""
    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    root = _hf_root(path, revision)
    try:
        files = sorted(fs.glob(f"{root}/{name or '*'}/partial-{split}/*.parquet"))
    except Exception:  # not on the Hub (a local folder) or unreachable: open_hf says so
        return
    if not files:
        return
    rows = 0
    for f in files:
        with fs.open(f, "rb", block_size=1 << 16) as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    total = expected_docs(path, split)
    of = f" of the {total:,} the dataset has" if total else ""
    if max_docs is not None and max_docs <= rows:
        log.warning(
            "%s: reading the first %d documents of %r from its partial Parquet conversion (%s rows%s)",
            where, max_docs, path, f"{rows:,}", of,
        )  # fmt: skip
        return
    raise DataError(
        f"{where}: the Hub's Parquet conversion of {path!r} at {revision!r} is partial: split folder "
        f"'partial-{split}' holds {rows:,} documents{of}, so the corpus would be a slice of its first part. "
        "Read the dataset's own files instead (OpenWebText: `revision: main`, `data_files: [subsets/*.tar]`), "
        f"or set `max_docs` <= {rows} to take that slice on purpose"
    )


def is_archive_source(data_files: tuple[str, ...] | list[str]) -> bool:
    return bool(data_files) and all(str(p).endswith(".tar") for p in data_files)


def iter_archive_docs(path: str, revision: str | None, data_files: tuple[str, ...] | list[str],
                      text_field: str = "text", where: str = "") -> Iterator[dict[str, Any]]:  # fmt: skip
    """Documents of a dataset's raw tar archives on the Hub, streamed in order without writing them
    to disk: each `.txt` member is a document, and each `.xz` member an xz-compressed tar of `.txt`
    documents (OpenWebText's `subsets/urlsf_subsetNN.tar`, the files its loading script reads; the
    script's order, so the first documents are those of its Parquet conversion)."""
    import lzma
    import tarfile

    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    root = _hf_root(path, revision)
    try:
        files = sorted({f for p in data_files for f in fs.glob(f"{root}/{p}")})
    except Exception as e:
        raise DataError(f"{where}: cannot list {list(data_files)} in the dataset {path!r}: {e}") from e
    if not files:
        raise DataError(
            f"{where}: no file of the dataset {path!r} matches data_files {list(data_files)}; check the patterns"
        )

    def texts(tf: tarfile.TarFile) -> Iterator[tuple[str, Any]]:
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            if f is not None:
                yield m.name, f

    for file in files:
        with fs.open(file, "rb", block_size=1 << 20) as fh, tarfile.open(fileobj=fh, mode="r|") as outer:
            for member, f in texts(outer):
                if member.endswith(".xz"):
                    with lzma.open(f) as xz, tarfile.open(fileobj=xz, mode="r|") as inner:
                        for _, doc in texts(inner):
                            yield {text_field: doc.read().decode("utf-8", "replace").strip()}
                elif member.endswith(".txt"):
                    yield {text_field: f.read().decode("utf-8", "replace").strip()}
