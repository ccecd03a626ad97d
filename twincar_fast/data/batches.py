"""Batch-level loading from the decoded-image cache: a fastai `TfmdDL` whose items are row indices.

The DataBlock still describes the data (items, labels, split, vocab, `show_batch`); only the hot
path changes, as in fastai's tabular loaders: a batch of indices becomes a batch of pixels in one
go. Each image is cut from the memory map and, in training, warped and recoloured by `CpuAugment`
(the same draws and ranges as the item stage) in a thread pool (OpenCV and NumPy release the GIL),
one batch ahead of the one the model is on, without worker processes. Validation batches get the
validation geometry (centre crop, squish or pad to img_size). A new loader over another data set
(`test_dl`, an exported learner's empty loaders) is a plain `TfmdDL`: the final test evaluation and
the Predictor read the original files through the exact validation path.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import cv2
import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorCategory, TensorImage

from twincar_fast.data.cache import ImageCache
from twincar_fast.data.cpu_aug import CpuAugment
from twincar_fast.data.geometry import resize_window

__all__ = ["CachedDL", "valid_view"]


def valid_view(img: np.ndarray, size: int, method: str) -> np.ndarray:
    """fastai's validation `Resize` of an HWC uint8 image: centre crop, squish or zero pad, then
    an area resample to size × size."""
    h, w = img.shape[:2]
    left, top, ww, wh = resize_window(w, h, size, method)
    if method == "pad":
        canvas = np.zeros((wh, ww, 3), dtype=np.uint8)
        canvas[-top : -top + h, -left : -left + w] = img
        img = canvas
    else:
        img = img[top : top + wh, left : left + ww]
    shrink = img.shape[0] > size
    return cv2.resize(
        img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


class CachedDL(TfmdDL):
    """Batches of a fastai `Datasets` subset gathered from an `ImageCache` in a thread pool."""

    def __init__(
        self,
        dataset=None,
        cache: ImageCache | None = None,
        size: int = 224,
        resize: str = "crop",
        augment: CpuAugment | None = None,
        threads: int = 2,
        wgts: Sequence[float] | None = None,
        **kwargs,
    ):
        self.cache, self.size, self.resize, self.augment = cache, size, resize, augment
        self.threads, self.wgts, self._pool = threads, wgts, None
        kwargs["num_workers"] = 0  # threads, not worker processes
        super().__init__(dataset, **kwargs)
        items = dataset.items
        self.slots = cache.slots(items["path"]) if len(items) else np.zeros(0, dtype=np.int64)
        self.labels = torch.tensor([int(y) for y in dataset.tls[1]], dtype=torch.long)

    def new(self, dataset=None, cls=None, **kwargs):
        """The same cached loader (other bs, shuffle, ...), or a plain `TfmdDL` over new data."""
        if dataset is None or dataset is self.dataset:
            keep = dict(cache=self.cache, size=self.size, resize=self.resize, augment=self.augment)
            keep.update(threads=self.threads, wgts=self.wgts)
            return super().new(self.dataset, cls, **{**keep, **kwargs})
        kwargs.setdefault("num_workers", self.threads)  # the per-item path's worker processes
        return super().new(dataset, cls or TfmdDL, **kwargs)

    def get_idxs(self) -> list[int]:
        """fastai's order, or (training with `wgts`) draws weighted as fastai's `WeightedDL`."""
        if self.wgts is None or not self.shuffle or self.n == 0:
            return super().get_idxs()
        p = np.asarray(self.wgts, dtype=float)
        return list(np.random.choice(self.n, self.n, p=p / p.sum()))

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The thread pool, started on first use."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="twincar-batch")
        return self._pool

    def _image(self, out: np.ndarray, slot: int, seed: int | None) -> None:
        """Write cache image `slot`, augmented with `seed` (None: validation view), into `out`."""
        img = self.cache.image(slot)
        if seed is None or self.augment is None:
            img = valid_view(img, self.size, self.resize)
        else:
            img = self.augment.augment(img, random.Random(seed))
        out[...] = img.transpose(2, 0, 1)

    def _submit(self, idxs: list) -> tuple:
        """Start a batch: a uint8 tensor the pool fills, its futures and labels."""
        idxs = [0 if i is None else int(i) for i in idxs]  # fastai's one pass asks for None
        xb = torch.empty((len(idxs), 3, self.size, self.size), dtype=torch.uint8)
        out = xb.numpy()
        train = self.augment is not None and getattr(self.dataset, "split_idx", 1) == 0
        # drawn here, in order, so the pixels don't depend on which thread runs first
        seeds = [self.rng.getrandbits(64) if train else None for _ in idxs]
        # an empty split (valid_pct 0) still makes fastai's one typing pass: any image will do
        slots = self.slots[idxs] if len(self.slots) else np.zeros(len(idxs), dtype=np.int64)
        labels = self.labels[idxs] if len(self.labels) else torch.zeros(len(idxs), dtype=torch.long)
        jobs = [
            self.pool.submit(self._image, out[j], int(slot), seed)
            for j, (slot, seed) in enumerate(zip(slots, seeds, strict=True))
        ]
        return xb, jobs, labels

    @staticmethod
    def _collect(xb: torch.Tensor, jobs: list[Future], yb: torch.Tensor) -> tuple:
        """Wait for a batch's images; (TensorImage uint8, TensorCategory)."""
        for job in jobs:
            job.result()  # re-raises a worker's error here
        return TensorImage(xb), TensorCategory(yb)

    def _done(self, batch: tuple) -> tuple:
        """A finished batch; the cache's pages read so far leave this process's RSS."""
        out = self._collect(*batch)
        self.cache.release()
        return out

    def do_item(self, s):
        return s

    def do_batch(self, b):
        return self._collect(*self._submit(list(b)))

    def create_batches(self, samps) -> Iterator[tuple]:
        pending = None
        for idxs in self.chunkify(samps):
            job = self._submit(list(idxs))  # the next batch starts before this one is used
            if pending is not None:
                yield self._done(pending)
            pending = job
        if pending is not None:
            yield self._done(pending)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # threads don't pickle; a copy starts its own
        return state
