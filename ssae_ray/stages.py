"""Stage plumbing: content-hashed artifact folders, atomic writes, manifests.

Every stage writes `<workdir>/<stage>/<key>/` where `key` is a hash of everything its output
depends on. It writes into a temp folder beside the final one and renames it into place once
complete, with a `manifest.json` last; a folder with a manifest is finished and is reused.
A crash leaves only a `*.tmp-*` folder behind, never a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ssae_ray.config import config_hash

log = logging.getLogger("ssae_ray")

MANIFEST = "manifest.json"
BUILDS = [0]
"""How many stages this process has built (not found cached); the pipeline's timer reads it."""


class StageError(RuntimeError):
    """A stage cannot run: bad input, a missing upstream artifact, a corrupt file."""


def stage_key(*parts: Any) -> str:
    """Content hash of a stage's inputs (configs, upstream manifests' keys, file checksums)."""
    return config_hash(list(parts))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    restore_aside(folder)
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _aside(final: Path) -> Path:
    return final.with_name(f"{final.name}.old")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    OS, libc or file system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def restore_aside(final: str | Path) -> None:
    """Put back an old folder `swap_in` had moved aside when a crash came before the new one was
    renamed in (only on systems without an atomic exchange)."""
    final = Path(final)
    aside = _aside(final)
    if not final.exists() and aside.is_dir():
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rename(aside, final)
            log.warning("restored %s from %s (a swap was interrupted)", final, aside)


def swap_in(new: str | Path, final: str | Path) -> Path:
    """Rename the finished folder `new` to `final`, replacing an older `final` so that a reader
    never finds `final` missing: the two are exchanged in one atomic step where the OS can
    (Linux), else the old folder is moved aside first (`<final>.old`, put back by
    `restore_aside` / `read_manifest` after a crash) and removed only after the rename."""
    new, final = Path(new), Path(final)
    restore_aside(final)
    if not final.exists():
        os.replace(new, final)
        return final
    if _exchange(new, final):  # `new` now holds the old folder
        shutil.rmtree(new, ignore_errors=True)
        return final
    aside = _aside(final)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(final, aside)
    os.replace(new, final)
    shutil.rmtree(aside, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success swap it in as `final` (`swap_in`: replacing
    an older one without a moment where neither exists). On error the temp folder is removed and
    `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, final)


def run_stage(
    cfg_root: str | Path,
    stage: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    force: bool = False,
) -> Path:
    """Run `build(tmp_dir) -> manifest dict` unless `<root>/<stage>/<key>` is already finished.

    The manifest gets `stage`, `key`, `seconds` and `created` added and is written last.
    """
    final = Path(cfg_root).expanduser() / stage / key
    if not force and read_manifest(final) is not None:
        log.info("stage %s: cached at %s", stage, final)
        return final
    log.info("stage %s: building %s", stage, final)
    BUILDS[0] += 1
    t0 = time.perf_counter()
    with atomic_dir(final) as tmp:
        manifest = build(tmp) or {}
        manifest.update(stage=stage, key=key, seconds=round(time.perf_counter() - t0, 3), created=time.time())
        write_json_atomic(tmp / MANIFEST, manifest)
    return final
