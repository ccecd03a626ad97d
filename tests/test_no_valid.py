"""A run without a validation split (data.valid_pct: 0, as the demo) reads as a finished run.

Its page, model card, console and summary.json show the test split's accuracy, macro F1 and top-5
and say which epoch was kept and why; nowhere a `nan`, `None` or null where a value belongs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re

import pytest
from conftest import make_tiny_cfg

from twincar_fast.experiment import run_experiment

NOT_A_VALUE = re.compile(r"\b(nan|None)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def no_valid_run(tiny_data, tmp_path_factory):
    """A tiny run with valid_pct 0, test evaluation and the report; its console output."""
    cfg = make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("no_valid"))
    cfg.data = dataclasses.replace(cfg.data, valid_pct=0.0)
    cfg.eval = dataclasses.replace(cfg.eval, test=True, interpret=True, gradcam=1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_experiment(cfg)
    test = json.loads((result.report_dir / "eval_test.json").read_text())
    return result, test, buf.getvalue()


def _strict(text: str) -> dict:
    """JSON that may hold no NaN or infinity."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def _nulls(obj, path: str = "") -> list[str]:
    """The paths of every null in a JSON object."""
    if obj is None:
        return [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _nulls(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _nulls(v, f"{path}[{i}]")]
    return []


def test_summary_says_which_epoch_was_kept_and_holds_the_test_metrics(no_valid_run):
    result, test, _ = no_valid_run
    summary = _strict((result.report_dir / "summary.json").read_text())
    assert _nulls(summary) == []  # before: best_value and 16 valid_* values were null
    assert summary["kept_epoch"] == summary["best_epoch"] == 1  # the last of 2 epochs
    assert "no validation split" in summary["kept_because"]
    assert "best_value" not in summary and "monitor" not in summary  # nothing was judged
    assert summary["test"] == {
        "n_images": 24,
        "acc": test["test_acc"],
        "top5": test["test_top5"],
        "f1_macro": test["test_f1_macro"],
        "loss": test["test_loss"],
    }
    assert result.summary == summary


def test_page_shows_the_test_metrics_and_the_kept_epoch_without_nan(no_valid_run):
    result, test, _ = no_valid_run
    page = (result.report_dir / "index.html").read_text()
    results = page.split("<h2>Config (config.yaml)</h2>")[0]  # the config's own text aside
    assert not NOT_A_VALUE.findall(results), NOT_A_VALUE.findall(results)
    assert f"accuracy {test['test_acc']:.2%}" in page
    assert f"top-5 {test['test_top5']:.2%}" in page and f"macro F1 {test['test_f1_macro']:.3f}"
    assert "The model is epoch 1 of epochs 0-1: the last epoch, as there is no validation" in page
    assert "Validation during training" not in page
    assert "Train accuracy per epoch (no validation split" in page  # the caption of accuracy.png
    assert "Accuracy (train and valid)" not in page


def test_model_card_shows_the_test_metrics_and_the_kept_epoch(no_valid_run):
    result, test, _ = no_valid_run
    card = (result.model_dir / "README.md").read_text()
    metrics = card.split("## Metrics")[1].split("## Training config")[0]
    assert not NOT_A_VALUE.findall(metrics), metrics
    assert "The weights of epoch 1: the last epoch, as there is no validation split" in metrics
    assert "| metric | test (24 images) |" in metrics
    assert f"| acc | {test['test_acc']:.4f} |" in metrics
    assert f"| top5 | {test['test_top5']:.4f} |" in metrics
    assert f"| f1_macro | {test['test_f1_macro']:.4f} |" in metrics
    config = _strict((result.model_dir / "config.json").read_text())
    recorded = config["twincar"]["metrics"]
    assert _nulls(recorded) == [] and recorded["test_acc"] == test["test_acc"]
    assert recorded["epoch"] == 1 and recorded["test_images"] == 24


def test_console_names_the_kept_epoch_and_prints_the_test_metrics(no_valid_run):
    _, test, out = no_valid_run
    assert not NOT_A_VALUE.findall(out), [ln for ln in out.splitlines() if NOT_A_VALUE.search(ln)]
    assert "evaluating the best model" not in out  # it evaluates the last epoch's
    assert "evaluating the model of epoch 1 on the test split: done in" in out
    assert "kept epoch 1, the last epoch, as there is no validation split" in out
    assert (
        f"test split (24 images): acc {test['test_acc']:.4f}, top-5 {test['test_top5']:.4f}, "
        f"macro F1 {test['test_f1_macro']:.4f}"
    ) in out
