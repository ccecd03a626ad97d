"""The synthetic demo set: devkit layout, read-back, determinism, class-only-in-the-part, errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from twincar_fast.cli import main
from twincar_fast.data.demo import (
    MAX_CLASSES,
    PARTS,
    class_names,
    class_part,
    draw_car,
    make_demo_data,
    sample_attrs,
)
from twincar_fast.errors import DataError

N_CLASSES, PER_CLASS, SIZE = 4, 3, (96, 64)
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _make(out: Path, seed: int = 1) -> Path:
    return make_demo_data(out, n_classes=N_CLASSES, per_class=PER_CLASS, size=SIZE, seed=seed)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory.mktemp("demo") / "raw")


def _annotations(path: Path) -> pd.DataFrame:
    """A devkit annotation .mat as a DataFrame, read the way real-devkit loaders read it."""
    annos = scipy.io.loadmat(path)["annotations"]
    assert annos.shape[0] == 1 and annos.dtype.names == FIELDS
    rows = [[a[f].item() for f in FIELDS[:5]] + [a["fname"].item()] for a in annos[0]]
    return pd.DataFrame(rows, columns=list(FIELDS))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_devkit_layout_and_images(demo: Path):
    for split in ("train", "test"):
        jpgs = sorted((demo / f"cars_{split}").iterdir())
        assert [p.name for p in jpgs] == [f"{i:05d}.jpg" for i in range(1, 13)]
        with Image.open(jpgs[0]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", SIZE)
    for f in ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat"):
        assert (demo / f).is_file()
    assert (demo / "cars_test_annos_withlabels.mat").is_file() and (demo / "parts.csv").is_file()
    assert not [p for p in demo.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_mat_files_read_back_like_the_real_devkit(demo: Path):
    names = scipy.io.loadmat(demo / "devkit" / "cars_meta.mat")["class_names"]
    assert names.shape == (1, N_CLASSES)
    assert [n.item() for n in names[0]] == class_names(N_CLASSES)
    for split, mat in (
        ("train", demo / "devkit" / "cars_train_annos.mat"),
        ("test", demo / "cars_test_annos_withlabels.mat"),
    ):
        df = _annotations(mat)
        assert df["class"].value_counts().to_dict() == {c: PER_CLASS for c in range(1, 5)}
        assert sorted(df.fname) == sorted(p.name for p in (demo / f"cars_{split}").iterdir())
        assert (df.bbox_x1 >= 1).all() and (df.bbox_y1 >= 1).all()
        assert (df.bbox_x1 < df.bbox_x2).all() and (df.bbox_x2 <= SIZE[0]).all()
        assert (df.bbox_y1 < df.bbox_y2).all() and (df.bbox_y2 <= SIZE[1]).all()


def test_parts_csv_boxes_lie_inside_the_car_and_image(demo: Path):
    parts = pd.read_csv(demo / "parts.csv")
    assert list(parts.columns) == ["fname", "split", "x1", "y1", "x2", "y2"]
    assert len(parts) == 2 * N_CLASSES * PER_CLASS
    for split, mat in (("train", "devkit/cars_train_annos.mat"), ("test", "cars_test_annos_withlabels.mat")):  # fmt: skip
        df = _annotations(demo / mat).merge(parts[parts.split == split], on="fname")
        assert len(df) == N_CLASSES * PER_CLASS
        assert (df.x1 >= df.bbox_x1).all() and (df.x2 <= df.bbox_x2).all()
        assert (df.y1 >= df.bbox_y1).all() and (df.y2 <= df.bbox_y2).all()
        assert (df.x1 < df.x2).all() and (df.y1 < df.y2).all()
        share = (df.x2 - df.x1 + 1) * (df.y2 - df.y1 + 1) / (SIZE[0] * SIZE[1])
        assert share.between(0.01, 0.2).all()


def test_same_seed_same_bytes_other_seed_other_images(demo: Path, tmp_path: Path):
    again = _files(_make(tmp_path / "again"))
    assert again == _files(demo)
    other = _files(_make(tmp_path / "other", seed=2))
    jpgs = [k for k in other if k.endswith(".jpg")]
    assert sum(other[k] != again[k] for k in jpgs) == len(jpgs)


@pytest.mark.parametrize("size", [(96, 64), (192, 128), (64, 160)])
def test_twin_classes_differ_only_inside_the_part_box(size: tuple[int, int]):
    rng = np.random.default_rng(0)
    for first in range(0, MAX_CLASSES, 2):
        for flip in (False, True):
            attrs = dataclasses.replace(sample_attrs(rng, size), flip=flip)
            img_a, car_a, (x1, y1, x2, y2) = draw_car(attrs, first)
            img_b, car_b, part_b = draw_car(attrs, first + 1)
            assert class_part(first)[0] == class_part(first + 1)[0]
            assert (car_a, (x1, y1, x2, y2)) == (car_b, part_b)
            diff = np.abs(np.asarray(img_a, int) - np.asarray(img_b, int)).sum(axis=2)
            inside = diff[y1 - 1 : y2, x1 - 1 : x2]
            assert diff.sum() == inside.sum(), f"class {first} leaks outside its part box"
            assert (inside > 60).mean() > 0.05, f"class {first} vs its twin is barely visible"


def test_classes_of_different_parts_use_different_boxes():
    attrs = sample_attrs(np.random.default_rng(3), (192, 128))
    boxes = {class_part(k)[0]: draw_car(attrs, k)[2] for k in range(0, 2 * len(PARTS), 2)}
    assert len(set(boxes.values())) == len(PARTS)


def test_class_names_look_like_stanford_cars_and_are_unique():
    names = class_names(MAX_CLASSES)
    assert len(set(names)) == MAX_CLASSES
    assert all(
        re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+ [A-Z][A-Za-z]+ (19|20)\d\d", n) for n in names
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_classes": 1}, f"2..{MAX_CLASSES}"),
        ({"n_classes": MAX_CLASSES + 1}, f"2..{MAX_CLASSES}"),
        ({"per_class": 1}, "--per-class"),
        ({"size": (63, 128)}, "--size"),
        ({"size": (192, 32)}, "--size"),
    ],
)
def test_bad_arguments_raise_one_line(tmp_path: Path, kwargs: dict, needle: str):
    with pytest.raises(DataError, match=re.escape(needle)) as e:
        make_demo_data(tmp_path / "out", **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_folder_and_fills_an_empty_one(tmp_path: Path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make_demo_data(tmp_path / "full", n_classes=2, per_class=2, size=(64, 64))
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    make_demo_data(tmp_path / "empty", n_classes=2, per_class=2, size=(64, 64))
    assert len(list((tmp_path / "empty" / "cars_train").iterdir())) == 4


def test_cli_demo_data(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["demo-data", "--out", str(tmp_path / "bad"), "--classes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--classes" in err
    assert not (tmp_path / "bad").exists()
    argv = ["demo-data", "--out", str(tmp_path / "ok"), "--classes", "3", "--per-class", "2"]
    assert main([*argv, "--size", "64x64", "--seed", "5"]) == 0
    assert "12 images" in capsys.readouterr().err
    assert len(_annotations(tmp_path / "ok" / "devkit" / "cars_train_annos.mat")) == 6


def test_prepare_reads_the_demo_set(demo: Path, tmp_path: Path):
    from twincar_fast.data.prepare import prepare_dataset

    out = prepare_dataset(demo, tmp_path / "prepared")
    classes = pd.read_csv(out / "classes.csv")
    assert classes.label.tolist() == class_names(N_CLASSES)
    ann = pd.read_csv(out / "annotations.csv")
    assert len(ann) == 2 * N_CLASSES * PER_CLASS and len(pd.read_csv(out / "rejected.csv")) == 0
    ann["fname"] = ann.image.map(lambda p: Path(p).name)
    devkit = _annotations(demo / "devkit" / "cars_train_annos.mat")
    train = ann[ann.split == "train"].merge(devkit, on="fname", suffixes=("", "_devkit"))
    assert len(train) == N_CLASSES * PER_CLASS
    assert (train.class_id == train["class"] - 1).all()
    assert (train.label == train.class_id.map(dict(enumerate(class_names(N_CLASSES))))).all()
    assert (train.bbox_x1 == train.bbox_x1_devkit).all()
