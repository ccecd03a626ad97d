"""Interpretation of a trained model: the figures of `plots`, top losses and Grad-CAM++ maps.

`interpret_learner` runs at the end of a run on the in-memory learner; `interpret_run` redraws
everything later from a saved model (models/<run>/learner.pkl) without retraining. Both end with
`reports/<run>/index.html`, one file that links every figure and table.

Grad-CAM++ figures (maps from `twincar_fast.analysis.gradcam`): the top-loss mistakes with the map of the
predicted class beside the map of the true class, one correct example per class, files given on
the command line, and on the demo set (raw/parts.csv) how much of the map falls in the part box
that tells the classes apart. With `eval.twins` the twin pairs and their Finer-CAM figures
(`twins.find_twins`) come last.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from PIL import Image

from twincar_fast.analysis import plots
from twincar_fast.analysis.curves import plot_curves
from twincar_fast.analysis.evaluate import evaluate_learner, open_saved_run, split_dl
from twincar_fast.analysis.gradcam import (
    box_mass_ratio,
    denormalize,
    find_target_layer,
    gradcam_maps,
    overlay,
)
from twincar_fast.analysis.report import write_index
from twincar_fast.analysis.samples import outline, part_boxes, part_masks, rows_tensor
from twincar_fast.analysis.twins import copy_twins, find_twins
from twincar_fast.config import ExperimentConfig
from twincar_fast.console import console, eval_bars, step
from twincar_fast.data import check_vocab, read_annotations
from twincar_fast.data.dataset import BBOX_COLUMNS
from twincar_fast.data.geometry import InputGeometry
from twincar_fast.errors import TwincarError
from twincar_fast.files import write_csv
from twincar_fast.run_folder import (
    EVAL_JSON,
    FIGURES_DIR,
    GRADCAM_IMAGES_PNG,
    GRADCAM_PARTS_CSV,
    METRICS_CSV,
    MOST_CONFUSED_CSV,
    PER_CLASS_CSV,
    PREDICTIONS_CSV,
    SPLIT_PNG,
)

__all__ = [
    "draw_split_figures",
    "find_target_layer",
    "gradcam_correct",
    "gradcam_files",
    "gradcam_maps",
    "gradcam_mistakes",
    "gradcam_parts",
    "interpret_learner",
    "interpret_run",
    "part_boxes",
]

CONFUSED_ROWS = 10  # rows of the most-confused example figure


# ---------------------------------------------------------------- Grad-CAM++ figures


def _cam_panels(learn: Learner, x: torch.Tensor, targets: Sequence[int]) -> list[np.ndarray]:
    """Overlays of the Grad-CAM++ maps of `targets` on the images of `x`."""
    rgb = denormalize(learn, x)
    cams = gradcam_maps(learn, x, targets)
    return [overlay(r, c) for r, c in zip(rgb, cams, strict=True)]


def gradcam_mistakes(learn, dl, preds, data_dir, path, n) -> Path | None:
    """Top-loss mistakes: the input, the map of the predicted class and of the true class."""
    wrong = preds[preds.true_id != preds.predicted_id].sort_values("loss", ascending=False)
    wrong = wrong.head(n)
    if wrong.empty:
        return None
    x = rows_tensor(learn, dl, wrong, data_dir)
    on_pred = _cam_panels(learn, x, wrong.predicted_id.tolist())
    on_true = _cam_panels(learn, x, wrong.true_id.tolist())
    rgb = denormalize(learn, x)
    triples = [
        [
            (rgb[i], plots.wrap(r.image, 36), "black"),
            (on_pred[i], f"predicted: {plots.wrap(r.predicted)}\np={r.probability:.2f}", "tab:red"),
            (on_true[i], f"true: {plots.wrap(r.true)}\np={r.true_probability:.2f}", "tab:green"),
        ]
        for i, r in enumerate(wrong.itertuples())
    ]
    # two mistakes per row: half as tall a figure for the report page
    rows = [sum(triples[i : i + 2], []) for i in range(0, len(triples), 2)]
    title = (
        "Grad-CAM++ on the top-loss mistakes, two per row: the input, the map of the predicted "
        "class (red) and of the true class (green)"
    )
    return plots.plot_panels(rows, path, title)


def _classes_to_show(preds: pd.DataFrame) -> list[int]:
    """Class ids, those of the most-confused pairs first (most mistakes first), then the rest."""
    pairs = plots.most_confused(preds, len(preds))
    first = pd.unique(pairs[["actual_id", "predicted_id"]].to_numpy().ravel()).tolist()
    return first + sorted(set(preds["true_id"]) - set(first))


def gradcam_correct(learn, dl, preds, data_dir, path, n) -> Path | None:
    """One correct example (the most confident) per class, confused classes first, with maps."""
    right = preds[preds.true_id == preds.predicted_id].sort_values(
        ["probability", "image"], ascending=[False, True]
    )
    right = right.drop_duplicates("true_id").set_index("true_id", drop=False)
    right = right.loc[[c for c in _classes_to_show(preds) if c in right.index]].head(n)
    if right.empty:
        return None
    x = rows_tensor(learn, dl, right, data_dir)
    panels = _cam_panels(learn, x, right.true_id.tolist())
    cells = [
        (p, f"{plots.wrap(r.true)}\np={r.probability:.2f}", "black")
        for p, r in zip(panels, right.itertuples(), strict=True)
    ]
    rows = [cells[i : i + 4] for i in range(0, len(cells), 4)]
    return plots.plot_panels(rows, path, "Grad-CAM++ on a correct example of each class")


def _check_images(images: Sequence[str | os.PathLike] | None) -> None:
    """One-line error for the first image file that doesn't exist."""
    missing = [f for f in images or () if not Path(f).is_file()]
    if missing:
        raise TwincarError(f"{missing[0]}: image not found; check the --images paths")


def _files_items(files: Sequence[Path], boxes: Sequence | None) -> pd.DataFrame:
    """Annotations-like rows (path and car box, NaN: none) that the run's loader opens and cuts
    exactly as it does the data set's images."""
    boxes = list(boxes) if boxes is not None else [None] * len(files)
    if len(boxes) != len(files):
        raise TwincarError(f"{len(boxes)} boxes for {len(files)} --images; give one per image")
    cells = [tuple(b) if b is not None else (np.nan,) * 4 for b in boxes]
    df = pd.DataFrame(cells, columns=list(BBOX_COLUMNS), dtype=float)
    return df.assign(path=[str(f) for f in files])


def box_warning(missing: int, n: int) -> str:
    """The warning line for --images fed whole to a model trained on car-box crops."""
    return (
        f"this model was trained on car-box crops (bbox_crop) but {missing} of {n} --images "
        "have no box and are fed whole, which lowers accuracy; give boxes (--boxes boxes.csv "
        "or --data DIR), as for `twincar predict`"
    )


def gradcam_files(
    learn: Learner, files: Sequence[Path], path: Path, boxes: Sequence | None = None
) -> Path:
    """For image files (each cut to its car box, when given, as the run's loader cuts its
    images): the input and the maps of its two most probable classes."""
    _check_images(files)
    items = _files_items(files, boxes)
    dl = learn.dls.test_dl(items, with_labels=False, rm_type_tfms=0, bs=min(len(files), 64))
    x = torch.cat([b[0] for b in dl])
    with eval_bars(learn):
        probs = learn.get_preds(dl=dl)[0].float().numpy()
    top2 = np.argsort(-probs, axis=1)[:, :2]
    vocab, rgb = list(learn.dls.vocab), denormalize(learn, x)
    firsts = _cam_panels(learn, x, top2[:, 0].tolist())
    seconds = _cam_panels(learn, x, top2[:, min(1, top2.shape[1] - 1)].tolist())
    rows = []
    for i, f in enumerate(files):
        a, b = top2[i, 0], top2[i, min(1, top2.shape[1] - 1)]
        rows.append(
            [
                (rgb[i], plots.wrap(Path(f).name, 36), "black"),
                (firsts[i], f"1st: {plots.wrap(vocab[a])}\np={probs[i, a]:.2f}", "black"),
                (seconds[i], f"2nd: {plots.wrap(vocab[b])}\np={probs[i, b]:.2f}", "black"),
            ]
        )
    return plots.plot_panels(rows, path, "Grad-CAM++ of the two most probable classes")


def gradcam_parts(learn, dl, preds, data_dir, split, fig_path, csv_path, n_show) -> float | None:
    """Demo set: Grad-CAM++ mass in the part box of correct images ÷ the box's area share.

    Writes one row per correctly classified image to `csv_path` and the first `n_show`
    overlays, box drawn, to `fig_path`; returns the mean ratio (None without raw/parts.csv).
    """
    boxes = part_boxes(data_dir, split)
    if boxes is None:
        return None
    right = preds[preds.true_id == preds.predicted_id]
    names = right["image"].map(lambda s: Path(s).name)
    right = right[names.isin(boxes.index)]
    if right.empty:
        return None
    x = rows_tensor(learn, dl, right, data_dir)
    cams = gradcam_maps(learn, x, right.true_id.tolist())
    masks = part_masks(learn, dl, right, data_dir, boxes)
    ratio = box_mass_ratio(cams, masks)
    table = right[["image", "true", "probability"]].assign(
        box_share=masks.reshape(len(masks), -1).mean(1), ratio=ratio
    )
    write_csv(csv_path, table)
    rgb = denormalize(learn, x[:n_show])
    cells = [
        (
            outline(overlay(rgb[i], cams[i]), masks[i]),
            f"{plots.wrap(r.true)}\nratio {r.ratio:.1f}",
            "black",
        )
        for i, r in enumerate(table.head(n_show).itertuples())
    ]
    title = f"Grad-CAM++ vs the class-telling part (white box): mean ratio {np.nanmean(ratio):.2f}"
    plots.plot_panels([cells[i : i + 4] for i in range(0, len(cells), 4)], fig_path, title)
    return float(np.nanmean(ratio))


# ---------------------------------------------------------------- whole report


def draw_split_figures(
    report_dir: Path, split: str, data_dir: Path, cfg: ExperimentConfig
) -> list[Path]:
    """Class F1, confusion (+ zoom), most-confused pairs and top losses from the run's CSVs."""
    fig_dir = report_dir / FIGURES_DIR
    preds = pd.read_csv(report_dir / PREDICTIONS_CSV.format(split))
    per_class = pd.read_csv(report_dir / PER_CLASS_CSV.format(split))
    classes = per_class.sort_values("class_id")["label"].astype(str).tolist()
    cm = plots.confusion_counts(preds, len(classes))
    block = plots.most_confused_block(cm, plots.cluster_order(cm), cfg.eval.confusion_zoom)
    pairs = plots.most_confused(preds, cfg.eval.most_confused)
    write_csv(report_dir / MOST_CONFUSED_CSV.format(split), pairs)
    out = [
        plots.plot_class_f1(per_class, fig_dir / SPLIT_PNG.format("class_f1", split)),
        plots.plot_confusion(cm, classes, fig_dir / SPLIT_PNG.format("confusion", split)),
    ]
    zoom = fig_dir / SPLIT_PNG.format("confusion_zoom", split)
    if len(block) < len(classes):  # a zoom on every class would only repeat the matrix
        out.append(plots.plot_confusion_zoom(cm, classes, block, zoom))
    else:
        zoom.unlink(missing_ok=True)  # from an earlier interpret with a zoom
    view = model_view(cfg, data_dir)
    if not pairs.empty:
        ex = fig_dir / SPLIT_PNG.format("most_confused", split)
        out.append(plots.plot_confused_examples(preds, pairs, data_dir, ex, CONFUSED_ROWS, view))
    if cfg.eval.top_losses:
        tl = fig_dir / SPLIT_PNG.format("top_losses", split)
        out.append(plots.plot_top_losses(preds, data_dir, tl, cfg.eval.top_losses, view))
    return out


def _warn_whole(cfg: ExperimentConfig, images, boxes) -> None:
    """Say once, on stderr, when a box-trained model gets --images without a box."""
    if not images or not cfg.data.bbox_crop:
        return
    missing = len(images) if boxes is None else sum(b is None for b in boxes)
    if missing:
        print(f"warning: {box_warning(missing, len(images))}", file=sys.stderr)


def model_view(cfg: ExperimentConfig, data_dir: Path):
    """(image, rgb) → what the model saw of it: the car-box crop and resize of its input."""
    geo = InputGeometry.from_config(cfg)
    cols = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    ann = read_annotations(data_dir).set_index("image")[cols] if geo.bbox_crop else None

    def view(image: str, rgb: Image.Image) -> Image.Image:
        box = tuple(ann.loc[image]) if ann is not None and image in ann.index else None
        return geo.view(rgb, box)

    return view


def _gradcam_figures(learn, report_dir, split, data_dir, cfg, images, boxes) -> list[Path]:
    """The Grad-CAM++ figures of the split's mistakes and correct examples, and of `images`."""
    fig_dir, n = report_dir / FIGURES_DIR, cfg.eval.gradcam
    out = []
    if images:
        files = [Path(f) for f in images]
        out.append(gradcam_files(learn, files, fig_dir / GRADCAM_IMAGES_PNG, boxes))
    if n:
        preds = pd.read_csv(report_dir / PREDICTIONS_CSV.format(split))
        dl = split_dl(learn, data_dir, split, cfg)
        out.append(
            gradcam_mistakes(
                learn, dl, preds, data_dir, fig_dir / SPLIT_PNG.format("gradcam_mistakes", split), n
            )
        )
        out.append(
            gradcam_correct(
                learn, dl, preds, data_dir, fig_dir / SPLIT_PNG.format("gradcam_correct", split), n
            )
        )
        fig, table = (
            fig_dir / SPLIT_PNG.format("gradcam_parts", split),
            report_dir / GRADCAM_PARTS_CSV.format(split),
        )
        if gradcam_parts(learn, dl, preds, data_dir, split, fig, table, n) is not None:
            out.append(fig)
    return [p for p in out if p is not None]


def interpret_learner(
    learn: Learner,
    cfg: ExperimentConfig,
    report_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike] | None = None,
    boxes: Sequence | None = None,
) -> Path:
    """Draw every figure and table of a run from an in-memory learner; return index.html.

    Args:
        images: more image files to draw Grad-CAM++ maps of.
        boxes: per image its car box (x1, y1, x2, y2; 1-based inclusive) or None (whole).
    """
    report_dir, data_dir = Path(report_dir), Path(data_dir)
    _check_images(images)
    _warn_whole(cfg, images, boxes)
    check_vocab(learn.dls, data_dir)
    split = "test" if cfg.eval.test else "valid"
    if not (report_dir / EVAL_JSON.format(split)).is_file():
        evaluate_learner(learn, data_dir, split, report_dir, cfg)
    with step("drawing the figures"):
        if (report_dir / METRICS_CSV).is_file():
            plot_curves(report_dir / METRICS_CSV, report_dir / FIGURES_DIR)
        for s in ("test", "valid"):
            if (report_dir / PREDICTIONS_CSV.format(s)).is_file():
                draw_split_figures(report_dir, s, data_dir, cfg)
    if cfg.eval.gradcam or images:
        with step("Grad-CAM++ maps"):
            _gradcam_figures(learn, report_dir, split, data_dir, cfg, images, boxes)
    if cfg.eval.twins:
        with step("twins (Finer-CAM)"):
            find_twins(learn, cfg, report_dir, data_dir, split, cfg.eval.twins)
    return write_index(report_dir)


def interpret_run(
    run: str | os.PathLike,
    images: Sequence[str | os.PathLike] | None = None,
    data_dir: str | os.PathLike | None = None,
    boxes: Sequence | None = None,
    force: bool = False,
) -> Path:
    """Regenerate a run's evaluation, figures and index.html from its saved model.

    Args:
        run: reports/<run>, models/<run> or a learner.pkl.
        images: more image files to draw Grad-CAM++ maps of.
        data_dir: the prepared data set (default: the run's).
        boxes: per image its car box or None, as `twincar predict` takes them.
        force: let new twins replace a different twins.csv in the model folder.
    """
    _check_images(images)
    paths, cfg, data, learn = open_saved_run(run, data_dir)
    index = interpret_learner(learn, cfg, paths.report_dir, data, images, boxes)
    copy_twins(paths.report_dir, paths.model_dir, force=force)
    console.print(f"report of {paths.name}: {index}")
    return index
