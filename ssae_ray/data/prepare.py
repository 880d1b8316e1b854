"""Real datasets as corpus splits: per-split sources (`corpus.sources`), the seeded 60/20/20 split
of single-split datasets, the seed drawn from validation, token caps, and pretraining corpora cut
to their first tokens.

The rule, for the `hf` / `parquet` / `jsonl` kinds (recorded in each corpus manifest):

1. Every split but `corpus` is read whole from its source (at most `max_docs` documents), empty
   texts dropped, exact duplicate texts dropped, and ranked by `sha256("<seed>:<source>:<text>")`:
   a seeded order that depends on neither the row order nor the split being built, so the `val`
   and `test` parts of one source never share a document.
2. `part`: the ranked documents cut at `fractions` (60/20/20 by default) into train / val / test.
3. `from_split`: the documents of an already built split, in its order (the seed from validation).
4. The evaluation splits (`test`, `ood`, `general_test`) drop documents whose text is in the seed
   or the validation split (the parts as cut, before token caps).
5. `max_tokens`: documents taken in order while they fit in the cap (in LM tokens, no special
   tokens); the first that does not fit is cut so the split holds exactly the cap.
6. `corpus` is streamed in batches (bounded memory): at most `max_docs` documents, each cut to its
   first `first_tokens` LM tokens when set, minus any document whose text is in a held-out split
   (as cut by step 2-4, before the token caps: a document cut by a cap is held out whole).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from ssae_ray.config import Config, CorpusConfig, SourceConfig
from ssae_ray.data.files import iter_docs, resolve_files
from ssae_ray.data.hub import is_local, iter_hf, open_hf
from ssae_ray.data.schema import SCHEMA, SPLITS, DataError, text_key, write_splits
from ssae_ray.stages import file_sha256

log = logging.getLogger("ssae_ray")

PARTS = ("train", "val", "test")
HELD_OUT = ("seed", "val", "test", "ood", "general_test")
EVAL_SPLITS = ("test", "ood", "general_test")
BUILD_ORDER = ("val", "seed", "test", "ood", "general_test")
# The in-domain label of each split's documents: seed/val/test/ood are the domain, general_test is not.
LABELS = {"seed": True, "val": True, "test": True, "ood": True, "general_test": False}
PREP_RULE = __doc__.split("The rule", 1)[1].split("\n", 1)[1].strip()


# ---------------------------------------------------------------------------------------------
# Sources


def sources_of(c: CorpusConfig) -> dict[str, SourceConfig]:
    """The source of each split: `corpus.sources.<split>`, else the short form (`path` with
    `hf_split` / `max_docs`, `<split>_path`, one `text_field`; `hf:<id>[:split]` names a dataset)."""
    unknown = sorted(set(c.sources) - set(SPLITS))
    if unknown:
        raise DataError(f"corpus.sources.{unknown[0]}: unknown split; the splits are {', '.join(SPLITS)}")
    out: dict[str, SourceConfig] = {}
    for split in SPLITS:
        if split in c.sources:
            out[split] = c.sources[split]
            continue
        p = c.path if split == "corpus" else getattr(c, f"{split}_path")
        if not p:
            continue
        p = str(p)
        if p.startswith("hf:"):
            rest = p[5:] if p.startswith("hf://") else p[3:]
            name, _, hf_split = rest.partition(":")
            out[split] = SourceConfig(path=f"hf://{name}", split=hf_split or "train", text_field=c.text_field)
        elif split == "corpus":
            out[split] = SourceConfig(path=p, split=c.hf_split, text_field=c.text_field, max_docs=c.max_docs)
        else:
            out[split] = SourceConfig(path=p, text_field=c.text_field)
    for split, s in out.items():
        _check_source(split, s, out)
    return out


def _check_source(split: str, s: SourceConfig, all_sources: dict[str, SourceConfig]) -> None:
    where = f"corpus.sources.{split}"
    if (s.path is None) == (s.from_split is None):
        raise DataError(f"{where}: give exactly one of `path` (a dataset or files) and `from_split`")
    if s.from_split is not None:
        if s.from_split not in HELD_OUT or s.from_split == split:
            raise DataError(f"{where}.from_split={s.from_split!r}: name another of {', '.join(HELD_OUT)}")
        if s.from_split not in all_sources or all_sources[s.from_split].from_split is not None:
            raise DataError(
                f"{where}.from_split={s.from_split!r}: that split has no source of its own; "
                f"set corpus.sources.{s.from_split}"
            )
    if s.part is not None and s.part not in PARTS:
        raise DataError(f"{where}.part={s.part!r}: choose one of {', '.join(PARTS)}")
    if len(s.fractions) != 3 or any(f < 0 for f in s.fractions) or abs(sum(s.fractions) - 1) > 1e-6:
        raise DataError(f"{where}.fractions={list(s.fractions)}: three shares >= 0 that sum to 1")
    for k in ("max_docs", "max_tokens", "first_tokens"):
        v = getattr(s, k)
        if v is not None and v < 1:
            raise DataError(f"{where}.{k}={v}: must be >= 1 (or null for no limit)")
    if split == "corpus" and (s.part or s.from_split or s.max_tokens):
        raise DataError(
            f"{where}: the retrieval corpus takes `max_docs` / `first_tokens`, not part/from_split/max_tokens"
        )


def uses_hf(s: SourceConfig, kind: str) -> bool:
    """A source is read with `datasets` unless it is a local file, glob or (for the `parquet` /
    `jsonl` kinds) a local folder; `hf://` forces `datasets`."""
    p = str(s.path)
    if p.startswith("hf://"):
        return True
    if any(ch in p for ch in "*?["):
        return False
    if is_local(p):
        return Path(p).expanduser().is_dir() and kind == "hf"
    return True


def _hf_path(s: SourceConfig) -> str:
    p = str(s.path)
    return p[5:] if p.startswith("hf://") else p


def needs_tokenizer(c: CorpusConfig) -> bool:
    return any(s.max_tokens or s.first_tokens for s in c.sources.values())


def source_inputs(c: CorpusConfig) -> dict[str, Any]:
    """What the prepared splits depend on (the corpus stage key): sources, and local files by
    size and modification time (hashing a large corpus is slow)."""
    import dataclasses

    out: dict[str, Any] = {}
    for split, s in sources_of(c).items():
        d = dataclasses.asdict(s)
        if s.path is not None and not uses_hf(s, c.kind):
            d["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in resolve_files(s.path)]
        out[split] = d
    return out


def open_source(split: str, s: SourceConfig, kind: str, batch_size: int = 10_000) -> Iterator[pa.Table]:
    """Normalised batches of one source (`datasets` streaming or local files), at most `max_docs`."""
    from ssae_ray.data import hub

    where = f"corpus.sources.{split}"
    hf = uses_hf(s, kind)
    if hf and not is_local(_hf_path(s)) and hub.is_archive_source(s.data_files):  # raw archives
        docs = hub.iter_archive_docs(_hf_path(s), s.revision, s.data_files, s.text_field, where=where)
        batches = iter_hf(docs, s.text_field, _hf_path(s), batch_size, where=where)
    elif hf:
        if s.revision and s.revision.startswith("refs/convert/") and not is_local(_hf_path(s)):
            hub.check_parquet_conversion(_hf_path(s), s.revision, s.split, s.name, s.max_docs, where)
        ds = open_hf(
            _hf_path(s), s.split, name=s.name, revision=s.revision, data_files=s.data_files, where=where
        )
        batches = iter_hf(ds, s.text_field, _hf_path(s), batch_size, where=where)
    else:
        batches = iter_docs(s.path, s.text_field, batch_size)
    n = 0
    for b in batches:
        if s.max_docs is not None:
            b = b.slice(0, s.max_docs - n)
        n += b.num_rows
        if b.num_rows:
            yield b
        if s.max_docs is not None and n >= s.max_docs:
            return
    if hf and split == "corpus" and not is_local(_hf_path(s)):  # the whole source was read: its size
        total = hub.expected_docs(_hf_path(s), s.split)
        if total is not None and n != total:
            log.warning(
                "%s: read %s documents of %r, but the dataset has %s: a partial or changed source",
                where, f"{n:,}", _hf_path(s), f"{total:,}",
            )  # fmt: skip


def check_sources(c: CorpusConfig) -> None:
    """Open every source and read its first batch: a missing split, repo, field or file, or a
    loading-script dataset, fails here, before anything is streamed or written."""
    for split, s in sources_of(c).items():
        if s.path is not None:
            next(open_source(split, s, c.kind, batch_size=2), None)


# ---------------------------------------------------------------------------------------------
# Token counting and cutting


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def cut_to_tokens(tokenizer: Any, texts: list[str], n: int) -> list[str]:
    """Each text cut to its first `n` LM tokens (no special tokens), on a character boundary."""
    if not texts:
        return []
    # A token spans at most a few dozen characters: cut long texts first, then by offsets.
    heads = [t[: 64 * n] for t in texts]
    try:
        enc = tokenizer(heads, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: decode the ids instead
        ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
        return [t if len(i) <= n else tokenizer.decode(i[:n]) for t, i in zip(texts, ids, strict=True)]
    return [t if len(o) <= n else t[: o[n - 1][1]] for t, o in zip(texts, offsets, strict=True)]


def cap_tokens(table: pa.Table, tokenizer: Any, cap: int, batch: int = 64) -> tuple[pa.Table, int]:
    """The first documents of `table` holding exactly `cap` LM tokens (the last one cut), or all of
    them when they hold fewer; and their token count."""
    total, rows = 0, 0
    texts = table.column("text").to_pylist()
    for start in range(0, len(texts), batch):
        for i, n in enumerate(token_lengths(tokenizer, texts[start : start + batch])):
            if total + n <= cap:
                total += n
                rows += 1
                if total == cap:
                    return table.slice(0, rows), total
                continue
            last = table.slice(start + i, 1)
            cut = cut_to_tokens(tokenizer, [texts[start + i]], cap - total)[0]
            kept = token_lengths(tokenizer, [cut])[0]
            last = last.set_column(1, "text", pa.array([cut], pa.string()))
            return pa.concat_tables([table.slice(0, rows), last]), total + kept
    return table, total


# ---------------------------------------------------------------------------------------------
# Splitting


def rank(table: pa.Table, seed: int, salt: str) -> pa.Table:
    """Documents deduplicated by text and ordered by a seeded hash of their text and `salt`."""
    texts = table.column("text").to_pylist()
    seen: set[str] = set()
    keyed = []
    for i, t in enumerate(texts):
        k = text_key(t)
        if k in seen:
            continue
        seen.add(k)
        keyed.append((hashlib.sha256(f"{seed}:{salt}:{k}".encode()).digest(), i))
    keyed.sort()
    return table.take(pa.array([i for _, i in keyed], pa.int64()))


def part_of(table: pa.Table, part: str, fractions: tuple[float, float, float]) -> pa.Table:
    """The `part` (train / val / test) of a ranked table cut at `fractions`."""
    n = table.num_rows
    a = round(fractions[0] * n)
    b = round((fractions[0] + fractions[1]) * n)
    lo, hi = {"train": (0, a), "val": (a, b), "test": (b, n)}[part]
    return table.slice(lo, hi - lo)


def _salt(s: SourceConfig) -> str:
    return f"{s.path}|{s.name}|{s.split}|{s.revision}|{','.join(s.data_files)}"


def _read_source(split: str, s: SourceConfig, c: CorpusConfig, memo: dict[str, pa.Table]) -> pa.Table:
    """The whole source, ranked (read once when two splits share it)."""
    key = f"{_salt(s)}|{s.max_docs}|{s.text_field}|{s.seed}"
    if key not in memo:
        parts = list(open_source(split, s, c.kind))
        table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        memo[key] = rank(table, c.split_seed if s.seed is None else s.seed, _salt(s))
    return memo[key]


class Splits(NamedTuple):
    tables: dict[str, pa.Table]
    """The held-out splits (seed, val, test, ood, general_test) that have a source."""
    notes: dict[str, Any]
    held_out: set[str]
    """Text keys of every document of their parts before the token caps: none of them may be in
    the retrieval corpus (a document cut by a cap is held out whole)."""


def build_splits(c: CorpusConfig, tokenizer: Any) -> Splits:
    """The held-out splits (seed, val, test, ood, general_test) by the rule above."""
    sources = sources_of(c)
    memo: dict[str, pa.Table] = {}
    tables: dict[str, pa.Table] = {}
    notes: dict[str, Any] = {}
    held_out: set[str] = set()
    pools: dict[str, set[str]] = {}  # text keys of each split before its token cap
    for split in BUILD_ORDER:
        s = sources.get(split)
        if s is None:
            continue
        where = f"corpus.sources.{split}"
        if s.from_split is not None:
            t = tables.get(s.from_split)
            if t is None:
                raise DataError(f"{where}.from_split={s.from_split!r}: that split is not built from a source")
            note: dict[str, Any] = {"from_split": s.from_split, "available": t.num_rows}
        else:
            t = _read_source(split, s, c, memo)
            note = {"source": s.path, "source_split": s.split, "source_docs": t.num_rows}
            if s.part is not None:
                t = part_of(t, s.part, s.fractions)
                note |= {"part": s.part, "fractions": list(s.fractions), "part_docs": t.num_rows}
        keys = [text_key(x) for x in t.column("text").to_pylist()]
        if split in EVAL_SPLITS:
            seen = pools.get("seed", set()) | pools.get("val", set())
            keep = [i for i, k in enumerate(keys) if k not in seen]
            if len(keep) < t.num_rows:
                note["dropped_in_seed_or_val"] = t.num_rows - len(keep)
                t = t.take(pa.array(keep, pa.int64()))
                keys = [keys[i] for i in keep]
        pools[split] = set(keys)
        held_out.update(keys)
        if s.max_tokens is not None:
            if tokenizer is None:
                raise DataError(f"{where}.max_tokens needs the LM's tokenizer (build_corpus(cfg, tokenizer))")
            t, n = cap_tokens(t, tokenizer, s.max_tokens)
            note |= {"max_tokens": s.max_tokens, "lm_tokens": n}
            if n < s.max_tokens:
                log.warning("corpus: %s holds %d LM tokens, fewer than its cap %d", split, n, s.max_tokens)
        if t.num_rows == 0:
            raise DataError(
                f"{where}: no documents with a non-empty {s.text_field!r} (source {s.path or s.from_split})"
            )
        t = t.set_column(5, "is_domain", pa.array([LABELS[split]] * t.num_rows, pa.bool_()))
        tables[split] = t
        notes[split] = note | {"docs": t.num_rows}
    return Splits(tables, notes, held_out)


def stream_corpus(c: CorpusConfig, tokenizer: Any, held_out: set[str], out: Path) -> dict[str, Any]:
    """Write the retrieval corpus to `out` in batches; its counts."""
    s = sources_of(c).get("corpus")
    if s is None:
        raise DataError(f"corpus.path (or corpus.sources.corpus) is required for corpus.kind={c.kind!r}")
    if s.first_tokens and tokenizer is None:
        raise DataError(
            "corpus.sources.corpus.first_tokens needs the LM's tokenizer (build_corpus(cfg, tokenizer))"
        )
    n = dropped = words = domain = 0
    with pq.ParquetWriter(out, SCHEMA) as writer:
        for batch in _progress(open_source("corpus", s, c.kind), f"corpus {s.path}"):
            texts = batch.column("text").to_pylist()
            if held_out:  # on the whole documents, before any cut
                keep = [i for i, t in enumerate(texts) if text_key(t) not in held_out]
                dropped += len(texts) - len(keep)
                if len(keep) < len(texts):
                    batch = batch.take(pa.array(keep, pa.int64()))
                    texts = [texts[i] for i in keep]
            if s.first_tokens:
                texts = cut_to_tokens(tokenizer, texts, s.first_tokens)
                batch = batch.set_column(1, "text", pa.array(texts, pa.string()))
            writer.write_table(batch)
            n += batch.num_rows
            words += sum(len(t.split()) for t in texts)
            domain += sum(d is True for d in batch.column("is_domain").to_pylist())
    if n == 0:
        raise DataError(f"the corpus {s.path} holds no documents with a non-empty {s.text_field!r}")
    return {"docs": n, "words": words, "domain_docs": domain, "dropped_held_out": dropped,
            "max_docs": s.max_docs, "first_tokens": s.first_tokens,
            "file": out.name, "sha256": file_sha256(out)}  # fmt: skip


def build_sources(c: CorpusConfig, out: Path, tokenizer: Any = None) -> dict[str, Any]:
    """The `hf` / `parquet` / `jsonl` corpus builder: check every source, build the held-out splits,
    stream the corpus minus them; the manifest body."""
    check_sources(c)
    tables, notes, held = build_splits(c, tokenizer)
    if "seed" not in tables:
        log.warning("corpus: no seed split (corpus.seed_path / corpus.sources.seed): seed.parquet is empty")
    info = {"corpus": stream_corpus(c, tokenizer, held, out / "corpus.parquet")}
    info |= write_splits(out, tables, names=SPLITS[1:])
    return {
        "kind": c.kind,
        "splits": info,
        "prepared": notes,
        "tokens": {},
        "tokens_note": "no tokenizer was given: counts are words",
        "split_rule": PREP_RULE,
        "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
    }


def lm_tokenizer(cfg: Config) -> Any:
    """The LM's tokenizer alone (token caps need it before the LM is loaded)."""
    from transformers import AutoTokenizer

    from ssae_ray.models import _resolve_source, load_lm

    cache = cfg.root / "models"
    if cfg.model.source == "tiny":
        return load_lm(cfg.model, cache).tokenizer
    folder, gguf = _resolve_source(cfg.model, cache)
    if gguf is not None:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return AutoTokenizer.from_pretrained(folder)


def _progress(it: Iterable[pa.Table], desc: str) -> Iterator[pa.Table]:
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit=" docs", disable=None) as bar:
        for batch in it:
            bar.update(batch.num_rows)
            yield batch
