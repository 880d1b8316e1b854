"""A throwaway PostgreSQL server for tests (Debian's `postgresql`, which `scripts/setup.sh` installs).

`PostgresServer` runs `initdb` into a fresh folder under the temp dir and starts `postgres` on a
Unix socket in that folder only (no TCP port, so parallel runs never collide), as the `postgres`
user when the caller is root (PostgreSQL refuses to run as root); `stop()` (or leaving the `with`
block) shuts it down and deletes the folder. No fsync: the data is thrown away.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PORT = 5432
"""Only names the socket file (`.s.PGSQL.5432`) in the server's own folder."""


def pg_bin(name: str) -> str | None:
    """A PostgreSQL program from PATH or Debian's `/usr/lib/postgresql/<version>/bin` (newest)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    return versions[-1] if versions else None


def missing() -> str | None:
    """Why no server can start here (None when one can)."""
    if not all(pg_bin(n) for n in ("initdb", "pg_ctl")):
        return "PostgreSQL is not installed: run scripts/setup.sh (as root it installs it) or apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no `postgres` user to run PostgreSQL as"
    return None


class PostgresServer:
    def __init__(self) -> None:
        problem = missing()
        if problem:
            raise RuntimeError(problem)
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.dir = Path(tempfile.mkdtemp(prefix="ssae-pg-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        opts = f"-k {self.dir} -p {PORT} -F -c listen_addresses='' -c fsync=off"
        try:
            self._run(
                pg_bin("initdb"), "-D", self.data, "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"
            )
            self._run(pg_bin("pg_ctl"), "-D", self.data, "-o", opts, "-l", self.dir / "log", "-w", "start")
        except RuntimeError:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, *args: Any) -> None:
        user = "postgres" if os.geteuid() == 0 else None
        p = subprocess.run([str(a) for a in args], user=user, cwd=self.dir, capture_output=True, text=True)
        if p.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").is_file() else ""
            raise RuntimeError(
                f"{Path(str(args[0])).name} failed ({p.returncode}): {p.stderr or p.stdout}{log}"
            )

    @property
    def conninfo(self) -> str:
        return f"host={self.dir} port={PORT} user={self.user} dbname=postgres"

    def stop(self) -> None:
        if self.data.is_dir():
            self._run(pg_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
