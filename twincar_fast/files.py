"""Atomic file writes, build locks and run-folder naming: nothing left half-written or overwritten."""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from twincar_fast.errors import TwincarError


def _new_file(path: Path) -> None:
    """Create the empty file `path` (FileExistsError if it exists) with the umask's permissions."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _fresh(path: Path, make: Callable[[Path], None]) -> Path:
    """A new `.<name>.<random>.tmp` beside `path`, made by `make`.

    Made with mode 0o666/0o777, which the kernel narrows by the process umask, so the finished
    file follows it like any other; tempfile's are 0600/0700, and reading the umask means setting
    it, for every thread of the process.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue  # another writer's name: draw again
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` that replaces it only if the block succeeds."""
    path = Path(path)
    tmp = _fresh(path, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented, strict JSON to `path` atomically (NaN/inf become null)."""
    text = json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)
    return write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    """`obj` with every NaN/inf float replaced by None: strict JSON readers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write a DataFrame (without its index) to `path` atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


@contextmanager
def file_lock(path: str | os.PathLike, busy: Callable[[str], str] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block.

    One process builds a shared thing (a data set, a cache); the others wait, then reuse it. With
    `busy`, a process that finds the lock held doesn't wait: it raises a TwincarError whose
    message is `busy(holder)`, the holder's process id (the file holds it). The lock goes when
    its file descriptor does, so a killed holder never leaves it stuck.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            f.seek(0)
            raise TwincarError(busy(f.read(64).strip() or "another process")) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that is renamed to `path` only if the block succeeds."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(path)
    tmp = _fresh(path, Path.mkdir)  # mode 0o777, narrowed by the umask
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_folder(path: str | os.PathLike, what: str) -> Path:
    """`path` if it is a usable folder or can become one; a one-line TwincarError otherwise."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise TwincarError(
            f"{what} {path}: a broken symlink (to {os.readlink(path)}); fix or remove it"
        )
    if path.exists() and not path.is_dir():
        raise TwincarError(f"{what} {path}: is a file, not a folder; give a folder")
    return path


def new_run_name(name: str, parents: list[Path], now: datetime | None = None) -> str:
    """Return `name-YYYYmmdd-HHMMSS` (with a counter if needed) that exists under none of `parents`."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    run = f"{name}-{stamp}"
    for n in range(2, 10_000):  # bounded: a folder that reports everything as taken is an error
        if not any(os.path.lexists(p / run) for p in parents):
            return run
        run = f"{name}-{stamp}-{n}"
    raise TwincarError(f"{parents[0]}: no free run name for {name!r}; check the folder")
