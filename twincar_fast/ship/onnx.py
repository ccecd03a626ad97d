"""`twincar export MODEL --format onnx`: the model folder's network as `model.onnx`, checked.

The graph takes the uint8 RGB items of the validation transform (N×3×S×S, S = the item side, the
batch axis dynamic) and does the device half of the preprocessing itself (scale to [0, 1],
resample to img_size, normalize) before the forward pass, so the ONNX predictor needs only PIL.
After torch's exporter, `onnx.checker` runs its full check (shape inference included), then
onnxruntime's probabilities are compared with PyTorch's on real images of the run's data (max
abs difference ≤ 1e-4, the same top-1 on every image); the check goes into config.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path, write_json
from twincar_fast.ship.card import CONFIG_JSON, read_config, training_data_root
from twincar_fast.ship.integrity import record_sha256
from twincar_fast.ship.onnx_predict import ONNX_FILE, OnnxPredictor, require_onnx
from twincar_fast.ship.predict import Predictor, Preprocess, resample

__all__ = ["PROB_TOL", "OnnxGraph", "check_images", "export_onnx", "spread_images"]

PROB_TOL = 1e-4  # max abs difference of probabilities between onnxruntime and PyTorch


class OnnxGraph(nn.Module):
    """uint8 items → logits: scale, resample to img_size, normalize, then the model."""

    def __init__(self, model: nn.Module, pre: Preprocess):
        super().__init__()
        self.model, self.img_size = model, pre.img_size
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a uint8 NCHW batch of items."""
        x = resample(x.float() / 255.0, self.img_size)
        return self.model((x - self.mean) / self.std)


def spread_images(df, n: int) -> tuple[list[str], list]:
    """Paths and car boxes of up to `n` rows of an annotations frame, evenly spread over it."""
    from twincar_fast.data.dataset import BBOX_COLUMNS

    df = df.iloc[np.linspace(0, len(df) - 1, min(n, len(df))).astype(int)]
    return df["path"].tolist(), df[list(BBOX_COLUMNS)].to_numpy().tolist()


def check_images(config: dict, n: int = 8) -> tuple[list, list | None, str]:
    """(images, boxes, where from): up to `n` test images of the run's data, else noise."""
    from twincar_fast.data.dataset import read_annotations

    root = training_data_root(config)
    if root is not None:
        df = read_annotations(root)
        test = df[df["split"] == "test"]
        paths, boxes = spread_images(test if len(test) else df, n)
        return paths, boxes, f"{len(paths)} images of {root.resolve()}"
    rng = np.random.default_rng(0)  # the run's data are gone: noise still exercises the graph
    side = config["pretrained_cfg"]["input_size"][-1]
    noise = [Image.fromarray(rng.integers(0, 256, (side, side + 7, 3), np.uint8)) for _ in range(n)]
    return noise, None, f"{n} noise images (the run's data not found)"


def _export_graph(predictor: Predictor, path: Path, opset: int | None) -> None:
    """torch's (dynamo) exporter with a dynamic batch axis, then onnx's full check."""
    import onnx

    side = predictor.preprocess.input_size
    graph = OnnxGraph(predictor.model, predictor.preprocess).eval()
    x = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    kwargs = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(
        graph,
        (x,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        external_data=False,  # one self-contained file
        verbose=False,
        **kwargs,
    )
    onnx.checker.check_model(str(path), full_check=True)


def _compare(predictor: Predictor, ort: OnnxPredictor, config: dict) -> dict:
    """The ONNX check: probabilities of both backends on real images; error if they differ."""
    images, boxes, source = check_images(config)
    expected = predictor.predict_proba(images, boxes=boxes)
    got = ort.predict_proba(images, boxes=boxes)
    diff = float(np.abs(got - expected).max())
    same = int((got.argmax(1) == expected.argmax(1)).sum())
    if diff > PROB_TOL or same < len(images):
        raise TwincarError(
            f"ONNX check failed: probabilities differ from PyTorch's by up to {diff:.2e} "
            f"(limit {PROB_TOL:g}), top-1 equal on {same} of {len(images)} images; "
            "try another --opset"
        )
    return {"max_abs_diff_probs": diff, "top1_equal": f"{same}/{len(images)}", "images": source}


def export_onnx(
    model_dir: str | os.PathLike, opset: int | None = None, force: bool = False
) -> Path:
    """Write `model.onnx` into a model folder, check it fully and record the check in config.json.

    Args:
        model_dir: a models/<run> folder with model.safetensors + config.json.
        opset: the ONNX opset (default: torch's exporter's).
        force: replace an existing model.onnx.
    """
    require_onnx("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch's exporter needs it
    import onnx
    import onnxruntime

    model_dir = Path(model_dir)
    out, config_path = model_dir / ONNX_FILE, model_dir / CONFIG_JSON
    if not config_path.is_file():
        raise TwincarError(f"{config_path} not found: export needs a model folder with config.json")
    if out.exists() and not force:
        raise TwincarError(f"{out} exists: pass --force to replace it")
    config = read_config(config_path)
    predictor = Predictor.from_path(model_dir, device="cpu")  # the safe files, never a pickle
    with atomic_path(out) as tmp:
        _export_graph(predictor, tmp, opset)
        ort = OnnxPredictor(tmp, predictor.classes, predictor.preprocess)
        check = _compare(predictor, ort, config)
    opset_used = next(
        o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")
    )
    config["twincar"]["onnx"] = {
        "file": ONNX_FILE,
        "opset": int(opset_used),
        "input": "uint8 RGB items, N×3×S×S (batch dynamic), resized as config.json says",
        **check,
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    write_json(config_path, record_sha256(config, out))  # checked on every load
    return out
