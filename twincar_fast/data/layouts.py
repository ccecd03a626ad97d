"""The real layouts of a Stanford Cars download and a reader for each.

Layouts: the original devkit (`cars_train/`, `cars_test/`, `devkit/*.mat`), torchvision's
(the same under `stanford_cars/`), the Kaggle mirror (`cars_train/cars_train/`,
`car_devkit/devkit/`), the Hugging Face parquet mirror (`data/{split}-*.parquet`) and an
ImageFolder (`train/<class>/`, `test/<class>/`). Each reader returns the class names and the
images, with labels checked against the class list; nothing is decoded here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import yaml

from twincar_fast.errors import DataError

__all__ = ["LAYOUTS", "Item", "Source", "detect_layout", "read_source"]

LAYOUTS = ("devkit", "torchvision", "kaggle", "hf_parquet", "imagefolder")
BBOX = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "test")
TEST_ANNOS = "cars_test_annos_withlabels.mat"

Box = tuple[int, int, int, int]


@dataclass
class Item:
    """One image to prepare: where it is read now, how annotations.csv names it, its class and box."""

    path: Path  # readable location during preparation (a staged copy for parquet sources)
    image: str  # path relative to the output folder, as annotations.csv stores it
    key: str  # relative name under presized_N/ for its resized copy
    class_id: int  # 0-based
    split: str  # train | test
    bbox: Box | None = None  # 1-based inclusive pixel box, as in the devkit
    problem: str | None = None  # known to be unusable before decoding (no bytes in the parquet)


@dataclass
class Source:
    """What a layout reader found: class names (vocab order) and the images."""

    classes: list[str]
    items: list[Item]


# ---------------------------------------------------------------- layout detection


def detect_layout(source: str | os.PathLike) -> str:
    """Name the layout of a Stanford Cars download (one of `LAYOUTS`), or raise DataError."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(
            f"{source} is not a folder; point SOURCE at the unpacked Stanford Cars data"
        )
    if (source / "annotations.csv").is_file():
        raise DataError(
            f"{source} is already a prepared data set (it has annotations.csv); "
            "use it directly as data.root instead of preparing it again"
        )
    if (source / "stanford_cars").is_dir():
        return "torchvision"
    if (source / "cars_train").is_dir() or _find_devkit(source) is not None:
        return "kaggle" if (source / "cars_train" / "cars_train").is_dir() else "devkit"
    if _parquet_files(source):
        return "hf_parquet"
    if _class_dirs(source / "train"):
        return "imagefolder"
    raise DataError(
        f"{source}: unrecognised layout; expected the Stanford Cars devkit (cars_train/, "
        "devkit/), torchvision's stanford_cars/, the Kaggle mirror, Hugging Face parquet files "
        "(data/train-*.parquet) or an ImageFolder (train/<class>/, test/<class>/)"
    )


def _find_devkit(root: Path) -> Path | None:
    """The folder holding cars_meta.mat: devkit/, Kaggle's car_devkit/devkit/, or `root` itself."""
    for folder in [root / "devkit", *sorted(root.glob("*/devkit")), root]:
        if (folder / "cars_meta.mat").is_file():
            return folder
    return None


def _class_dirs(folder: Path) -> list[Path]:
    """Sorted, visible subfolders of `folder` (none if it is missing)."""
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _parquet_files(source: Path) -> list[Path]:
    """The parquet files of a Hugging Face download (`data/*.parquet` or anywhere below)."""
    return sorted(source.glob("data/*.parquet")) or sorted(source.rglob("*.parquet"))


def _rel(path: Path, out: Path) -> str:
    """`path` relative to the output folder (may climb with ..), absolute across drives."""
    try:
        return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()
    except ValueError:
        return path.resolve().as_posix()


# ---------------------------------------------------------------- devkit family (.mat files)


def _load_mat(path: Path, key: str) -> np.ndarray:
    """Variable `key` of a .mat file, with a DataError naming the file if it can't be had."""
    if not path.is_file():
        raise DataError(
            f"annotation file {path} not found; unpack the devkit (car_devkit.tgz) so it is there"
        )
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except (ValueError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise DataError(f"can't read {path} as a MATLAB file: {e}") from None
    if key not in mat:
        raise DataError(f"{path} has no '{key}' variable; is it the right annotation file?")
    return mat[key]


def _scalar(value: object) -> object:
    """A plain Python value from a .mat field, whether loadmat squeezed it or left it 1×1."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.ravel()[0]
    return value.item() if isinstance(value, np.generic) else value


def _mat_strings(value: np.ndarray) -> list[str]:
    """A cell array of strings (squeezed or not, one or many) as a list."""
    return [str(_scalar(v)) for v in np.atleast_1d(np.asarray(value, dtype=object)).ravel()]


def _mat_records(value: np.ndarray, path: Path) -> list[dict]:
    """The records of a struct array (1×N, N, or a single squeezed record) as dicts."""
    records = np.atleast_1d(value).ravel()
    names = records.dtype.names or ()
    missing = [f for f in ["fname", "class", *BBOX] if f not in names]
    if missing:
        hint = " (the unlabelled test file? use cars_test_annos_withlabels.mat)" * (
            "class" in missing
        )
        raise DataError(f"{path}: annotations lack field(s) {', '.join(missing)}{hint}")
    return [{f: _scalar(r[f]) for f in names} for r in records]


def _mat_items(mat: Path, image_dir: Path, split: str, n_classes: int, root: Path, out: Path):
    """Items of one split from a devkit annotation file; classes there are 1-based."""
    items = []
    for rec in _mat_records(_load_mat(mat, "annotations"), mat):
        cls, fname = rec["class"], str(rec["fname"])
        if not isinstance(cls, int | float) or cls != int(cls) or not 1 <= cls <= n_classes:
            raise DataError(
                f"{mat}: class {cls} of {fname} is outside the {n_classes} classes of "
                "cars_meta.mat (1-based); the annotations don't match the class list"
            )
        path = image_dir / fname
        box = None if any(rec[f] is None for f in BBOX) else tuple(int(rec[f]) for f in BBOX)
        key = path.relative_to(root).as_posix()
        items.append(Item(path, _rel(path, out), key, int(cls) - 1, split, box))
    return items


def _image_dir(root: Path, name: str) -> Path:
    """cars_train/ or cars_test/, looking inside the Kaggle mirror's doubled folder."""
    folder = root / name / name if (root / name / name).is_dir() else root / name
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found; unpack {name}.tgz into {root}")
    return folder


def _test_annos(root: Path, devkit: Path) -> Path:
    """cars_test_annos_withlabels.mat (any copy suffix such as ' (1)') beside the data or devkit."""
    for folder in dict.fromkeys([root, devkit, devkit.parent]):
        found = sorted(folder.glob("cars_test_annos_withlabels*.mat"), key=lambda p: len(p.name))
        if found:
            return found[0]
    raise DataError(
        f"annotation file {root / TEST_ANNOS} not found; the test labels ship apart from the "
        f"devkit: put {TEST_ANNOS} (a copy suffix like ' (1)' is fine) in {root} or {devkit}"
    )


def _read_devkit(root: Path, out: Path) -> Source:
    """The devkit layout (also torchvision's and Kaggle's, which move the same files around)."""
    devkit = _find_devkit(root)
    if devkit is None:
        raise DataError(
            f"annotation file {root / 'devkit' / 'cars_meta.mat'} not found; "
            f"unpack the devkit (car_devkit.tgz) into {root}"
        )
    classes = _mat_strings(_load_mat(devkit / "cars_meta.mat", "class_names"))
    train_mat, test_mat = devkit / "cars_train_annos.mat", _test_annos(root, devkit)
    train = _mat_items(train_mat, _image_dir(root, "cars_train"), "train", len(classes), root, out)
    test = _mat_items(test_mat, _image_dir(root, "cars_test"), "test", len(classes), root, out)
    return Source(classes, train + test)


# ---------------------------------------------------------------- Hugging Face parquet


def _card_names(readme: Path) -> list[str] | None:
    """Class names from a dataset card's YAML (`dataset_info.features[label].dtype.class_label`)."""
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", readme.read_text(encoding="utf-8"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    infos = meta.get("dataset_info") if isinstance(meta, dict) else None
    for info in infos if isinstance(infos, list) else [infos]:
        for feature in (info or {}).get("features") or []:
            names = (feature.get("dtype") or {}) if feature.get("name") == "label" else {}
            names = names.get("class_label", {}).get("names") if isinstance(names, dict) else None
            if isinstance(names, dict) and all(str(k).isdigit() for k in names):
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
    return None


def _hf_class_names(files: list[Path], source: Path) -> list[str]:
    """Class names from the parquet `huggingface` schema metadata, else the README.md card."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(files[0]).metadata or {}
    if b"huggingface" in meta:
        features = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {})
        names = features.get("label", {}).get("names")
        if names:
            return [str(n) for n in names]
    for readme in (source / "README.md", source.parent / "README.md"):
        names = _card_names(readme) if readme.is_file() else None
        if names:
            return names
    raise DataError(
        f"{files[0]}: no class names in its 'huggingface' metadata and no dataset card "
        f"{source / 'README.md'} listing them; download the repo's README.md with the data"
    )


def _parquet_split(path: Path) -> str | None:
    """train/test from `train-00000-of-00001.parquet` or a `train/` folder; None for others."""
    for name in (path.name.split("-")[0], path.stem, path.parent.name):
        if name in SPLITS:
            return name
    return None


def _read_hf_parquet(source: Path, staging: Path) -> Source:
    """Write the parquet's image bytes to images/{split}/NNNNN.ext; labels are 0-based there."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "reading Hugging Face parquet files needs pyarrow: pip install 'twincar-fast[parquet]'"
        ) from None
    files = [f for f in _parquet_files(source) if _parquet_split(f)]
    files.sort(key=lambda f: SPLITS.index(_parquet_split(f)))  # train rows first, like the others
    if not files:
        raise DataError(f"{source}: no train-*.parquet or test-*.parquet files found")
    f = files[0]
    try:  # pyarrow's errors are OSError/ValueError subclasses; a corrupt file is the user's to fix
        classes, items, counts = _hf_class_names(files, source), [], dict.fromkeys(SPLITS, 0)
        for f in files:
            for image, label in _parquet_rows(f, pq):
                if label is None or not 0 <= label < len(classes):
                    raise DataError(
                        f"{f}: label {label} is outside the {len(classes)} class names (0-based)"
                    )
                split = _parquet_split(f)
                items.append(_hf_item(image or {}, int(label), split, counts[split], staging))
                counts[split] += 1
    except (OSError, ValueError) as e:
        raise DataError(f"can't read {f} as parquet: {' '.join(str(e).split())}") from None
    return Source(classes, items)


def _parquet_rows(path: Path, pq) -> Iterator[tuple[dict | None, int | None]]:
    """(image struct, label) of each row of a parquet file, a batch in memory at a time."""
    names = pq.read_schema(path).names
    if "image" not in names or "label" not in names:
        raise DataError(f"{path}: expected columns 'image' and 'label', found {names}")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=["image", "label"]):
        columns = batch.to_pydict()
        yield from zip(columns["image"], columns["label"], strict=True)


def _hf_item(image: dict, label: int, split: str, index: int, staging: Path) -> Item:
    """Stage one parquet image's original bytes as a file."""
    suffix = Path(image.get("path") or "").suffix.lower()
    rel = f"images/{split}/{index:05d}{suffix if suffix in IMAGE_SUFFIXES else '.jpg'}"
    path = staging / rel
    data = image.get("bytes")
    if data is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    problem = None if data is not None else "no image bytes in the parquet file"
    return Item(path, rel, rel, label, split, None, problem)


# ---------------------------------------------------------------- ImageFolder


def _read_imagefolder(root: Path, out: Path) -> Source:
    """train/<class>/ and test/<class>/ folders; class ids follow the sorted train folder names."""
    classes = [d.name for d in _class_dirs(root / "train")]
    index = {name: i for i, name in enumerate(classes)}
    if not (root / "test").is_dir():
        raise DataError(
            f"test folder {root / 'test'} not found; ImageFolder needs train/ and test/"
        )
    items = []
    for split in SPLITS:
        for folder in _class_dirs(root / split):
            if folder.name not in index:
                raise DataError(
                    f"{folder}: class not among the {len(classes)} folders of {root / 'train'}"
                )
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                    key = path.relative_to(root).as_posix()
                    items.append(Item(path, _rel(path, out), key, index[folder.name], split))
    return Source(classes, items)


# ---------------------------------------------------------------- dispatch


def read_source(layout: str, source: Path, out: Path, staging: Path) -> Source:
    """Class names and images of the download at `source`, read the way `layout` stores them."""
    if layout == "hf_parquet":
        return _read_hf_parquet(source, staging)
    if layout == "imagefolder":
        return _read_imagefolder(source, out)
    root = source / "stanford_cars" if layout == "torchvision" else source
    return _read_devkit(root, out)
