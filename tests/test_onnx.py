"""Issue 16.3: ONNX export (dynamic batch, onnx's full check, compared with PyTorch on the run's
images, recorded in config.json) and the onnxruntime predictor that needs no torch or fastai."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from twincar_fast.cli import main
from twincar_fast.errors import TwincarError
from twincar_fast.ship.predict import Predictor

NO_TORCH = """
import sys
from twincar_fast.ship.onnx_predict import OnnxPredictor
p = OnnxPredictor.from_path(sys.argv[1])
print(p.predict(sys.argv[2:], top_k=1)[0]["label"])
heavy = [m for m in ("fastai", "torch", "timm", "torchvision") if m in sys.modules]
assert not heavy, heavy
"""


def valid_paths(learn) -> list[str]:
    return [str(p) for p in learn.dls.valid.items["path"]]


def test_onnx_equals_pytorch_and_records_the_check(shipped_onnx):
    learn, folder = shipped_onnx
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert inp.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    check = json.loads((folder / "config.json").read_text())["twincar"]["onnx"]
    assert check["max_abs_diff_probs"] <= 1e-4 and check["top1_equal"] == "8/8"
    assert "images of" in check["images"] and check["opset"] >= 17
    paths = valid_paths(learn)
    torch_p = Predictor.from_path(folder, device="cpu").predict_proba(paths)
    ort = Predictor.from_path(folder, backend="onnx")
    for n in (1, 5, len(paths)):  # batch sizes other than the traced one
        np.testing.assert_allclose(ort.predict_proba(paths[:n]), torch_p[:n], atol=1e-4)
    assert torch_p.max(1).mean() > 0.5 and len(set(torch_p.argmax(1))) > 1
    flip = Predictor.from_path(folder, device="cpu").predict_proba(paths, tta=True)
    np.testing.assert_allclose(ort.predict_proba(paths, tta=True), flip, atol=1e-4)
    assert np.abs(flip - torch_p).max() > 1e-3  # the flip really changes the inputs


def test_onnx_predictor_imports_neither_torch_nor_fastai(shipped_onnx, tmp_path):
    learn, folder = shipped_onnx
    image = valid_paths(learn)[0]
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(folder), image],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = Predictor.from_path(folder, device="cpu").predict(image, top_k=1)[0]["label"]
    assert proc.stdout.strip() == expected


def test_export_cli_opset_force_and_errors(shipped, tmp_path, capsys):
    _, folder = shipped
    copy = shutil.copytree(folder, tmp_path / "m", ignore=shutil.ignore_patterns("model.onnx"))
    assert main(["export", str(copy), "--format", "onnx", "--opset", "18"]) == 0
    assert json.loads((copy / "config.json").read_text())["twincar"]["onnx"]["opset"] == 18
    before = (copy / "model.onnx").read_bytes()
    assert main(["export", str(copy), "--format", "onnx"]) == 2  # never replaced silently
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert (copy / "model.onnx").read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TwincarError, match="twincar export"):
        Predictor.from_path(empty, backend="onnx")
    with pytest.raises(TwincarError, match="backend"):
        Predictor.from_path(copy, backend="tflite")


def test_onnx_without_its_extra_is_a_one_line_error(shipped, tmp_path, monkeypatch, capsys):
    _, folder = shipped
    copy = shutil.copytree(folder, tmp_path / "m", ignore=shutil.ignore_patterns("model.onnx"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if [onnx] were not installed
    assert main(["export", str(copy), "--format", "onnx"]) == 2
    assert (
        capsys.readouterr().err
        == 'twincar: error: ONNX needs onnxscript: pip install -e ".[onnx]"\n'
    )
    assert not (copy / "model.onnx").exists()
