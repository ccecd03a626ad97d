"""The train/valid split: stratified per class, seeded, and never touching the test split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twincar_fast.data import read_annotations, split_train_valid
from twincar_fast.errors import DataError

SIZES = [4, 5, 9, 24, 37, 46, 100]  # Stanford Cars' train classes hold 24..68 images


def make_df(sizes: list[int], n_test: int = 3) -> pd.DataFrame:
    """Annotation rows (no files needed): class c has sizes[c] train and n_test test images."""
    rows = []
    for c, n in enumerate(sizes):
        rows += [(f"train/{c}_{i}.jpg", f"class {c}", c, "train") for i in range(n)]
        rows += [(f"test/{c}_{i}.jpg", f"class {c}", c, "test") for i in range(n_test)]
    return pd.DataFrame(rows, columns=["image", "label", "class_id", "split"])


@pytest.mark.parametrize("valid_pct", [0.1, 0.25])
def test_split_is_stratified(valid_pct):
    out = split_train_valid(make_df(SIZES), valid_pct, seed=42)
    for c, n in enumerate(SIZES):
        part = out[out["class_id"] == c]
        n_valid = int(part["is_valid"].sum())
        assert len(part) == n
        assert n_valid >= 2 and n - n_valid >= 2, (c, n, n_valid)
        if n * valid_pct >= 2:  # where the floor of 2 doesn't bind, the share is kept per class
            assert abs(n_valid - valid_pct * n) <= 1, (c, n, n_valid)
        else:
            assert n_valid == 2


def test_tiny_split_proportions(tiny_data):
    out = split_train_valid(read_annotations(tiny_data), 0.25, seed=42)
    counts = out.groupby("label")["is_valid"].agg(["sum", "size"])
    assert (counts["size"] == 12).all()
    assert (counts["sum"] == 3).all()  # 25 % of 12 in every class


def test_split_is_seeded():
    df = make_df(SIZES)
    a = split_train_valid(df, 0.1, seed=42)
    b = split_train_valid(df, 0.1, seed=42)
    c = split_train_valid(df, 0.1, seed=7)
    assert a["is_valid"].tolist() == b["is_valid"].tolist()
    assert a["is_valid"].tolist() != c["is_valid"].tolist()
    assert a["is_valid"].sum() == c["is_valid"].sum()  # same per-class counts, other images


def test_test_split_stays_out():
    df = make_df(SIZES)
    out = split_train_valid(df, 0.1, seed=42)
    assert (out["split"] == "train").all()
    assert len(out) == sum(SIZES)
    test_images = set(df.loc[df["split"] == "test", "image"])
    assert not test_images & set(out["image"])
    assert out["is_valid"].dtype == np.bool_


def test_too_small_class_is_one_line_error():
    with pytest.raises(DataError) as info:
        split_train_valid(make_df([12, 3, 12]), 0.1, seed=0)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'class 1'" in msg and "3" in msg and "fewer than 4" in msg


def test_no_validation_split_keeps_every_train_image():
    df = make_df(SIZES)
    out = split_train_valid(df, 0.0, seed=42)
    assert len(out) == sum(SIZES) and not out["is_valid"].any()
    assert set(out["split"]) == {"train"}
