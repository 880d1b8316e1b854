"""Any domain from one text file: `ssae-ray run --seed my_seed.txt [--ood my_ood.txt] [--name music]`.

The seed file holds in-domain documents, one per line (blank lines skipped), or JSONL with a
`text` field (`.jsonl` files, or any file whose first non-blank line is a JSON object). Its
documents are split by a hash of their text (stable whatever their order in the file): `val`
(the sweep selects checkpoints on it), `test` (the held-out in-domain test set) and `seed` (what
retrieval starts from). The preset's own corpus (retrieval corpus and general test text) is
built as usual; the domain's run then uses it as a Parquet corpus whose seed / val / test / ood
splits are the user's, so every document of the seed file, held-out ones included, is removed
from the retrieval corpus (`data.prepare.build_sources` streams the corpus minus the held-out
splits) and no selection can contain a test document. Then the preset's whole job runs: GSAEs,
index, retrieval, caches, sweep, evaluation, report and dashboard, titled by the domain's name
(`cfg.name`).

Bad input is one line and exit status 2 (`DomainInputError`): an empty file, too few documents
for the held-out split, bytes that are not UTF-8 (or UTF-16 with a BOM), malformed JSONL.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ssae_ray.config import Config, load_config

TEST_FRACTION = 0.3
VAL_FRACTION = 0.2
MIN_PER_SPLIT = 2
"""Each of seed, val and test gets at least this many documents."""
MIN_DOCS = 3 * MIN_PER_SPLIT


class DomainInputError(ValueError):
    """A seed / OOD file that cannot be used (printed as one line, exit status 2)."""


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DomainInputError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} cannot be decoded); "
            f"convert it, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from None


def read_documents(path: str | Path, what: str = "seed") -> list[str]:
    """The documents of a text file (one per line) or JSONL file (a `text` field per line), in file
    order, stripped, empty ones and exact duplicates dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DomainInputError(f"the {what} file {path} does not exist")
    text = _decode(path, path.read_bytes())
    if "\x00" in text:
        raise DomainInputError(f"{path} holds NUL bytes: it is binary, not a text or JSONL file")
    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or first.startswith("{")
    docs: list[str] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DomainInputError(
                    f"{path} line {i} is not valid JSON ({e.msg}); JSONL needs one object per line"
                ) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DomainInputError(
                    f'{path} line {i} has no string field \'text\' (JSONL: {{"text": "..."}} per line)'
                )
            doc = rec["text"].strip()
        else:
            doc = line.strip()
        if doc:
            docs.append(doc)
    docs = list(dict.fromkeys(docs))
    if not docs:
        raise DomainInputError(
            f"the {what} file {path} has no documents (one document per line, or JSONL with a 'text' field)"
        )
    return docs


def split_seed_docs(docs: Sequence[str], test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION,
                    salt: str = "ssae-ray") -> dict[str, list[str]]:  # fmt: skip
    """`{seed, val, test}`: the documents ordered by a hash of their text, the first
    `test_fraction` to test, the next `val_fraction` to val, the rest to seed (each >= 2)."""
    n = len(docs)
    if n < MIN_DOCS:
        raise DomainInputError(
            f"the seed file has {n} document{'s' if n != 1 else ''}; at least {MIN_DOCS} are needed "
            f"({MIN_PER_SPLIT} each to retrieve from, to select checkpoints on and to hold out as the test set)"
        )
    order = sorted(docs, key=lambda d: hashlib.sha1(f"{salt}\0{d}".encode()).hexdigest())
    n_test = max(MIN_PER_SPLIT, round(test_fraction * n))
    n_val = max(MIN_PER_SPLIT, round(val_fraction * n))
    if n - n_test - n_val < MIN_PER_SPLIT:
        n_test = n_val = MIN_PER_SPLIT  # small files: 2 / 2 / the rest
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "seed": order[n_test + n_val :]}


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return s[:60] or "domain"


def _write(path: Path, docs: Sequence[str], source: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ssae_ray.data.schema import content_id

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table({"id": [f"{source}/{content_id(d)}" for d in docs], "text": list(docs)}), tmp)
    tmp.replace(path)


def domain_config(
    preset: str,
    seed_file: str | Path,
    ood_file: str | Path | None = None,
    name: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    test_fraction: float = TEST_FRACTION,
) -> tuple[Config, dict[str, Any]]:
    """The config of the domain's run (the preset's, named `name`, its corpus the preset's corpus
    with the seed file's splits) and a summary of the split; builds the preset's corpus."""
    from ssae_ray.pipeline import stage_corpus

    if not 0 < test_fraction < 1:
        raise DomainInputError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    docs = read_documents(seed_file, "seed")
    splits = split_seed_docs(docs, test_fraction)
    ood = read_documents(ood_file, "OOD") if ood_file is not None else []
    name = name or Path(seed_file).stem
    base = load_config(preset, config_file, list(overrides))
    base_corpus = stage_corpus(base)
    h = hashlib.sha256(json.dumps([splits, ood], sort_keys=True).encode()).hexdigest()[:12]
    folder = base.root / "domains" / f"{slug(name)}-{h}"
    for split, d in splits.items():
        _write(folder / f"{split}.parquet", d, f"{slug(name)}-{split}")
    import pyarrow.parquet as pq

    sources: dict[str, Any] = {
        "corpus": {"path": str(base_corpus / "corpus.parquet")},
        **{s: {"path": str(folder / f"{s}.parquet")} for s in splits},
    }
    if pq.ParquetFile(base_corpus / "general_test.parquet").metadata.num_rows:  # the preset's general text
        sources["general_test"] = {"path": str(base_corpus / "general_test.parquet")}
    if ood:
        _write(folder / "ood.parquet", ood, f"{slug(name)}-ood")
        sources["ood"] = {"path": str(folder / "ood.parquet")}
    user = {"name": name, "corpus": {"kind": "parquet", "path": None, "sources": sources}}
    (folder / "domain.yaml").write_text(yaml.safe_dump(user, sort_keys=False))
    cfg = load_config(preset, folder / "domain.yaml", list(overrides))
    if config_file is not None:  # the user's file wins over the domain's, the overrides over both
        cfg = load_config(preset, config_file, [*_flat(user), *overrides])
    summary = {"name": name, "folder": str(folder), "docs": len(docs), "ood": len(ood),
               **{s: len(d) for s, d in splits.items()}}  # fmt: skip
    return cfg, summary


def _flat(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k != "sources":
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def run_domain(cfg: Config, summary: dict[str, Any], force: bool = False) -> Path:
    """The preset's whole job on the domain; returns the report."""
    from ssae_ray.pipeline import run_physics

    print(f"domain {summary['name']!r}: {summary['docs']} documents -> seed {summary['seed']}, "
          f"val {summary['val']}, held-out test {summary['test']}; OOD {summary['ood'] or 'none'} "
          f"(split files: {summary['folder']})")  # fmt: skip
    return run_physics(cfg, force=force)
