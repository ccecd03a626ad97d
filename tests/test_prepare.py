"""`prepare` reads every real Stanford Cars layout into the same tables, rejects broken images,
presizes, and fails with one clear line, leaving nothing half-written."""

from __future__ import annotations

import io
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.io
from fake_cars import (
    CLASS_NAMES,
    WRITERS,
    jpeg_bytes,
    make_samples,
    replace_data,
    write_devkit,
    write_hf_parquet,
    write_imagefolder,
)
from PIL import Image

from twincar_fast.cli import main
from twincar_fast.data.images import open_rgb
from twincar_fast.data.layouts import _mat_records
from twincar_fast.data.prepare import detect_layout, prepare_dataset
from twincar_fast.errors import DataError

BBOX = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
HAS_BOXES = {"devkit", "torchvision", "kaggle"}


@pytest.fixture(scope="module")
def samples():
    return make_samples()


def expected_table(samples, with_boxes: bool) -> pd.DataFrame:
    """annotations.csv (without `image`) as the samples say it should be."""
    rows = [
        [CLASS_NAMES[s.class_id], s.class_id, s.split, *(s.bbox if with_boxes else [pd.NA] * 4)]
        for s in samples
    ]
    return pd.DataFrame(rows, columns=["label", "class_id", "split", *BBOX]).astype(
        {c: "Int64" for c in BBOX}
    )


def read_ann(out) -> pd.DataFrame:
    return pd.read_csv(out / "annotations.csv", dtype={c: "Int64" for c in BBOX})


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_same_images(out, ann, samples):
    for image, s in zip(ann["image"], samples, strict=True):
        np.testing.assert_array_equal(np.asarray(open_rgb(out / image)), pixels(s.data))


@pytest.mark.parametrize("layout", [*WRITERS, "hf_readme"])
def test_every_layout_prepares_to_the_same_table(tmp_path, samples, layout):
    if layout == "hf_readme":
        src = write_hf_parquet(tmp_path / "src", samples, names_in="readme")
    else:
        src = WRITERS[layout](tmp_path / "src", samples)
    assert detect_layout(src) == layout.replace("hf_readme", "hf_parquet")
    out = prepare_dataset(src, tmp_path / "out")
    ann = read_ann(out)
    assert list(ann.columns) == ["image", "label", "class_id", "split", *BBOX]
    pd.testing.assert_frame_equal(
        ann.drop(columns="image"), expected_table(samples, layout in HAS_BOXES)
    )
    assert_same_images(out, ann, samples)
    classes = pd.read_csv(out / "classes.csv")
    assert classes.to_dict("list") == {"class_id": [0, 1, 2], "label": CLASS_NAMES}
    assert pd.read_csv(out / "rejected.csv").empty


def test_folder_images_are_referenced_in_place_parquet_images_written_out(tmp_path, samples):
    devkit = write_devkit(tmp_path / "raw", samples)
    ann = read_ann(prepare_dataset(devkit, tmp_path / "a" / "out"))
    assert ann["image"][0] == "../../raw/cars_train/00001.jpg"
    assert not list((tmp_path / "a" / "out").glob("**/*.jpg"))
    hf = write_hf_parquet(tmp_path / "hf", samples)
    out = prepare_dataset(hf, tmp_path / "b")
    ann = read_ann(out)
    assert ann["image"].tolist()[:2] == ["images/train/00000.jpg", "images/train/00001.jpg"]
    assert ann["image"].tolist()[-1] == "images/test/00005.jpg"
    assert (out / ann["image"][0]).read_bytes() == samples[0].data  # original bytes kept


def test_devkit_variants_test_labels_in_devkit_and_single_record_files(tmp_path):
    one = make_samples(n_classes=1, n_train=1, n_test=1)  # 1×1 structs and a 1×1 cell
    src = write_devkit(tmp_path / "src", one)
    (src / "cars_test_annos_withlabels.mat").rename(
        src / "devkit" / "cars_test_annos_withlabels (2).mat"
    )
    ann = read_ann(prepare_dataset(src, tmp_path / "out"))
    pd.testing.assert_frame_equal(ann.drop(columns="image"), expected_table(one, True))


@pytest.mark.parametrize("squeeze", [True, False])
def test_mat_records_read_both_squeeze_forms(tmp_path, samples, squeeze):
    src = write_devkit(tmp_path / "src", samples)
    path = src / "devkit" / "cars_train_annos.mat"
    raw = scipy.io.loadmat(path, squeeze_me=squeeze)["annotations"]
    records = _mat_records(raw, path)
    train = [s for s in samples if s.split == "train"]
    assert [r["fname"] for r in records] == [s.fname for s in train]
    assert [int(r["class"]) - 1 for r in records] == [s.class_id for s in train]
    assert [tuple(int(r[f]) for f in BBOX) for r in records] == [s.bbox for s in train]


BROKEN = {1: ("zero", b""), 4: ("truncated", None), 10: ("text", b"not an image\n")}


@pytest.mark.parametrize("layout", ["devkit", "hf_parquet", "imagefolder"])
def test_broken_images_are_rejected_and_excluded(tmp_path, samples, layout):
    bad = samples
    for index, (_, data) in BROKEN.items():
        bad = replace_data(bad, index, data if data is not None else samples[index].data[:400])
    out = prepare_dataset(WRITERS[layout](tmp_path / "src", bad), tmp_path / "out")
    ann, rejected = read_ann(out), pd.read_csv(out / "rejected.csv")
    kept = [s for i, s in enumerate(samples) if i not in BROKEN]
    pd.testing.assert_frame_equal(
        ann.drop(columns="image"), expected_table(kept, layout in HAS_BOXES)
    )
    assert_same_images(out, ann, kept)
    assert len(rejected) == 3 and not set(rejected["image"]) & set(ann["image"])
    reasons = rejected["reason"].tolist()
    assert reasons[0] == "empty file (0 bytes)"
    assert "truncated" in reasons[1].lower() and reasons[2].startswith("not an image")
    names = [s.fname for i, s in enumerate(samples) if i in BROKEN]
    if layout != "hf_parquet":  # parquet rows are renumbered per split
        assert [p.rsplit("/", 1)[1] for p in rejected["image"]] == names


def test_odd_but_valid_images_are_kept(tmp_path, samples):
    rgb = Image.open(io.BytesIO(samples[0].data))
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    cmyk = jpeg_bytes(rgb.convert("CMYK"))
    odd = replace_data(replace_data(samples, 0, png.getvalue()), 2, cmyk)
    odd = replace_data(odd, 3, jpeg_bytes(rgb.convert("L")))
    out = prepare_dataset(write_devkit(tmp_path / "src", odd), tmp_path / "out")
    ann = read_ann(out)
    assert len(ann) == len(samples) and pd.read_csv(out / "rejected.csv").empty
    assert all(open_rgb(out / p).mode == "RGB" for p in ann["image"])


def test_presize_writes_smaller_copies_with_scaled_boxes(tmp_path):
    big = make_samples(size=(80, 60))
    src = write_devkit(tmp_path / "src", big)
    out = prepare_dataset(src, tmp_path / "out", presize=30)
    ann = read_ann(out)
    assert list(ann.columns)[-1] == "source_image"
    assert ann["image"][0] == "presized_30/cars_train/00001.jpg"
    assert ann["source_image"][0] == "../src/cars_train/00001.jpg"
    for row, s in zip(ann.itertuples(), big, strict=True):
        with Image.open(out / row.image) as img:
            assert img.size == (40, 30) and img.format == "JPEG"
        # Half the size: a 1-based inclusive box [x1, x2] becomes [(x1-1)/2+1, x2/2].
        x1, y1, x2, y2 = s.bbox
        expected = (round((x1 - 1) / 2) + 1, round((y1 - 1) / 2) + 1, round(x2 / 2), round(y2 / 2))
        assert (row.bbox_x1, row.bbox_y1, row.bbox_x2, row.bbox_y2) == expected
        assert (out / row.source_image).resolve() == (src / f"cars_{s.split}" / s.fname).resolve()


def test_presize_keeps_images_that_are_already_small(tmp_path, samples):
    out = prepare_dataset(write_devkit(tmp_path / "src", samples), tmp_path / "out", presize=30)
    ann = read_ann(out)
    assert (ann["image"] == ann["source_image"]).all()
    pd.testing.assert_frame_equal(
        ann.drop(columns=["image", "source_image"]), expected_table(samples, True)
    )


# ---------------------------------------------------------------- errors


def _error(source, out, **kw) -> str:
    with pytest.raises(DataError) as info:
        prepare_dataset(source, out, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unrecognised_layout(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    msg = _error(tmp_path / "junk", tmp_path / "out")
    assert "unrecognised layout" in msg and str(tmp_path / "junk") in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "missing", ["cars_test_annos_withlabels.mat", "devkit/cars_train_annos.mat", "devkit"]
)
def test_missing_annotation_file(tmp_path, samples, missing):
    src = write_devkit(tmp_path / "src", samples)
    victim = src / missing
    if victim.is_dir():
        for f in victim.iterdir():
            f.unlink()
        victim.rmdir()
    else:
        victim.unlink()
    msg = _error(src, tmp_path / "out")
    shown = "devkit/cars_meta.mat" if missing == "devkit" else missing
    assert "not found" in msg and str(src / shown) in msg


def test_unlabelled_test_file_is_named(tmp_path, samples):
    src = write_devkit(tmp_path / "src", samples)
    (src / "cars_test_annos_withlabels.mat").unlink()
    (src / "devkit" / "cars_test_annos.mat").rename(src / "cars_test_annos_withlabels.mat")
    msg = _error(src, tmp_path / "out")
    assert "cars_test_annos_withlabels.mat" in msg and "class" in msg


def test_label_outside_class_list_leaves_nothing(tmp_path, samples):
    src = write_devkit(tmp_path / "src", samples, class_names=CLASS_NAMES[:2])
    msg = _error(src, tmp_path / "out")
    assert str(src / "devkit" / "cars_train_annos.mat") in msg and "class 3" in msg
    assert not (tmp_path / "out").exists()


def test_parquet_label_outside_class_list_leaves_existing_out_clean(tmp_path, samples):
    src = write_hf_parquet(tmp_path / "src", samples, class_names=CLASS_NAMES[:2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _error(src, out)
    assert "train-00000-of-00001.parquet" in msg and "label 2" in msg
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # staged images removed too


def test_imagefolder_class_missing_from_train(tmp_path, samples):
    src = write_imagefolder(tmp_path / "src", samples)
    (src / "test" / "Tesla Model S Sedan 2012").mkdir()
    msg = _error(src, tmp_path / "out")
    assert str(src / "test" / "Tesla Model S Sedan 2012") in msg


def test_already_prepared_out_and_source(tmp_path, samples):
    src = write_devkit(tmp_path / "src", samples)
    out = prepare_dataset(src, tmp_path / "out")
    before = (out / "annotations.csv").read_bytes()
    msg = _error(src, out)
    assert str(out / "annotations.csv") in msg and "already prepared" in msg
    assert (out / "annotations.csv").read_bytes() == before
    msg = _error(out, tmp_path / "again")
    assert "already a prepared data set" in msg and str(out) in msg


def test_missing_pyarrow_is_explained(tmp_path, samples, monkeypatch):
    src = write_hf_parquet(tmp_path / "src", samples)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    assert "pip install 'twincar-fast[parquet]'" in _error(src, tmp_path / "out")


def test_parquet_without_class_names(tmp_path, samples):
    src = write_hf_parquet(tmp_path / "src", samples, names_in="none")
    assert "README.md" in _error(src, tmp_path / "out")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    code = main(["prepare", str(tmp_path / "bad"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "unrecognised layout" in err and "Traceback" not in err


def test_cli_prepares_and_summarises(tmp_path, samples, capsys):
    src = write_devkit(tmp_path / "src", samples)
    assert main(["prepare", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "devkit" in out and "9 train" in out and "6 test" in out and "0 rejected" in out


def test_corrupt_parquet_is_named(tmp_path, samples):
    src = write_hf_parquet(tmp_path / "src", samples)
    bad = src / "data" / "test-00000-of-00001.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    msg = _error(src, tmp_path / "out")
    assert str(bad) in msg and "parquet" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("names", [["001", "002", "010"], ["NA", "None", "nan"]])
def test_class_names_are_kept_as_written(tmp_path, samples, names):
    """Issue 12.10: pandas turned folders 001/010 into 1/10 and NA/None into NaN."""
    from twincar_fast.data import read_annotations, read_classes

    out = prepare_dataset(write_imagefolder(tmp_path / "src", samples, names), tmp_path / "out")
    assert sorted(read_classes(out)) == sorted(names)
    assert set(read_annotations(out)["label"]) == set(names)


def test_out_inside_source_empty_classes_and_nothing_usable(tmp_path, samples, capsys):
    """Issue 12.11: --out inside SOURCE/train became a class; an empty class passed silently;
    a source whose every image was rejected prepared 'fine'."""
    src = write_imagefolder(tmp_path / "src", samples)
    msg = _error(src, src / "train" / "prepared")
    assert "lies inside the source" in msg
    assert not (src / "train" / "prepared").exists()
    dev = write_devkit(tmp_path / "dev", samples)
    gone = [s for s in samples if s.class_id == 2 and s.split == "train"]
    for s in gone:  # class 2 keeps its test images only
        (dev / "cars_train" / s.fname).write_bytes(b"")
    prepare_dataset(dev, tmp_path / "out")
    assert "1 class(es) have no training images" in capsys.readouterr().err
    for s in samples:
        (dev / f"cars_{s.split}" / s.fname).write_bytes(b"")
    assert "none of its" in _error(dev, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
