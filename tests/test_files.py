"""Atomic writes: finished files and folders follow the process umask, which no import touches."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_dir, atomic_path, file_lock, write_text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_finished_files_follow_the_umask_of_the_moment(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f.txt").write_text("z")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "d" / "f.txt").read_text() == "z"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "d"]  # no temp left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_importing_the_package_leaves_the_umask_alone():
    code = (
        "import os\n"
        "def refuse(*a):\n"
        "    raise AssertionError('os.umask called at import')\n"
        "os.umask = refuse\n"
        "import twincar_fast, twincar_fast.files, twincar_fast.config\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_lock_held_elsewhere_is_waited_for_or_refused_with_its_holder(tmp_path):
    lock = tmp_path / "sub" / ".lock"
    script = (
        "import sys, time\n"
        "from twincar_fast.files import file_lock\n"
        "with file_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(2)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TwincarError, match=rf"^in use by {holder.pid}$"):
            with file_lock(lock, busy=lambda pid: f"in use by {pid}"):
                pass
        start = time.monotonic()
        with file_lock(lock):  # waits for the holder to let go, then holds it
            assert time.monotonic() - start > 0.5 and lock.read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()
