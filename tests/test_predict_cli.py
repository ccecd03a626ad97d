"""Issue 16.4: `twincar predict` over folders and globs, CSV/JSON columns, --tta, --cam, --backend,
and unreadable files listed with their reason while the rest is predicted (exit code 1)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from twincar_fast.cli import main
from twincar_fast.ship.batch import collect_images
from twincar_fast.ship.predict import Predictor


@pytest.fixture(scope="module")
def photos(shipped, tmp_path_factory):
    """A folder tree of 6 test images (one level nested), a corrupt JPEG and a text file."""
    learn, _ = shipped
    root = tmp_path_factory.mktemp("photos") / "photos"
    (root / "more").mkdir(parents=True)
    src = sorted(str(p) for p in learn.dls.valid.items["path"])[:6]
    for i, p in enumerate(src):
        shutil.copy(p, (root if i < 3 else root / "more") / f"car{i}.jpg")
    (root / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folders_are_searched_recursively_and_failures_listed(shipped, photos, tmp_path, capsys):
    _, folder = shipped
    out = tmp_path / "preds.csv"
    assert main(["predict", str(folder), str(photos), "--out", str(out), "--batch-size", "2"]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    names = [p.split("/")[-1] for p in table["image"]]
    assert sorted(names) == sorted([f"car{i}.jpg" for i in range(6)] + ["broken.jpg"])
    assert all(p.startswith(str(photos)) for p in table["image"])  # the path as given
    assert list(table.columns[:5]) == ["image", "label", "prob", "top1", "top1_prob"]
    assert "top4_prob" in table.columns and "top5" not in table.columns  # 4 classes
    broken = table[table["image"].str.endswith("broken.jpg")].iloc[0]
    assert broken["error"] and broken["label"] == ""
    good = table[table["error"] == ""]
    expected = Predictor.from_path(folder, device="cpu").predict_proba(good["image"].tolist())
    np.testing.assert_allclose(good["prob"].astype(float), expected.max(1), atol=1e-5)
    assert (good["label"] == good["top1"]).all()
    assert "1 of 7 image(s) could not be read" in capsys.readouterr().err


def test_globs_json_tta_and_the_onnx_backend(shipped_onnx, photos, tmp_path):
    _, folder = shipped_onnx
    pattern = str(photos / "**" / "car*.jpg")
    assert [p.name for p in collect_images([pattern])] == [f"car{i}.jpg" for i in range(6)]
    runs = {}
    for name, extra in {"torch": [], "tta": ["--tta"], "onnx": ["--backend", "onnx"]}.items():
        out = tmp_path / f"{name}.json"
        assert main(["predict", str(folder), pattern, "--out", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    probs = {k: np.array([[t["prob"] for t in r["topk"]] for r in v]) for k, v in runs.items()}
    np.testing.assert_allclose(probs["onnx"], probs["torch"], atol=1e-4)
    assert [r["label"] for r in runs["onnx"]] == [r["label"] for r in runs["torch"]]
    images = [r["image"] for r in runs["torch"]]
    tta = Predictor.from_path(folder, device="cpu").predict_proba(images, tta=True)
    np.testing.assert_allclose([r["prob"] for r in runs["tta"]], tta.max(1), atol=1e-5)
    assert np.abs(probs["tta"] - probs["torch"]).max() > 1e-3


def test_cam_writes_one_overlay_per_image_and_never_replaces(shipped, photos, tmp_path, capsys):
    _, folder = shipped
    cams = tmp_path / "cams"
    out = tmp_path / "p.csv"
    argv = ["predict", str(folder), str(photos / "more"), "--cam", str(cams), "--out", str(out)]
    assert main(argv) == 1  # the broken file: listed, no overlay
    written = sorted(cams.glob("*.png"))
    assert len(written) == 3
    table = pd.read_csv(out, keep_default_na=False)
    assert sorted(table["cam"][table["error"] == ""]) == [str(p) for p in written]
    with Image.open(written[0]) as im:
        pic = np.asarray(im)
    assert pic.shape[1] >= 320 and pic.shape[0] > pic.shape[1] and pic.std() > 1  # see test_cam
    capsys.readouterr()
    assert main([*argv[:-2], "--out", str(tmp_path / "q.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "never replaced" in err
    assert main(["predict", str(folder), str(photos), "--cam", str(cams), "--backend", "onnx"]) == 2
    assert "--backend torch" in capsys.readouterr().err


def test_paths_that_match_nothing_are_one_line_errors(shipped, tmp_path, capsys):
    _, folder = shipped
    (tmp_path / "empty").mkdir()
    for arg, needle in [
        (str(tmp_path / "empty"), "no image files"),
        (str(tmp_path / "*.png"), "no file matches"),
        (str(tmp_path / "missing.jpg"), "image not found"),
    ]:
        assert main(["predict", str(folder), arg]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_a_sideways_phone_photo_is_predicted_upright(shipped, tmp_path):
    """Issue 29.5: EXIF orientation 6 (stored turned a quarter) is applied before predicting."""
    learn, folder = shipped
    upright = Image.open(sorted(learn.dls.valid.items["path"])[0]).convert("RGB")
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # show turned 90° clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "no_exif.png")
    predictor = Predictor.from_path(folder, device="cpu")
    names = ["upright.png", "phone.png", "no_exif.png"]
    probs = predictor.predict_proba([str(tmp_path / n) for n in names])
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-5)
    assert np.abs(probs[2] - probs[0]).max() > 1e-3  # turned pixels do change the answer
    pil = predictor.predict_proba(Image.open(tmp_path / "phone.png"))  # as the app may give it
    np.testing.assert_allclose(pil[0], probs[0], atol=1e-5)


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "cuda"])
def test_devices_that_are_not_there_are_one_line(shipped, capsys, device):
    """Issue 29.15: --device bogus and --device cuda without a GPU."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: cuda:99 stands for the missing one")
    learn, folder = shipped
    image = str(sorted(learn.dls.valid.items["path"])[0])
    assert main(["predict", str(folder), image, "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"device {device!r}" in err, err
    assert main(["predict", str(folder), image, "--device", "cuda", "--backend", "onnx"]) == 2
    assert "runs on the CPU" in capsys.readouterr().err
