"""`twincar prepare`: turn a Stanford Cars download, in any of its real layouts, into the CSV form.

The layout is detected (`layouts.py` reads each one). Images in folders are referenced in place;
every image is decoded once on a thread pool, and unusable ones go to `rejected.csv` instead of
`annotations.csv`. Outputs appear only when everything succeeded, annotations.csv last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import track

from twincar_fast.data.images import image_problem, image_size, open_rgb
from twincar_fast.data.layouts import BBOX, LAYOUTS, Box, Item, Source, detect_layout, read_source
from twincar_fast.errors import DataError
from twincar_fast.files import write_csv

__all__ = ["LAYOUTS", "detect_layout", "prepare_dataset"]

COLUMNS = ["image", "label", "class_id", "split", *BBOX]
PRESIZE_QUALITY = 90  # JPEG quality of the presized copies


# ---------------------------------------------------------------- checking and presizing


def _scale_box(box: Box, old: tuple[int, int], new: tuple[int, int]) -> Box:
    """A 1-based inclusive box scaled from an `old`-sized image to a `new`-sized one."""
    sx, sy = new[0] / old[0], new[1] / old[1]
    x1 = min(max(round((box[0] - 1) * sx) + 1, 1), new[0])
    y1 = min(max(round((box[1] - 1) * sy) + 1, 1), new[1])
    return (
        x1,
        y1,
        min(max(round(box[2] * sx), x1), new[0]),
        min(max(round(box[3] * sy), y1), new[1]),
    )


def _presized_key(key: str) -> str:
    """Name of the JPEG copy of `key` (x.png becomes x.png.jpg so names never collide)."""
    return key if Path(key).suffix.lower() in (".jpg", ".jpeg") else key + ".jpg"


def _check(item: Item, presize: int | None, staging: Path) -> tuple[str | None, tuple | None]:
    """(reason the image is unusable or None, (presized path, old size, new size) or None)."""
    reason = item.problem or image_problem(item.path)
    if reason or presize is None:
        return reason, None
    old = image_size(item.path)  # upright, as open_rgb returns it
    if min(old) <= presize:
        return None, None
    scale = presize / min(old)
    new = (max(presize, round(old[0] * scale)), max(presize, round(old[1] * scale)))
    rel = f"presized_{presize}/{_presized_key(item.key)}"
    small = open_rgb(item.path, draft=new).resize(new, Image.Resampling.LANCZOS)
    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
    small.save(staging / rel, quality=PRESIZE_QUALITY)
    return None, (rel, old, new)


def _check_all(items: list[Item], presize: int | None, staging: Path) -> list[tuple]:
    """Check (and presize) every image on a thread pool; PIL decodes outside the GIL."""
    check = partial(_check, presize=presize, staging=staging)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check, items)
        return list(track(results, total=len(items), description="Checking images", transient=True))


def _tables(src: Source, results: list[tuple], presize: int | None) -> tuple[pd.DataFrame, ...]:
    """annotations, classes and rejected tables from the items and their check results."""
    rows, rejected = [], []
    for item, (reason, small) in zip(src.items, results, strict=True):
        if reason:
            rejected.append((item.image, reason))
            continue
        image, box = (small[0], item.bbox) if small else (item.image, item.bbox)
        if small and box:
            box = _scale_box(box, *small[1:])
        box = box or (None,) * 4
        row = [image, src.classes[item.class_id], item.class_id, item.split, *box]
        rows.append(row + [item.image] * (presize is not None))
    columns = COLUMNS + ["source_image"] * (presize is not None)
    ann = pd.DataFrame(rows, columns=columns).astype({c: "Int64" for c in BBOX})
    classes = pd.DataFrame({"class_id": range(len(src.classes)), "label": src.classes})
    return ann, classes, pd.DataFrame(rejected, columns=["image", "reason"])


# ---------------------------------------------------------------- entry point


def _check_out(out: Path, layout: str, presize: int | None) -> list[str]:
    """The folders we'll write into `out`; refuse it if it holds them or a prepared set."""
    if (out / "annotations.csv").exists():
        raise DataError(
            f"{out / 'annotations.csv'} exists: {out} is already prepared; "
            "choose another --out or delete it"
        )
    names = ["images"] * (layout == "hf_parquet") + [f"presized_{presize}"] * (presize is not None)
    for name in names:
        if (out / name).exists():
            raise DataError(f"{out / name} already exists; choose an empty --out or delete it")
    return names


def _check_usable(source: Path, tables: tuple[pd.DataFrame, ...]) -> None:
    """DataError when no image is usable; a warning per class without training images."""
    ann, classes, rejected = tables
    if ann.empty:
        first = f" (first: {rejected.iloc[0, 0]}: {rejected.iloc[0, 1]})" if len(rejected) else ""
        raise DataError(f"{source}: none of its {len(rejected)} images is usable{first}")
    train = set(ann.loc[ann["split"] == "train", "class_id"])
    empty = [label for i, label in enumerate(classes["label"]) if i not in train]
    if empty:
        Console(stderr=True, highlight=False).print(
            f"warning: {len(empty)} class(es) have no training images "
            f"(first: {escape(str(empty[0]))}); the model can't learn them"
        )


def _publish(staging: Path, out: Path, tables: tuple[pd.DataFrame, ...]) -> None:
    """Move staged images into `out`, then write the CSVs, annotations.csv last."""
    for child in staging.iterdir():
        os.replace(child, out / child.name)
    ann, classes, rejected = tables
    write_csv(out / "classes.csv", classes)
    write_csv(out / "rejected.csv", rejected)
    write_csv(out / "annotations.csv", ann)


def prepare_dataset(
    source: str | os.PathLike, out: str | os.PathLike, presize: int | None = None
) -> Path:
    """Convert a Stanford Cars download to `out`/annotations.csv, classes.csv and rejected.csv.

    Args:
        source: the download, in any of the `LAYOUTS` (detected).
        out: folder for the prepared set; images in folder layouts are referenced, not copied.
        presize: also write JPEG copies whose shorter side is this many pixels (only of larger
            images) under `out`/presized_N/, and point `image` at them.
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if presize is not None and presize < 1:
        raise DataError(f"--presize must be a positive number of pixels, got {presize}")
    if out.resolve().is_relative_to(source.resolve()):
        raise DataError(
            f"--out {out} lies inside the source {source}: it would be read as part of the "
            "download; choose an output folder outside it"
        )
    layout = detect_layout(source)
    ours = _check_out(out, layout, presize)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        src = read_source(layout, source, out, staging)
        tables = _tables(src, _check_all(src.items, presize, staging), presize)
        _check_usable(source, tables)
        _publish(staging, out, tables)
    except BaseException:
        # Nothing half-written stays behind: only what this call created is removed.
        for path in [out] if created else [out / name for name in ours]:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(layout, source, out, tables)
    return out


def _print_summary(layout: str, source: Path, out: Path, tables: tuple[pd.DataFrame, ...]) -> None:
    """A few lines on what was prepared."""
    ann, classes, rejected = tables
    counts = ann["split"].value_counts()
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]Prepared[/] {escape(str(source))} ([cyan]{layout}[/] layout) → {escape(str(out))}"
    )
    console.print(
        f"  {len(classes)} classes · {counts.get('train', 0):,} train · "
        f"{counts.get('test', 0):,} test · {len(rejected):,} rejected"
        + (f" (listed in {escape(str(out / 'rejected.csv'))})" if len(rejected) else "")
    )
