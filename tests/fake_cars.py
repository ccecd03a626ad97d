"""Builders of tiny Stanford Cars downloads in every real layout, from one shared sample list.

`make_samples()` draws the images once; `write_devkit`, `write_torchvision`, `write_kaggle`,
`write_hf_parquet` and `write_imagefolder` lay the same bytes out the way each source does, so a
test can check that every layout prepares to the same table. Samples are ordered train then test,
class by class, with increasing file names: the order every layout lists them in.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

CLASS_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
ANNO_FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
W, H = 40, 30


@dataclass
class Sample:
    """One image of the fake download."""

    fname: str  # devkit file name, e.g. "00001.jpg" (numbered per split, like the devkit)
    class_id: int  # 0-based
    split: str  # train | test
    bbox: tuple[int, int, int, int]  # 1-based inclusive, like the devkit
    data: bytes  # the file's bytes (a JPEG unless a test swaps in something else)


def jpeg_bytes(img: Image.Image, **save_args) -> bytes:
    """`img` encoded as a JPEG."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **save_args)
    return buf.getvalue()


def draw_car(
    class_id: int, index: int, size: tuple[int, int] = (W, H)
) -> tuple[Image.Image, tuple]:
    """A noisy image with a class-coloured box; returns it and the box (1-based inclusive)."""
    rng = np.random.default_rng(1000 * class_id + index)
    w, h = size
    arr = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    x, y = 2 + 3 * class_id + index % 3, 3 + index % 4
    bw, bh = w // 2, h // 2
    arr[y : y + bh, x : x + bw] = (220, 60 + 70 * class_id, 30 + 20 * index % 200)
    return Image.fromarray(arr), (x + 1, y + 1, x + bw, y + bh)


def make_samples(
    n_classes: int = 3, n_train: int = 3, n_test: int = 2, size: tuple[int, int] = (W, H)
) -> list[Sample]:
    """Samples for `n_classes` classes with `n_train` train and `n_test` test images each."""
    samples = []
    for split, n in (("train", n_train), ("test", n_test)):
        number = 0
        for c in range(n_classes):
            for i in range(n):
                number += 1
                img, box = draw_car(c, i + (100 if split == "test" else 0), size)
                samples.append(Sample(f"{number:05d}.jpg", c, split, box, jpeg_bytes(img)))
    return samples


def replace_data(samples: list[Sample], index: int, data: bytes) -> list[Sample]:
    """A copy of `samples` whose `index`-th file holds `data` instead."""
    samples = list(samples)
    samples[index] = dataclasses.replace(samples[index], data=data)
    return samples


def _mat_int(v: int) -> np.generic:
    """An integer in the smallest unsigned type MATLAB would keep it in, as the devkit does."""
    return np.uint8(v) if v < 256 else np.uint16(v)


def annotations_struct(samples: list[Sample], labelled: bool = True) -> np.ndarray:
    """A 1×N struct array like the devkit's `annotations` (class 1-based; unlabelled drops it)."""
    fields = ANNO_FIELDS if labelled else [f for f in ANNO_FIELDS if f != "class"]
    arr = np.zeros((1, len(samples)), dtype=[(f, "O") for f in fields])
    for i, s in enumerate(samples):
        values = dict(zip(ANNO_FIELDS[:4], map(_mat_int, s.bbox), strict=True))
        values.update({"class": np.uint8(s.class_id + 1), "fname": s.fname})
        arr[0, i] = tuple(values[f] for f in fields)
    return arr


def write_mat_layout(
    root: Path,
    samples: list[Sample],
    train_dir: str,
    test_dir: str,
    devkit_dir: str,
    test_annos: str,
    class_names: list[str] = CLASS_NAMES,
) -> Path:
    """Write images, devkit .mat files and the labelled test file at the given places under `root`."""
    for s in samples:
        path = root / (train_dir if s.split == "train" else test_dir) / s.fname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s.data)
    devkit = root / devkit_dir
    devkit.mkdir(parents=True, exist_ok=True)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    names = np.empty((1, len(class_names)), dtype=object)
    names[0, :] = class_names
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": annotations_struct(train)})
    unlabelled = annotations_struct(test, labelled=False)
    scipy.io.savemat(devkit / "cars_test_annos.mat", {"annotations": unlabelled})
    (root / test_annos).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / test_annos, {"annotations": annotations_struct(test)})
    return root


def write_devkit(root: Path, samples: list[Sample], class_names: list[str] = CLASS_NAMES) -> Path:
    """The original download: cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat."""
    return write_mat_layout(
        root,
        samples,
        "cars_train",
        "cars_test",
        "devkit",
        "cars_test_annos_withlabels.mat",
        class_names,
    )


def write_torchvision(root: Path, samples: list[Sample]) -> Path:
    """torchvision's StanfordCars root: the devkit layout inside `root`/stanford_cars/."""
    write_devkit(root / "stanford_cars", samples)
    return root


def write_kaggle(root: Path, samples: list[Sample]) -> Path:
    """The Kaggle mirror: doubled image folders, car_devkit/devkit/, a ' (1)'-suffixed test file."""
    return write_mat_layout(
        root,
        samples,
        "cars_train/cars_train",
        "cars_test/cars_test",
        "car_devkit/devkit",
        "cars_test_annos_withlabels (1).mat",
    )


def hf_card(class_names: list[str]) -> str:
    """A dataset card README.md whose YAML header lists the class names the way the Hub writes it."""
    lines = ["---", "dataset_info:", "  features:", "  - name: image", "    dtype: image"]
    lines += ["  - name: label", "    dtype:", "      class_label:", "        names:"]
    lines += [f"          '{i}': {name}" for i, name in enumerate(class_names)]
    lines += ["  splits:", "  - name: train", "  - name: test", "---", "", "# Stanford Cars", ""]
    return "\n".join(lines)


def write_hf_parquet(
    root: Path,
    samples: list[Sample],
    names_in: str = "schema",
    class_names: list[str] = CLASS_NAMES,
) -> Path:
    """tanganke/stanford_cars as downloaded: data/{split}-00000-of-00001.parquet (+ README.md).

    Args:
        names_in: where the class names live: "schema" (the `huggingface` metadata), "readme"
            (only the dataset card) or "none".
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf_meta = {"info": {"features": {"image": {"_type": "Image"}}}}
    hf_meta["info"]["features"]["label"] = {"names": class_names, "_type": "ClassLabel"}
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [s for s in samples if s.split == split]
        images = pa.array([{"bytes": s.data, "path": s.fname} for s in rows], type=image_type)
        labels = pa.array([s.class_id for s in rows], type=pa.int64())
        table = pa.table({"image": images, "label": labels})
        if names_in == "schema":
            table = table.replace_schema_metadata({"huggingface": json.dumps(hf_meta)})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    if names_in == "readme":
        (root / "README.md").write_text(hf_card(class_names), encoding="utf-8")
    return root


def write_imagefolder(
    root: Path, samples: list[Sample], class_names: list[str] = CLASS_NAMES
) -> Path:
    """train/<class name>/<fname> and test/<class name>/<fname>."""
    for s in samples:
        path = root / s.split / class_names[s.class_id] / s.fname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s.data)
    return root


WRITERS = {
    "devkit": write_devkit,
    "torchvision": write_torchvision,
    "kaggle": write_kaggle,
    "hf_parquet": write_hf_parquet,
    "imagefolder": write_imagefolder,
}
