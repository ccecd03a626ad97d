"""The README's notebook snippet, run as written on a tiny demo-like config: it learns and shows metrics."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import matplotlib
import numpy as np
from conftest import make_tiny_cfg

from twincar_fast.config import save_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    """The python block of the README's "### In a notebook" section."""
    section = README.read_text().split("### In a notebook")[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_notebook_snippet_learns_and_records_its_metrics(tiny_data, tmp_path):
    matplotlib.use("Agg")
    cfg = make_tiny_cfg(tiny_data, tmp_path)  # shaped like demo.yaml: no validation split,
    cfg.data = dataclasses.replace(cfg.data, valid_pct=0.0)  # warm-up then cosine, from scratch
    cfg.train = dataclasses.replace(
        cfg.train, epochs=6, schedule="cosine", warmup_epochs=1, freeze=[], lr=1e-2
    )
    save_config(cfg, tmp_path / "demo.yaml")
    code = _snippet().replace("experiments/demo.yaml", str(tmp_path / "demo.yaml"))
    scope: dict = {}
    exec(compile(code, "README snippet", "exec"), scope)  # noqa: S102 - the README's own code
    learn = scope["learn"]
    rec = learn.recorder
    assert rec.metric_names[1:4] == ["train_loss", "valid_loss", "accuracy"]
    values = np.array([v[:3] for v in rec.values], dtype=float)  # None (no valid split) → nan
    assert len(values) == 6 and np.isfinite(values).all(), values  # metrics shown every epoch
    assert values[-1, 1] < values[0, 1] * 0.8, values  # the valid loss drops
    assert values[-1, 2] > 0.5  # 4 classes: well above chance
