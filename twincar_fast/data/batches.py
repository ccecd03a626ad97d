"""Batch-level loading from the decoded-image cache: a fastai `TfmdDL` whose items are row indices.

The DataBlock still describes the data (items, labels, split, vocab, `show_batch`); only the hot
path changes, as in fastai's tabular loaders: a batch of indices becomes a batch of pixels in one
go. Each image is cut from the memory map and, in training, warped and recoloured by `CpuAugment`
(the same draws and ranges as the item stage) in a thread pool (OpenCV and NumPy release the GIL),
one batch ahead of the one the model is on, without worker processes; or (`batched`, the GPU's
path) the loader only lays the batch on one host canvas (pinned for a CUDA device) with its draws,
or, for a cache copied to GPU memory, hands over where each image lies in it, and `DeviceAugment`
gathers and augments it in a few batched ops after fastai's `to_device`, as its batch transforms
run. What the loader yields is always on the CPU: the CPU and the GPU run the same code. Batches
without augmentation get the validation geometry (centre crop, squish or pad to img_size).

Validation, and any loader over other data (`test_dl`, an exported learner's empty loaders), is a
`ThreadedDL`: fastai's own per-item path from the original files, its items made in threads, so
the checkpoint choice, the test evaluation and the Predictor see the exact validation pixels.
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
from twincar_fast.data.device_aug import BatchAugment, DeviceAugment, PendingAugment
from twincar_fast.data.geometry import resize_window
from twincar_fast.errors import ConfigError

__all__ = ["CachedDL", "ThreadedDL", "device_pixels", "valid_view"]

_COPY_CHUNK = 1 << 26  # host → GPU copies of the cache in 64 MiB pieces: no second host copy


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


def device_pixels(
    cache: ImageCache, device: torch.device, mode: str = "auto", share: float = 0.5
) -> torch.Tensor | None:
    """The cache's payload copied to `device` for batched augmentation, or None (host memory).

    `mode` is `data.cache_device`: cuda (always), cpu (never), auto (when it takes at most
    `share` of the GPU's free memory).
    """
    if device.type != "cuda":
        if mode == "cuda":
            raise ConfigError("data.cache_device=cuda needs train.device to be a CUDA GPU")
        return None
    n = len(cache.pixels)
    if mode == "cpu" or (mode == "auto" and n > share * torch.cuda.mem_get_info(device)[0]):
        return None
    out = torch.empty(n, dtype=torch.uint8, device=device)
    for start in range(0, n, _COPY_CHUNK):
        piece = np.array(cache.pixels[start : start + _COPY_CHUNK])  # writable, for torch
        out[start : start + len(piece)].copy_(torch.from_numpy(piece))
    cache.release()
    return out


class _PooledDL(TfmdDL):
    """A `TfmdDL` whose batches are made in a thread pool (no worker processes), each one started
    before the previous one is handed out."""

    def __init__(self, dataset=None, threads: int = 2, **kwargs):
        self.threads, self._pool = max(1, threads), None
        kwargs["num_workers"] = 0  # threads, not worker processes
        super().__init__(dataset, **kwargs)

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The thread pool, started on first use."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="twincar-batch")
        return self._pool

    def _start(self, idxs: list):
        """Start making the batch of `idxs` in the pool; what `_finish` needs to complete it."""
        raise NotImplementedError

    def _finish(self, job) -> tuple:
        """Wait for a started batch; the batch."""
        raise NotImplementedError

    def create_batches(self, samps) -> Iterator[tuple]:
        pending = None
        for idxs in self.chunkify(samps):
            job = self._start(list(idxs))  # the next batch starts before this one is used
            if pending is not None:
                yield self._finish(pending)
            pending = job
        if pending is not None:
            yield self._finish(pending)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # threads don't pickle; a copy starts its own
        return state


class CachedDL(_PooledDL):
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
        batched: bool = False,
        pixels: torch.Tensor | None = None,
        **kwargs,
    ):
        self.cache, self.size, self.resize, self.augment = cache, size, resize, augment
        self.wgts = wgts
        # batched: augment on the device; `pixels`: the cache's payload already there (or None)
        self.batched, self.pixels = batched and augment is not None, pixels
        self.batch_aug = BatchAugment(augment) if self.batched else None
        kwargs["after_batch"] = self._with_device_step(kwargs.get("after_batch"))
        super().__init__(dataset, threads, **kwargs)
        items = dataset.items
        self.slots = cache.slots(items["path"]) if len(items) else np.zeros(0, dtype=np.int64)
        self.labels = torch.tensor([int(y) for y in dataset.tls[1]], dtype=torch.long)

    def new(self, dataset=None, cls=None, **kwargs):
        """The same cached loader (other bs, shuffle, ...), or the exact per-item path over new
        data (`ThreadedDL` unless `cls` says otherwise)."""
        if dataset is None or dataset is self.dataset:
            keep = dict(cache=self.cache, size=self.size, resize=self.resize, augment=self.augment)
            keep.update(threads=self.threads, wgts=self.wgts, batched=self.batched)
            keep.update(pixels=self.pixels)
            return super().new(self.dataset, cls, **{**keep, **kwargs})
        cls = cls or ThreadedDL
        kwargs.setdefault("threads" if issubclass(cls, ThreadedDL) else "num_workers", self.threads)
        return super().new(dataset, cls, **kwargs)

    def _with_device_step(self, after_batch) -> list:
        """The batch transforms with this loader's `DeviceAugment` first (batched), in place of
        any other loader's (`new` hands the same pipeline on)."""
        tfms = getattr(after_batch, "fs", after_batch) or []
        tfms = [t for t in tfms if not isinstance(t, DeviceAugment)]
        return [DeviceAugment(self.batch_aug, self.pixels), *tfms] if self.batched else tfms

    def get_idxs(self) -> list[int]:
        """fastai's order, or (training with `wgts`) draws weighted as fastai's `WeightedDL`."""
        if self.wgts is None or not self.shuffle or self.n == 0:
            return super().get_idxs()
        p = np.asarray(self.wgts, dtype=float)
        return list(np.random.choice(self.n, self.n, p=p / p.sum()))

    def _image(self, out: np.ndarray, slot: int, seed: int | None) -> None:
        """Write cache image `slot`, augmented with `seed` (None: validation view), into `out`."""
        img = self.cache.image(slot)
        if seed is None or self.augment is None:
            img = valid_view(img, self.size, self.resize)
        else:
            img = self.augment.augment(img, random.Random(seed))
        out[...] = img.transpose(2, 0, 1)

    def _start(self, idxs: list) -> tuple:
        """Start a batch: a uint8 tensor the pool fills (or a canvas), its futures, labels and
        (batched) the draws."""
        idxs = [0 if i is None else int(i) for i in idxs]  # fastai's one pass asks for None
        train = self.augment is not None and getattr(self.dataset, "split_idx", 1) == 0
        # drawn here, in order, so the pixels don't depend on which thread runs first
        seeds = [self.rng.getrandbits(64) if train else None for _ in idxs]
        # an empty split (valid_pct 0) still makes fastai's one typing pass: any image will do
        slots = self.slots[idxs] if len(self.slots) else np.zeros(len(idxs), dtype=np.int64)
        labels = self.labels[idxs] if len(self.labels) else torch.zeros(len(idxs), dtype=torch.long)
        if train and self.batched:
            return self._start_canvas(slots, seeds, labels)
        xb = torch.empty((len(idxs), 3, self.size, self.size), dtype=torch.uint8)
        out = xb.numpy()
        jobs = [
            self.pool.submit(self._image, out[j], int(slot), seed)
            for j, (slot, seed) in enumerate(zip(slots, seeds, strict=True))
        ]
        return xb, jobs, labels, None

    def _start_canvas(self, slots: np.ndarray, seeds: list, labels: torch.Tensor) -> tuple:
        """Start a batched batch: its draws, and its images on one zero host canvas (top-left
        each, filled in the pool) or, for a cache in GPU memory, where each lies in it."""
        index = self.cache.index[slots]  # offset, height, width
        draws = self.batch_aug.draw([(int(h), int(w)) for _, h, w in index], seeds)
        shape = (len(slots), 3, int(index[:, 1].max()), int(index[:, 2].max()))
        pending = PendingAugment(draws, *shape[2:])
        if self.pixels is not None:  # gathered there by DeviceAugment, after the transfer
            return torch.from_numpy(index), [], labels, pending
        # pinned for a CUDA device, so the copy is asynchronous (and fastai's pinning a no-op)
        canvas = torch.zeros(shape, dtype=torch.uint8, pin_memory=self._pin())
        out = canvas.numpy()

        def place(j: int, slot: int) -> None:
            img = self.cache.image(slot)
            out[j, :, : img.shape[0], : img.shape[1]] = img.transpose(2, 0, 1)

        jobs = [self.pool.submit(place, j, int(slot)) for j, slot in enumerate(slots)]
        return canvas, jobs, labels, pending

    def _pin(self) -> bool:
        """Whether batches go to page-locked memory: fastai pins them for a CUDA device."""
        return bool(self.pin_memory) and torch.cuda.is_available()

    def _collect(self, xb: torch.Tensor, jobs: list[Future], yb: torch.Tensor, pending) -> tuple:
        """Wait for a batch's images: (TensorImage uint8, TensorCategory), or for the batched
        path (canvas or cache places, `PendingAugment`, TensorCategory); all on the CPU."""
        for job in jobs:
            job.result()  # re-raises a worker's error here
        if pending is not None:
            return xb, pending, TensorCategory(yb)
        return TensorImage(xb), TensorCategory(yb)

    def _finish(self, job: tuple) -> tuple:
        """A finished batch; the cache's pages read so far leave this process's RSS."""
        out = self._collect(*job)
        self.cache.release()
        return out

    def do_item(self, s):
        return s

    def do_batch(self, b):
        return self._collect(*self._start(list(b)))


class ThreadedDL(_PooledDL):
    """fastai's per-item `TfmdDL`, its items made in a thread pool instead of worker processes.

    For validation beside a cached training loader: the exact path (decode, crop, resize) with
    no worker processes to start each epoch; PIL's decoding releases the GIL. With `memo` (a
    dict), each item is made once and kept: the validation set is decoded in the first epoch only
    and then read from memory, so its pass runs at the model's speed (the items are the exact
    path's, which has nothing random in it).
    """

    def __init__(self, dataset=None, threads: int = 2, memo: dict | None = None, **kwargs):
        self.memo = memo
        super().__init__(dataset, threads, **kwargs)

    def new(self, dataset=None, cls=None, **kwargs):
        kwargs.setdefault("threads", self.threads)
        kwargs.pop("num_workers", None)
        same = (dataset is None or dataset is self.dataset) and "after_item" not in kwargs
        kwargs.setdefault("memo", self.memo if same else None)  # the same items: the same memo
        return super().new(dataset, cls, **kwargs)

    def _kept(self) -> dict:
        """The memo while the items are validation ones; else an empty dict that keeps nothing
        (fastai's `tta` sets the dataset to training transforms: random items, never kept)."""
        valid = getattr(self.dataset, "split_idx", None) == 1
        return self.memo if self.memo is not None and valid else {}

    def _start(self, idxs: list) -> tuple[dict, list[tuple]]:
        memo = self._kept()
        return memo, [
            (i, memo[i] if i in memo else self.pool.submit(self.do_item, i)) for i in idxs
        ]

    def _finish(self, job: tuple[dict, list[tuple]]) -> tuple:
        """The batch of finished items (skipped ones dropped), each kept in the memo."""
        memo, items = job
        done = []
        for i, item in items:
            if isinstance(item, Future):
                item = item.result()
                if item is not None:
                    memo[i] = item
            if item is not None:
                done.append(item)
        return self.do_batch(done)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["memo"] = None if self.memo is None else {}  # a pickled loader keeps no pixels
        return state
