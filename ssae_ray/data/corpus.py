"""The corpus stage: `build_corpus(cfg)` writes one folder `<workdir>/corpus/<key>/` holding six
Parquet files (`corpus`, `seed`, `val`, `test`, `ood`, `general_test`), all with the columns of
`SCHEMA`, and a `manifest.json` with document, word and (when a tokenizer is given) token counts
per split, the split rule and the inputs. The same config gives the same key and byte-identical
files. The builders: `local` (local.py), `tiny` (tiny.py), `hf` / `parquet` / `jsonl`
(prepare.py: real datasets and user files)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ssae_ray.config import Config, CorpusConfig
from ssae_ray.data.local import build_local, find_wiki_wheel
from ssae_ray.data.prepare import build_sources, check_sources, lm_tokenizer, needs_tokenizer, source_inputs
from ssae_ray.data.schema import SPLITS, VERSION, DataError, split_file
from ssae_ray.data.tiny import build_tiny
from ssae_ray.stages import file_sha256, read_manifest, run_stage, stage_key, write_json_atomic


def build_corpus(cfg: Config, tokenizer: Any = None, force: bool = False) -> Path:
    """Build (or reuse) the corpus splits of `cfg.corpus` and return the stage folder.

    With a `tokenizer` the manifest gets exact token counts per split under the tokenizer's name
    (added to a cached folder without rebuilding it); without one it reports words only. Sources
    capped in tokens (`max_tokens`, `first_tokens`) are cut with the LM's tokenizer: `tokenizer`,
    or the one of `cfg.model` loaded alone."""
    c = cfg.corpus
    builders: dict[str, Callable[[CorpusConfig, Path], dict[str, Any]]] = {
        "local": build_local,
        "tiny": build_tiny,
        "parquet": build_sources,
        "jsonl": build_sources,
        "hf": build_sources,
    }
    if c.kind not in builders:
        raise DataError(f"corpus.kind {c.kind!r} is not one of: {', '.join(builders)}")
    inputs = stage_inputs(cfg)
    capped = "tokenizer" in inputs
    loaded: list[Any] = []

    def build(tmp: Path) -> dict[str, Any]:
        if builders[c.kind] is build_sources:
            if capped and tokenizer is None:  # loaded only when a build needs it
                loaded.append(lm_tokenizer(cfg))
            return build_sources(c, tmp, tokenizer if tokenizer is not None else (loaded or [None])[0])
        return builders[c.kind](c, tmp)

    key = stage_key("corpus", VERSION, inputs)
    folder = run_stage(cfg.root, "corpus", key, lambda tmp: build(tmp) | {"config": inputs}, force=force)
    if tokenizer is not None or loaded:
        add_token_counts(folder, tokenizer if tokenizer is not None else loaded[0])
    return folder


def stage_inputs(cfg: Config) -> dict[str, Any]:
    """The corpus stage's key inputs: `corpus_inputs`, plus the LM whose tokenizer cuts the sources
    capped in tokens (the caps depend on it)."""
    c = cfg.corpus
    inputs = corpus_inputs(c)
    if c.kind in ("hf", "parquet", "jsonl") and needs_tokenizer(c):
        inputs["tokenizer"] = [cfg.model.source, cfg.model.gguf_file, cfg.model.tiny_arch]
    return inputs


def preflight(cfg: Config) -> None:
    """Before a job loads its LM: unless the corpus is already built, open every dataset source and
    read its first rows, so a missing split, repo, field or a loading-script dataset fails first."""
    c = cfg.corpus
    if c.kind not in ("hf", "parquet", "jsonl"):
        return
    key = stage_key("corpus", VERSION, stage_inputs(cfg))
    if read_manifest(cfg.root / "corpus" / key) is None:
        check_sources(c)


def corpus_inputs(c: CorpusConfig) -> dict[str, Any]:
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
    return {"kind": c.kind, "split_seed": c.split_seed, "sources": source_inputs(c)}


def check_splits(corpus_dir: str | Path, needed: tuple[str, ...], why: str) -> None:
    """Fail before heavy work when a built corpus lacks a split a job needs (`why` says which job)."""
    empty = [s for s in needed if pq.ParquetFile(split_file(corpus_dir, s)).metadata.num_rows == 0]
    if empty:
        hints = ", ".join(f"corpus.sources.{s} (or corpus.{s}_path)" for s in empty)
        raise DataError(f"{why} needs the {', '.join(empty)} split(s) but {corpus_dir} has none; set {hints}")


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
