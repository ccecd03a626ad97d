"""The stratified, seeded train/valid split of the official train split (the test split stays out)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twincar_fast.errors import DataError

__all__ = ["MIN_PER_CLASS", "split_train_valid"]

MIN_PER_CLASS = 2  # images every class keeps in each of train and valid


def _n_valid(n: int, valid_pct: float) -> int:
    """Valid images for a class of `n`: the nearest count to n·valid_pct, ≥ 2 and leaving ≥ 2."""
    return int(np.clip(round(n * valid_pct), MIN_PER_CLASS, n - MIN_PER_CLASS))


def split_train_valid(df: pd.DataFrame, valid_pct: float, seed: int) -> pd.DataFrame:
    """The train-split rows of `df` with a bool `is_valid` column: a per-class, seeded split.

    Every class gives round(n · valid_pct) of its n images to validation (at least 2, leaving at
    least 2 for training), drawn with `seed`; the same rows in the same order give the same split.
    sklearn's `train_test_split(stratify=...)` allocates counts globally and can leave a small
    class with 0 or 1 validation images, hence the per-class draw.

    `valid_pct` 0 keeps every image for training (`is_valid` all False).

    Raises:
        DataError: some class has fewer than 4 train images.
    """
    if not 0 <= valid_pct < 1:
        raise DataError(f"valid_pct must be in [0, 1), got {valid_pct}")
    out = df[df["split"] == "train"] if "split" in df.columns else df
    out = out.reset_index(drop=True)
    if valid_pct == 0:
        return out.assign(is_valid=False)
    counts = out["label"].value_counts()
    small = counts[counts < 2 * MIN_PER_CLASS]
    if len(small):
        raise DataError(
            f"{len(small)} class(es) have fewer than {2 * MIN_PER_CLASS} train images, too few to "
            f"split into train and valid (first: {small.index[0]!r} with {small.iloc[0]}); "
            "add images or drop the class from annotations.csv and classes.csv"
        )
    rng = np.random.default_rng(seed)
    is_valid = np.zeros(len(out), dtype=bool)
    groups = out.groupby("label", sort=True).indices  # sorted: draw order independent of rows
    for label in sorted(groups):
        idx = groups[label]
        is_valid[rng.choice(idx, _n_valid(len(idx), valid_pct), replace=False)] = True
    return out.assign(is_valid=is_valid)
