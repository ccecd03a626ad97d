"""Prediction from a model folder's `model.onnx` with onnxruntime: NumPy and PIL only, no torch.

The ONNX graph (`ship.onnx.export_onnx`) takes the uint8 items of the validation transform
(`ItemPrep`, resized on the CPU) and does the rest itself (scale, resample, normalize, forward),
so this module needs neither torch nor fastai: a server gets by with `pip install onnxruntime`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from twincar_fast.errors import TwincarError
from twincar_fast.run_folder import INT8_ONNX, ONNX
from twincar_fast.ship.card import read_model_card
from twincar_fast.ship.inputs import ImageInput, ItemPrep, PredictMixin
from twincar_fast.ship.integrity import check_sha256

__all__ = ["INT8_FILE", "ONNX_FILE", "OnnxPredictor", "require_onnx", "softmax"]

ONNX_FILE, INT8_FILE = ONNX, INT8_ONNX  # the model and its int8 copy (`ship.quantize`)


def require_onnx(*modules: str) -> None:
    """A one-line error naming the extra when onnx/onnxruntime is not installed."""
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise TwincarError(f'ONNX needs {name}: pip install -e ".[onnx]"')


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row maximum so it can't overflow."""
    z = logits.astype(np.float32) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _session(path: Path, num_threads: int | None):
    """An onnxruntime CPU session of `path`; a one-line error for a file that isn't a model."""
    require_onnx("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # no busy-waiting between runs: the threads that decode the next images (and a torch
    # model in the same process) need those cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if num_threads:
        opts.intra_op_num_threads = num_threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise TwincarError(
            f"{path}: not a usable ONNX model (empty, truncated or damaged: {reason}); "
            f"re-export it with `twincar export {path.parent} --format onnx --force`"
        ) from None


def _check_graph(session, path: Path, n_classes: int, prep: ItemPrep) -> str:
    """The graph's input name, once its input and output fit config.json (one-line error else)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    side = prep.input_size
    expect_in = ["batch", 3, side, side]
    problem = None
    if len(inputs) != 1 or len(outputs) < 1:
        problem = f"{len(inputs)} input(s) and {len(outputs)} output(s), not 1 and 1"
    elif inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
        problem = f"input {inputs[0].type} {inputs[0].shape}, not uint8 N×3×{side}×{side}"
    elif any(
        isinstance(d, int) and d != e for d, e in zip(inputs[0].shape, expect_in, strict=True)
    ):
        problem = f"input of shape {inputs[0].shape}, but config.json gives items of {side} px"
    else:
        out = outputs[0].shape[-1] if outputs[0].shape else None
        if not isinstance(out, int):  # a symbolic class axis: ask the graph itself
            x = np.zeros((1, 3, side, side), np.uint8)
            out = session.run(None, {inputs[0].name: x})[0].shape[-1]
        if out != n_classes:
            problem = f"{out} outputs, but config.json lists {n_classes} classes"
    if problem is not None:
        raise TwincarError(
            f"{path}: this ONNX graph is not the folder's model ({problem}); re-export it with "
            f"`twincar export {path.parent} --format onnx --force`"
        )
    return inputs[0].name


class OnnxPredictor(PredictMixin):
    """A `model.onnx`, its classes and the CPU half of its preprocessing, run by onnxruntime."""

    def __init__(
        self,
        path: str | os.PathLike,
        classes: Sequence[str],
        preprocess: ItemPrep,
        batch_size: int = 32,
        num_threads: int | None = None,
    ):
        self.session = _session(Path(path), num_threads)
        self.input_name = _check_graph(self.session, Path(path), len(classes), preprocess)
        self.classes = list(classes)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.num_threads = num_threads or min(os.cpu_count() or 1, 8)
        self.device = "cpu (onnxruntime)"

    @classmethod
    def from_path(
        cls, path: str | os.PathLike, batch_size: int = 32, int8: bool = False
    ) -> OnnxPredictor:
        """Load `model.onnx` (or `model.int8.onnx`, or the one in a model folder) with the
        folder's config.json."""
        path = Path(path)
        name = INT8_FILE if int8 else ONNX_FILE
        onnx_file = path / name if path.is_dir() else path
        if not onnx_file.is_file() or onnx_file.suffix != ".onnx":
            folder = path if path.is_dir() else path.parent
            how = " --int8" if int8 else ""
            raise TwincarError(
                f"{onnx_file}: no ONNX model here; write it with `twincar export {folder} "
                f"--format onnx{how}` (needs pip install 'twincar-fast[onnx]')"
            )
        card = read_model_card(onnx_file.parent)
        check_sha256(onnx_file)
        keys = ("item_size", "img_size", "mean", "std", "resize", "pad_mode", "draft")
        prep = ItemPrep(
            **{k: getattr(card, k) for k in keys},
            bbox_crop=card.bbox_crop,
            bbox_margin=card.bbox_margin,
        )
        return cls(onnx_file, card.classes, prep, batch_size=batch_size)

    def _item(self, image: ImageInput, box=None) -> np.ndarray:
        """One presized uint8 HWC item."""
        return self.preprocess.item_array(image, box)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The graph's logits of a uint8 NCHW batch of items."""
        return self.session.run(None, {self.input_name: x})[0]

    def _batch_proba(self, items: list[np.ndarray], tta: bool) -> np.ndarray:
        """Probabilities of one batch of items (with the flip averaged in when `tta`)."""
        x = np.ascontiguousarray(np.stack(items).transpose(0, 3, 1, 2))
        p = softmax(self.logits(x))
        if tta:
            p = (p + softmax(self.logits(np.ascontiguousarray(x[..., ::-1])))) / 2
        return p
