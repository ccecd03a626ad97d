"""`python -m benchmarks.cache_memory`: a process's memory while it iterates caches of growing size.

For each size, a demo-style set is drawn (`per_class` images per class), its image cache built,
and the cached training loader iterated for a few epochs in a fresh process; the process reports
its peak RSS (VmHWM) and its anonymous and file-backed resident memory at the end. The cache's
pages live in the page cache: the process's own memory should not grow with the cache.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.measure import _status_kb, run_in_child
from twincar_fast.config import load_config
from twincar_fast.data.demo import make_demo_data
from twincar_fast.data.prepare import prepare_dataset

DEMO = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"


def iterate_cache(root: str, epochs: int, cache_size: int) -> dict:
    """Build the cache of the demo config over `root` and iterate its training loader (child)."""
    from twincar_fast.data import build_dls

    cfg = load_config(DEMO, [f"data.root={root}", f"data.cache_size={cache_size}", "data.cache=on"])
    dls = build_dls(cfg)
    before = _status_kb("/proc/self/status", "VmHWM")
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        n += sum(len(xb) for xb, _ in dls.train)
    cache = dls.train.cache
    return {
        "images": len(cache),
        "cache_mb": round(cache.nbytes / 2**20, 1),
        "iterated": n,
        "seconds": round(time.perf_counter() - start, 2),
        "hwm_before_mb": round(before / 1024, 1),
        "rss_anon_mb": round(_status_kb("/proc/self/status", "RssAnon") / 1024, 1),
        "rss_file_mb": round(_status_kb("/proc/self/status", "RssFile") / 1024, 1),
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Draw the sets, measure each in its own process, print one line per size."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_memory", description=__doc__)
    p.add_argument("--per-class", type=int, nargs="+", default=[40, 200])
    p.add_argument("--cache-size", type=int, default=256, help="shorter side of cached images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path("data/bench/cache_memory"))
    args = p.parse_args(argv)
    out = []
    for per_class in args.per_class:
        root = args.root / f"p{per_class}"
        if not (root / "prepared" / "annotations.csv").is_file():
            make_demo_data(root / "raw", per_class=per_class, size=(384, 256), seed=0)
            prepare_dataset(root / "raw", root / "prepared")
        r = run_in_child(
            iterate_cache,
            root=str(root / "prepared"),
            epochs=args.epochs,
            cache_size=args.cache_size,
        )
        out.append(r)
        print(
            f"{r['images']} images, cache {r['cache_mb']} MB: peak RSS {r['vm_hwm_mb']:.0f} MB "
            f"(before iterating {r['hwm_before_mb']:.0f}), anon {r['rss_anon_mb']:.0f} MB, "
            f"file pages {r['rss_file_mb']:.0f} MB; {r['iterated']} images in {r['seconds']} s"
        )
    return out


if __name__ == "__main__":
    main()
