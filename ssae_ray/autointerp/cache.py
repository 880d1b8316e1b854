"""A persistent SQLite cache of model answers, so a rerun or resumed run never pays twice.

The key is a SHA-256 of everything that determines an answer: model, system prompt, messages,
sampling parameters and the re-ask attempt number. The API key is never part of it. SQLite in
WAL mode lets several processes share one file on one machine; on a multi-node cluster the
cache lives in one `CacheActor` (see `actors.py`) so every actor sees the same file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple


class Cached(NamedTuple):
    text: str
    input_tokens: int
    output_tokens: int


def cache_key(model: str, system: str, messages: Any, params: dict[str, Any]) -> str:
    blob = json.dumps(
        {"model": model, "system": system, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """`get(key) -> Cached | None`, `put(key, Cached)`; safe across threads and processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, text TEXT, "
            "input_tokens INTEGER, output_tokens INTEGER, created REAL)"
        )

    def get(self, key: str) -> Cached | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, input_tokens, output_tokens FROM answers WHERE key = ?", (key,)
            ).fetchone()
        return Cached(*row) if row else None

    def put(self, key: str, value: Cached, model: str = "") -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, value.text, value.input_tokens, value.output_tokens, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
