"""`interpret_run`: every figure and table of a saved run, Grad-CAM++ on the class-telling detail."""

from __future__ import annotations

import dataclasses
import html
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_cfg
from fastai.learner import Learner
from PIL import Image

from twincar_fast.analysis.evaluate import load_run_learner
from twincar_fast.analysis.gradcam import (
    batch_tensor,
    box_masks,
    box_mass_ratio,
    find_target_layer,
    gradcam_maps,
)
from twincar_fast.analysis.interpret import interpret_run
from twincar_fast.cli import main
from twincar_fast.config import ModelConfig
from twincar_fast.data import build_dls, eval_dl
from twincar_fast.data.dataset import BBOX_COLUMNS
from twincar_fast.errors import TwincarError
from twincar_fast.experiment import run_experiment
from twincar_fast.model.learner import create_model

FIGURES = [
    "accuracy.png",
    "loss.png",
    "precision_recall.png",
    "topk.png",
    "class_f1_test.png",
    "confusion_test.png",
    "most_confused_test.png",
    "top_losses_test.png",
    "gradcam_mistakes_test.png",
    "gradcam_correct_test.png",
    "gradcam_images.png",
]
TABLES = {
    "eval_test.json": None,
    "per_class_test.csv": ["class_id", "label", "precision", "recall", "f1", "support"],
    "predictions_test.csv": ["image", "true_id", "true", "predicted_id", "predicted", "loss"],
    "most_confused_test.csv": ["actual", "predicted", "count"],
}


def sharp_cfg(data, out):
    """A tiny config whose maps can resolve the 10 px square: 128 px input → 4×4 layer4 grid."""
    cfg = make_tiny_cfg(data, out)
    cfg.data = dataclasses.replace(cfg.data, img_size=128, item_size=128, resize="squish")
    cfg.aug = dataclasses.replace(cfg.aug, enabled=False)
    cfg.train = dataclasses.replace(cfg.train, epochs=5, freeze=[], label_smoothing=0.0)
    return cfg


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A tiny run (test_resnet, 128 px, 5 epochs), then `interpret_run` with two extra images."""
    cfg = sharp_cfg(tiny_data, tmp_path_factory.mktemp("interp_run"))
    cfg.eval = dataclasses.replace(cfg.eval, test=True)  # the run itself evaluates the test split
    result = run_experiment(cfg)
    assert (result.report_dir / "eval_test.json").is_file()
    images = [tiny_data / "images/test_0_000.jpg", tiny_data / "images/test_3_001.jpg"]
    index = interpret_run(result.report_dir, images=images)
    return result, index


@pytest.fixture(scope="module")
def learn(run):
    """The run's exported learner, loaded back from learner.pkl."""
    return load_run_learner(run[0].model_dir / "learner.pkl")


def assert_png(path, min_side=150):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path.name, im.size)


def test_every_figure_and_table_is_written(run):
    result, index = run
    report = result.report_dir
    assert index == report / "index.html"
    for name in FIGURES:
        assert_png(report / "figures" / name)
    # 4 classes and a zoom of 4: it would repeat the whole matrix, so there is none
    assert not (report / "figures" / "confusion_zoom_test.png").exists()
    for name, columns in TABLES.items():
        assert (report / name).stat().st_size > 0
        if columns:
            df = pd.read_csv(report / name)
            assert len(df) > 0 and set(columns) <= set(df.columns), name


def test_index_links_every_figure_and_shows_headline_metrics(run):
    result, index = run
    page = index.read_text()
    links = set(re.findall(r'(?:href|src)="([^"]+)"', page))
    for link in links:
        assert (result.report_dir / html.unescape(link)).is_file(), link
    for name in FIGURES:
        assert f"figures/{name}" in links
    for name in TABLES:
        assert name in links
    test = pd.read_json(result.report_dir / "eval_test.json", typ="series")
    assert f"{test['test_acc']:.4f}" in page
    assert f"{result.summary['best']['valid_acc']:.4f}" in page
    assert "arch: test_resnet" in page  # config.yaml inline
    assert '"torch":' in html.unescape(page)  # env.json inline


def test_gradcam_mass_sits_on_the_coloured_square(learn, tiny_data):
    """Correct test images: the CAM's share in the class-telling square ≫ the square's area share."""
    dl = eval_dl(learn.dls, tiny_data, "test")
    items = dl.items
    x = torch.cat([b[0] for b in learn.dls.test_dl(items, with_labels=True, rm_type_tfms=0)])
    with torch.no_grad():
        pred = learn.model.eval()(x).argmax(1).numpy()
    ok = pred == items["class_id"].to_numpy()
    assert ok.mean() >= 0.5, "the tiny model should learn the squares"
    cams = gradcam_maps(learn, x[ok], items["class_id"][ok].tolist())
    sizes = [Image.open(p).size for p in items["path"][ok]]
    masks = box_masks(learn, sizes, items.loc[ok, BBOX_COLUMNS].to_numpy())
    assert 0.03 < masks.mean() < 0.2  # the 10×10 square of a 48×32 image, squished to 128²
    ratio = box_mass_ratio(cams, masks)
    print(
        f"tiny set Grad-CAM++ box ratio: mean {np.nanmean(ratio):.2f}, min {np.nanmin(ratio):.2f}"
    )
    assert np.nanmean(ratio) > 2.5  # measured ≈ 5 (4×4 grid at 128 px); 1 = no preference


def test_gradcam_maps_follow_the_target_class(learn, tiny_data):
    files = [tiny_data / "images/test_1_000.jpg", tiny_data / "images/test_2_000.jpg"]
    x = batch_tensor(learn, files)
    assert x.shape == (2, 3, 128, 128)
    a = gradcam_maps(learn, files, [1, 2])
    b = gradcam_maps(learn, x, [3, 0])
    assert a.shape == b.shape == (2, 128, 128)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6 and np.isfinite(a).all()
    assert np.abs(a - b).mean() > 1e-3  # another class, another map
    np.testing.assert_allclose(gradcam_maps(learn, x, [1, 2]), a, atol=1e-5)  # files = tensor


def test_box_masks_follow_the_transform(learn):
    # a box on the left half of a 200×100 image, squished to 128²: the left half of the input
    mask = box_masks(learn, [(200, 100)], [(1, 1, 100, 100)])[0]
    assert mask.shape == (128, 128)
    assert mask[:, :60].all() and not mask[:, 68:].any()


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext", "test_efficientnet", "test_vit"])
def test_target_layer_and_maps_for_timm_families(arch, tiny_cfg):
    model = create_model(ModelConfig(arch=arch, pretrained=False, head_hidden=16), 4)
    body = model[0].model
    layer = find_target_layer(model)
    if arch == "test_resnet":
        assert layer is body.layer4[-1]
    else:
        assert layer is body.get_submodule(body.feature_info[-1]["module"])
    tiny_cfg.data = dataclasses.replace(tiny_cfg.data, img_size=64, item_size=64)
    learn = Learner(build_dls(tiny_cfg), model)
    x = learn.dls.one_batch()[0][:3]
    cams = gradcam_maps(learn, x, [0, 1, 2])
    assert cams.shape == (3, 64, 64) and np.isfinite(cams).all()


def test_missing_image_is_one_line(run, capsys):
    report = run[0].report_dir
    with pytest.raises(TwincarError, match="nope.jpg: image not found"):
        interpret_run(report, images=[report / "nope.jpg"])
    assert main(["interpret", str(report), "--images", str(report / "nope.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.jpg: image not found" in err


def test_run_without_model_and_other_classes_are_one_line(run, tiny_data, tmp_path, capsys):
    result = run[0]
    lonely = tmp_path / "reports" / result.name
    lonely.mkdir(parents=True)
    shutil.copy(result.report_dir / "config.yaml", lonely)
    assert main(["interpret", str(lonely)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no saved model" in err
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    classes = pd.read_csv(other / "classes.csv")
    classes.loc[3, "label"] = "Bugatti Veyron 16.4 Coupe 2009"
    classes.to_csv(other / "classes.csv", index=False)
    assert main(["interpret", str(result.model_dir), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "classes.csv" in err


def test_moved_data_set_asks_for_data(run, tiny_data, tmp_path, capsys):
    result = run[0]
    reports = tmp_path / "reports" / result.name
    shutil.copytree(result.report_dir, reports)
    shutil.copytree(result.model_dir, tmp_path / "models" / result.name)
    text = (reports / "config.yaml").read_text()
    (reports / "config.yaml").write_text(text.replace(str(tiny_data), str(tmp_path / "gone")))
    assert main(["interpret", str(reports)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --data" in err
    index = interpret_run(reports, data_dir=tiny_data)  # the copied run redraws from its own model
    assert (
        index == reports / "index.html" and (reports / "figures" / "confusion_test.png").is_file()
    )


@pytest.mark.slow
def test_demo_set_gradcam_falls_in_the_class_telling_part(tmp_path):
    """The demo set's twins differ only inside raw/parts.csv's box: the maps must find it.

    4 classes (two twin pairs) × 60 images, test_resnet from scratch at 128 px for 25 epochs
    (under a minute on 2 CPU cores with bf16 autocast); measured: mean ratio 5.6.
    """
    cfg = make_tiny_cfg(tmp_path / "demo", tmp_path)
    cfg.name = "demo-gradcam"
    cfg.data = dataclasses.replace(
        cfg.data,
        demo=True,
        demo_classes=4,
        demo_per_class=60,
        img_size=128,
        item_size=128,
        resize="squish",  # keep the nose and the tail (the parts at the ends) in the input
        batch_size=16,
        valid_pct=0.1,
    )
    cfg.aug = dataclasses.replace(cfg.aug, enabled=False)
    cfg.train = dataclasses.replace(cfg.train, epochs=25, lr=3e-3, freeze=[], label_smoothing=0.0)
    cfg.eval = dataclasses.replace(cfg.eval, test=True, interpret=True, gradcam=12)
    result = run_experiment(cfg)
    interpret_run(result.report_dir)
    test = pd.read_json(result.report_dir / "eval_test.json", typ="series")
    assert test["test_acc"] >= 0.8
    parts = pd.read_csv(result.report_dir / "gradcam_parts_test.csv")
    assert len(parts) >= 0.8 * 240
    assert 0.02 < parts["box_share"].mean() < 0.12  # the part box: ~5% of the input
    print(f"demo Grad-CAM++ box ratio: mean {parts['ratio'].mean():.2f} over {len(parts)} images")
    assert parts["ratio"].mean() > 3.0  # 1 = no preference for the part
    assert (parts["ratio"] > 1).mean() > 0.9
    assert_png(result.report_dir / "figures" / "gradcam_parts_test.png")


def test_images_take_their_boxes_and_a_box_trained_run_warns_without(tiny_data, tmp_path, capsys):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True)
    cfg.train = dataclasses.replace(cfg.train, epochs=1)
    result = run_experiment(cfg)
    image = str(tiny_data / "images" / "test_0_000.jpg")
    capsys.readouterr()
    assert main(["interpret", str(result.report_dir), "--images", image]) == 0
    err = capsys.readouterr().err
    assert "trained on car-box crops" in err and "1 of 1 --images have no box" in err
    assert (
        main(["interpret", str(result.report_dir), "--images", image, "--data", str(tiny_data)])
        == 0
    )
    assert "car-box crops" not in capsys.readouterr().err  # its box from the data set
    boxes = tmp_path / "boxes.csv"
    pd.DataFrame([(image, 5, 9, 14, 18)], columns=["image", "x1", "y1", "x2", "y2"]).to_csv(
        boxes, index=False
    )
    assert (
        main(["interpret", str(result.report_dir), "--images", image, "--boxes", str(boxes)]) == 0
    )
    assert "car-box crops" not in capsys.readouterr().err
    assert (result.report_dir / "figures" / "gradcam_images.png").is_file()
