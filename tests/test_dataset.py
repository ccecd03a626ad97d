"""Reading and checking a prepared set, and `ensure_dataset` building or explaining a missing one."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import CLASS_NAMES, make_tiny_cfg

from twincar_fast.data import ensure_dataset, read_annotations, read_classes, read_rejected
from twincar_fast.data.demo import make_demo_data
from twincar_fast.errors import DataError


@pytest.fixture
def tiny_copy(tiny_data, tmp_path) -> Path:
    """A writable copy of the tiny set."""
    return Path(shutil.copytree(tiny_data, tmp_path / "copy"))


def one_line_error(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_read_classes_in_file_order(tiny_data):
    assert read_classes(tiny_data) == CLASS_NAMES


def test_read_annotations_adds_absolute_paths(tiny_data, monkeypatch):
    monkeypatch.chdir(tiny_data.parent)  # a relative data dir still gives absolute paths
    df = read_annotations(Path(tiny_data.name))
    assert len(df) == 4 * (12 + 6)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert df.loc[0, "path"] == str((tiny_data / df.loc[0, "image"]).resolve())
    assert set(df["split"]) == {"train", "test"}
    assert df[["bbox_x1", "bbox_x2"]].notna().all().all()
    assert len(read_rejected(tiny_data)) == 0


def test_missing_annotations_says_run_prepare(tmp_path):
    (tmp_path / "classes.csv").write_text("class_id,label\n0,a\n1,b\n")
    msg = one_line_error(read_annotations, tmp_path)
    assert "annotations.csv" in msg and "twincar prepare" in msg
    msg = one_line_error(read_classes, tmp_path / "nowhere")
    assert "classes.csv" in msg and "twincar prepare" in msg


def test_missing_column(tiny_copy):
    df = pd.read_csv(tiny_copy / "annotations.csv").drop(columns=["split"])
    df.to_csv(tiny_copy / "annotations.csv", index=False)
    assert "split" in one_line_error(read_annotations, tiny_copy)


def test_class_id_out_of_range(tiny_copy):
    df = pd.read_csv(tiny_copy / "annotations.csv")
    df.loc[5, "class_id"] = 9
    df.to_csv(tiny_copy / "annotations.csv", index=False)
    msg = one_line_error(read_annotations, tiny_copy)
    assert "class_id" in msg and df.loc[5, "image"] in msg
    assert "with class_id 9)" in msg  # issue 12.18: not np.int64(9)


def test_label_must_match_classes(tiny_copy):
    df = pd.read_csv(tiny_copy / "annotations.csv")
    df.loc[3, "label"] = CLASS_NAMES[3]
    df.loc[3, "class_id"] = 0
    df.to_csv(tiny_copy / "annotations.csv", index=False)
    msg = one_line_error(read_annotations, tiny_copy)
    assert "1 rows" in msg and df.loc[3, "image"] in msg and "classes.csv" in msg


def test_duplicate_class_labels(tiny_copy):
    (tiny_copy / "classes.csv").write_text("class_id,label\n0,a\n1,a\n")
    assert "'a'" in one_line_error(read_classes, tiny_copy)


def test_missing_images_named_and_counted(tiny_copy):
    df = pd.read_csv(tiny_copy / "annotations.csv")
    for rel in df["image"][[4, 9]]:
        (tiny_copy / rel).unlink()
    msg = one_line_error(read_annotations, tiny_copy)
    assert "2 of 72 images are missing" in msg
    assert str(tiny_copy.resolve() / df["image"][4]) in msg


def test_ensure_dataset_returns_prepared_root(tiny_data, tmp_path):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    assert ensure_dataset(cfg) == tiny_data


def test_ensure_dataset_missing_is_one_actionable_line(tmp_path):
    cfg = make_tiny_cfg(tmp_path / "cars", tmp_path)
    msg = one_line_error(ensure_dataset, cfg)
    for part in (
        str(tmp_path / "cars"),
        "twincar prepare SOURCE --out",
        "tanganke/stanford_cars",
        "jessicali9530/stanford-cars-dataset",
        "StanfordCars",
        "data.source",
        "python -m twincar_fast.run experiments/demo.yaml",
    ):
        assert part in msg, part
    assert not (tmp_path / "cars").exists()  # nothing half-made


def demo_cfg(root: Path, out: Path):
    cfg = make_tiny_cfg(root, out)
    cfg.data = dataclasses.replace(
        cfg.data, demo=True, demo_classes=2, demo_per_class=4, demo_size=[64, 64], demo_seed=3
    )
    return cfg


def test_ensure_dataset_builds_demo_once(tmp_path):
    cfg = demo_cfg(tmp_path / "demo", tmp_path)
    root = ensure_dataset(cfg)
    assert root == tmp_path / "demo"
    df = read_annotations(root)
    assert len(read_classes(root)) == 2
    assert df.groupby(["split", "class_id"]).size().tolist() == [4, 4, 4, 4]
    assert (root / "raw" / "parts.csv").is_file()
    stamp = (root / "annotations.csv").stat().st_mtime_ns
    assert ensure_dataset(cfg) == root  # already there: nothing rebuilt
    assert (root / "annotations.csv").stat().st_mtime_ns == stamp


def test_ensure_dataset_reuses_a_drawn_demo(tmp_path):
    root = tmp_path / "demo"
    make_demo_data(root / "raw", n_classes=2, per_class=4, size=(64, 64), seed=3)
    assert ensure_dataset(demo_cfg(root, tmp_path)) == root  # raw/ present, annotations not yet
    assert len(read_annotations(root)) == 16


def test_ensure_dataset_prepares_source(tmp_path):
    raw = make_demo_data(tmp_path / "raw", n_classes=2, per_class=4, size=(64, 64), seed=1)
    cfg = make_tiny_cfg(tmp_path / "prepared", tmp_path)
    cfg.data.source = str(raw)
    root = ensure_dataset(cfg)
    assert (root / "annotations.csv").is_file()
    assert len(read_annotations(root)) == 16


@pytest.mark.slow  # three processes each load the stack (~20 s on 2 cores)
def test_first_runs_started_together_share_one_demo_build(tmp_path):
    """Issue 12.5: concurrent first runs raced on raw/ ('Directory not empty'); a killed build's
    .raw.XXXX folder stayed behind."""
    root = tmp_path / "demo"
    (root / ".raw.killed").mkdir(parents=True)  # what a build killed mid-way leaves
    code = (
        "from twincar_fast.config import ExperimentConfig; "
        "from twincar_fast.data import ensure_dataset; cfg = ExperimentConfig(); "
        f"cfg.data.root = {str(root)!r}; cfg.data.demo = True; cfg.data.demo_classes = 3; "
        "cfg.data.demo_per_class = 6; cfg.data.demo_size = [96, 64]; ensure_dataset(cfg)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert len(read_annotations(root)) == 36 and not list(root.glob(".raw.*"))


def test_a_class_without_training_images_is_refused_before_training(tiny_copy, tmp_path, capsys):
    """Issue 29.11: a class with 0 training images trained, exit 0, and shipped in the model."""
    from twincar_fast.cli import main
    from twincar_fast.config import save_config

    df = pd.read_csv(tiny_copy / "annotations.csv")
    empty = CLASS_NAMES[2]
    df = df[(df["label"] != empty) | (df["split"] == "test")]  # its test images stay
    df.to_csv(tiny_copy / "annotations.csv", index=False)
    cfg = make_tiny_cfg(tiny_copy, tmp_path)
    cfg.data = dataclasses.replace(cfg.data, valid_pct=0.0)
    cfg.train = dataclasses.replace(cfg.train, early_stopping=0, plateau_patience=0)
    yaml = save_config(cfg, tmp_path / "tiny.yaml")
    assert main(["train", str(yaml)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 class(es) have no training image" in err, err
    assert repr(empty) in err and "data.allow_empty_classes=true" in err
    assert not (tmp_path / "reports").exists()  # refused before any run folder
    cfg.data = dataclasses.replace(cfg.data, allow_empty_classes=True)
    assert ensure_dataset(cfg) == tiny_copy  # accepted when the config says so
