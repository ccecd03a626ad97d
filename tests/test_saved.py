"""Saved models loaded again: pickles only with trust, evaluation from the safe files, a finished
run's results never replaced, tampered model.json files refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_cfg

from twincar_fast.cli import main
from twincar_fast.errors import TwincarError
from twincar_fast.experiment import run_experiment
from twincar_fast.ship.predict import Predictor


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A finished tiny run with its own test evaluation (eval_test.json)."""
    cfg = make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("saved_run"))
    cfg.eval = dataclasses.replace(cfg.eval, test=True, interpret=False)
    return run_experiment(cfg)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*_test.*")}


def test_evaluation_on_other_data_never_replaces_the_runs_results(run, tiny_data, tmp_path, capsys):
    """Issue 12.1: evaluate --data OTHER used to overwrite eval_test.json & co. in place."""
    before = _files(run.report_dir)
    assert set(before) == {"eval_test.json", "predictions_test.csv", "per_class_test.csv"}
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    assert main(["evaluate", str(run.model_dir), "--data", str(other)]) == 0
    assert _files(run.report_dir) == before
    (new,) = run.report_dir.glob("eval-other-*")
    assert json.loads((new / "eval_test.json").read_text())["data_dir"] == str(other.resolve())
    # its own data again, or an --out that holds an evaluation: refused unless --force
    assert main(["evaluate", str(run.report_dir), "--data", str(tiny_data)]) == 2
    assert "--force" in one_line(capsys)
    assert _files(run.report_dir) == before
    argv = ["evaluate", str(run.model_dir), "--data", str(other), "--out", str(tmp_path / "o")]
    assert main(argv) == 0 and main(argv) == 2
    assert main([*argv, "--force"]) == 0


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickles_load_only_with_trust(run, tiny_data, tmp_path, capsys):
    """Issue 12.2: a learner.pkl with an os.system payload ran under predict and evaluate."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil" / "learner.pkl"
    evil.parent.mkdir()
    torch.save(_Payload(marker), evil)
    image = next((tiny_data / "images").glob("test_*.jpg"))
    with pytest.raises(TwincarError, match=r"pickle can run any code.*model.safetensors"):
        Predictor.from_path(evil.parent)
    assert main(["predict", str(evil), str(image)]) == 2
    assert "--trust-pickle" in one_line(capsys)
    assert main(["evaluate", str(evil.parent), "--data", str(tiny_data)]) == 2
    assert "--trust-pickle" in one_line(capsys)
    assert not marker.exists()
    # a folder with both: the safe pair is used, the pickle never opened
    assert Predictor.from_path(run.model_dir).classes == run.learn.dls.vocab


def test_evaluate_works_from_the_safe_files(run, tiny_data, tmp_path):
    """Issue 12.2: evaluate read only pickles; now model.safetensors + config.json suffice."""
    safe = tmp_path / "safe"
    safe.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(run.model_dir / name, safe / name)
    assert (
        main(["evaluate", str(safe), "--data", str(tiny_data), "--out", str(tmp_path / "a")]) == 0
    )
    argv = ["evaluate", str(safe / "model.safetensors"), "--data", str(tiny_data)]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    own = json.loads((run.report_dir / "eval_test.json").read_text())
    for out in ("a", "b"):
        got = json.loads((tmp_path / out / "eval_test.json").read_text())
        assert got["test_acc"] == pytest.approx(own["test_acc"], abs=1e-9)
        assert got["test_loss"] == pytest.approx(own["test_loss"], rel=1e-4)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"img_size": "abc"}, "key 'img_size': expected int"),
        ({"img_size": 0}, "key 'img_size' must be in [16, 4096]"),
        ({"mean": [0.5, 0.5]}, "key 'mean' must be 3 numbers (R, G, B) in [0, 1]"),
        ({"std": [0, 0, 0]}, "key 'std' must be 3 numbers (R, G, B) in [0.001, 10]"),
        # issue 29.2: values that passed but gave NaN, garbage or a 24 GB process
        ({"std": [1e-300] * 3}, "key 'std' must be 3 numbers (R, G, B) in [0.001, 10]"),
        ({"std": [1e308] * 3}, "key 'std' must be 3 numbers (R, G, B) in [0.001, 10]"),
        ({"mean": [1e300] * 3}, "key 'mean' must be 3 numbers (R, G, B) in [0, 1]"),
        ({"classes": ["Audi"] * 4}, "key 'label_names' must name each class once"),
        ({"img_size": 20000, "item_size": 20000}, "key 'img_size' must be in [16, 4096]"),
        ({"item_size": 20000}, "key 'item_size' must be in [16, 4096]"),
        ({"resize": "bogus"}, "key 'resize': expected 'crop' | 'squish' | 'pad'"),
        ({"draft": "no"}, "key 'draft': expected bool"),
        ({"classes": None}, "key 'classes': expected a list of str"),
        ({"head_dropout": 2}, "key 'head_dropout' must be in"),
        ({"bbox_margin": -0.5}, "key 'bbox_margin' must be a finite number"),
        (None, "must be a JSON object"),
    ],
)
def test_tampered_model_json_is_one_line(run, tmp_path, edit, needle):
    """Issue 12.16: hand-edited model.json files gave tracebacks or silently wrong predictions."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(run.model_dir / "model.safetensors", folder)
    config = json.loads((run.model_dir / "config.json").read_text())
    for key, value in (edit or {}).items():  # each fact where config.json keeps it
        if key in ("mean", "std"):
            config["pretrained_cfg"][key] = value
        elif key == "classes":
            config["label_names"] = value
        else:
            config["twincar"][key] = value
    (folder / "config.json").write_text(json.dumps(None if edit is None else config))
    with pytest.raises(TwincarError) as e:
        Predictor.from_path(folder, device="cpu")
    assert needle in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)


def test_folders_exported_before_config_json_still_load(run, tmp_path):
    """Issue 16.1: model.json gave way to config.json; older folders keep loading."""
    from twincar_fast.ship.card import read_model_card

    card = dataclasses.asdict(read_model_card(run.model_dir))
    del card["weights_layout"]  # model.json never had it
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run.model_dir / "model.safetensors", old)
    (old / "model.json").write_text(json.dumps({**card, "format": "twincar_fast/model-v1"}))
    image = sorted(p for p in run.learn.dls.valid.items["path"])[:3]
    expected = Predictor.from_path(run.model_dir, device="cpu").predict_proba(image)
    got = Predictor.from_path(old, device="cpu").predict_proba(image)
    assert got.shape == (3, 4)
    assert abs(got - expected).max() == 0
