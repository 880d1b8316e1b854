"""The retrieval corpus as a streaming Ray Dataset (the index stage reads it this way)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ssae_ray.config import CorpusConfig
from ssae_ray.data.files import iter_docs, resolve_files
from ssae_ray.data.hub import is_local, open_hf
from ssae_ray.data.schema import DataError, normalise, split_file

if TYPE_CHECKING:
    import ray.data


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
        ds = _hf_to_ray(open_hf(c.path, c.hf_split, where="corpus.path"), local=is_local(c.path))
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
