"""A Stanford-Cars-sized synthetic set for the benchmarks, drawn once and cached by its parameters.

The demo generator draws devkit-layout JPEGs at one size (about 600×400, the real set's average);
a share of them is then re-saved upscaled (about 2400×1600, like the real set's largest photos),
with their devkit and parts boxes scaled to match, and the set is prepared with `prepare_dataset`
(and, on request, prepared again with `--presize`). Everything lives under
`data/bench/<key>/`: `raw/` (devkit layout), `prepared/`, `presized_<N>/`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from PIL import Image

from twincar_fast.data.demo import make_demo_data
from twincar_fast.data.prepare import prepare_dataset
from twincar_fast.files import atomic_dir, write_text

DEFAULT_ROOT = Path("data/bench")
_BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


@dataclass(frozen=True)
class BenchData:
    """How the benchmark set is drawn; equal parameters give the same cached folder."""

    n_classes: int = 24  # demo classes (the generator's maximum)
    per_class: int = 40  # images per class in each of train and test (Stanford Cars: ~41)
    size: tuple[int, int] = (576, 384)  # most images: W, H
    big_frac: float = 0.02  # share re-saved at `big_size`; mean size ≈ 612×408 with the defaults
    big_size: tuple[int, int] = (2400, 1600)  # the large photos: W, H
    seed: int = 0

    @property
    def key(self) -> str:
        """The cache folder name of these parameters."""
        (w, h), (bw, bh) = self.size, self.big_size
        return (
            f"c{self.n_classes}-p{self.per_class}-{w}x{h}-big{self.big_frac:g}-{bw}x{bh}"
            f"-s{self.seed}"
        )


def _scale_box(box: tuple[int, ...], sx: float, sy: float) -> tuple[int, ...]:
    """A 1-based inclusive box scaled by (sx, sy)."""
    x1, y1, x2, y2 = box
    return round((x1 - 1) * sx) + 1, round((y1 - 1) * sy) + 1, round(x2 * sx), round(y2 * sy)


def _upscale_split(raw: Path, split: str, mat: Path, spec: BenchData, rng) -> int:
    """Re-save a `big_frac` share of one split's JPEGs at `big_size`; scale their boxes."""
    m = scipy.io.loadmat(mat)
    ann = m["annotations"]
    n = ann.shape[1]
    chosen = rng.choice(n, int(round(spec.big_frac * n)), replace=False)
    parts = pd.read_csv(raw / "parts.csv")
    for i in sorted(chosen):
        fname = str(ann[0, i]["fname"].item())
        path = raw / f"cars_{split}" / fname
        with Image.open(path) as im:
            (w, h), big = im.size, im.convert("RGB").resize(spec.big_size, Image.BICUBIC)
        big.save(path, quality=90)
        sx, sy = spec.big_size[0] / w, spec.big_size[1] / h
        box = _scale_box(tuple(int(ann[0, i][f].item()) for f in _BOX_FIELDS), sx, sy)
        for f, v in zip(_BOX_FIELDS, box, strict=True):
            ann[0, i][f] = np.array([[v]], dtype=np.uint16)
        row = (parts["fname"] == fname) & (parts["split"] == split)
        old = parts.loc[row, ["x1", "y1", "x2", "y2"]].iloc[0]
        parts.loc[row, ["x1", "y1", "x2", "y2"]] = _scale_box(tuple(int(v) for v in old), sx, sy)
    scipy.io.savemat(mat, {"annotations": ann})
    parts.to_csv(raw / "parts.csv", index=False)
    return len(chosen)


def _draw(raw: Path, spec: BenchData) -> None:
    """Draw the devkit-layout set into `raw` and upscale its share of large photos."""
    make_demo_data(raw, spec.n_classes, spec.per_class, spec.size, spec.seed)
    rng = np.random.default_rng([spec.seed, 2400])
    _upscale_split(raw, "train", raw / "devkit" / "cars_train_annos.mat", spec, rng)
    _upscale_split(raw, "test", raw / "cars_test_annos_withlabels.mat", spec, rng)


def bench_dataset(spec: BenchData, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The prepared benchmark set for `spec` (drawn and prepared on first use, then cached)."""
    folder = Path(root) / spec.key
    if not (folder / "prepared" / "annotations.csv").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a run interrupted after drawing
        with atomic_dir(folder) as tmp:
            _draw(tmp / "raw", spec)
            prepare_dataset(tmp / "raw", tmp / "prepared")  # image paths are relative: ../raw/...
    return folder / "prepared"


def presized_dataset(spec: BenchData, presize: int, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The same set prepared with `presize` (shorter sides cut to `presize` px once), cached."""
    prepared = bench_dataset(spec, root)
    out = prepared.parent / f"presized_{presize}"
    if not (out / "annotations.csv").is_file():
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        prepare_dataset(prepared.parent / "raw", out, presize=presize)
        write_text(_cost_file(out), f"{time.perf_counter() - start:.2f}\n")
    return out


def repeated_dataset(prepared: str | os.PathLike, times: int) -> Path:
    """`prepared` with every image listed `times` times (a longer epoch over the same files).

    Written once beside it as `<name>_x<times>/`; the benchmark's short epochs would otherwise be
    mostly worker start-up, which a real epoch (254 batches of Stanford Cars) spreads thin.
    """
    prepared = Path(prepared)
    if times <= 1:
        return prepared
    out = prepared.parent / f"{prepared.name}_x{times}"
    if not (out / "annotations.csv").is_file():
        df = pd.read_csv(prepared / "annotations.csv")
        with atomic_dir(out) as tmp:
            df = pd.concat([df] * times, ignore_index=True)
            df["image"] = [os.path.relpath(prepared / p, out) for p in df["image"]]
            df.to_csv(tmp / "annotations.csv", index=False)
            for name in ("classes.csv", "rejected.csv"):
                if (prepared / name).is_file():
                    shutil.copy(prepared / name, tmp / name)
    return out


def cars_sized_dataset(
    spec: BenchData,
    root: str | os.PathLike = DEFAULT_ROOT,
    n_classes: int = 196,
    n_train: int = 8144,
    n_test: int = 8041,
) -> Path:
    """A set shaped like Stanford Cars (`n_classes` classes, 8,144 train and 8,041 test rows)
    over the distinct JPEGs of `spec`'s set, each file listed several times under one class.

    For the GPU check's end-to-end runs: the shapes a real run meets (196 outputs, an epoch of
    8,144 images, a test pass of 8,041), not a learnable task (a class's test files are other
    drawings than its training files). Written once beside the bench set, then reused.
    """
    prepared = bench_dataset(spec, root)
    out = prepared.parent / f"cars{n_classes}-{n_train}-{n_test}"
    if (out / "annotations.csv").is_file():
        return out
    df = pd.read_csv(prepared / "annotations.csv")
    names = [f"Synthetic Car {k:03d}" for k in range(n_classes)]
    parts = []
    for split, n in (("train", n_train), ("test", n_test)):
        files = df[df["split"] == split].reset_index(drop=True)
        ids = np.arange(len(files)) % n_classes
        files = files.assign(class_id=ids, label=[names[k] for k in ids])
        parts.append(files.iloc[np.arange(n) % len(files)])
    rows = pd.concat(parts, ignore_index=True)
    rows["image"] = [os.path.relpath(prepared / p, out) for p in rows["image"]]
    with atomic_dir(out) as tmp:
        rows.to_csv(tmp / "annotations.csv", index=False)
        classes = pd.DataFrame({"class_id": range(n_classes), "label": names})
        classes.to_csv(tmp / "classes.csv", index=False)
    return out


def _cost_file(presized: Path) -> Path:
    """Where the one-time cost of a presized copy is kept."""
    return presized.parent / f"{presized.name}_seconds.txt"


def presize_seconds(presized: str | os.PathLike) -> float | None:
    """Seconds `prepare --presize` took to write `presized` (None if not recorded)."""
    path = _cost_file(Path(presized))
    return float(path.read_text()) if path.is_file() else None


def image_stats(data_dir: str | os.PathLike) -> dict:
    """Mean and max image size, file size and count of a prepared set (for the report)."""
    from twincar_fast.data.dataset import read_annotations

    sizes, nbytes = [], []
    for p in read_annotations(data_dir)["path"]:
        with Image.open(p) as im:
            sizes.append(im.size)
        nbytes.append(os.path.getsize(p))
    arr = np.asarray(sizes)
    return {
        "images": len(sizes),
        "mean_wh": [round(float(v)) for v in arr.mean(0)],
        "max_wh": [int(v) for v in arr.max(0)],
        "mean_kb": round(float(np.mean(nbytes)) / 1024, 1),
    }
