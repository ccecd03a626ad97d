"""`twincar export MODEL --int8`: a static int8 copy of `model.onnx` for serving on CPUs.

fp32 onnxruntime is bounded by its convolutions (about 1.3× torch's on a 2-core AVX512 CPU, see
the README's Performance); int8 convolutions (VNNI) go several times faster. onnxruntime's
static quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges) is
calibrated on the run's *training* images through the exact validation transform, never on the
images it is checked on. The check: top-1 against PyTorch's fp32 model on up to 64 test images,
refused below `INT8_TOP1_MIN`; the result goes into config.json as `twincar.onnx_int8`. int8
outputs are close to, not equal to, the fp32 model's: `model.onnx` stays the exact one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path, write_json
from twincar_fast.ship.card import CONFIG_JSON, read_config, training_data_root
from twincar_fast.ship.integrity import record_sha256
from twincar_fast.ship.onnx import check_images, spread_images
from twincar_fast.ship.onnx_predict import INT8_FILE, ONNX_FILE, OnnxPredictor, require_onnx
from twincar_fast.ship.predict import Predictor

__all__ = ["CALIB_IMAGES", "CHECK_IMAGES", "INT8_TOP1_MIN", "calibration_batches", "quantize_onnx"]

CALIB_IMAGES = 64  # training images whose activations set the int8 ranges
CHECK_IMAGES = 64  # test images whose top-1 is compared with PyTorch's
INT8_TOP1_MIN = 0.95  # share of those that must agree


def calibration_batches(
    fp32: OnnxPredictor, config: dict, n: int = CALIB_IMAGES, bs: int = 8
) -> list[np.ndarray]:
    """uint8 NCHW batches of up to `n` training images of the run's data, evenly spread."""
    from twincar_fast.data.dataset import read_annotations

    root = training_data_root(config)
    if root is None:
        where = config.get("twincar", {}).get("training", {}).get("data", {}).get("root")
        raise TwincarError(
            f"int8 calibration needs the run's training images, but its data ({where}) are not "
            "on this machine; prepare them there again, or keep the fp32 model.onnx"
        )
    df = read_annotations(root)
    paths, boxes = spread_images(df[df["split"] == "train"], n)
    items = [fp32.preprocess.item_array(p, b) for p, b in zip(paths, boxes, strict=True)]
    return [
        np.ascontiguousarray(np.stack(items[i : i + bs]).transpose(0, 3, 1, 2))
        for i in range(0, len(items), bs)
    ]


def _quantize(src: Path, out: Path, batches: list[np.ndarray], input_name: str) -> None:
    """onnxruntime's shape pre-processing, then static QDQ quantization into `out`."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({input_name: b} for b in batches)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="twincar-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # symbolic shape inference is for transformer graphs; onnx's own inference suffices here
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        first_conv = next(n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv")
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # the convolutions hold the time; the stem (3 input channels: little time, much of
            # the error), the head, the residual sums and the resampling stay fp32
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=[first_conv],
        )


def _check(model_dir: Path, int8: OnnxPredictor, config: dict, min_top1: float) -> dict:
    """Top-1 of the int8 model against PyTorch's fp32 one on test images; error below the bar."""
    images, boxes, source = check_images(config, CHECK_IMAGES)
    expected = Predictor.from_path(model_dir, device="cpu").predict_proba(images, boxes=boxes)
    got = int8.predict_proba(images, boxes=boxes)
    same = int((got.argmax(1) == expected.argmax(1)).sum())
    if same < min_top1 * len(images):
        raise TwincarError(
            f"int8 check failed: top-1 equals PyTorch's on only {same} of {len(images)} images "
            f"(at least {min_top1:.0%} needed); serve the fp32 model.onnx instead"
        )
    return {
        "top1_equal": f"{same}/{len(images)}",
        "max_abs_diff_probs": float(np.abs(got - expected).max()),
        "images": source,
    }


def quantize_onnx(
    model_dir: str | os.PathLike, force: bool = False, min_top1: float | None = None
) -> tuple[Path, dict]:
    """Write `model.int8.onnx` from a folder's checked `model.onnx`; (its path, the check).

    Args:
        model_dir: a models/<run> folder with model.onnx (`export_onnx`) and config.json.
        force: replace an existing model.int8.onnx.
        min_top1: the share of test images whose top-1 must equal PyTorch's (default
            `INT8_TOP1_MIN`); below it nothing is written.
    """
    if min_top1 is not None and not 0 <= min_top1 <= 1:
        raise TwincarError(f"--int8-min-top1 must be between 0 and 1, got {min_top1}")
    min_top1 = INT8_TOP1_MIN if min_top1 is None else min_top1
    require_onnx("onnx", "onnxruntime")
    model_dir = Path(model_dir)
    src, out, config_path = model_dir / ONNX_FILE, model_dir / INT8_FILE, model_dir / CONFIG_JSON
    if not src.is_file():
        raise TwincarError(f"{src} not found: run `twincar export {model_dir} --format onnx` first")
    if out.exists() and not force:
        raise TwincarError(f"{out} exists: pass --force to replace it")
    config = read_config(config_path)
    fp32 = OnnxPredictor.from_path(model_dir)
    batches = calibration_batches(fp32, config)
    with atomic_path(out) as tmp:
        _quantize(src, tmp, batches, fp32.input_name)
        int8 = OnnxPredictor(tmp, fp32.classes, fp32.preprocess)
        check = _check(model_dir, int8, config, min_top1)
    config["twincar"]["onnx_int8"] = {
        "file": INT8_FILE,
        "scheme": "static QDQ: int8 per-channel weights, uint8 activations, MinMax ranges",
        "calibration": f"{sum(len(b) for b in batches)} training images",
        "fp32_nodes": "the stem convolution, the head, residual sums, preprocessing",
        "min_top1": min_top1,
        **check,
    }
    write_json(config_path, record_sha256(config, out))  # checked on every load
    return out, check
