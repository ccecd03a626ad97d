"""`python -m benchmarks.profile_aug [--quick]`: where our data pipeline spends its time, per stage.

Times, on one batch of the benchmark set, the item stage (decode, then augment or presize, in the
workers) and every batch transform (on the device, in the main process) in training mode, so a
slow transform shows up by name. The reference's per-item transforms are timed the same way for
comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from benchmarks import reference
from benchmarks.data import bench_dataset
from benchmarks.settings import ours_config, settings_for
from twincar_fast.data import build_dls


def best_seconds(fn: Callable[[], object], repeats: int = 3, threads: int | None = None) -> float:
    """The fastest of `repeats` calls of `fn`, in seconds (after one warm-up call).

    `threads=1` times a stage as DataLoader workers run it (torch sets 1 thread in workers).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _best(fn, repeats)
    finally:
        torch.set_num_threads(before)


def _best(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls of `fn` after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ours_stages(cfg, n: int) -> list[tuple[str, float]]:
    """(stage, seconds per image) of our loader: items, collate, then each batch transform."""
    dl = build_dls(cfg).train
    idxs = list(range(n))

    dl.before_iter()  # training transforms on, as the loader's iterator sets them

    def decoded() -> list:
        return [dl.create_item(i) for i in idxs]

    raw = decoded()

    def augment() -> list:
        return [dl.after_item(x) for x in raw]

    rows = [
        ("worker: read row + decode (draft)", best_seconds(decoded, threads=1)),
        ("worker: augment (item stage) or presize", best_seconds(augment, threads=1)),
    ]
    items = augment()
    rows.append(("worker: collate", best_seconds(lambda: dl.do_batch(items), threads=1)))
    b = dl.do_batch(items)
    for tfm in dl.after_batch.fs:
        rows.append(
            (f"batch: {type(tfm).__name__}", best_seconds(lambda t=tfm, x=b: t(x, split_idx=0)))
        )
        b = tfm(b, split_idx=0)
    return [(name, secs / n) for name, secs in rows]


def reference_stages(paths: Sequence[str], size: int) -> list[tuple[str, float]]:
    """(stage, seconds per image) of the reference's per-item pipeline."""
    images = [Image.open(p).convert("RGB") for p in paths]
    decode = lambda: [Image.open(p).convert("RGB") for p in paths]  # noqa: E731
    rows = [("worker: decode", best_seconds(decode, threads=1))]
    x = images
    for tfm in reference.train_transform(size).transforms:
        work = lambda t=tfm, xs=x: [t(i) for i in xs]  # noqa: E731
        rows.append((f"worker: {type(tfm).__name__}", best_seconds(work, threads=1)))
        x = [tfm(i) for i in x]
    rows.append(("worker: collate", best_seconds(lambda: torch.stack(x), threads=1)))
    return [(name, secs / len(paths)) for name, secs in rows]


def main(argv: Sequence[str] | None = None) -> None:
    """Print both sides' per-stage milliseconds per image."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_aug", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="the quick benchmark set (default: full)")
    args = p.parse_args(argv)
    s = settings_for("quick" if args.quick else "full")
    cfg = ours_config(s, bench_dataset(s.data), s.train_arch, s.pipe_img, s.pipe_item)
    cfg.data = dataclasses.replace(cfg.data, num_workers=0)
    n = s.batch_size
    ours = ours_stages(cfg, n)
    dl_items = build_dls(cfg).train.items
    ref = reference_stages([str(x) for x in dl_items["path"][:n]], s.pipe_img)
    table = Table(title=f"per-image cost, batch of {n}, {torch.get_num_threads()} torch threads")
    for col in ("side", "stage", "ms/img"):
        table.add_column(col, justify="right" if col == "ms/img" else "left")
    for side, rows in (("ours", ours), ("reference", ref)):
        for name, secs in rows:
            table.add_row(side, name, f"{secs * 1000:.2f}")
        table.add_row(side, "[bold]total[/]", f"[bold]{sum(v for _, v in rows) * 1000:.2f}[/]")
    Console().print(table)


if __name__ == "__main__":
    main()
