"""Measuring tools: the machine, comparisons as ratios, and functions run in a child process while
the parent samples the memory of its whole process tree (the child and its DataLoader workers).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def machine_info() -> dict:
    """CPU, memory, accelerator and library versions of this machine."""
    import fastai
    import PIL
    import timm
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = _status_kb("/proc/meminfo", "MemTotal")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(mem_kb / 2**20, 1) if mem_kb else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastai": fastai.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "pillow_simd": "post" in PIL.__version__,
    }


def compare(ours: float, reference: float, unit: str, higher_is_better: bool, **extra) -> dict:
    """One benchmark's entry: both figures and a ratio where > 1 means ours is better."""
    if higher_is_better:
        ratio = ours / reference if reference else float("nan")
    else:
        ratio = reference / ours if ours else float("nan")
    return {"ours": ours, "reference": reference, "unit": unit, "ratio": round(ratio, 3), **extra}


# ---------------------------------------------------------------- memory of a process tree


def _read(path: str) -> str:
    """A /proc file's text, or '' once the process is gone."""
    try:
        return Path(path).read_text()
    except (OSError, ProcessLookupError):
        return ""


def _status_kb(path: str, key: str) -> int:
    """A `key: N kB` field of a /proc status-like file, 0 if absent."""
    for line in _read(path).splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _descendants(pid: int) -> list[int]:
    """`pid` and every live process below it (parents read from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read(f"/proc/{entry.name}/stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_memory_kb(pid: int) -> int:
    """Proportional set size (PSS: shared pages split between sharers) of a process tree in kB."""
    total = 0
    for p in _descendants(pid):
        pss = _status_kb(f"/proc/{p}/smaps_rollup", "Pss")
        total += pss or _status_kb(f"/proc/{p}/status", "VmRSS")
    return total


def _child_main(fn: Callable[..., dict], kwargs: dict, conn, start_method: str) -> None:
    """Run `fn(**kwargs)` in the child; send back its result with the child's own peak RSS."""
    # A spawned child inherits "spawn" as its default, so its DataLoader workers would re-import
    # everything every epoch; give it the start method a plain script gets (fork on Linux).
    mp.set_start_method(start_method, force=True)
    try:
        result = fn(**kwargs)
        result["vm_hwm_mb"] = _status_kb("/proc/self/status", "VmHWM") / 1024
        conn.send(("ok", result))
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_in_child(
    fn: Callable[..., dict], timeout: float = 1800, interval: float = 0.2, **kwargs: Any
) -> dict:
    """`fn(**kwargs)` in a fresh spawned process; adds `tree_peak_mb` (sampled PSS of its tree).

    `fn` must be importable (a module-level function) and return a dict. Spawn, not fork: a
    forked child of a process with torch's thread pools can deadlock, and it would share the
    parent's pages, spoiling the memory figures.
    """
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    default = mp.get_start_method(allow_none=True) or mp.get_all_start_methods()[0]
    proc = ctx.Process(target=_child_main, args=(fn, kwargs, send, default))
    proc.start()
    send.close()
    peak, deadline = 0, time.monotonic() + timeout
    while not recv.poll(interval):
        peak = max(peak, tree_memory_kb(proc.pid))
        if not proc.is_alive():
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.join()
            raise RuntimeError(f"benchmark child {fn.__name__} ran over {timeout:.0f} s; killed")
    try:
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", f"child process died (exit code {proc.exitcode})"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark child {fn.__name__} failed: {payload}")
    payload["tree_peak_mb"] = round(peak / 1024, 1)
    return payload


def best_of(fn: Callable[[], tuple[int, float]], repeats: int) -> tuple[int, float]:
    """Run `fn` (returning images, seconds) `repeats` times; the fastest run's (images, seconds)."""
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r[1])


class Timer:
    """Wall-clock seconds of a `with` block (`perf_counter`)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start

    def elapsed(self) -> float:
        """Seconds since the block began (inside it)."""
        return time.perf_counter() - self.start
