"""Issue 29 items 4 and 15, issue 31 item 6: `--boxes` rows are checked one by one and matched by
path, then by a unique file name; a bad row is that image's error, never the whole image."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_cfg, sensitive_export

from twincar_fast.cli import main
from twincar_fast.data import read_annotations
from twincar_fast.errors import TwincarError
from twincar_fast.ship.predict import Predictor

TOL = 1e-4
BOX = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]


@pytest.fixture(scope="module")
def box_model(tiny_data, tmp_path_factory):
    """A tiny input-sensitive model trained on car-box crops, exported."""
    out = tmp_path_factory.mktemp("box_model")
    cfg = make_tiny_cfg(tiny_data, out)
    cfg.train.mixed_precision = "none"
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True, bbox_margin=0.16, resize="squish")
    _, model_dir = sensitive_export(cfg, out / "models" / "box-run")
    return model_dir


@pytest.fixture
def photos(tiny_data, tmp_path):
    """10 test images copied to photos/car{i}.jpg, and their true boxes."""
    df = read_annotations(tiny_data)
    test = df[df["split"] == "test"].iloc[::2].head(10)
    (tmp_path / "photos").mkdir()
    paths = []
    for i, src in enumerate(test["path"]):
        paths.append(tmp_path / "photos" / f"car{i}.jpg")
        shutil.copy(src, paths[-1])
    return [str(p) for p in paths], test[BOX].to_numpy().astype(float)


def write_boxes(path, rows) -> str:
    lines = ["image,x1,y1,x2,y2", *(",".join(str(v) for v in row) for row in rows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_each_bad_row_is_an_error_of_its_image(box_model, photos, tmp_path, capsys):
    paths, boxes = photos
    x1, y1, x2, y2 = boxes[0]
    bad = {  # image index: (row, reason)
        1: ((x2, y1, x1, y2), "empty or inverted"),
        2: ((100, 100, 120, 120), "outside the 48×32 image"),
        3: (("", y1, x2, y2), "x1 is empty"),
        4: ((x1, y1), "x2 is empty"),  # a short row
        5: ((x1, y1, "inf", y2), "x2 'inf' is not a finite number"),
        6: ((x1, "1e309", x2, y2), "y1 '1e309' is not a finite number"),
        7: ((10, 10, 10, 10), "empty or inverted"),  # zero area
        8: ((x1, "abc", x2, y2), "y1 'abc' is not a number"),
    }
    rows = [(paths[0], *boxes[0]), (paths[9], *boxes[9])]
    rows += [(paths[i], *row) for i, (row, _) in bad.items()]
    csv = write_boxes(tmp_path / "boxes.csv", rows)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(box_model), *paths, "--boxes", csv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "8 of 10 image(s)" in err and "Traceback" not in err
    table = pd.read_csv(out, keep_default_na=False)
    for i, (_, reason) in bad.items():
        assert reason in table["error"][i] and table["label"][i] == "", (i, table["error"][i])
    expected = Predictor.from_path(box_model, device="cpu").predict_proba(
        [paths[0], paths[9]], boxes=[boxes[0], boxes[9]]
    )
    np.testing.assert_allclose(table["prob"][[0, 9]].astype(float), expected.max(1), atol=TOL)
    assert table["error"][0] == table["error"][9] == ""


def test_bad_boxes_in_python_are_one_line_errors(box_model, photos):
    paths, boxes = photos
    predictor = Predictor.from_path(box_model, device="cpu")
    x1, y1, x2, y2 = boxes[0]
    cases = {
        (x2, y1, x1, y2): "empty or inverted",
        (x1, y1, x1, y2): "empty or inverted",
        (x1, y1, float("inf"), y2): "finite",
        (100, 100, 120, 120): "outside the 48×32 image",
        (x1, "abc", x2, y2): "give 4 numbers",
    }
    for box, needle in cases.items():
        with pytest.raises(TwincarError) as e:
            predictor.predict(paths[0], boxes=[box])
        assert needle in str(e.value) and "\n" not in str(e.value), (box, str(e.value))
    nan = [float("nan")] * 4  # all NaN: no box, as in annotations.csv
    with pytest.warns(UserWarning, match="car-box crops"):
        assert predictor.predict(paths[0], boxes=[nan])[0]["box"] is None


def test_an_image_listed_twice_is_refused(box_model, photos, tmp_path, capsys):
    paths, boxes = photos
    csv = write_boxes(tmp_path / "boxes.csv", [(paths[0], *boxes[0]), (paths[0], 1, 1, 20, 20)])
    assert main(["predict", str(box_model), paths[0], "--boxes", csv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rows 2 and 3 both give a box" in err


@pytest.mark.parametrize(
    ("text", "needle"),
    [("", "the file is empty"), ("image,x1,y1,x2,y2\n", "no rows"), ("a,b\n1,2\n", "missing")],
)
def test_empty_or_headless_box_files_are_one_line(
    box_model, photos, tmp_path, capsys, text, needle
):
    paths, _ = photos
    (tmp_path / "boxes.csv").write_text(text)
    assert main(["predict", str(box_model), paths[0], "--boxes", str(tmp_path / "boxes.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_boxes_by_file_name_and_rows_matching_nothing(box_model, photos, tmp_path, capsys):
    paths, boxes = photos
    (tmp_path / "elsewhere").mkdir()
    names = [(f"car{i}.jpg", *boxes[i]) for i in range(4)]
    csv = write_boxes(tmp_path / "elsewhere" / "boxes.csv", [*names, ("gone.jpg", 1, 1, 9, 9)])
    out = tmp_path / "preds.csv"
    assert main(["predict", str(box_model), *paths[:4], "--boxes", csv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 row(s) match no image given" in err and "row 6 (gone.jpg)" in err
    assert "have no box" not in err
    expected = Predictor.from_path(box_model, device="cpu").predict_proba(paths[:4], boxes[:4])
    np.testing.assert_allclose(pd.read_csv(out)["prob"], expected.max(1), atol=TOL)
    # two images of one name: the name alone can't say which
    (tmp_path / "other").mkdir()
    twin = shutil.copy(paths[0], tmp_path / "other" / "car0.jpg")
    assert main(["predict", str(box_model), paths[0], str(twin), "--boxes", csv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'car0.jpg', the file name of 2 images" in err
