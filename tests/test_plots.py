"""Figures and tables drawn from a run's files: clustered 196-class confusion, pairs, curves, bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from twincar_fast.analysis import curves, plots
from twincar_fast.analysis.metrics import METRIC_NAMES

MAKES = ["Chevrolet Silverado 2500HD Regular Cab", "Mercedes-Benz Sprinter Van", "Audi S5 Coupe"]


def class_names(n: int) -> list[str]:
    """Long, unique Stanford-Cars-like names."""
    return [f"{MAKES[i % 3]} {2000 + i // 3} #{i}" for i in range(n)]


def synthetic_predictions(n_classes: int, pairs: list[tuple[int, int]], seed: int = 0):
    """A predictions table: 10 images per class, 4 of each class in `pairs` mistaken both ways."""
    rng = np.random.default_rng(seed)
    names = class_names(n_classes)
    true = np.repeat(np.arange(n_classes), 10)
    pred = true.copy()
    for a, b in pairs:
        pred[np.flatnonzero(true == a)[:4]] = b
        pred[np.flatnonzero(true == b)[:3]] = a
    noise = rng.random(len(true)) < 0.02  # scattered single mistakes
    pred[noise] = rng.integers(0, n_classes, noise.sum())
    return pd.DataFrame(
        {
            "image": [f"img_{i}.jpg" for i in range(len(true))],
            "true_id": true,
            "true": [names[t] for t in true],
            "predicted_id": pred,
            "predicted": [names[p] for p in pred],
            "probability": rng.uniform(0.3, 1, len(true)),
            "true_probability": rng.uniform(0, 0.3, len(true)),
            "loss": rng.uniform(0, 3, len(true)),
        }
    )


def assert_png(path, min_w=200, min_h=150):
    """The file is a PNG PIL can open, at least min_w × min_h pixels."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h, im.size
        return im.size


PAIRS_196 = [(3, 150), (20, 121), (57, 58), (90, 11), (140, 177), (60, 190)]


def test_cluster_order_puts_confused_classes_side_by_side():
    preds = synthetic_predictions(196, PAIRS_196)
    cm = plots.confusion_counts(preds, 196)
    order = plots.cluster_order(cm)
    assert sorted(order.tolist()) == list(range(196))  # a permutation
    pos = np.empty(196, int)
    pos[order] = np.arange(196)
    for a, b in PAIRS_196:
        assert abs(pos[a] - pos[b]) == 1, (a, b, pos[a], pos[b])
    # in the original order these pairs are far apart: the ordering did the work
    assert np.mean([abs(a - b) for a, b in PAIRS_196]) > 40


def test_most_confused_block_holds_the_planted_cluster():
    # a 4-class cluster mistaken among itself, in a 196-class matrix with scattered noise
    cluster = [7, 61, 133, 180]
    pairs = [(a, b) for i, a in enumerate(cluster) for b in cluster[i + 1 :]]
    preds = synthetic_predictions(196, pairs, seed=1)
    cm = plots.confusion_counts(preds, 196)
    block = plots.most_confused_block(cm, plots.cluster_order(cm), 4)
    assert sorted(block.tolist()) == cluster


def test_confusion_counts_match_pandas_crosstab():
    preds = synthetic_predictions(12, [(0, 5), (3, 4)])
    cm = plots.confusion_counts(preds, 12)
    ct = pd.crosstab(preds.true_id, preds.predicted_id).reindex(
        index=range(12), columns=range(12), fill_value=0
    )
    np.testing.assert_array_equal(cm, ct.to_numpy())


def test_most_confused_table_counts_and_order():
    preds = synthetic_predictions(20, [(2, 9), (4, 5)], seed=3)
    table = plots.most_confused(preds, 3)
    assert list(table.columns[:3]) == ["actual", "predicted", "count"]
    wrong = preds[preds.true_id != preds.predicted_id]
    counts = wrong.groupby(["true_id", "predicted_id"]).size()
    assert table["count"].tolist() == sorted(counts, reverse=True)[:3]
    for row in table.itertuples():
        assert counts[(row.actual_id, row.predicted_id)] == row.count
        assert row.actual == class_names(20)[row.actual_id]


def test_196_class_confusion_is_drawn_large_enough_to_read(tmp_path):
    preds = synthetic_predictions(196, PAIRS_196)
    cm = plots.confusion_counts(preds, 196)
    names = class_names(196)
    w, h = assert_png(plots.plot_confusion(cm, names, tmp_path / "cm.png"), 2000, 2000)
    assert w < 4000 and h < 4000  # big enough for 196 named rows, not absurd
    block = plots.most_confused_block(cm, plots.cluster_order(cm), 20)
    assert_png(plots.plot_confusion_zoom(cm, names, block, tmp_path / "zoom.png"), 600, 600)


def metrics_frame(n_epochs: int) -> pd.DataFrame:
    """A metrics.csv as the training callback writes it (rising scores, falling losses)."""
    t = np.linspace(0.2, 0.9, n_epochs)
    df = pd.DataFrame({"epoch": range(n_epochs), "train_loss": 2 - t, "train_acc": t})
    df["valid_loss"] = 2.1 - t
    for name in METRIC_NAMES:
        df[f"valid_{name}"] = t * 0.95
    df["lr"], df["time_s"] = 1e-3, 3.0
    return df


@pytest.mark.parametrize("n_epochs", [1, 6])
def test_curves_from_metrics_csv(tmp_path, n_epochs):
    metrics_frame(n_epochs).to_csv(tmp_path / "metrics.csv", index=False)
    paths = curves.plot_curves(tmp_path / "metrics.csv", tmp_path / "figures")
    assert [p.name for p in paths] == [
        "accuracy.png",
        "loss.png",
        "precision_recall.png",
        "topk.png",
    ]
    for p in paths:
        assert_png(p)


def test_curves_skip_figures_whose_columns_are_missing(tmp_path):
    df = metrics_frame(3)[["epoch", "train_loss", "valid_loss"]]
    df.to_csv(tmp_path / "metrics.csv", index=False)
    paths = curves.plot_curves(tmp_path / "metrics.csv", tmp_path)
    assert [p.name for p in paths] == ["loss.png"]


def test_class_f1_bars_best_and_worst(tmp_path):
    rng = np.random.default_rng(0)
    names = class_names(196)
    per_class = pd.DataFrame(
        {
            "class_id": range(196),
            "label": names,
            "precision": rng.random(196),
            "recall": rng.random(196),
            "f1": rng.random(196),
            "support": rng.integers(20, 50, 196),
        }
    )
    assert_png(plots.plot_class_f1(per_class, tmp_path / "f1.png", k=20), 600, 800)


def test_top_losses_and_confused_examples_open_the_images(tmp_path):
    preds = synthetic_predictions(6, [(0, 1), (2, 3)])
    rng = np.random.default_rng(0)
    for img in preds["image"]:
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / img)
    assert_png(plots.plot_top_losses(preds, tmp_path, tmp_path / "top.png", n=6))
    pairs = plots.most_confused(preds, 4)
    assert_png(plots.plot_confused_examples(preds, pairs, tmp_path, tmp_path / "pairs.png"))


@pytest.fixture
def drawn(monkeypatch):
    """The figures `plots.save_figure` writes, by file name, kept open for a look at them."""
    figures = {}
    original = plots.save_figure

    def keep(fig, path, dpi=plots.DPI):
        figures[Path(path).name] = fig
        with monkeypatch.context() as m:
            m.setattr(plots.plt, "close", lambda fig: None)  # still written, left open
            return original(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(curves, "save_figure", keep)
    yield figures
    for fig in figures.values():
        plots.plt.close(fig)


def test_curves_without_a_validation_split_say_so_and_mark_the_kept_epoch(tmp_path, drawn):
    df = metrics_frame(4)
    for col in [c for c in df if c.startswith("valid_")]:
        df[col] = np.nan  # data.valid_pct: 0
    df.to_csv(tmp_path / "metrics.csv", index=False)
    (tmp_path / "summary.json").write_text('{"kept_epoch": 3, "best_epoch": 3}')
    paths = curves.plot_curves(tmp_path / "metrics.csv", tmp_path / "figures")
    assert [p.name for p in paths] == ["accuracy.png", "loss.png"]
    ax = drawn["accuracy.png"].axes[0]
    assert ax.get_title() == "Train accuracy (no validation split: the test split judges the run)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train accuracy", "kept epoch 3"]
    assert drawn["loss.png"].axes[0].get_title() == "Train loss (no validation split)"
    df = metrics_frame(4)
    df.to_csv(tmp_path / "metrics.csv", index=False)
    curves.plot_curves(tmp_path / "metrics.csv", tmp_path / "figures")
    assert drawn["accuracy.png"].axes[0].get_title() == "Accuracy and macro F1"


@pytest.mark.parametrize(
    ("n", "shape"), [(9, (3, 3)), (16, (4, 4)), (10, (2, 5)), (12, (3, 4)), (3, (1, 3))]
)
def test_top_losses_grid_leaves_no_empty_panel_when_it_can(tmp_path, drawn, n, shape):
    assert plots.grid_shape(n) == shape
    preds = synthetic_predictions(4, [(0, 1)])
    rng = np.random.default_rng(0)
    for img in preds["image"]:
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / img)
    plots.plot_top_losses(preds, tmp_path, tmp_path / "top.png", n=n)
    axes = drawn["top.png"].axes
    assert len(axes) == n  # 9 images: a 3×3 grid, not 4 columns with 3 empty panels
    assert all(ax.images for ax in axes)


def test_class_f1_bars_are_coloured_by_value_not_by_rank(tmp_path, drawn):
    f1 = [1.0, 1.0, 1.0, 0.99, 0.98, 0.97]  # the demo: its "worst" classes are good ones
    per_class = pd.DataFrame(
        {"class_id": range(6), "label": class_names(6), "f1": f1, "support": 40}
    )
    plots.plot_class_f1(per_class, tmp_path / "f1.png", k=3)
    top, bottom = drawn["f1.png"].axes
    assert "lowest F1" in bottom.get_title() and "worst" not in bottom.get_title()
    for ax in (top, bottom):
        for bar in ax.patches:
            r, g, b, _ = bar.get_facecolor()
            assert g > r + 0.2, (bar.get_width(), bar.get_facecolor())  # F1 ≥ 0.97: green
    low = plots.f1_colors([0.1])[0]
    assert low[0] > low[1] + 0.3  # a bad class is red
    np.testing.assert_allclose(plots.f1_colors([0.98]), plots.f1_colors([0.98]))


def test_wrapped_titles_never_break_at_a_hyphen():
    text = "Twins #1: Dynamo Alpha Wagon 2009 vs Dynamo Alpha Wagon 2012 (centroid 0.91). Finer-CAM"
    for width in range(20, 100):
        lines = plots.wrap(text, width).splitlines()
        assert not any(ln.endswith("-") for ln in lines), (width, lines)
