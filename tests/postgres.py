"""A private PostgreSQL cluster for tests: initdb + pg_ctl in a temporary folder, trust auth.

PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user (Debian's
package creates it). `start_cluster` returns the SQLAlchemy URL, or the reason it can't.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path | None:
    """The folder holding initdb and pg_ctl (PATH, then Debian's versioned folders)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster() -> tuple[str | None, str, callable]:
    """(URL or None, why not, stop function) of a fresh cluster on 127.0.0.1."""
    bindir = _bindir()
    if bindir is None:
        return None, "no PostgreSQL binaries (initdb, pg_ctl) on this machine", lambda: None
    root = Path(tempfile.mkdtemp(prefix="twincar-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres won't run as root: run it as the postgres user
        if shutil.which("runuser") is None:
            return None, "running as root without runuser to start PostgreSQL", lambda: None
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "twincar")
    if r.returncode:
        return None, f"initdb failed: {r.stderr.strip()[:200]}", lambda: None
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    r = run(
        str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"
    )
    if r.returncode:
        return None, f"pg_ctl start failed: {r.stderr.strip()[:200]}", lambda: None

    def stop() -> None:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)

    return f"postgresql+psycopg2://twincar@127.0.0.1:{port}/postgres", "", stop
