"""Fast inference from an exported model: the validation preprocessing, batched, no Learner.

`Predictor.from_path` loads `model.safetensors` + `model.json` (weights only, no pickle), a
fastai `learner.pkl`, or a `models/<run>` folder (preferring the safetensors pair). Images are
preprocessed exactly as the validation set is during training: opened with `open_region` (JPEG
draft decoding, as the training loader), resized on the CPU (centre square crop, squish or pad) in
a thread pool to `item_size` (= `img_size` for models trained with item-stage augmentation, the
default), then resampled to `img_size` where that differs and normalized as a batch on the
model's device; the forward pass runs channels-last under `inference_mode`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from twincar_fast.data.loaders import open_region
from twincar_fast.errors import TwincarError

__all__ = ["Predictor", "Preprocess", "predict_files", "require_trust"]

ImageInput = str | os.PathLike | Image.Image
_MODEL_FILES = ("model.safetensors", "learner.pkl")
# fastai's PadMode → torchvision's padding_mode
_PAD_MODES = {"zeros": "constant", "border": "edge", "reflection": "reflect"}


@dataclass
class Preprocess:
    """The validation transform of a trained model: resize on the CPU, resample on the device."""

    item_size: int  # side of the validation item (the model's img_size unless batch-stage aug)
    img_size: int  # side of the crop the model sees
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    resize: str = "crop"  # crop: centre square; squish: whole image; pad: pad to a square
    pad_mode: str = "zeros"  # padding of `pad` (fastai PadMode: zeros, border, reflection)
    draft: bool = True  # JPEG draft decoding at a reduced scale still ≥ item_size

    def open(self, image: ImageInput) -> Image.Image:
        """An RGB PIL image from a path (checked, draft-decoded) or an image object."""
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        path = Path(image)
        if not path.is_file():
            raise TwincarError(f"image not found: {path} (check the path)")
        return open_region(path, min_side=self.item_size if self.draft else None)

    def item(self, image: ImageInput) -> torch.Tensor:
        """One presized uint8 CHW tensor, as fastai's validation `Resize(item_size)` makes it."""
        img = _presize(self.open(image), self.item_size, self.resize, self.pad_mode)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)

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
        from fastai.vision.augment import AffineCoordTfm, RandomResizedCropGPU, Resize

        from twincar_fast.data.loaders import ImageLoader

        dl = dls.valid
        resize = next(t for t in dl.after_item.fs if isinstance(t, Resize))
        norm = next(t for t in dl.after_batch.fs if isinstance(t, Normalize))
        crops = (RandomResizedCropGPU, AffineCoordTfm)
        sizes = [t.size for t in dl.after_batch.fs if isinstance(t, crops) and t.size is not None]
        tfms = [t for p in dl.dataset.tfms for t in p.fs]
        loader = next((t for t in tfms if isinstance(t, ImageLoader)), None)
        return cls(
            item_size=int(resize.size[0]),
            img_size=int(sizes[-1][0]) if sizes else int(resize.size[0]),  # item stage: sized
            mean=norm.mean.flatten().tolist(),
            std=norm.std.flatten().tolist(),
            resize=str(resize.method),
            pad_mode=str(resize.pad_mode),
            draft=bool(loader.draft) if loader is not None else False,
        )


def _presize(img: Image.Image, size: int, method: str, pad_mode: str) -> Image.Image:
    """fastai's `Resize(size, method, pad_mode)` on the validation set: centred, bilinear."""
    w, h = img.size
    if method == "squish":
        return img.resize((size, size), Image.BILINEAR)
    # Same float arithmetic as fastai's Resize.encodes, so the crop box matches to the pixel.
    ratios = (w / size, h / size)
    m = max(ratios) if method == "pad" else min(ratios)
    side = int(m * size)
    left, top = int(0.5 * (w - side)), int(0.5 * (h - side))
    img = img.crop((max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)))
    pads = [max(-left, 0), max(-top, 0), max(left + side - w, 0), max(top + side - h, 0)]
    if any(pads):
        from torchvision.transforms.functional import pad  # what fastai pads PIL images with

        img = pad(img, pads, padding_mode=_PAD_MODES[pad_mode])
    return img.resize((size, size), Image.BILINEAR)


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
        """Load `model.safetensors` (+ model.json), `learner.pkl` or a `models/<run>` folder.

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

    def _items(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Presized items, decoded in threads (PIL releases the GIL while decoding and resizing)."""
        if len(images) < 2 or self.num_threads < 2:
            return [self.preprocess.item(im) for im in images]
        with ThreadPoolExecutor(min(self.num_threads, len(images))) as pool:
            return list(pool.map(self.preprocess.item, images))

    def predict_proba(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Class probabilities, shape (n_images, n_classes), in the model's class order."""
        images = _as_list(images)
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                items = self._items(images[i : i + self.batch_size])
                x = self.preprocess.batch(items, self.device)
                x = x.contiguous(memory_format=torch.channels_last)
                out.append(self.model(x).float().softmax(1).cpu())
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return torch.cat(out).numpy()

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 3) -> list[dict]:
        """Per image: `label`, `class_id`, `prob` of the top class and the `topk` list of dicts."""
        probs = self.predict_proba(images)
        k = max(1, min(top_k, len(self.classes)))
        results = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            topk = [
                {"label": self.classes[c], "class_id": int(c), "prob": float(p[c])} for c in order
            ]
            results.append({**topk[0], "topk": topk})
        return results


def require_trust(path: Path, trust_pickle: bool) -> None:
    """A one-line TwincarError unless the user trusts this pickle (it can run any code)."""
    if not trust_pickle:
        raise TwincarError(
            f"{path}: a pickle can run any code, so it is loaded only when you trust it "
            "(--trust-pickle, or trust_pickle=True); the safe files are model.safetensors + "
            "model.json in the same folder"
        )


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
    """Rebuild the model from model.json, load the weights-only safetensors, no pickle involved."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from twincar_fast.config import ModelConfig
    from twincar_fast.model.learner import create_model
    from twincar_fast.ship.export import read_model_card

    card = read_model_card(path.with_name("model.json"))
    model_cfg = ModelConfig(
        arch=card.arch,
        pretrained=False,
        head=card.head,
        head_hidden=card.head_hidden,
        head_dropout=card.head_dropout,
    )
    model = create_model(model_cfg, len(card.classes), pretrained=False)
    try:
        model.load_state_dict(load_file(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise TwincarError(
            f"{path}: can't load these weights into {card.arch} ({reason}); "
            "the file and model.json must come from the same export"
        ) from None
    pre = Preprocess(
        card.item_size, card.img_size, card.mean, card.std, card.resize, card.pad_mode, card.draft
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


def predict_files(
    model: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    top_k: int = 3,
    trust_pickle: bool = False,
) -> list[dict]:
    """Classify image files with an exported model, print a table and return the results."""
    from rich.console import Console
    from rich.table import Table

    if top_k < 1:
        raise TwincarError(f"--top-k must be at least 1, got {top_k}")
    paths = [Path(p) for p in images]
    for p in paths:  # before loading the model: a typo shouldn't cost a model load
        if not p.is_file():
            raise TwincarError(f"image not found: {p} (check the path)")
    predictor = Predictor.from_path(model, trust_pickle=trust_pickle)
    results = predictor.predict(paths, top_k=top_k)
    table = Table(title=f"predictions ({Path(model)})")
    table.add_column("image")
    table.add_column("prediction")
    table.add_column("prob", justify="right")
    table.add_column(f"top {min(top_k, len(predictor.classes))}")
    for p, r in zip(paths, results, strict=True):
        others = ", ".join(f"{t['label']} {t['prob']:.2f}" for t in r["topk"])
        table.add_row(str(p), r["label"], f"{r['prob']:.3f}", others)
    Console().print(table)
    return [{"image": str(p), **r} for p, r in zip(paths, results, strict=True)]
