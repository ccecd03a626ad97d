"""The decoded-image cache: every training-split image decoded once, stored as uint8 pixels.

Each image of the train split (car-box crop with its margin first, when `data.bbox_crop`) is
decoded in full and area-resized so its shorter side is `data.cache_size`; the pixels (H × W × 3
each, one after another) go into one file per data set and settings, which training reads through a
memory map: the pages live in the page cache (shared by every process on the machine), and the
loader hands them back after each batch (`ImageCache.release`), so a process's RSS does not grow
with the data set. The file starts with a header (magic, the key, image count, payload length,
CRC-32) and the index: (offset, height, width) per image, in the order of the train rows of
annotations.csv. A build writes a temporary file with `pwrite` from a thread pool, under a lock,
and renames it into place, so a reader sees a whole cache or none; a cut-short or corrupted file
fails its length or checksum test and is rebuilt with a warning. The key hashes annotations.csv,
the settings that change the pixels and, for each image file, its path, its size and the bytes of
its first and last 64 KiB (the whole file up to 128 KiB): change any of them and the name changes,
so a stale cache is not read. Only those blocks are read, to keep the key fast on a large set: an
edit confined to the middle of a file over 128 KiB that keeps its size is not seen (`twincar
cache` after deleting the cache file rebuilds it). The test split is not cached: the final
evaluation reads the original files through the exact validation path.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from rich.progress import Progress

from twincar_fast.config import ExperimentConfig
from twincar_fast.console import console
from twincar_fast.data.dataset import BBOX_COLUMNS, read_annotations
from twincar_fast.data.geometry import crop_region
from twincar_fast.data.images import image_size, open_region
from twincar_fast.errors import ConfigError, DataError
from twincar_fast.files import atomic_path, file_lock

__all__ = [
    "ImageCache",
    "build_cache",
    "cache_command",
    "cache_key",
    "cache_path",
    "cache_rows",
    "cache_size",
    "decode",
    "file_bytes",
    "open_cache",
]

_MAGIC = b"TWCACHE1"
_HEAD = struct.Struct("<8s32sQQI")  # magic, key (sha256), images, payload bytes, CRC-32
_VERSION = 2  # bump when the pixels a build writes change (2: EXIF orientation applied)
_EDGE = 1 << 16  # the key reads each image's first and last 64 KiB
_CHUNK = 1 << 24  # CRC-32 in 16 MiB reads: fast, and no second copy of the file in memory


def cache_size(cfg: ExperimentConfig) -> int:
    """Shorter side of the cached images: `data.cache_size`, else img_size × max(1.15, max_zoom),
    img_size being the largest of `data.img_size_schedule` (one cache serves every size)."""
    if cfg.data.cache_size is not None:
        return cfg.data.cache_size
    side = max([cfg.data.img_size, *(size for _, size in cfg.data.img_size_schedule)])
    return math.ceil(side * max(1.15, cfg.aug.max_zoom))


def cache_rows(data_dir: Path) -> pd.DataFrame:
    """The annotation rows a cache holds (the train split, each file once), in file order."""
    df = read_annotations(data_dir)
    return df[df["split"] == "train"].drop_duplicates("path")


def _region_size(path: str, box, margin: float) -> tuple[int, int]:
    """(w, h) of the part of the image at `path` that is cached, read from its header only."""
    size = image_size(path)  # upright, as `open_region` cuts it
    region = crop_region(box, margin, size)
    if region is None:
        return size
    left, top, right, bottom = region
    return math.ceil(right) - math.floor(left), math.ceil(bottom) - math.floor(top)


def _scaled(w: int, h: int, side: int) -> tuple[int, int]:
    """(w, h) scaled so the shorter side is `side` (each at least 1)."""
    s = side / min(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _content_digest(path: str) -> str:
    """sha256 of a file's size and its first and last `_EDGE` bytes (all of a small file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f"{size}\0".encode())
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def cache_key(data_dir: Path, rows: pd.DataFrame, cfg: ExperimentConfig) -> str:
    """sha256 of annotations.csv, each image's path, size and first and last 64 KiB, and the
    pixel settings (the files' edges are read in threads: the key stays fast on a large set)."""
    h = hashlib.sha256()
    h.update((Path(data_dir) / "annotations.csv").read_bytes())
    paths = list(rows["path"])
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        digests = list(pool.map(_content_digest, paths))
    for path, digest in zip(paths, digests, strict=True):
        h.update(f"{path}\0{digest}\n".encode())
    d = cfg.data
    settings = [_VERSION, cache_size(cfg), d.bbox_crop, d.bbox_margin if d.bbox_crop else 0]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()


def cache_dir(cfg: ExperimentConfig, data_dir: Path) -> Path:
    """`data.cache_dir`, or `.cache` inside the prepared set."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else data_dir / ".cache"


def cache_path(cfg: ExperimentConfig, data_dir: Path, key: str) -> Path:
    """The cache file of `key`."""
    return cache_dir(cfg, data_dir) / f"images-{cache_size(cfg)}px-{key[:16]}.u8"


def file_bytes(layout: np.ndarray) -> int:
    """Bytes of the cache file of a `_layout` (header, index and pixels)."""
    return int(layout[:, 0].sum()) + _header_bytes(len(layout))


def _boxes(rows: pd.DataFrame, cfg: ExperimentConfig) -> list:
    """Each row's car box (x1, y1, x2, y2), or None without `bbox_crop`."""
    if not cfg.data.bbox_crop or not set(BBOX_COLUMNS) <= set(rows.columns):
        return [None] * len(rows)
    return [tuple(map(float, b)) for b in rows[BBOX_COLUMNS].to_numpy()]


def _layout(rows: pd.DataFrame, cfg: ExperimentConfig) -> np.ndarray:
    """(n, 3) int64: bytes, height, width of each cached image."""
    side, margin = cache_size(cfg), cfg.data.bbox_margin
    out = np.zeros((len(rows), 3), dtype=np.int64)
    for i, (path, box) in enumerate(zip(rows["path"], _boxes(rows, cfg), strict=True)):
        w, h = _scaled(*_region_size(path, box, margin), side)
        out[i] = (h * w * 3, h, w)
    return out


def decode(path: str, box, margin: float, hw: tuple[int, int]) -> np.ndarray:
    """The region of `path` as an h × w × 3 uint8 array: full decode, crop, area resize."""
    arr = np.asarray(open_region(path, box, margin))  # the loader's own cut, at full scale
    h, w = hw
    if arr.shape[:2] == (h, w):
        return arr
    shrink = h < arr.shape[0]  # INTER_AREA averages when shrinking; bilinear when enlarging
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclass
class ImageCache:
    """A built cache: the memory-mapped pixels and, per image, its offset, height, width, path."""

    path: Path
    pixels: np.ndarray  # uint8, memory-mapped payload
    index: np.ndarray  # (n, 3) int64: offset, height, width
    paths: list[str]
    mm: mmap.mmap | None = None  # the mapping, to hand its pages back (`release`)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        """Image `i` as an h × w × 3 uint8 view of the memory map (no copy)."""
        off, h, w = (int(v) for v in self.index[i])
        return self.pixels[off : off + h * w * 3].reshape(h, w, 3)

    def slots(self, paths) -> np.ndarray:
        """The cache position of each path; a DataError if any is not in the cache."""
        pos = pd.Index(self.paths).get_indexer(list(paths))
        if (pos < 0).any():
            missing = list(paths)[int(np.argmax(pos < 0))]
            raise DataError(f"{missing} is not in the image cache {self.path}; rebuild it")
        return pos

    def release(self) -> None:
        """Drop this process's mapping of the pages read so far: they stay in the page cache
        (the next read is a minor fault), but not in the process's RSS, which so stays flat."""
        if self.mm is not None:
            self.mm.madvise(mmap.MADV_DONTNEED)

    @property
    def nbytes(self) -> int:
        """Size of the cache file in bytes."""
        return self.path.stat().st_size


def _header_bytes(n: int) -> int:
    """Bytes before the payload: the header and the index, padded to a page."""
    raw = _HEAD.size + n * 3 * 8
    return -(-raw // 4096) * 4096


def _crc(path: Path, start: int) -> int:
    """CRC-32 of the file at `path` from byte `start`, read in chunks (page cache, not RSS)."""
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _read(path: Path, key: str, paths: list[str], verify: bool = True) -> ImageCache | None:
    """The cache at `path` if it is whole and of `key`; None if it's missing, stale or broken.

    `verify` reads the whole file for its CRC-32 (about 0.5 s a GB from the page cache).
    """
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head, size = f.read(_HEAD.size), os.fstat(f.fileno()).st_size
        if len(head) < _HEAD.size:
            return _broken(path, "its header is cut short")
        magic, k, n, payload, crc = _HEAD.unpack(head)
        if magic != _MAGIC or k != bytes.fromhex(key) or n != len(paths):
            return _broken(path, "its header doesn't match this data set")
        start = _header_bytes(n)
        if size != start + payload:
            return _broken(path, f"it is {size} bytes, its header says {start + payload}")
        if verify and _crc(path, _HEAD.size) != crc:
            return _broken(path, "its checksum doesn't match")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mm = np.frombuffer(mapping, dtype=np.uint8)
    index = np.frombuffer(mm[_HEAD.size : _HEAD.size + n * 24], dtype=np.int64).reshape(n, 3)
    return ImageCache(path, mm[start:], index.copy(), paths, mapping)


def _broken(path: Path, why: str) -> None:
    """Warn that the cache at `path` is unusable and will be rebuilt."""
    console.print(f"warning: image cache {path} is damaged ({why}); rebuilding it", markup=False)
    return None


def _write(
    tmp: Path, key: str, rows: pd.DataFrame, cfg: ExperimentConfig, layout: np.ndarray, workers: int
) -> None:
    """Decode every row into a new cache file at `tmp` (header written last, with the CRC).

    Written with `pwrite`, not through a memory map, so the pages go to the page cache without
    ever counting in this process's RSS.
    """
    n, payload = len(rows), int(layout[:, 0].sum())
    offsets = np.concatenate([[0], np.cumsum(layout[:, 0])[:-1]]).astype(np.int64)
    index = np.stack([offsets, layout[:, 1], layout[:, 2]], axis=1)
    start = _header_bytes(n)
    boxes, margin = _boxes(rows, cfg), cfg.data.bbox_margin
    fd = os.open(tmp, os.O_RDWR)
    try:
        # reserve every block now: a full disk is an OSError here, not half a file later
        os.posix_fallocate(fd, 0, start + payload)

        def fill(i: int) -> None:
            off, h, w = (int(v) for v in index[i])
            os.pwrite(fd, decode(rows["path"].iloc[i], boxes[i], margin, (h, w)), start + off)

        with ThreadPoolExecutor(workers) as pool, Progress(console=console, transient=True) as bar:
            task = bar.add_task("caching decoded images", total=n)
            for _ in pool.map(fill, range(n)):  # PIL, OpenCV and pwrite release the GIL
                bar.advance(task)
        os.pwrite(fd, index.tobytes(), _HEAD.size)
        crc = _crc(tmp, _HEAD.size)
        os.pwrite(fd, _HEAD.pack(_MAGIC, bytes.fromhex(key), n, payload, crc), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(folder: Path) -> None:
    """Create the cache folder; a one-line ConfigError if it can't be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"data.cache_dir {folder} is not writable ({e.strerror}); set data.cache_dir to a "
            "writable folder or data.cache=off"
        ) from None


def _build(path: Path, *args) -> float:
    """Write the cache at `path` by `_write(tmp, *args)`, under the build lock; the seconds."""
    for stale in path.parent.glob(".images-*.tmp"):  # a killed build's: nobody writes now
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        with atomic_path(path) as tmp:
            _write(tmp, *args)
    except OSError as e:
        raise ConfigError(
            f"can't write the image cache in {path.parent} ({e.strerror or e}); free space "
            "there, set data.cache_dir to another folder or data.cache=off"
        ) from None
    return time.perf_counter() - start


def build_cache(
    cfg: ExperimentConfig,
    data_dir: str | os.PathLike,
    workers: int | None = None,
    max_bytes: float | None = None,
) -> tuple[ImageCache | None, float]:
    """The cache of `cfg`'s data set, built if missing or stale; and the seconds spent building.

    Args:
        max_bytes: build only if the cache would take at most this (else return None).

    Raises:
        ConfigError: the cache folder is not writable, or the disk filled up while writing.
    """
    data_dir = Path(data_dir)
    rows = cache_rows(data_dir)
    key = cache_key(data_dir, rows, cfg)
    path, paths = cache_path(cfg, data_dir, key), rows["path"].tolist()
    cache = _read(path, key, paths)
    if cache is not None:
        return cache, 0.0
    layout = _layout(rows, cfg)  # from the image headers: nothing decoded yet
    if max_bytes is not None and file_bytes(layout) > max_bytes:
        return None, 0.0
    _make_dir(path.parent)
    with file_lock(path.parent / ".lock"):
        cache = _read(path, key, paths)  # another process may have built it while we waited
        if cache is not None:
            return cache, 0.0
        seconds = _build(path, key, rows, cfg, layout, workers or os.cpu_count() or 1)
    cache = _read(path, key, paths, verify=False)  # _write has just read it for its CRC
    if cache is None:
        raise DataError(f"the image cache {path} was damaged right after it was written")
    return cache, seconds


def open_cache(cfg: ExperimentConfig, data_dir: str | os.PathLike) -> ImageCache | None:
    """The cache `cfg` trains from, built if needed; None when `data.cache` leaves it off.

    `auto` builds it unless it would exceed `data.cache_max_gb`; `aug.stage: batch` presizes
    for fastai's batch transforms instead, so the cache (item-stage inputs) is not used.
    """
    mode = cfg.data.cache
    if mode == "off":
        return None
    if cfg.aug.enabled and cfg.aug.stage == "batch":  # with data.cache: on, a config error
        return None
    limit = None if mode == "on" else cfg.data.cache_max_gb * 2**30
    cache, seconds = build_cache(cfg, data_dir, max_bytes=limit)
    if cache is None:
        console.print(
            f"image cache off: it would exceed data.cache_max_gb={cfg.data.cache_max_gb}; "
            "decoding every image every epoch",
            markup=False,
        )
    elif seconds:
        mb = cache.nbytes / 2**20
        console.print(
            f"image cache: {len(cache)} images, {mb:.0f} MB in {seconds:.1f}s → {cache.path}",
            markup=False,
        )
    return cache


def cache_command(cfg: ExperimentConfig) -> ImageCache:
    """`twincar cache`: build (or check) the cache of `cfg`'s data set ahead of a run; print it."""
    from twincar_fast.data.dataset import ensure_dataset

    if cfg.data.cache == "off":
        raise ConfigError("data.cache is off in this config; set data.cache=auto or on to cache")
    if cfg.aug.enabled and cfg.aug.stage == "batch":
        raise ConfigError("aug.stage=batch doesn't train from the cache; use aug.stage=item")
    cache, seconds = build_cache(cfg, ensure_dataset(cfg))
    what = f"built in {seconds:.1f}s" if seconds else "up to date"
    mb = cache.nbytes / 2**20
    console.print(
        f"image cache {cache.path}: {len(cache)} images, {mb:.1f} MB, {what}", markup=False
    )
    return cache
