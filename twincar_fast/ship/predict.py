"""Fast inference from an exported model: the validation preprocessing, batched, no Learner.

`Predictor.from_path` loads `model.safetensors` + `config.json` (weights only, no pickle), a
fastai `learner.pkl`, or a `models/<run>` folder (preferring the safetensors pair). Images are
preprocessed exactly as the validation set is during training: opened with `open_region` (JPEG
draft decoding, as the training loader; cut to the car box grown by its margin for models trained
with `bbox_crop`, so `predict(..., boxes=...)` takes one box per image), resized on the CPU (centre square crop, squish or pad) in
a thread pool to `item_size` (= `img_size` for models trained with item-stage augmentation, the
default), then resampled to `img_size` where that differs and normalized as a batch on the
model's device; the forward pass runs channels-last under `inference_mode`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from twincar_fast.ship.onnx_predict import OnnxPredictor

from twincar_fast.errors import TwincarError
from twincar_fast.run_folder import LEARNER_PKL, SAFETENSORS
from twincar_fast.ship.inputs import BACKENDS, ImageInput, ItemPrep, PredictMixin

# torch is imported inside the functions that use it: `Predictor.from_path(..., backend="onnx")`
# (the public path to the ONNX predictor) must work where torch is not installed

__all__ = ["Predictor", "Preprocess", "require_trust", "resample"]

_MODEL_FILES = (SAFETENSORS, LEARNER_PKL)  # in this order: the safe files first


@dataclass
class Preprocess(ItemPrep):
    """The validation transform of a trained model: resize on the CPU, resample on the device."""

    def item(self, image: ImageInput, box=None) -> torch.Tensor:
        """One presized uint8 CHW tensor, as fastai's validation `Resize(item_size)` makes it."""
        import torch

        return torch.from_numpy(self.item_array(image, box).copy()).permute(2, 0, 1)

    def batch(self, items: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Stacked items as a normalized float batch of `img_size`, as the validation batch tfms."""
        import torch

        x = torch.stack(list(items)).to(device, non_blocking=True).float().div_(255.0)
        x = resample(x, self.img_size)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_dls(cls, dls) -> Preprocess:
        """The validation preprocessing of a fastai DataLoaders built by `build_dls`."""
        from twincar_fast.data.geometry import valid_input

        return cls(**valid_input(dls))


def resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """fastai's validation `RandomResizedCropGPU`: full crop, bilinear to `size` (align corners).

    Like fastai's `_grid_sample`, an image more than twice the target size is first area-averaged
    down so the bilinear step doesn't alias.
    """
    import torch.nn.functional as F

    if x.shape[-2:] == (size, size):
        return x
    d = min(x.shape[-2] / size, x.shape[-1] / size) / 2
    if d > 1:
        x = F.interpolate(x, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


class Predictor(PredictMixin):
    """A model, its classes and its validation preprocessing, ready to classify image files."""

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        preprocess: Preprocess,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        num_threads: int | None = None,
    ):
        import torch

        from twincar_fast.data.device import resolve_device

        self.device = resolve_device(device, key="device")
        self.classes = list(classes)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.num_threads = num_threads or min(os.cpu_count() or 1, 8)
        # channels-last convolutions: faster on GPUs and, with oneDNN, on CPUs too (same results)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        trust_pickle: bool = False,
        backend: str = "torch",
    ) -> Predictor | OnnxPredictor:
        """Load `model.safetensors` (+ config.json), `learner.pkl` or a `models/<run>` folder.

        Args:
            path: the model file or folder (a folder's safetensors pair is preferred).
            device: where to run (default: CUDA, then MPS, then the CPU; the onnx backend: the CPU).
            trust_pickle: allow loading `learner.pkl`, a pickle that can run any code.
            backend: "torch", "onnx" (the folder's model.onnx with onnxruntime) or "onnx-int8"
                (its model.int8.onnx, see `twincar export --int8`).
        """
        if backend in ("onnx", "onnx-int8"):
            from twincar_fast.ship.onnx_predict import OnnxPredictor

            if device not in (None, "", "cpu"):
                raise TwincarError(
                    f"device {device!r}: the {backend} backend runs on the CPU (onnxruntime); "
                    "leave the device out, or use backend torch"
                )
            return OnnxPredictor.from_path(path, int8=backend == "onnx-int8")
        if backend != "torch":
            raise TwincarError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        from twincar_fast.data.device import resolve_device

        device = resolve_device(device, key="device")  # before the load: a wrong name costs none
        path = _model_file(Path(path))
        if path.suffix == ".pkl":
            require_trust(path, trust_pickle)
            model, classes, pre = _load_learner_pkl(path)
        else:
            model, classes, pre = _load_safetensors(path)
        return cls(model, classes, pre, device=device)

    def _item(self, image: ImageInput, box=None) -> torch.Tensor:
        """One presized uint8 CHW item."""
        return self.preprocess.item(image, box)

    def _batch_proba(self, items: list[torch.Tensor], tta: bool) -> np.ndarray:
        """Probabilities of one batch of items (with the flip averaged in when `tta`)."""
        import torch

        with torch.inference_mode():
            x = self.preprocess.batch(items, self.device)
            x = x.contiguous(memory_format=torch.channels_last)
            p = self.model(x).float().softmax(1)
            if tta:  # fastai's TTA flip: the horizontally mirrored input
                p = (p + self.model(x.flip(3)).float().softmax(1)) / 2
            return p.cpu().numpy()


def require_trust(path: Path, trust_pickle: bool) -> None:
    """A one-line TwincarError unless the user trusts this pickle (it can run any code)."""
    if not trust_pickle:
        raise TwincarError(
            f"{path}: a pickle can run any code, so it is loaded only when you trust it "
            "(--trust-pickle, or trust_pickle=True); the safe files are model.safetensors + "
            "config.json in the same folder"
        )


def _model_file(path: Path) -> Path:
    """The model file to load: the file itself, or the safetensors/pickle inside a run folder."""
    if path.is_dir():
        for name in _MODEL_FILES:
            if (path / name).is_file():
                return path / name
        raise TwincarError(
            f"{path}: no model.safetensors or learner.pkl in this folder; "
            "pass a models/<run> folder written by `twincar run`"
        )
    if not path.is_file():
        raise TwincarError(
            f"model not found: {path} (pass learner.pkl, model.safetensors or a models/<run> folder)"
        )
    if path.suffix not in (".safetensors", ".pkl"):
        raise TwincarError(
            f"{path}: not a model file; pass learner.pkl, model.safetensors or a models/<run> folder"
        )
    return path


def _load_safetensors(path: Path) -> tuple[nn.Module, list[str], Preprocess]:
    """Rebuild the model from config.json (or model.json), load the weights-only safetensors, no pickle involved."""
    from safetensors import SafetensorError

    from twincar_fast.config import ModelConfig
    from twincar_fast.model.learner import create_model
    from twincar_fast.ship.card import read_model_card
    from twincar_fast.ship.export import load_safetensors
    from twincar_fast.ship.integrity import check_sha256

    card = read_model_card(path.parent)
    check_sha256(path)
    model_cfg = ModelConfig(
        arch=card.arch,
        pretrained=False,
        head=card.head,
        head_hidden=card.head_hidden,
        head_dropout=card.head_dropout,
    )
    model = create_model(model_cfg, len(card.classes), pretrained=False)
    try:
        load_safetensors(model, path, card.weights_layout)
    except (SafetensorError, OSError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise TwincarError(
            f"{path}: can't load these weights into {card.arch} ({reason}); "
            "the file and config.json must come from the same export"
        ) from None
    pre = Preprocess(
        card.item_size,
        card.img_size,
        card.mean,
        card.std,
        card.resize,
        card.pad_mode,
        card.draft,
        card.bbox_crop,
        card.bbox_margin,
    )
    return model, card.classes, pre


def _load_learner_pkl(path: Path) -> tuple[nn.Module, list[str], Preprocess]:
    """The model, vocab and validation preprocessing of a fastai `learner.pkl` (pickle: trusted files only)."""
    from twincar_fast.analysis.learner_pkl import load_learner_pkl

    learn = load_learner_pkl(path, cpu=True)  # the Predictor moves the model to its device
    return learn.model, [str(v) for v in learn.dls.vocab], Preprocess.from_dls(learn.dls)
