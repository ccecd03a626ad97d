"""The training curves of a run: accuracy/F1, loss, precision/recall and top-k per epoch from its
metrics.csv, the kept epoch (summary.json's) marked; titles that say when there is no validation split.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from twincar_fast.analysis.plots import save_figure
from twincar_fast.run_folder import (
    ACCURACY_PNG,
    LOSS_PNG,
    PRECISION_RECALL_PNG,
    SUMMARY_JSON,
    TOPK_PNG,
    read_json,
)

__all__ = ["CURVES", "curve_title", "plot_curves"]

# figure file -> (title, y label, [(metrics.csv column, legend label), ...])
CURVES = {
    ACCURACY_PNG: (
        "Accuracy and macro F1",
        "score",
        [
            ("train_acc", "train accuracy"),
            ("valid_acc", "valid accuracy"),
            ("valid_f1_macro", "valid F1 macro"),  # weighted F1 (metrics.csv) hid under it
        ],
    ),
    LOSS_PNG: ("Loss", "loss", [("train_loss", "train"), ("valid_loss", "valid")]),
    PRECISION_RECALL_PNG: (
        "Macro precision and recall (valid)",
        "score",
        [("valid_precision_macro", "precision macro"), ("valid_recall_macro", "recall macro")],
    ),
    TOPK_PNG: (
        "Top-k accuracy (valid)",
        "accuracy",
        [("valid_acc", "top-1"), ("valid_top3", "top-3"), ("valid_top5", "top-5")],
    ),
}
# the title of a figure that has no validation curve (data.valid_pct: 0): what it does show
TRAIN_ONLY_TITLES = {
    ACCURACY_PNG: "Train accuracy (no validation split: the test split judges the run)",
    LOSS_PNG: "Train loss (no validation split)",
}


def curve_title(name: str, columns: list[str]) -> str:
    """The title of curve figure `name` drawing metrics.csv `columns`."""
    if not any(c.startswith("valid_") for c in columns) and name in TRAIN_ONLY_TITLES:
        return TRAIN_ONLY_TITLES[name]
    return CURVES[name][0]


def _kept_epoch(metrics_csv: Path) -> int | None:
    """The epoch whose weights the run kept (summary.json beside metrics.csv), if recorded."""
    summary = read_json(metrics_csv.parent / SUMMARY_JSON)
    kept = summary.get("kept_epoch", summary.get("best_epoch"))
    return kept if isinstance(kept, int) else None


def plot_curves(metrics_csv: str | os.PathLike, fig_dir: str | os.PathLike) -> list[Path]:
    """Accuracy/F1, loss, precision/recall and top-k curves per epoch from metrics.csv, the kept
    epoch (summary.json's) marked."""
    df = pd.read_csv(metrics_csv)
    kept = _kept_epoch(Path(metrics_csv))
    out = []
    for name, (_, ylabel, series) in CURVES.items():
        present = [(c, lab) for c, lab in series if c in df and df[c].notna().any()]
        if df.empty or not present:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for k, (col, label) in enumerate(present):
            style = "--" if "weighted" in col or "top5" in col else "-"  # overlapping twins show
            ax.plot(df["epoch"], df[col], style, marker="o", ms=3, label=label, zorder=3 - k / 9)
        if kept is not None and (df["epoch"] == kept).any():
            ax.axvline(kept, color="0.5", ls=":", lw=1, label=f"kept epoch {kept}")
        ax.set(title=curve_title(name, [c for c, _ in present]), xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        out.append(save_figure(fig, Path(fig_dir) / name))
    return out
