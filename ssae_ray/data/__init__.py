"""Corpora and their splits, one job per module:

- `schema`: the columns every split has, normalising, ids, writing and reading split files;
- `corpus`: the cached corpus stage (`build_corpus`) and token counts in the manifest;
- `prepare`: real datasets: per-split sources, seeded 60/20/20 splits, the seed drawn from
  validation, token caps, pretraining corpora cut to their first tokens;
- `hub`: Hugging Face datasets streamed with `datasets` (revision, data_files, clear errors);
- `files`: Parquet / JSONL files, folders and globs;
- `raydata`: the retrieval corpus as a streaming Ray Dataset;
- `local`: the offline Wikipedia + sympy.physics corpus; `tiny`: the generated test corpus.
"""

from ssae_ray.data.corpus import add_token_counts, build_corpus, check_splits, corpus_inputs
from ssae_ray.data.files import iter_docs, read_docs, resolve_files
from ssae_ray.data.hub import PARQUET_REVISION, open_hf
from ssae_ray.data.local import (
    LOCAL_SPLIT_RULE,
    SETUP_HINT,
    WIKI_JSON,
    WIKI_WHEEL_GLOB,
    data_dir,
    find_wiki_wheel,
    is_physics,
    load_wiki_leads,
    sympy_physics_docs,
    title_hash,
)
from ssae_ray.data.prepare import build_splits, cap_tokens, cut_to_tokens, sources_of
from ssae_ray.data.raydata import read_dataset
from ssae_ray.data.schema import (
    SCHEMA,
    SPLITS,
    VERSION,
    DataError,
    content_id,
    load_split,
    normalise,
    split_file,
    text_key,
)
from ssae_ray.data.tiny import TINY_SPLIT_RULE, TOPIC_WORDS, generate_tiny_corpus
from ssae_ray.stages import file_sha256

__all__ = [
    "LOCAL_SPLIT_RULE", "PARQUET_REVISION", "SCHEMA", "SETUP_HINT", "SPLITS", "TINY_SPLIT_RULE", "TOPIC_WORDS",
    "VERSION", "WIKI_JSON", "WIKI_WHEEL_GLOB", "DataError", "add_token_counts", "build_corpus", "build_splits",
    "cap_tokens", "check_splits", "content_id", "corpus_inputs", "cut_to_tokens", "data_dir", "file_sha256",
    "find_wiki_wheel", "generate_tiny_corpus", "is_physics", "iter_docs", "load_split", "load_wiki_leads",
    "normalise", "open_hf", "read_dataset", "read_docs", "resolve_files", "sources_of", "split_file",
    "sympy_physics_docs", "text_key", "title_hash",
]  # fmt: skip
