"""The evaluation metrics (TwinCar's full table), computed from predictions with scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    hamming_loss,
    jaccard_score,
    matthews_corrcoef,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from twincar_fast.config_rules import METRIC_NAMES  # train.monitor names them: a config rule

__all__ = ["METRIC_NAMES", "classification_metrics", "per_class_table"]


def _topk(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Top-k accuracy over all classes (1.0 when there are no more than k classes)."""
    n_classes = probs.shape[1]
    if k >= n_classes:
        return 1.0
    return float(top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(n_classes)))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """TwinCar's metric table (keys = METRIC_NAMES) for integer targets and (N, C) probabilities."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(1)
    labels = np.arange(probs.shape[1])
    out = {"acc": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=np.unique(y_true), average=avg, zero_division=0
        )
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = (
            float(p),
            float(r),
            float(f),
        )
    out["hamming"] = float(hamming_loss(y_true, y_pred))
    out["cohen_kappa"] = float(cohen_kappa_score(y_true, y_pred, labels=labels))
    out["mcc"] = float(matthews_corrcoef(y_true, y_pred))
    out["jaccard_macro"] = float(
        jaccard_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)
    )
    out["top3"], out["top5"] = _topk(y_true, probs, 3), _topk(y_true, probs, 5)
    return {k: out[k] for k in METRIC_NAMES}


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support, one row per class in vocab order."""
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(class_names)), average=None, zero_division=0
    )
    return pd.DataFrame(
        {
            "class_id": np.arange(len(class_names)),
            "label": class_names,
            "precision": p,
            "recall": r,
            "f1": f,
            "support": s,
        }
    )
