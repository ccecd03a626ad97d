"""Figures drawn from a run's files (per_class_*.csv, predictions_*.csv), so they redraw.

Every function takes tables or file paths and writes one PNG atomically (matplotlib's Agg backend,
no display needed). The confusion matrix stays readable at 196 classes: rows are normalized, classes
are reordered by hierarchical clustering of the symmetrized confusion so that classes mistaken for
each other sit side by side, and a zoom shows the most-confused block with class names.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from scipy.cluster.hierarchy import leaves_list, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

from twincar_fast.files import atomic_path  # noqa: E402

__all__ = [
    "cluster_order",
    "confusion_counts",
    "most_confused",
    "most_confused_block",
    "plot_class_f1",
    "plot_confused_examples",
    "plot_confusion",
    "plot_confusion_zoom",
    "plot_panels",
    "plot_top_losses",
    "save_figure",
    "wrap",
]

DPI = 110
CMAP = "Blues"


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write `fig` as PNG to `path` atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def wrap(text: str, width: int = 28) -> str:
    """Break a long class name over lines of at most `width` characters (at spaces only)."""
    # never at a hyphen: "Finer-CAM" or "Mercedes-Benz" split over two lines reads as two words
    return "\n".join(textwrap.wrap(str(text), width, break_on_hyphens=False)) or str(text)


# ---------------------------------------------------------------- per-class scores


F1_CMAP = "RdYlGn"  # red (F1 0) through yellow to green (F1 1), the same in both panels


def f1_colors(f1: np.ndarray | pd.Series) -> np.ndarray:
    """RGBA bar colours by F1 value on one fixed 0-1 scale (a 0.98 class is green wherever it ranks)."""
    return plt.get_cmap(F1_CMAP)(np.clip(np.asarray(f1, dtype=float), 0, 1))


def plot_class_f1(per_class: pd.DataFrame, path: str | os.PathLike, k: int = 20) -> Path:
    """Horizontal bars of the `k` highest and `k` lowest classes by F1 (support beside each bar),
    coloured by F1 value."""
    df = per_class[per_class["support"] > 0].sort_values(["f1", "label"], kind="stable")
    k = max(1, min(k, (len(df) + 1) // 2))
    panels = [("highest", df.tail(k)), ("lowest", df.head(k).iloc[::-1])]
    fig, axes = plt.subplots(2, 1, figsize=(9, 0.28 * 2 * k + 2.2))
    for ax, (which, part) in zip(axes, panels, strict=True):
        y = np.arange(len(part))
        ax.barh(y, part["f1"], color=f1_colors(part["f1"]), alpha=0.9)
        ax.set_yticks(y, part["label"], fontsize=8)
        ax.invert_yaxis() if which == "lowest" else None
        for yi, (f1, n) in enumerate(zip(part["f1"], part["support"], strict=True)):
            ax.text(min(f1, 1.0) + 0.01, yi, f"{f1:.2f} (n={n})", va="center", fontsize=7)
        ax.set_xlim(0, 1.18)
        ax.set_title(f"The {k} classes with the {which} F1", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("F1 (bar colour: red 0 → yellow 0.5 → green 1)")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------- confusion


def confusion_counts(preds: pd.DataFrame, n_classes: int) -> np.ndarray:
    """The (true, predicted) count matrix from a predictions table."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (preds["true_id"].to_numpy(), preds["predicted_id"].to_numpy()), 1)
    return cm


def _row_normalized(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its total (rows without images stay zero)."""
    return cm / np.maximum(cm.sum(1, keepdims=True), 1)


def cluster_order(cm: np.ndarray) -> np.ndarray:
    """A class order that puts classes confused with each other next to each other."""
    n = len(cm)
    sim = _row_normalized(cm)
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 0)
    if n < 3 or sim.max() <= 0:
        return np.arange(n)
    dist = 1 - sim / sim.max()
    np.fill_diagonal(dist, 0)
    z = linkage(squareform(dist, checks=False), method="average", optimal_ordering=True)
    return leaves_list(z)


def most_confused_block(cm: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """The `k` consecutive classes of `order` holding the most off-diagonal confusion."""
    k = max(1, min(k, len(order)))
    off = cm[np.ix_(order, order)].astype(float)
    np.fill_diagonal(off, 0)
    scores = [off[i : i + k, i : i + k].sum() for i in range(len(order) - k + 1)]
    start = int(np.argmax(scores))
    return order[start : start + k]


def _confusion_axes(ax, cm_norm: np.ndarray, labels: list[str], fontsize: float):
    """Draw a row-normalized matrix with class-name ticks on both axes; return the image."""
    im = ax.imshow(cm_norm, cmap=CMAP, norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="none")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.tick_params(length=1.5, pad=1)
    return im


def _colorbar(fig: plt.Figure, im, ax, shrink: float) -> None:
    """A colour bar with ticks spread out on the square-root scale."""
    cb = fig.colorbar(im, ax=ax, shrink=shrink, pad=0.01, ticks=[0, 0.05, 0.2, 0.5, 1])
    cb.set_label("share of the true class's images")


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | os.PathLike) -> Path:
    """The whole row-normalized confusion matrix, clustered, every class named (tiny at 196)."""
    order = cluster_order(cm)
    n = len(classes)
    cell = 0.3 if n <= 30 else 0.1  # inches per class: names at 5.5 pt still fit at 196
    fontsize = 8 if n <= 30 else 5.5
    side = max(5.0, cell * n + 1.5)
    fig, ax = plt.subplots(figsize=(side + 2.5, side + 1.0))
    labels = [classes[i] for i in order]
    im = _confusion_axes(ax, _row_normalized(cm)[np.ix_(order, order)], labels, fontsize)
    title = (
        f"Confusion matrix, {n} classes (rows normalized; clustered so that confused classes "
        "sit together)"
    )
    ax.set_title(wrap(title, int(side * 9)), fontsize=10)  # ~9 characters per inch at 10 pt
    _colorbar(fig, im, ax, 0.5)
    return save_figure(fig, path, dpi=DPI if n <= 30 else 140)  # crisp 5.5 pt names


def plot_confusion_zoom(
    cm: np.ndarray, classes: list[str], block: np.ndarray, path: str | os.PathLike
) -> Path:
    """The most-confused block of the clustered matrix, with class names and counts in cells."""
    sub = cm[np.ix_(block, block)]
    norm = _row_normalized(cm)[np.ix_(block, block)]
    k = len(block)
    side = max(4.5, 0.42 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = _confusion_axes(ax, norm, [classes[i] for i in block], 8)
    for i, j in zip(*np.nonzero(sub), strict=True):
        color = "white" if norm[i, j] > 0.5 else "black"
        ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_title(f"Most-confused block ({k} classes; numbers = image counts)", fontsize=10)
    _colorbar(fig, im, ax, 0.6)
    return save_figure(fig, path)


def most_confused(preds: pd.DataFrame, n: int) -> pd.DataFrame:
    """The `n` most frequent (actual, predicted) mistakes: actual, predicted, count, ids."""
    wrong = preds[preds["true_id"] != preds["predicted_id"]]
    pairs = (
        wrong.groupby(["true_id", "predicted_id", "true", "predicted"])
        .size()
        .reset_index(name="count")
        .sort_values(["count", "true_id", "predicted_id"], ascending=[False, True, True])
        .head(n)
    )
    return pairs.rename(
        columns={
            "true": "actual",
            "true_id": "actual_id",
            "predicted_id": "predicted_id",
        }
    )[["actual", "predicted", "count", "actual_id", "predicted_id"]].reset_index(drop=True)


# ---------------------------------------------------------------- example images


def _open(data_dir: Path, image: str, view: Callable | None = None):
    """The image at `image` (relative to `data_dir`, or absolute) as an RGB PIL image; `view`
    (image, rgb) → what the model saw of it (the validation crop and resize)."""
    from twincar_fast.data.images import open_rgb

    img = open_rgb(data_dir / image)
    return view(image, img) if view is not None else img


def _show(ax, img, title: str, color: str = "black") -> None:
    """An image without axes and with a small title."""
    ax.imshow(img)
    ax.set_title(title, fontsize=7.5, color=color)
    ax.axis("off")


def plot_confused_examples(
    preds: pd.DataFrame,
    pairs: pd.DataFrame,
    data_dir: str | os.PathLike,
    path: str | os.PathLike,
    rows: int = 10,
    view: Callable | None = None,
) -> Path:
    """A row per confused pair: an image of A predicted as B beside a correct example of B
    (`view`: as in `_open`)."""
    data_dir = Path(data_dir)
    pairs = pairs.head(max(1, rows))
    fig, axes = plt.subplots(
        len(pairs), 2, figsize=(6.4, 2.4 * len(pairs) + 0.4), squeeze=False, layout="constrained"
    )
    for (left, right), pair in zip(axes, pairs.itertuples(), strict=True):
        wrong = preds[(preds.true_id == pair.actual_id) & (preds.predicted_id == pair.predicted_id)]
        w = wrong.sort_values("probability", ascending=False).iloc[0]
        title = f"A: {wrap(pair.actual)}\nseen as B {pair.count}× (p={w.probability:.2f})"
        _show(left, _open(data_dir, w.image, view), title, "tab:red")
        good = preds[
            (preds.true_id == pair.predicted_id) & (preds.predicted_id == pair.predicted_id)
        ]
        if good.empty:
            right.axis("off")
            right.set_title(f"B: {wrap(pair.predicted)}\n(no correct example)", fontsize=7.5)
            continue
        g = good.sort_values("probability", ascending=False).iloc[0]
        _show(
            right,
            _open(data_dir, g.image, view),
            f"B: {wrap(pair.predicted)}\ncorrect (p={g.probability:.2f})",
            "tab:green",
        )
    fig.suptitle(
        "Most-confused pairs: class A mistaken for B (left), a real B (right)", fontsize=10
    )
    return save_figure(fig, path)


def grid_shape(n: int, widths: tuple[int, ...] = (4, 3, 5)) -> tuple[int, int]:
    """(rows, columns) for `n` panels: of `widths` (preferred first), the one leaving the fewest
    empty panels (9 → 3×3, 10 → 2×5, 16 → 4×4)."""
    if n <= max(widths):
        return 1, max(n, 1)
    cols = min(widths, key=lambda c: (-n % c, widths.index(c)))
    return -(-n // cols), cols


def plot_top_losses(
    preds: pd.DataFrame,
    data_dir: str | os.PathLike,
    path: str | os.PathLike,
    n: int = 16,
    view: Callable | None = None,
) -> Path:
    """A grid of the `n` highest-loss images titled predicted / actual / loss / probability
    (`view`: as in `_open`)."""
    data_dir = Path(data_dir)
    top = preds.sort_values("loss", ascending=False, kind="stable").head(max(1, n))
    nrows, cols = grid_shape(len(top))
    first = _open(data_dir, top.iloc[0].image, view)
    aspect = first.height / first.width  # rows as tall as the images and their 3 title lines
    fig, axes = plt.subplots(
        nrows,
        cols,
        figsize=(3.2 * cols, (3.0 * aspect + 0.7) * nrows + 0.4),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(top) :]:
        ax.axis("off")
    for ax, r in zip(axes.flat, top.itertuples(), strict=False):
        title = (
            f"pred: {wrap(r.predicted, 34)}\nactual: {wrap(r.true, 34)}\n"
            f"loss {r.loss:.2f}, p(pred) {r.probability:.2f}, p(actual) {r.true_probability:.2f}"
        )
        _show(
            ax,
            _open(data_dir, r.image, view),
            title,
            "tab:red" if r.true_id != r.predicted_id else "black",
        )
    fig.suptitle(f"Top {len(top)} losses (red = misclassified)", fontsize=11)
    return save_figure(fig, path)


def plot_panels(
    rows: list[list[tuple[np.ndarray, str, str]]], path: str | os.PathLike, title: str
) -> Path:
    """A grid of images, one list of (image, title, title colour) per row."""
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows),
        ncols,
        figsize=(2.9 * ncols, 3.0 * len(rows) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax_row, row in zip(axes, rows, strict=True):
        for ax, (img, text, color) in zip(ax_row, row, strict=False):
            _show(ax, img, text, color)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
