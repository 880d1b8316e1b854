"""A local Hugging Face Hub: a standard-library HTTP server speaking the part of the Hub API that
`huggingface_hub`, `transformers`, `datasets` (streaming Parquet included), `sentence-transformers`
and sae-lens' `SAE.from_pretrained` call. Point the clients at it with `HF_ENDPOINT` (read when
`huggingface_hub` / `datasets` are imported: set it first, or run the client in a subprocess with
`hub_env(url)`).

Repositories are folders: `<root>/<models|datasets>/<owner>/<name>/<revision>/<files...>`, the
revision a branch name quoted with `urllib.parse.quote(rev, safe="")` (`main`,
`refs%2Fconvert%2Fparquet`). An optional `<root>/<kind>/<owner>/<name>/repo.json` holds
`{"gated": true}`. `ssae_ray.testing.hub_fixtures.build_fixture_hub` writes the fixture repos.

What it answers, as the Hub does:
- `HEAD|GET /<repo>/resolve/<rev>/<path>` (`/datasets/<repo>/resolve/...` for datasets):
  `X-Repo-Commit` (40 hex), `ETag` (the sha256 of LFS-type files, the git blob sha1 of the others),
  `Content-Length`, `Accept-Ranges: bytes`; `Range: bytes=a-b` is answered 206 with
  `Content-Range`. `<rev>` may be a branch or a commit id.
- `GET /api/<models|datasets>/<repo>[/revision/<rev>]`: the repo's info (`id`, `sha`, `siblings`,
  `gated`, `private`...); `GET /api/.../tree/<rev>[/<path>]` (`recursive`), `POST
  /api/.../paths-info/<rev>` (`paths` form fields), `GET /api/.../refs`, `GET /api/.../auth-check`.
- Errors with `X-Error-Code` / `X-Error-Message`: `RepoNotFound` (401 without a token, 404 with
  one: the Hub does not reveal whether a private repo exists), `RevisionNotFound`,
  `EntryNotFound` (404), `GatedRepo` (401 without a token, 403 with a token that was not granted
  access). A gated repo's info and file listings are public; its files need
  `Authorization: Bearer <a token in LocalHub.tokens>`.

`LocalHub.requests` records `(method, path, status)` of every request, so tests can check what a
client fetched (e.g. that no weights were downloaded before an error).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import mimetypes
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

KINDS = {"models": "model", "datasets": "dataset"}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Stored with Git LFS on the Hub (their ETag is the sha256 of the content, and listings carry `lfs`).
_LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".parquet",
    ".npz",
    ".pt",
    ".pth",
    ".model",
    ".gguf",
    ".zst",
    ".arrow",
)
_EPOCH = "2024-01-01T00:00:00.000Z"
DEFAULT_TOKEN = "hf_local_hub_test_token"
"""The token `LocalHub` grants gated access to by default."""


@dataclass(frozen=True)
class Entry:
    path: str
    file: Path
    size: int
    blob_id: str
    """git blob sha1 of the content (the Hub's `oid` of a file)."""
    sha256: str
    lfs: bool


@dataclass
class Repo:
    kind: str
    """`model` or `dataset`."""
    repo_id: str
    gated: bool
    branches: dict[str, str] = field(default_factory=dict)
    """branch name -> commit id."""
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    """commit id -> path -> file."""

    def commit_of(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


def _hash_file(path: Path) -> tuple[str, str]:
    size = path.stat().st_size
    blob = hashlib.sha1(f"blob {size}\0".encode())
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            blob.update(chunk)
            sha.update(chunk)
    return blob.hexdigest(), sha.hexdigest()


def load_repos(root: str | Path) -> dict[tuple[str, str], Repo]:
    """Every repo folder under `root` (see the module docstring), keyed by (kind, repo id)."""
    root = Path(root)
    repos: dict[tuple[str, str], Repo] = {}
    for plural, kind in KINDS.items():
        base = root / plural
        if not base.is_dir():
            continue
        for owner in sorted(p for p in base.iterdir() if p.is_dir()):
            for name in sorted(p for p in owner.iterdir() if p.is_dir()):
                repo_id = f"{owner.name}/{name.name}"
                meta_file = name / "repo.json"
                meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
                repo = Repo(kind, repo_id, gated=bool(meta.get("gated", False)))
                for rev_dir in sorted(
                    p for p in name.iterdir() if p.is_dir() and not p.name.endswith(".tmp")
                ):
                    branch = urllib.parse.unquote(rev_dir.name)
                    entries: dict[str, Entry] = {}
                    for f in sorted(p for p in rev_dir.rglob("*") if p.is_file()):
                        rel = f.relative_to(rev_dir).as_posix()
                        blob, sha = _hash_file(f)
                        entries[rel] = Entry(rel, f, f.stat().st_size, blob, sha, rel.endswith(_LFS_SUFFIXES))
                    digest = hashlib.sha1(f"{kind}/{repo_id}@{branch}".encode())
                    for rel, e in entries.items():
                        digest.update(f"{rel}\0{e.sha256}\n".encode())
                    commit = digest.hexdigest()
                    repo.branches[branch] = commit
                    repo.commits[commit] = entries
                repos[(kind, repo_id)] = repo
    return repos


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LocalHub:
    """The server. `with LocalHub(root) as hub: os.environ["HF_ENDPOINT"] = hub.url`.

    `tokens`: the tokens that open gated repos (default `DEFAULT_TOKEN`); any other bearer token
    is a user without access (403). `port=0` picks a free port."""

    def __init__(
        self, root: str | Path | None, tokens: set[str] | None = None, host: str = "127.0.0.1", port: int = 0
    ):
        self.root = Path(root) if root is not None else None
        self.repos = load_repos(self.root) if self.root is not None else {}
        self.tokens = {DEFAULT_TOKEN} if tokens is None else set(tokens)
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        ThreadingHTTPServer.request_queue_size = 128
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def set_root(self, root: str | Path) -> LocalHub:
        """Serve the repo folders under `root` (re-read: call it again after adding a repo)."""
        repos = load_repos(root)
        with self._lock:
            self.root, self.repos = Path(root), repos
        return self

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def fetched(self, pattern: str = "") -> list[str]:
        """Paths of the successful GETs whose path contains `pattern`."""
        with self._lock:
            return [p for m, p, s in self.requests if m == "GET" and s in (200, 206) and pattern in p]

    # -- the API ------------------------------------------------------------------------------

    def _repo(self, kind: str, repo_id: str, authed: bool) -> Repo:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            # The Hub answers 401 to anonymous users so as not to reveal private repos.
            raise HubError(404 if authed else 401, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: Repo, rev: str) -> tuple[str, dict[str, Entry]]:
        commit = repo.commit_of(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit, repo.commits[commit]

    def _check_gate(self, repo: Repo, token: str | None) -> None:
        if not repo.gated or token in self.tokens:
            return
        what = f"{repo.kind} {repo.repo_id}"
        if token is None:
            raise HubError(
                401,
                "GatedRepo",
                f"Access to {what} is restricted. You must have access to it and be authenticated to access it. "
                "Please log in.",
            )
        raise HubError(
            403,
            "GatedRepo",
            f"Access to {what} is restricted and you are not in the authorized list. "
            f"Visit {self.url}/{'datasets/' if repo.kind == 'dataset' else ''}{repo.repo_id} to ask for access.",
        )

    @staticmethod
    def _tree_item(e: Entry, commit: str, expand: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": e.blob_id, "size": e.size, "path": e.path}
        if e.lfs:
            item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
        if expand:
            item["lastCommit"] = {"id": commit, "title": "fixture", "date": _EPOCH}
            item["securityFileStatus"] = {"status": "safe"}
        return item

    @staticmethod
    def _dir_item(path: str, commit: str, expand: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
                                "path": path}  # fmt: skip
        if expand:
            item["lastCommit"] = {"id": commit, "title": "fixture", "date": _EPOCH}
        return item

    def info(self, repo: Repo, rev: str) -> dict[str, Any]:
        commit, entries = self._commit(repo, rev)
        siblings = []
        for e in entries.values():
            sib: dict[str, Any] = {"rfilename": e.path, "size": e.size, "blobId": e.blob_id}
            if e.lfs:
                sib["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": 134}
            siblings.append(sib)
        card = _card_data(entries)
        out: dict[str, Any] = {
            "_id": commit[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit,
            "lastModified": _EPOCH,
            "createdAt": _EPOCH,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in entries.values()),
        }
        if card is not None:
            out["cardData"] = card
        if repo.kind == "model":
            out["modelId"] = repo.repo_id
            cfg = entries.get("config.json")
            if cfg is not None:
                with contextlib.suppress(ValueError, OSError):
                    conf = json.loads(cfg.file.read_text())
                    out["config"] = {k: conf[k] for k in ("architectures", "model_type") if k in conf}
        return out

    def tree(self, repo: Repo, rev: str, path: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
        commit, entries = self._commit(repo, rev)
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and path in entries:
            raise HubError(404, "EntryNotFound", f"{path} is a file, not a folder")
        files = [e for p, e in entries.items() if p.startswith(prefix)]
        if path and not files:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}")
        out, dirs = [], set()
        for e in files:
            rest = e.path[len(prefix) :].split("/")
            for i in range(1, len(rest) if recursive else min(len(rest), 2)):
                dirs.add(prefix + "/".join(rest[:i]))
            if recursive or len(rest) == 1:
                out.append(self._tree_item(e, commit, expand))
        out += [self._dir_item(d, commit, expand) for d in sorted(dirs)]
        return sorted(out, key=lambda item: item["path"])

    def paths_info(self, repo: Repo, rev: str, paths: list[str], expand: bool) -> list[dict[str, Any]]:
        commit, entries = self._commit(repo, rev)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in entries:
                out.append(self._tree_item(entries[p], commit, expand))
            elif any(q.startswith(p + "/") for q in entries) or p == "":
                out.append(self._dir_item(p, commit, expand))
        return out

    def refs(self, repo: Repo) -> dict[str, Any]:
        branches, converts = [], []
        for name, commit in repo.branches.items():
            if name.startswith("refs/convert/"):
                converts.append(
                    {"name": name.removeprefix("refs/convert/"), "ref": name, "targetCommit": commit}
                )
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit})
        out: dict[str, Any] = {"branches": branches, "tags": []}
        if converts:
            out["converts"] = converts
        return out

    # -- HTTP ---------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _token(self) -> str | None:
                auth = self.headers.get("authorization", "")
                return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None

            def _record(self, status: int) -> None:
                with hub._lock:
                    hub.requests.append((self.command, self.path, status))

            def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self._record(status)
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _send_error(self, err: HubError) -> None:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send_json(err.status, {"error": err.message}, headers)

            def _dispatch(self) -> None:
                try:
                    self._route()
                except HubError as err:
                    self._send_error(err)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:  # noqa: N802
                self._dispatch()

            def do_HEAD(self) -> None:  # noqa: N802
                self._dispatch()

            def do_POST(self) -> None:  # noqa: N802
                self._dispatch()

            def _route(self) -> None:
                split = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(split.query)
                seg = [urllib.parse.unquote(s) for s in split.path.split("/")[1:]]
                token = self._token()
                if seg[:1] == ["api"] and len(seg) >= 2 and seg[1] == "whoami-v2":
                    if token is None:
                        raise HubError(401, None, "Invalid credentials in Authorization header")
                    return self._send_json(200, {"type": "user", "name": "local-hub-user", "auth": {}})
                if seg[:1] == ["api"] and len(seg) >= 4 and seg[1] in KINDS:
                    return self._api(KINDS[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:], query, token)
                kind = "model"
                if seg[:1] == ["datasets"]:
                    kind, seg = "dataset", seg[1:]
                if len(seg) >= 5 and seg[2] == "resolve":
                    return self._resolve(kind, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), token)
                raise HubError(404, None, f"Sorry, we can't find the page you are looking for: {split.path}")

            def _api(self, kind: str, repo_id: str, rest: list[str], query: dict, token: str | None) -> None:
                repo = hub._repo(kind, repo_id, token is not None)
                expand = _true(query.get("expand", ["false"])[-1]) or "expand[]" in query
                if not rest:
                    return self._send_json(200, hub.info(repo, "main"))
                if rest[0] == "revision" and len(rest) >= 2:
                    return self._send_json(200, hub.info(repo, "/".join(rest[1:])))
                if rest[0] == "tree" and len(rest) >= 2:
                    rev, path = rest[1], "/".join(rest[2:])
                    recursive = _true(query.get("recursive", ["false"])[-1])
                    return self._send_json(200, hub.tree(repo, rev, path, recursive, expand))
                if rest[0] == "paths-info" and len(rest) >= 2 and self.command == "POST":
                    form = self._form()
                    paths = form.get("paths", [])
                    exp = _true(form.get("expand", ["false"])[-1])
                    return self._send_json(200, hub.paths_info(repo, "/".join(rest[1:]), paths, exp))
                if rest[0] == "refs":
                    return self._send_json(200, hub.refs(repo))
                if rest[0] == "auth-check":
                    hub._check_gate(repo, token)
                    return self._send_json(200, {})
                raise HubError(404, None, f"Sorry, we can't find the page you are looking for: {self.path}")

            def _form(self) -> dict[str, list[str]]:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n).decode() if n else ""
                if "json" in (self.headers.get("content-type") or ""):
                    data = json.loads(body or "{}")
                    paths = data.get("paths", [])
                    return {"paths": list(paths), "expand": [str(data.get("expand", False))]}
                return urllib.parse.parse_qs(body, keep_blank_values=True)

            def _resolve(self, kind: str, repo_id: str, rev: str, path: str, token: str | None) -> None:
                repo = hub._repo(kind, repo_id, token is not None)
                hub._check_gate(repo, token)
                commit, entries = hub._commit(repo, rev)
                e = entries.get(path)
                if e is None:
                    raise HubError(404, "EntryNotFound", "Entry not found")
                start, end, status = 0, e.size - 1, 200
                rng = self.headers.get("range")
                if rng:
                    parsed = _parse_range(rng, e.size)
                    if parsed is None:
                        self._record(416)
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{e.size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    start, end, status = *parsed, 206
                length = max(0, end - start + 1)
                self._record(status)
                self.send_response(status)
                ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{e.sha256 if e.lfs else e.blob_id}"')
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Last-Modified", email.utils.formatdate(0, usegmt=True))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{e.size}")
                self.end_headers()
                if self.command == "HEAD" or length == 0:
                    return
                with e.file.open("rb") as f:
                    f.seek(start)
                    left = length
                    while left > 0:
                        chunk = f.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        left -= len(chunk)

        return Handler


def _true(v: str) -> bool:
    return v.lower() in ("1", "true", "yes")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # the last n bytes
        n = int(m.group(2))
        return (max(0, size - n), size - 1) if size else None
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, end


def _card_data(entries: dict[str, Entry]) -> dict[str, Any] | None:
    """The YAML front matter of README.md, for `cardData` (only flat `key: value` pairs and the
    `configs` block are needed by clients; the rest is ignored)."""
    readme = entries.get("README.md")
    if readme is None:
        return None
    text = readme.file.read_text()
    if not text.startswith("---"):
        return None
    try:
        import yaml

        return yaml.safe_load(text.split("---", 2)[1]) or None
    except Exception:
        return None


def hub_env(url: str, token: str | None = None, home: str | Path | None = None) -> dict[str, str]:
    """Environment variables that point every Hugging Face client of a *new process* at `url`:
    online, no Xet, no background safetensors conversion, no telemetry, and (with `home`) a fresh
    cache so nothing cached from elsewhere is read. `token` sets `HF_TOKEN` (else it is removed)."""
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1" if token is None else "0",
        "DISABLE_SAFETENSORS_CONVERSION": "1",
        "HF_HUB_ETAG_TIMEOUT": "30",
        "HF_HUB_DOWNLOAD_TIMEOUT": "60",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    if home is not None:
        env["HF_HOME"] = str(home)
    return env


def environ_with_hub(url: str, token: str | None = None, home: str | Path | None = None) -> dict[str, str]:
    """`os.environ` updated with `hub_env(...)` and without `HF_TOKEN` when `token` is None: the
    `env=` for `subprocess.run`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(hub_env(url, token, home))
    return env


def go_online(monkeypatch: Any, url: str, home: str | Path, token: str | None = None) -> None:
    """Point the already imported Hugging Face clients of *this process* at `url`, online, with a
    fresh cache under `home` (and the environment, for subprocesses and Ray workers started
    later). `monkeypatch` is pytest's (anything with `setattr`/`setenv`/`delenv`): all is undone
    after the test. `HF_ENDPOINT` itself must have been set before `huggingface_hub` was imported
    (tests/conftest.py does); the endpoint constants are patched too, as a safety net."""
    home = Path(home)
    for k, v in hub_env(url, token, home).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    from huggingface_hub import constants

    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": token is None,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", url)
    import datasets.config as dconfig

    for name, value in {
        "HF_ENDPOINT": url,
        "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HUB_DATASETS_HFFS_URL": "hf://datasets/{repo_id}@{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_DATASETS_CACHE": home / "datasets",
    }.items():
        if hasattr(dconfig, name):
            monkeypatch.setattr(dconfig, name, value)
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()


def main(argv: list[str] | None = None) -> None:
    """`python -m ssae_ray.testing.hub_server [ROOT] [--port N]`: build the fixture repos into ROOT
    (if it holds none) and serve them; prints the URL."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("root", nargs="?", default=str(Path("~/.cache/ssae-ray/local-hub").expanduser()))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--token", action="append", help=f"a token that opens gated repos (default {DEFAULT_TOKEN})"
    )
    args = ap.parse_args(argv)
    from ssae_ray.testing.hub_fixtures import build_fixture_hub

    root = build_fixture_hub(args.root)
    with LocalHub(root, tokens=set(args.token) if args.token else None, port=args.port) as hub:
        print(hub.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()


__all__ = ["DEFAULT_TOKEN", "LocalHub", "environ_with_hub", "go_online", "hub_env", "load_repos"]
