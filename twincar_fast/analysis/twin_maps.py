"""What tells a twin pair apart: Finer-CAM beside Grad-CAM++ on the images of both classes.

Each image of class a is explained as "a rather than b" (Finer-CAM: a's logit minus b's, see
`gradcam.model_finer_cams`) and as plain "a" (Grad-CAM++), and the same for b's images against a.
The maps are scored with the Finer-CAM paper's check (`masking_drop`): mask the top 5% of a map's
pixels and measure how much the model's confidence in the target over its twin drops; a map that
finds what separates the twins makes it drop more. On the demo set (raw/parts.csv) the share of
each map's mass in the differing part's box is compared with the box's area share too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from torch import nn

from twincar_fast.analysis import plots
from twincar_fast.analysis.gradcam import (
    box_mass_ratio,
    denormalize,
    model_cams,
    model_finer_cams,
    overlay,
)
from twincar_fast.analysis.samples import outline, part_masks, rows_tensor

__all__ = [
    "MASK_SHARE",
    "PairMaps",
    "mask_top",
    "masking_drop",
    "pair_maps",
    "pair_scores",
    "plot_pair",
    "relative_confidence",
]

MASK_SHARE = 0.05  # the share of a map's pixels masked by the Finer-CAM paper's check
SCORE_IMAGES = 48  # images per class explained and scored (the figure shows the first few)
FIGURE_IMAGES = 2  # images per class in a pair's figure


@dataclass
class PairMaps:
    """The maps of one pair's images: each row's target class, its twin and both maps."""

    rows: pd.DataFrame  # predictions rows: class a's images, then class b's
    x: torch.Tensor  # their normalized model inputs
    targets: np.ndarray  # the explained class: the true class
    twins: np.ndarray  # the class it is told apart from: the other class of the pair
    gradcam: np.ndarray  # Grad-CAM++ of the target (N, H, W)
    finer: np.ndarray  # Finer-CAM of the target against its twin (N, H, W)
    masks: np.ndarray | None = None  # the part boxes in the input (demo set), else None


def _pair_rows(preds: pd.DataFrame, a: int, b: int, n: int) -> pd.DataFrame:
    """Up to `n` images of each class: those mixed up with the other first, then by confidence."""
    out = []
    for c, other in ((a, b), (b, a)):
        rows = preds[preds["true_id"] == c]
        rows = rows.assign(_mixed=rows["predicted_id"] == other)
        rows = rows.sort_values(
            ["_mixed", "true_probability", "image"], ascending=[False, False, True]
        )
        out.append(rows.head(n).drop(columns="_mixed"))
    return pd.concat(out, ignore_index=True)


def pair_maps(
    learn: Learner, dl, preds: pd.DataFrame, data_dir: Path, a: int, b: int, boxes=None
) -> PairMaps:
    """Finer-CAM and Grad-CAM++ maps of the split's images of classes `a` and `b`."""
    rows = _pair_rows(preds, a, b, SCORE_IMAGES)
    x = rows_tensor(learn, dl, rows, data_dir)
    targets = rows["true_id"].to_numpy(int)
    twins = np.where(targets == a, b, a)
    model = learn.model
    names = rows["image"].map(lambda s: Path(s).name)
    masks = None
    if boxes is not None and names.isin(boxes.index).all():
        masks = part_masks(learn, dl, rows, data_dir, boxes)
    return PairMaps(
        rows=rows,
        x=x,
        targets=targets,
        twins=twins,
        gradcam=model_cams(model, x, targets.tolist()),
        finer=model_finer_cams(model, x, targets.tolist(), twins.tolist()),
        masks=masks,
    )


def relative_confidence(
    model: nn.Module, x: torch.Tensor, targets, twins, bs: int = 64
) -> np.ndarray:
    """The model's confidence in each target over its twin: softmax over the two logits."""
    model = getattr(model, "_orig_mod", model).eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    t, b = torch.tensor(np.array(targets, int)), torch.tensor(np.array(twins, int))
    out = []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            z = model(x[i : i + bs].as_subclass(torch.Tensor).to(device).float()).float().cpu()
            rows = torch.arange(len(z))
            out.append(torch.sigmoid(z[rows, t[i : i + bs]] - z[rows, b[i : i + bs]]))
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def mask_top(x: torch.Tensor, maps: np.ndarray, share: float = MASK_SHARE) -> torch.Tensor:
    """`x` with the top `share` of each map's pixels set to 0 (the data set's mean colour)."""
    n, h, w = maps.shape
    k = max(1, math.ceil(share * h * w))
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")[:, :k]
    keep = np.ones((n, h * w), np.float32)
    np.put_along_axis(keep, order, 0.0, axis=1)
    keep_t = torch.from_numpy(keep.reshape(n, 1, h, w)).to(x.device)
    return x.as_subclass(torch.Tensor).float() * keep_t


def masking_drop(
    model: nn.Module, x: torch.Tensor, maps: np.ndarray, targets, twins, share: float = MASK_SHARE
) -> np.ndarray:
    """Per image: the confidence in the target over its twin minus the same with the map's
    top `share` pixels masked (the Finer-CAM paper's check; larger: the map found more)."""
    before = relative_confidence(model, x, targets, twins)
    return before - relative_confidence(model, mask_top(x, maps, share), targets, twins)


def pair_scores(learn: Learner, pm: PairMaps) -> dict[str, float]:
    """Mean masking drops and (demo set) part ratios of both maps over the pair's images."""
    out = {}
    for name, maps in (("finer", pm.finer), ("gradcam", pm.gradcam)):
        drop = masking_drop(learn.model, pm.x, maps, pm.targets, pm.twins)
        out[f"drop_{name}"] = float(drop.mean()) if len(drop) else float("nan")
        if pm.masks is not None:
            out[f"part_ratio_{name}"] = float(np.nanmean(box_mass_ratio(maps, pm.masks)))
    return out


def _cells(learn: Learner, pm: PairMaps, i: int, vocab: list[str]) -> list:
    """Input, Grad-CAM++ and Finer-CAM panels of image `i` of a pair (part box outlined)."""
    rgb = denormalize(learn, pm.x[i : i + 1])[0]
    r = pm.rows.iloc[i]
    box = (lambda im: outline(im, pm.masks[i])) if pm.masks is not None else (lambda im: im)
    mixed = r["predicted_id"] != r["true_id"]
    head = f"{plots.wrap(r['true'])}\n→ {plots.wrap(r['predicted'], 24) if mixed else 'right'}"
    twin = plots.wrap(vocab[pm.twins[i]], 24)
    return [
        ((rgb * 255).round().astype(np.uint8), head, "tab:red" if mixed else "black"),
        (box(overlay(rgb, pm.gradcam[i])), "Grad-CAM++", "black"),
        (box(overlay(rgb, pm.finer[i])), f"Finer-CAM\nvs {twin}", "tab:blue"),
    ]


def plot_pair(learn: Learner, pm: PairMaps, pair: pd.Series, path: Path) -> Path:
    """The pair's figure: a row of class a's images and one of class b's, each with both maps."""
    vocab = list(learn.dls.vocab)
    rows = []
    for c in (pair["class_a_id"], pair["class_b_id"]):
        idx = np.flatnonzero(pm.targets == c)[:FIGURE_IMAGES]
        rows.append(sum((_cells(learn, pm, int(i), vocab) for i in idx), []))
    rows = [r for r in rows if r]
    facts = (
        f"Twins #{pair['rank']}: {pair['class_a']} vs {pair['class_b']} "
        f"(mixed up {pair['confusion_a_as_b']:.0%} / {pair['confusion_b_as_a']:.0%}, "
        f"centroid cosine {pair['centroid_cosine']:.2f})"
    )
    legend = "Finer-CAM: the target's evidence minus its twin's; white box: the part that differs"
    return plots.plot_panels(rows, path, f"{plots.wrap(facts, 110)}\n{legend} (demo set)")
