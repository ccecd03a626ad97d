"""The prepared data set on disk: read and check its CSVs, or build it when it is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from twincar_fast.config import ExperimentConfig
from twincar_fast.data.demo import make_demo_data
from twincar_fast.data.prepare import prepare_dataset
from twincar_fast.errors import DataError
from twincar_fast.files import file_lock

__all__ = [
    "BBOX_COLUMNS",
    "check_split",
    "check_train_classes",
    "ensure_dataset",
    "read_annotations",
    "read_classes",
    "read_rejected",
]

BBOX_COLUMNS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
_REQUIRED = ["image", "label", "class_id", "split"]
_SPLITS = {"train", "test"}

_HOW_TO_GET = (
    "get Stanford Cars from Hugging Face tanganke/stanford_cars "
    "(https://huggingface.co/datasets/tanganke/stanford_cars), Kaggle "
    "jessicali9530/stanford-cars-dataset or torchvision's StanfordCars layout; "
    "then run `twincar prepare SOURCE --out {root}` (or set data.source=SOURCE); "
    "or try the synthetic demo instead: `python -m twincar_fast.run experiments/demo.yaml` "
    "(or set data.demo=true)"
)


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    """Read one CSV of a prepared set, with a one-line error when it is missing or unreadable."""
    if not path.is_file():
        raise DataError(
            f"{path} not found: {path.parent} is not a prepared data set; "
            f"run `twincar prepare SOURCE --out {path.parent}` first ({what})"
        )
    try:
        # strings as written: class "001" stays "001", a class named "NA" or "None" stays a name
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        msg = " ".join(str(e).split())
        raise DataError(f"{path}: not a readable CSV ({msg}); re-run `twincar prepare`") from None


def read_classes(data_dir: str | os.PathLike) -> list[str]:
    """The class names of a prepared set in vocab order (row i of classes.csv is class_id i);
    `data_dir` may also be the classes .csv file itself."""
    path = Path(data_dir)
    path = path if path.suffix.lower() == ".csv" else path / "classes.csv"
    df = _read_csv(path, "the class list")
    if list(df.columns[:2]) != ["class_id", "label"]:
        raise DataError(f"{path}: columns must be class_id,label, got {','.join(df.columns)}")
    ids = pd.to_numeric(df["class_id"], errors="coerce")
    if ids.isna().any() or list(ids.astype(int)) != list(range(len(df))):
        raise DataError(
            f"{path}: class_id must run 0, 1, 2, ... in order; re-run `twincar prepare`"
        )
    labels = df["label"].astype(str).tolist()
    dupes = df["label"][df["label"].duplicated()].tolist()
    if dupes:
        raise DataError(f"{path}: label {dupes[0]!r} appears more than once; labels must be unique")
    if len(labels) < 2:
        raise DataError(f"{path}: needs at least 2 classes, found {len(labels)}")
    return labels


def _check_labels(df: pd.DataFrame, classes: list[str], path: Path) -> None:
    """Check class ids are in range, labels match classes.csv and splits are train/test."""
    ids = pd.to_numeric(df["class_id"], errors="coerce")
    bad = df[ids.isna() | (ids < 0) | (ids >= len(classes)) | (ids % 1 != 0)]
    if len(bad):
        row = bad.iloc[0]
        raise DataError(
            f"{path}: {len(bad)} rows have a class_id outside 0..{len(classes) - 1} "
            f"(first: {row['image']} with class_id {row['class_id'] or '(empty)'}); re-run `twincar prepare`"
        )
    expected = pd.Series(classes, dtype=object).iloc[ids.astype(int)].to_numpy()
    wrong = df[df["label"].astype(str).to_numpy() != expected]
    if len(wrong):
        row = wrong.iloc[0]
        raise DataError(
            f"{path}: {len(wrong)} rows have a label that doesn't match classes.csv "
            f"(first: {row['image']} labelled {row['label']!r} but class_id {row['class_id']} "
            f"is {classes[int(row['class_id'])]!r}); re-run `twincar prepare`"
        )
    splits = set(df["split"].astype(str)) - _SPLITS
    if splits:
        raise DataError(f"{path}: split must be train or test, found {sorted(splits)[0]!r}")


def read_annotations(data_dir: str | os.PathLike) -> pd.DataFrame:
    """Read and check annotations.csv; adds an absolute `path` column for every image."""
    data_dir = Path(data_dir).resolve()
    classes = read_classes(data_dir)
    path = data_dir / "annotations.csv"
    df = _read_csv(path, "the image list")
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; re-run `twincar prepare`")
    if df.empty:
        raise DataError(f"{path}: lists no images; re-run `twincar prepare` on the source")
    _check_labels(df, classes, path)
    df = df.copy()
    df["class_id"] = pd.to_numeric(df["class_id"]).astype(int)
    df["label"] = df["label"].astype(str)
    df["split"] = df["split"].astype(str)
    for col in BBOX_COLUMNS:  # optional: a set without boxes just can't use bbox_crop
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else float("nan")
    df["path"] = [str(data_dir / p) for p in df["image"].astype(str)]
    absent = [p for p in df["path"] if not os.path.isfile(p)]
    if absent:
        raise DataError(
            f"{path}: {len(absent)} of {len(df)} images are missing (first: {absent[0]}); "
            "copy the images back or re-run `twincar prepare`"
        )
    return df.reset_index(drop=True)


def check_split(data_dir: str | os.PathLike, split: str) -> None:
    """DataError unless `split` lists images and none of them is an empty file (before training)."""
    df = read_annotations(data_dir)
    paths = df.loc[df["split"] == split, "path"]
    where = Path(data_dir) / "annotations.csv"
    if paths.empty:
        raise DataError(
            f"{where}: no {split} images, but eval.{split} is on; add the {split} split "
            f"(re-run `twincar prepare`) or set eval.{split}=false"
        )
    empty = [p for p in paths if os.path.getsize(p) == 0]
    if empty:
        raise DataError(
            f"{where}: {len(empty)} {split} image(s) are empty files (first: {empty[0]}); "
            "re-run `twincar prepare` to reject them"
        )


def read_rejected(data_dir: str | os.PathLike) -> pd.DataFrame:
    """The images `prepare` left out and why (empty if there is no rejected.csv)."""
    path = Path(data_dir) / "rejected.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["image", "reason"])
    return _read_csv(path, "the rejected images")


def _build_demo(cfg: ExperimentConfig, root: Path) -> Path:
    """Draw the demo set into `root`/raw (if needed) and prepare it into `root` (holding the lock)."""
    d, raw = cfg.data, root / "raw"
    for stale in root.glob(".raw.*"):  # left by a build that was killed: nobody else builds now
        shutil.rmtree(stale, ignore_errors=True)
    if not raw.is_dir() or not any(raw.iterdir()):  # demo writes atomically: a raw/ is whole
        make_demo_data(
            raw,
            n_classes=d.demo_classes,
            per_class=d.demo_per_class,
            size=tuple(d.demo_size),
            seed=d.demo_seed,
        )
    return Path(prepare_dataset(raw, root))


def check_train_classes(data_dir: str | os.PathLike, allow_empty: bool = False) -> None:
    """DataError naming the classes of classes.csv with no training image (unless `allow_empty`):
    the model would ship a class it never saw."""
    if allow_empty:
        return
    df = read_annotations(data_dir)
    seen = set(df.loc[df["split"] == "train", "label"])
    empty = [c for c in read_classes(data_dir) if c not in seen]
    if empty:
        names = ", ".join(repr(c) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(
            f"{Path(data_dir) / 'annotations.csv'}: {len(empty)} class(es) have no training "
            f"image: {names}; add images, drop them from classes.csv and annotations.csv, or set "
            "data.allow_empty_classes=true to train anyway"
        )


def ensure_dataset(cfg: ExperimentConfig) -> Path:
    """The prepared data folder of `cfg` (every class with a training image, unless
    `data.allow_empty_classes`); builds the demo set or prepares `data.source` if missing."""
    root = _prepared_root(cfg)
    check_train_classes(root, cfg.data.allow_empty_classes)
    return root


def _prepared_root(cfg: ExperimentConfig) -> Path:
    """The prepared data folder of `cfg`, built or prepared first if it is missing."""
    root = Path(cfg.data.root).expanduser()
    if (root / "annotations.csv").is_file():
        return root
    if not (cfg.data.demo or cfg.data.source):
        raise DataError(
            f"data set missing: {root / 'annotations.csv'} not found and neither data.source nor "
            f"data.demo is set; " + _HOW_TO_GET.format(root=root)
        )
    with file_lock(root / ".build.lock"):
        if (root / "annotations.csv").is_file():  # another process built it while we waited
            return root
        if cfg.data.demo:
            return _build_demo(cfg, root)
        return Path(prepare_dataset(Path(cfg.data.source).expanduser(), root))
