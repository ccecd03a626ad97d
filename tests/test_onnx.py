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


def _counts(root) -> dict[str, int]:
    from twincar_fast.data.dataset import read_annotations

    return read_annotations(root)["split"].value_counts().to_dict()


def test_int8_copy_is_calibrated_on_training_images_and_checked(shipped_onnx, tmp_path, capsys):
    learn, folder = shipped_onnx
    copy = shutil.copytree(folder, tmp_path / "m")
    fp32_bytes = (copy / "model.onnx").read_bytes()
    # this untrained 32-px net has near-ties (top-2 margins < 0.02 on 3 of its 24 test images)
    # that any rounding flips: a lower bar than the default 95% for it
    assert main(["export", str(copy), "--int8", "--int8-min-top1", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "int8 ONNX" in out and out.count("→") == 1  # the checked model.onnx is kept, not redone
    assert (copy / "model.onnx").read_bytes() == fp32_bytes
    graph = onnx.load(str(copy / "model.int8.onnx")).graph
    onnx.checker.check_model(str(copy / "model.int8.onnx"), full_check=True)
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)  # int8 weights
    config = json.loads((copy / "config.json").read_text())
    record, counts = (
        config["twincar"]["onnx_int8"],
        _counts(config["twincar"]["training"]["data"]["root"]),
    )
    same, n = map(int, record["top1_equal"].split("/"))
    assert n == min(64, counts["test"]) and same >= 0.8 * n and record["min_top1"] == 0.8
    assert record["calibration"] == f"{min(64, counts['train'])} training images"
    from twincar_fast.ship.integrity import file_sha256  # issue 29.1: checked on every load

    assert config["twincar"]["sha256"]["model.int8.onnx"] == file_sha256(copy / "model.int8.onnx")
    paths = valid_paths(learn)
    p8 = Predictor.from_path(copy, backend="onnx-int8").predict_proba(paths)
    p32 = Predictor.from_path(copy, device="cpu").predict_proba(paths)
    np.testing.assert_allclose(p8.sum(1), 1, atol=1e-5)
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.8
    assert 1e-6 < np.abs(p8 - p32).max() < 0.2  # quantized (not the fp32 graph), yet close
    before = (copy / "model.int8.onnx").read_bytes()
    assert main(["export", str(copy), "--int8", "--int8-min-top1", "0.8"]) == 2  # not replaced
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert (copy / "model.int8.onnx").read_bytes() == before
    csv = tmp_path / "preds.csv"
    argv = ["predict", str(copy), *paths[:3], "--backend", "onnx-int8", "--out", str(csv)]
    assert main(argv) == 0
    rows = csv.read_text().splitlines()
    assert (
        len(rows) == 4
        and rows[1].split(",")[1]
        == Predictor.from_path(copy, backend="onnx-int8").predict(paths[0], top_k=1)[0]["label"]
    )


def test_int8_needs_the_training_images_and_leaves_nothing_when_refused(
    shipped_onnx, tmp_path, monkeypatch, capsys
):
    import twincar_fast.ship.quantize as quantize

    _, folder = shipped_onnx
    copy = shutil.copytree(folder, tmp_path / "m")
    config = json.loads((copy / "config.json").read_text())
    moved = json.loads(json.dumps(config))
    moved["twincar"]["training"]["data"]["root"] = str(tmp_path / "gone")
    (copy / "config.json").write_text(json.dumps(moved))
    assert main(["export", str(copy), "--int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration needs the run's training images" in err
    assert not (copy / "model.int8.onnx").exists()
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(quantize, "INT8_TOP1_MIN", 1.01)  # a bar no model can pass
    assert main(["export", str(copy), "--int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "int8 check failed" in err
    assert not (copy / "model.int8.onnx").exists() and not list(copy.glob(".model.int8*"))
    assert "onnx_int8" not in json.loads((copy / "config.json").read_text())["twincar"]
    with pytest.raises(TwincarError, match="--int8"):
        Predictor.from_path(copy, backend="onnx-int8")
    assert main(["export", str(copy), "--int8", "--int8-min-top1", "95"]) == 2  # a percentage
    assert "between 0 and 1" in capsys.readouterr().err
