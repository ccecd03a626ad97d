"""Issue 18: twin pairs from confusion and embeddings, Finer-CAM against the twin, the masking check."""

from __future__ import annotations

import dataclasses
import html
import math

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_grad_cam import FinerCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget
from torch import nn

from twincar_fast.analysis.evaluate import load_run_learner, split_dl
from twincar_fast.analysis.gradcam import FINER_ALPHA, _to_nchw, find_target_layer
from twincar_fast.analysis.report import write_index
from twincar_fast.analysis.twin_maps import mask_top, masking_drop, pair_maps, relative_confidence
from twincar_fast.analysis.twin_pairs import centroid_similarity, twin_pairs
from twincar_fast.analysis.twins import find_twins, no_twins_reason, twin_of
from twincar_fast.cli import main
from twincar_fast.data.demo import designed_twins
from twincar_fast.experiment import run_experiment
from twincar_fast.files import write_csv

CLASSES = ["A", "B", "C", "D", "E"]


# ---------------------------------------------------------------- pairs from made-up numbers


def made_up():
    """5 classes of 10 images: A↔B mixed up most, C→D and B→E equally often, D∥E never."""
    cm = np.diag([10] * 5)
    for (t, p), n in {(0, 1): 3, (1, 0): 3, (2, 3): 2, (1, 4): 1, (4, 1): 1}.items():
        cm[t, p], cm[t, t] = n, cm[t, t] - n
    # centroids: B and E far apart, C and D close, D and E the same (but never mixed up)
    centroids = np.array([[1, 0, 0], [1, 0.2, 0], [0, 1, 0], [0, 1, 0.1], [0, 1, 0.1]])
    labels = np.repeat(np.arange(5), 10)
    noise = np.random.default_rng(0).normal(0, 1e-3, (50, 3))
    return cm, centroids[labels] + noise, labels


def test_pairs_come_out_in_the_expected_order():
    cm, feats, labels = made_up()
    cos = centroid_similarity(feats, labels, 5)
    assert cos[3, 4] == pytest.approx(1, abs=1e-4) and cos[1, 4] < 0.3
    pairs = twin_pairs(cm, cos, CLASSES, k=10)
    # C-D (confusion 0.1, cosine ~1) beats B-E (0.1, cosine ~0.2); D-E, never mixed up, is out
    assert list(zip(pairs.class_a, pairs.class_b, strict=True)) == [
        ("A", "B"),
        ("C", "D"),
        ("B", "E"),
    ]
    top = pairs.iloc[0]
    assert top.confusion_a_as_b == top.confusion_b_as_a == pytest.approx(0.3)
    assert top.score == pytest.approx(0.3 * (1 + cos[0, 1]) / 2)
    cd = pairs.iloc[1]
    assert (cd.n_a_as_b, cd.n_b_as_a, cd.confusion) == (2, 0, pytest.approx(0.1))
    assert list(pairs["rank"]) == [1, 2, 3]
    assert len(twin_pairs(cm, cos, CLASSES, k=2)) == 2
    assert twin_of(pairs, "E") == ("B", 3) and twin_of(pairs, "B") == ("A", 1)


def test_class_a_is_the_one_taken_for_the_other():
    cm = np.array([[10, 0], [4, 6]])  # B's images go to A, never the other way
    pairs = twin_pairs(cm, np.ones((2, 2)), ["A", "B"])
    assert (pairs.class_a[0], pairs.class_b[0], pairs.n_a_as_b[0]) == ("B", "A", 4)


def test_no_pairs_get_one_sentence_in_the_report(tmp_path):
    assert "1 class" in no_twins_reason(["A"], np.ones((1, 1)), ["test"])
    assert "no two classes" in no_twins_reason(CLASSES, np.diag([4] * 5), ["test"])
    write_csv(tmp_path / "twins.csv", pd.DataFrame(columns=["rank", "class_a", "class_b"]))
    (tmp_path / "twins.json").write_text('{"message": "Twins: the model mixed up no two classes."}')
    page = write_index(tmp_path).read_text()
    assert "Twins: the model mixed up no two classes." in page


def test_designed_twins_share_a_part_and_differ_by_year():
    pairs = designed_twins(12)
    assert len(pairs) == 6 and pairs[0] == ("Twincar Alpha Sedan 2012", "Twincar Alpha Sedan 2009")


# ---------------------------------------------------------------- the masking check


class Toy(nn.Module):
    """Logits (a, b) = (0.1 × the sum of row 0's first 5 pixels over the channels, 0)."""

    def forward(self, x):
        za = 0.1 * x[:, :, 0, :5].sum((1, 2))
        return torch.stack([za, torch.zeros_like(za)], 1)


def test_masking_score_is_the_drop_of_the_target_over_its_twin():
    model = Toy().requires_grad_(False)
    x = torch.ones(2, 3, 10, 10)
    on, off = np.zeros((10, 10)), np.zeros((10, 10))
    on[0, :5] = [5, 4, 3, 2, 1]  # the top 5% (5 of 100 pixels) is the row the model reads
    off[9, :5] = 1  # ... or pixels it ignores
    maps = np.stack([on, off])
    masked = mask_top(x, maps)
    assert (masked == 0).sum() == 2 * 3 * math.ceil(0.05 * 100)
    assert float(masked[0, :, 0, :5].abs().sum()) == 0 and float(masked[1, :, 9, :5].sum()) == 0
    before = 1 / (1 + math.exp(-1.5))  # sigmoid(za - zb), za = 0.1 × 15
    np.testing.assert_allclose(relative_confidence(model, x, [0, 0], [1, 1]), [before] * 2, 1e-6)
    drop = masking_drop(model, x, maps, [0, 0], [1, 1])
    np.testing.assert_allclose(drop, [before - 0.5, 0.0], atol=1e-6)
    twin_view = masking_drop(model, x, maps, [1, 1], [0, 0])  # target b against a
    np.testing.assert_allclose(twin_view, [(1 - before) - 0.5, 0.0], atol=1e-6)


# ---------------------------------------------------------------- a trained tiny run


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A tiny run (test_resnet, 96 px: a 3×3 map grid, 1 epoch: it still mixes classes up)."""
    from conftest import make_tiny_cfg

    cfg = make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("twins_run"))
    cfg.data = dataclasses.replace(cfg.data, img_size=96, item_size=96, resize="squish")
    cfg.aug = dataclasses.replace(cfg.aug, enabled=False)
    cfg.train = dataclasses.replace(cfg.train, epochs=1, lr=3e-3)
    cfg.eval = dataclasses.replace(cfg.eval, test=True, interpret=True, gradcam=0, twins=3)
    result = run_experiment(cfg)
    return result, load_run_learner(result.model_dir / "learner.pkl"), cfg


def test_the_run_writes_twins_and_the_report_shows_them(run):
    result, _, _ = run
    pairs = pd.read_csv(result.report_dir / "twins.csv")
    assert 1 <= len(pairs) <= 3, "the short run should mix some classes up"
    assert {"class_a", "class_b", "score", "centroid_cosine", "drop_finer", "drop_gradcam"} <= set(
        pairs
    )
    assert list(pairs["score"]) == sorted(pairs["score"], reverse=True)
    first = pairs.iloc[0]
    mixed = str(first.images_a_as_b if first.n_a_as_b else first.images_b_as_a).split(";")
    assert len(mixed) == max(first.n_a_as_b, first.n_b_as_a)
    assert (result.report_dir / first.figure).is_file()
    assert (result.model_dir / "twins.csv").read_text() == (
        result.report_dir / "twins.csv"
    ).read_text()  # shipped with the model for the app
    page = (result.report_dir / "index.html").read_text()
    assert "<h2>Twins" in page and html.escape(first.class_a) in page and first.figure in page


def test_finer_cam_maps_of_the_top_pair_match_finer_cam_called_directly(run, tiny_data):
    result, learn, cfg = run
    top = pd.read_csv(result.report_dir / "twins.csv").iloc[0]
    a, b = int(top.class_a_id), int(top.class_b_id)
    preds = pd.read_csv(result.report_dir / "predictions_test.csv")
    dl = split_dl(learn, tiny_data, "test", cfg)
    pm = pair_maps(learn, dl, preds, tiny_data, a, b)
    assert set(pm.targets) == {a, b} and len(pm.rows) == 2 * 6  # 6 test images a class
    np.testing.assert_array_equal(pm.targets, pm.rows.true_id)
    np.testing.assert_array_equal(pm.twins, np.where(pm.targets == a, b, a))  # the other class
    model = learn.model
    targets = [
        FinerWeightedTarget(int(t), [int(o)], FINER_ALPHA)
        for t, o in zip(pm.targets, pm.twins, strict=True)
    ]
    x = pm.x.as_subclass(torch.Tensor).float().requires_grad_(True)
    with FinerCAM(model, [find_target_layer(model)], _to_nchw, base_method=GradCAMPlusPlus) as cam:
        direct = cam(input_tensor=x, targets=targets)
    np.testing.assert_allclose(pm.finer, direct, atol=1e-5)
    assert pm.finer.max() > 0 and pm.gradcam.max() > 0
    assert not np.allclose(pm.finer, pm.gradcam)  # the twin's evidence was taken out


def test_twins_command_redoes_the_pairs_only_with_force(run, capsys):
    result, _, _ = run
    shipped = (result.model_dir / "twins.csv").read_bytes()
    figures = sorted((result.report_dir / "figures" / "twins").glob("*.png"))
    argv = ["twins", str(result.report_dir), "--pairs", "1", "--split", "test"]
    assert main(argv) == 2  # the run has twins: never replaced without --force
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert str(result.model_dir / "twins.csv") in err
    assert (result.model_dir / "twins.csv").read_bytes() == shipped
    assert sorted((result.report_dir / "figures" / "twins").glob("*.png")) == figures
    assert main([*argv, "--force"]) == 0
    assert len(pd.read_csv(result.report_dir / "twins.csv")) == 1
    assert len(list((result.report_dir / "figures" / "twins").glob("*.png"))) == 1
    assert main(["twins", str(result.report_dir), "--pairs", "0"]) == 2
    assert "--pairs" in capsys.readouterr().err


def test_a_run_without_confusion_gets_the_sentence(run, tmp_path):
    result, learn, cfg = run
    report = tmp_path / "report"
    report.mkdir()
    preds = pd.read_csv(result.report_dir / "predictions_test.csv")
    preds = preds.assign(predicted_id=preds.true_id, predicted=preds.true)  # all right
    write_csv(report / "predictions_test.csv", preds)
    assert find_twins(learn, cfg, report, cfg.data.root, "test", 3).empty
    page = write_index(report).read_text()
    assert "mixed up no two classes on the test split (24 images, all right)" in page
    assert "<th>class_a</th>" not in page
