"""`evaluate`: the metric table of a saved run on the test (or valid) split, checked against sklearn."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_cfg
from sklearn import metrics as skm

from twincar_fast.analysis.metrics import METRIC_NAMES
from twincar_fast.cli import main
from twincar_fast.data import read_annotations, split_train_valid
from twincar_fast.errors import TwincarError
from twincar_fast.experiment import run_experiment
from twincar_fast.run_folder import resolve_run
from twincar_fast.ship.saved import evaluate

PRED_COLUMNS = [
    "image",
    "true_id",
    "true",
    "predicted_id",
    "predicted",
    "probability",
    "true_probability",
    "loss",
    "top5",
    "top5_probability",
]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """One finished tiny run (test_resnet, 32 px, 2 epochs) shared by the tests of this file."""
    cfg = make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("eval_run"))
    cfg.eval = dataclasses.replace(cfg.eval, test=False, interpret=False)
    return run_experiment(cfg)


@pytest.fixture(scope="module")
def evaluated(run, tiny_data, tmp_path_factory):
    """evaluate() of the run's model folder on the test split, into a fresh folder."""
    out = tmp_path_factory.mktemp("eval_out")
    return evaluate(run.model_dir, tiny_data, split="test", out_dir=out), out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_eval_json_has_every_metric_with_the_split_prefix(evaluated, run, tiny_data):
    result, out = evaluated
    saved = json.loads((out / "eval_test.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for name in ["loss", *METRIC_NAMES]:
        assert 0 <= saved[f"test_{name}"] < 10, name
    ann = read_annotations(tiny_data)
    assert saved["n_images"] == int((ann["split"] == "test").sum()) == 24
    assert saved["n_classes"] == 4 and saved["split"] == "test"
    assert saved["run"] == run.name
    assert saved["model"] == str(run.model_dir / "model.safetensors")  # the safe files


def test_eval_metrics_equal_sklearn_on_the_predictions_csv(evaluated):
    result, out = evaluated
    preds = pd.read_csv(out / "predictions_test.csv")
    assert list(preds.columns) == PRED_COLUMNS
    y, p = preds["true_id"].to_numpy(), preds["predicted_id"].to_numpy()
    expected = {
        "acc": skm.accuracy_score(y, p),
        "f1_macro": skm.f1_score(y, p, average="macro", zero_division=0),
        "f1_weighted": skm.f1_score(y, p, average="weighted", zero_division=0),
        "precision_macro": skm.precision_score(y, p, average="macro", zero_division=0),
        "recall_weighted": skm.recall_score(y, p, average="weighted", zero_division=0),
        "mcc": skm.matthews_corrcoef(y, p),
        "cohen_kappa": skm.cohen_kappa_score(y, p, labels=range(4)),
        "hamming": skm.hamming_loss(y, p),
        "jaccard_macro": skm.jaccard_score(y, p, average="macro", zero_division=0),
    }
    top = [list(map(int, t.split(";"))) for t in preds["top5"]]
    assert all(t[0] == pi for t, pi in zip(top, p, strict=True))
    expected["top3"] = np.mean([yi in t[:3] for yi, t in zip(y, top, strict=True)])
    for name, value in expected.items():
        assert result[f"test_{name}"] == pytest.approx(value, abs=1e-9), name
    assert result["test_loss"] == pytest.approx(preds["loss"].mean(), rel=1e-5)


def test_prediction_rows_are_consistent(evaluated, tiny_data):
    _, out = evaluated
    preds = pd.read_csv(out / "predictions_test.csv")
    classes = pd.read_csv(tiny_data / "classes.csv")["label"].tolist()
    assert (preds["true"] == [classes[i] for i in preds["true_id"]]).all()
    assert (preds["predicted"] == [classes[i] for i in preds["predicted_id"]]).all()
    probs = np.array([[float(v) for v in t.split(";")] for t in preds["top5_probability"]])
    assert probs.shape == (24, 4)  # 4 classes: the "top 5" lists them all
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(probs[:, 0], preds["probability"], rtol=1e-4)
    # label-smoothing CE (ε = 0.1, the tiny config's) from the listed probabilities = the loss column
    top = np.array([[int(v) for v in t.split(";")] for t in preds["top5"]])
    p_true = probs[top == preds["true_id"].to_numpy()[:, None]]
    np.testing.assert_allclose(p_true, preds["true_probability"], rtol=1e-4)
    ls_ce = 0.9 * -np.log(p_true) + 0.1 * -np.log(probs).mean(1)
    np.testing.assert_allclose(ls_ce, preds["loss"], rtol=1e-3)
    # images are relative to the data set, like annotations.csv
    test_images = set(read_annotations(tiny_data).query("split == 'test'")["image"])
    assert set(preds["image"]) == test_images


def test_per_class_csv(evaluated):
    _, out = evaluated
    per_class = pd.read_csv(out / "per_class_test.csv")
    assert list(per_class.columns) == ["class_id", "label", "precision", "recall", "f1", "support"]
    assert per_class["support"].tolist() == [6, 6, 6, 6]
    preds = pd.read_csv(out / "predictions_test.csv")
    recall = [
        (preds.query("true_id == @c")["predicted_id"] == c).mean() for c in per_class["class_id"]
    ]
    np.testing.assert_allclose(per_class["recall"], recall)


def test_every_model_form_gives_the_same_result_and_default_output_is_the_run(run, tiny_data):
    by_report = evaluate(run.report_dir, tiny_data)  # reports/<run>: writes into reports/<run>
    assert (run.report_dir / "eval_test.json").is_file()
    assert (run.report_dir / "predictions_test.csv").is_file()
    by_pkl = evaluate(
        run.model_dir / "learner.pkl", tiny_data, out_dir=run.report_dir / "x", trust_pickle=True
    )
    for name in ["loss", *METRIC_NAMES]:
        assert by_report[f"test_{name}"] == pytest.approx(by_pkl[f"test_{name}"], abs=1e-6)
    paths = resolve_run(run.model_dir)
    assert paths.report_dir == run.report_dir and paths.learner == run.model_dir / "learner.pkl"


def test_valid_split_reproduces_the_training_validation(run, tiny_data, tmp_path):
    result = evaluate(run.report_dir, tiny_data, split="valid", out_dir=tmp_path)
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    split = split_train_valid(read_annotations(tiny_data), cfg.data.valid_pct, cfg.data.split_seed)
    assert result["n_images"] == int(split["is_valid"].sum())
    preds = pd.read_csv(tmp_path / "predictions_valid.csv")
    assert set(preds["image"]) == set(split.loc[split["is_valid"], "image"])
    best = run.summary["best"]  # the exported model is the best epoch's
    assert result["valid_acc"] == pytest.approx(best["valid_acc"], abs=1e-6)
    assert result["valid_f1_macro"] == pytest.approx(best["valid_f1_macro"], abs=1e-6)
    assert result["valid_loss"] == pytest.approx(best["valid_loss"], rel=1e-3)


def _other_classes(tiny_data, tmp_path):
    """A copy of the tiny set whose class 2 has another name."""
    data = tmp_path / "other"
    shutil.copytree(tiny_data, data)
    for name in ("classes.csv", "annotations.csv"):
        df = pd.read_csv(data / name)
        df["label"] = df["label"].replace("Audi R8 Coupe 2012", "Audi TT Coupe 2012")
        df.to_csv(data / name, index=False)
    return data


def test_model_for_another_class_list_is_one_line(run, tiny_data, tmp_path, capsys):
    data = _other_classes(tiny_data, tmp_path)
    with pytest.raises(TwincarError, match="classes.csv.*Audi R8 Coupe 2012"):
        evaluate(run.model_dir, data, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["evaluate", str(run.model_dir), "--data", str(data)]) == 2
    assert "classes.csv" in one_error_line(capsys)


def test_run_folder_without_model_is_one_line(run, tmp_path, tiny_data, capsys):
    lonely = tmp_path / "reports" / run.name
    lonely.mkdir(parents=True)
    shutil.copy(run.report_dir / "config.yaml", lonely / "config.yaml")
    with pytest.raises(TwincarError, match="no saved model"):
        evaluate(lonely, tiny_data)
    assert main(["evaluate", str(lonely), "--data", str(tiny_data)]) == 2
    assert "no saved model" in one_error_line(capsys)


def test_bad_paths_are_one_line(run, tmp_path, tiny_data, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--data", str(tiny_data)]) == 2
    assert "no such model file or run folder" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--data", str(tiny_data)]) == 2
    assert "not a run folder" in one_error_line(capsys)
    junk = tmp_path / "junk" / "learner.pkl"
    junk.parent.mkdir()
    junk.write_text("not a pickle")
    assert main(["evaluate", str(junk), "--data", str(tiny_data), "--trust-pickle"]) == 2
    assert "can't load the learner" in one_error_line(capsys)
    lone = tmp_path / "lone" / "learner.pkl"  # a learner outside any run: no config for 'valid'
    lone.parent.mkdir()
    shutil.copy(run.model_dir / "learner.pkl", lone)
    argv = ["evaluate", str(lone), "--data", str(tiny_data), "--split", "valid", "--trust-pickle"]
    assert main(argv) == 2
    assert "config.yaml" in one_error_line(capsys)
