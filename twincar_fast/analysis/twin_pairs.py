"""Twin pairs: the look-alike classes a model mixes up, from its confusion and its embeddings.

Two similarities of every class pair (a, b):

- confusion: `(C[a, b] / n_a + C[b, a] / n_b) / 2`, the share of a's images predicted as b and of
  b's predicted as a, averaged (symmetrised, normalised by class size); counts from every
  evaluated split (valid and test) together.
- centroid cosine: the cosine between the class centroids (means over a split's images) of the
  model's pooled features: the body's output (model[0]) averaged over its positions, what the
  classifier head sees (timm heads: the body pools itself).

The pair score combines them as `confusion × (1 + cosine) / 2`: the model's mistakes rank the
pairs, and among pairs mixed up as often the one the model also sees as closer comes first (a
pair confused now and then while its features lie far apart is discounted by up to half). A pair
the model never mixed up scores 0 and is not listed, whatever its cosine.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner

from twincar_fast.analysis.plots import confusion_counts

__all__ = [
    "PAIR_COLUMNS",
    "centroid_similarity",
    "mixed_images",
    "pair_similarity",
    "pooled_features",
    "split_confusion",
    "twin_pairs",
]

PAIR_COLUMNS = [
    "rank",
    "class_a",
    "class_b",
    "class_a_id",
    "class_b_id",
    "score",
    "confusion",
    "confusion_a_as_b",
    "confusion_b_as_a",
    "centroid_cosine",
    "n_a_as_b",
    "n_b_as_a",
]


def centroid_similarity(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The (n, n) cosine between class centroids of `features`; NaN for classes without images."""
    dim = features.shape[1] if features.ndim == 2 else 0
    sums = np.zeros((n_classes, dim))
    np.add.at(sums, labels, features)
    counts = np.bincount(labels, minlength=n_classes)[:, None]
    centroids = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)
    return unit @ unit.T


def pair_similarity(cm: np.ndarray, cosine: np.ndarray) -> pd.DataFrame:
    """Every class pair a < b with both confusion rates, their mean, the cosine and the score."""
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    a, b = np.triu_indices(len(cm), k=1)
    cos = cosine[a, b]
    conf = (rates[a, b] + rates[b, a]) / 2
    return pd.DataFrame(
        {
            "a": a,
            "b": b,
            "score": conf * (1 + np.nan_to_num(cos)) / 2,
            "confusion": conf,
            "rate_ab": rates[a, b],
            "rate_ba": rates[b, a],
            "centroid_cosine": cos,
            "n_ab": cm[a, b],
            "n_ba": cm[b, a],
        }
    )


def twin_pairs(
    cm: np.ndarray, cosine: np.ndarray, classes: list[str], k: int | None = None
) -> pd.DataFrame:
    """The `k` best twin pairs (score, then confusion, then cosine), mixed-up pairs only.

    `class_a` is the class whose images are taken for the other more often (ties: lower id).
    """
    df = pair_similarity(cm, cosine)
    df = df[(df["n_ab"] + df["n_ba"]) > 0]
    swap = (df["rate_ba"] > df["rate_ab"]).to_numpy()
    for x, y in (("a", "b"), ("rate_ab", "rate_ba"), ("n_ab", "n_ba")):
        vx, vy = df[x].to_numpy(), df[y].to_numpy()
        df = df.assign(**{x: np.where(swap, vy, vx), y: np.where(swap, vx, vy)})
    df = df.sort_values(
        ["score", "confusion", "centroid_cosine", "a", "b"],
        ascending=[False, False, False, True, True],
        kind="stable",
    ).head(k)
    names = np.asarray(classes, dtype=object)
    out = pd.DataFrame(
        {
            "rank": np.arange(1, len(df) + 1),
            "class_a": names[df["a"].to_numpy(int)],
            "class_b": names[df["b"].to_numpy(int)],
            "class_a_id": df["a"].to_numpy(int),
            "class_b_id": df["b"].to_numpy(int),
            "score": df["score"].to_numpy(float),
            "confusion": df["confusion"].to_numpy(float),
            "confusion_a_as_b": df["rate_ab"].to_numpy(float),
            "confusion_b_as_a": df["rate_ba"].to_numpy(float),
            "centroid_cosine": df["centroid_cosine"].to_numpy(float),
            "n_a_as_b": df["n_ab"].to_numpy(int),
            "n_b_as_a": df["n_ba"].to_numpy(int),
        }
    )
    return out[PAIR_COLUMNS]


def split_confusion(preds: list[pd.DataFrame], n_classes: int) -> np.ndarray:
    """The summed (true, predicted) counts of the predictions tables of several splits."""
    return sum((confusion_counts(p, n_classes) for p in preds), np.zeros((n_classes,) * 2, int))


def mixed_images(preds: pd.DataFrame, a: int, b: int) -> list[str]:
    """The images of class `a` that the model predicted as `b`, highest loss first."""
    rows = preds[(preds["true_id"] == a) & (preds["predicted_id"] == b)]
    return rows.sort_values("loss", ascending=False)["image"].tolist()


def _pool(features: torch.Tensor) -> torch.Tensor:
    """Feature maps (B, C, H, W) or tokens (B, N, C) averaged to (B, C); (B, C) unchanged."""
    if features.ndim == 4:
        return features.float().mean((2, 3))
    return features.float().mean(1) if features.ndim == 3 else features.float()


def pooled_features(learn: Learner, dl) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, C), labels (N,)): the pooled output of the body (model[0]) over `dl`."""
    body = learn.model[0]
    feats, labels = [], []
    learn.model.eval()
    with torch.no_grad():
        for xb, yb in dl:
            feats.append(_pool(body(xb)).cpu())
            labels.append(yb.cpu())
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, int)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(int)
