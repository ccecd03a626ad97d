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

import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from twincar_fast.data.geometry import InputGeometry, resize_image, resize_short_crop
from twincar_fast.data.images import open_region
from twincar_fast.errors import TwincarError

__all__ = ["Predictor", "Preprocess", "box_warning", "require_trust"]

ImageInput = str | os.PathLike | Image.Image
_MODEL_FILES = ("model.safetensors", "learner.pkl")


@dataclass
class Preprocess:
    """The validation transform of a trained model: resize on the CPU, resample on the device."""

    item_size: int  # side of the validation item (the model's img_size unless batch-stage aug)
    img_size: int  # side of the crop the model sees
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    resize: str = "crop"  # crop: centre square; squish: whole image; pad: pad to a square;
    # short: shorter side to item_size, then the centre img_size square (torchvision's way)
    pad_mode: str = "zeros"  # padding of `pad` (fastai PadMode: zeros, border, reflection)
    draft: bool = True  # JPEG draft decoding at a reduced scale still ≥ item_size
    bbox_crop: bool = False  # the model was trained on car-box crops: give each image its box
    bbox_margin: float = 0.0  # ... grown by this share of the box on each side

    def open(self, image: ImageInput, box=None) -> Image.Image:
        """An RGB PIL image from a path (checked, draft-decoded) or an image object, cut to
        `box` (x1, y1, x2, y2; 1-based inclusive) grown by the margin when `bbox_crop`."""
        box = box if self.bbox_crop else None
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            if box is None:
                return image
            return image.crop(tuple(int(v) for v in self.geometry.crop(image.size, box)))
        path = Path(image)
        if not path.is_file():
            raise TwincarError(f"image not found: {path} (check the path)")
        min_side = self.item_size if self.draft else None
        return open_region(path, box, self.bbox_margin, min_side)

    def item(self, image: ImageInput, box=None) -> torch.Tensor:
        """One presized uint8 CHW tensor, as fastai's validation `Resize(item_size)` makes it."""
        img = self.open(image, box)
        if self.resize == "short":
            img = resize_short_crop(img, self.item_size, self.img_size)
        else:
            img = resize_image(img, self.item_size, self.resize, self.pad_mode)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)

    @property
    def geometry(self) -> InputGeometry:
        """Where boxes of an original image land in this model input."""
        return InputGeometry(
            self.item_size, self.img_size, self.resize, self.bbox_crop, self.bbox_margin
        )

    def batch(self, items: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Stacked items as a normalized float batch of `img_size`, as the validation batch tfms."""
        x = torch.stack(list(items)).to(device, non_blocking=True).float().div_(255.0)
        x = _resample(x, self.img_size)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_dls(cls, dls) -> Preprocess:
        """The validation preprocessing of a fastai DataLoaders built by `build_dls`."""
        from fastai.data.transforms import Normalize
        from fastai.vision.augment import Resize

        from twincar_fast.data.loaders import ImageLoader

        dl = dls.valid
        geo = InputGeometry.from_dls(dls)
        resize = next(t for t in dl.after_item.fs if isinstance(t, Resize))
        norm = next(t for t in dl.after_batch.fs if isinstance(t, Normalize))
        tfms = [t for p in dl.dataset.tfms for t in p.fs]
        loader = next((t for t in tfms if isinstance(t, ImageLoader)), None)
        return cls(
            item_size=geo.item_size,
            img_size=geo.img_size,
            mean=norm.mean.flatten().tolist(),
            std=norm.std.flatten().tolist(),
            resize=geo.resize,
            pad_mode=str(resize.pad_mode),
            draft=bool(loader.draft) if loader is not None else False,
            bbox_crop=geo.bbox_crop,
            bbox_margin=geo.bbox_margin,
        )


def _resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """fastai's validation `RandomResizedCropGPU`: full crop, bilinear to `size` (align corners).

    Like fastai's `_grid_sample`, an image more than twice the target size is first area-averaged
    down so the bilinear step doesn't alias.
    """
    if x.shape[-2:] == (size, size):
        return x
    d = min(x.shape[-2] / size, x.shape[-1] / size) / 2
    if d > 1:
        x = F.interpolate(x, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def _default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
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
        self.device = torch.device(device) if device else _default_device()
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
    ) -> Predictor:
        """Load `model.safetensors` (+ config.json), `learner.pkl` or a `models/<run>` folder.

        Args:
            path: the model file or folder (a folder's safetensors pair is preferred).
            device: where to run (default: CUDA when available).
            trust_pickle: allow loading `learner.pkl`, a pickle that can run any code.
        """
        path = _model_file(Path(path))
        if path.suffix == ".pkl":
            require_trust(path, trust_pickle)
            model, classes, pre = _load_learner_pkl(path)
        else:
            model, classes, pre = _load_safetensors(path)
        return cls(model, classes, pre, device=device)

    def _items(self, images: Sequence[ImageInput], boxes: Sequence) -> list[torch.Tensor]:
        """Presized items, decoded in threads (PIL releases the GIL while decoding and resizing)."""
        if len(images) < 2 or self.num_threads < 2:
            return [self.preprocess.item(im, b) for im, b in zip(images, boxes, strict=True)]
        with ThreadPoolExecutor(min(self.num_threads, len(images))) as pool:
            return list(pool.map(self.preprocess.item, images, boxes))

    def _boxes(self, n: int, boxes: Sequence | None) -> list:
        """One box (or None) per image; a warning when a box-trained model gets none."""
        boxes = [None] * n if boxes is None else [_as_box(b) for b in boxes]
        if len(boxes) != n:
            raise TwincarError(f"boxes: {len(boxes)} boxes for {n} images; give one per image")
        missing = sum(b is None for b in boxes)
        if self.preprocess.bbox_crop and missing:
            warnings.warn(box_warning(missing, n), UserWarning, stacklevel=3)
        return boxes

    def predict_proba(
        self, images: ImageInput | Sequence[ImageInput], boxes: Sequence | None = None
    ) -> np.ndarray:
        """Class probabilities, shape (n_images, n_classes), in the model's class order.

        Args:
            images: image files or PIL images.
            boxes: per image the car box (x1, y1, x2, y2; 1-based inclusive pixels, as in
                annotations.csv) or None; used when the model was trained with `bbox_crop`.
        """
        images = _as_list(images)
        return self._proba(images, self._boxes(len(images), boxes))

    def _proba(self, images: list[ImageInput], boxes: list) -> np.ndarray:
        """`predict_proba` of checked inputs, batch by batch."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                sl = slice(i, i + self.batch_size)
                x = self.preprocess.batch(self._items(images[sl], boxes[sl]), self.device)
                x = x.contiguous(memory_format=torch.channels_last)
                out.append(self.model(x).float().softmax(1).cpu())
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return torch.cat(out).numpy()

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        top_k: int = 3,
        boxes: Sequence | None = None,
    ) -> list[dict]:
        """Per image: `label`, `class_id`, `prob` of the top class, the `topk` list of dicts and
        the `box` it was cut to (None: the whole image); `boxes` as in `predict_proba`."""
        images = _as_list(images)
        boxes = self._boxes(len(images), boxes)
        probs = self._proba(images, boxes)
        k = max(1, min(top_k, len(self.classes)))
        results = []
        for p, box in zip(probs, boxes, strict=True):
            order = np.argsort(-p, kind="stable")[:k]
            topk = [
                {"label": self.classes[c], "class_id": int(c), "prob": float(p[c])} for c in order
            ]
            used = box if self.preprocess.bbox_crop else None
            results.append({**topk[0], "topk": topk, "box": used})
        return results


def require_trust(path: Path, trust_pickle: bool) -> None:
    """A one-line TwincarError unless the user trusts this pickle (it can run any code)."""
    if not trust_pickle:
        raise TwincarError(
            f"{path}: a pickle can run any code, so it is loaded only when you trust it "
            "(--trust-pickle, or trust_pickle=True); the safe files are model.safetensors + "
            "config.json in the same folder"
        )


def box_warning(missing: int, n: int) -> str:
    """The one warning line for images fed whole to a model trained on car-box crops."""
    return (
        f"this model was trained on car-box crops (bbox_crop) but {missing} of {n} image(s) "
        "have no box and are fed whole, which lowers accuracy; give boxes "
        "(--boxes boxes.csv or --data DIR; in Python `boxes=`)"
    )


def _as_box(box) -> tuple[float, float, float, float] | None:
    """A box as 4 finite floats, or None (missing, NaN)."""
    if box is None:
        return None
    values = tuple(float(v) for v in box)
    if len(values) != 4:
        raise TwincarError(f"box {box!r}: give 4 numbers x1, y1, x2, y2")
    return values if all(math.isfinite(v) for v in values) else None


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them, as a list."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


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

    card = read_model_card(path.parent)
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
    import warnings

    from fastai.learner import load_learner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's pickle warning: the user's own export
        try:
            learn = load_learner(path, cpu=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure: one line, what to do
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise TwincarError(
                f"{path}: can't load this learner ({reason}); re-export it"
            ) from None
    return learn.model, [str(v) for v in learn.dls.vocab], Preprocess.from_dls(learn.dls)
