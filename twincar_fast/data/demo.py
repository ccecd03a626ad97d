"""A procedurally drawn fine-grained "cars" set in the original Stanford Cars devkit layout.

Every car is the same cartoon side view with the same six parts (nose, tail, roof, windows, front
wheel, door). Each part has neutral variants, drawn at random on every car, and marker variants
reserved for classes: class k shows marker `m_k` on part `p_k` (`class_part`) and neutral variants
everywhere else, so twin classes (same part, markers 0/1 or 2/3) differ only inside that part's
box. Body colour, background, position, scale, flip and noise are random and class-independent.
Each part is drawn on a crop of its own box, so nothing it draws can leak outside the box.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw, ImageOps
from rich.console import Console
from rich.markup import escape

from twincar_fast.errors import DataError
from twincar_fast.files import atomic_dir

Box = tuple[int, int, int, int]  # x1, y1, x2, y2: 1-based inclusive pixels, like the devkit

PARTS = ("nose", "tail", "roof", "windows", "wheel", "door")
N_NEUTRAL, N_MARKER = 3, 4
MAX_CLASSES = len(PARTS) * N_MARKER
# Each part's box in car units (car length = 1, facing right, y down, roof line at y = 0.05).
ZONES = {
    "nose": (0.84, 0.10, 1.04, 0.35),
    "tail": (-0.03, 0.06, 0.20, 0.30),
    "roof": (0.28, -0.08, 0.70, 0.05),
    "windows": (0.22, 0.05, 0.79, 0.185),
    "wheel": (0.64, 0.20, 0.88, 0.44),
    "door": (0.36, 0.185, 0.62, 0.345),
}
ENVELOPE = (-0.03, -0.08, 1.04, 0.44)  # the car's box: body, wheels and every part's zone
BODY_COLOURS = [(200, 200, 205), (240, 240, 236), (60, 62, 68), (25, 25, 28), (30, 45, 95),
                (110, 25, 30), (35, 75, 50), (200, 185, 150), (80, 110, 140), (130, 120, 110)]  # fmt: skip
YELLOW, CYAN, ORANGE, MAGENTA, LIME = (255, 214, 0), (0, 215, 235), (255, 120, 0), (235, 0, 190), (120, 235, 0)  # fmt: skip
DARK, LIGHT, GLASS = (30, 30, 34), (225, 225, 215), (120, 150, 175)
MAKES = ("Twincar", "Borealis", "Corvana", "Dynamo", "Everest", "Falcon")
BODIES = ("Sedan", "Coupe", "Hatchback", "Wagon", "SUV", "Convertible")


@dataclass(frozen=True)
class CarAttrs:
    """Everything random about one image; none of it depends on the class."""

    size: tuple[int, int]
    scale: float  # car length in output pixels
    origin: tuple[float, float]  # car frame origin in output pixels
    flip: bool
    body: tuple[int, int, int]
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    horizon: float  # share of the height
    clouds: tuple[tuple[float, float, float, float], ...]  # centre and radii, shares of W and H
    cloud: tuple[int, int, int]
    neutral: tuple[int, ...]  # neutral variant of every part
    noise: float
    noise_seed: int


def class_part(class_id: int) -> tuple[int, int]:
    """The (part index, marker index) that class `class_id` (0-based) shows; twins share a part."""
    return (class_id // 2) % len(PARTS), 2 * (class_id // (2 * len(PARTS))) + class_id % 2


def class_names(n_classes: int) -> list[str]:
    """Stanford-Cars-style unique names, e.g. 'Twincar Alpha Sedan 2012'; twins differ by year."""
    names = []
    for k in range(n_classes):
        part, marker = class_part(k)
        model = ("Alpha", "Sigma")[marker // 2]
        names.append(f"{MAKES[part]} {model} {BODIES[part]} {(2012, 2009)[marker % 2]}")
    return names


def designed_twins(n_classes: int = MAX_CLASSES) -> list[tuple[str, str]]:
    """The class-name pairs drawn as twins: the classes `class_part` gives one part and one model."""
    names, groups = class_names(n_classes), {}
    for k in range(n_classes):
        part, marker = class_part(k)
        groups.setdefault((part, marker // 2), []).append(names[k])
    return [(g[0], g[1]) for g in groups.values() if len(g) == 2]


def _colour(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def sample_attrs(rng: np.random.Generator, size: tuple[int, int]) -> CarAttrs:
    """Draw the class-independent attributes of one image of `size` (W, H)."""
    w, h = size
    ex1, ey1, ex2, ey2 = ENVELOPE
    scale = min(rng.uniform(0.68, 0.86) * w, 0.96 * w / (ex2 - ex1), 0.92 * h / (ey2 - ey1))
    x0 = rng.uniform(0.02 * w - ex1 * scale, 0.98 * w - ex2 * scale)
    y0 = rng.uniform(0.04 * h - ey1 * scale, 0.97 * h - ey2 * scale)
    base = BODY_COLOURS[rng.integers(len(BODY_COLOURS))]
    body = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in base)
    lo, hi = (0, 0.05, 0.04, 0.02), (1, 0.35, 0.12, 0.05)  # cloud centre x, y and radii x, y
    clouds = tuple(tuple(rng.uniform(lo, hi).tolist()) for _ in range(rng.integers(0, 4)))
    sky = _colour(rng, 120, 216)
    return CarAttrs(
        size=(w, h), scale=float(scale), origin=(float(x0), float(y0)), flip=bool(rng.random() < 0.5),
        body=body, sky=sky, ground=_colour(rng, 40, 150), horizon=float(rng.uniform(0.45, 0.8)),
        clouds=clouds, cloud=tuple(c + 40 for c in sky),
        neutral=tuple(int(v) for v in rng.integers(0, N_NEUTRAL, len(PARTS))),
        noise=float(rng.uniform(2, 8)), noise_seed=int(rng.integers(2**31)),
    )  # fmt: skip


class _Pen:
    """Draws in car units on (a crop of) the 2× canvas: car length 1, facing right."""

    def __init__(self, draw: ImageDraw.ImageDraw, origin: tuple[float, float], scale: float):
        self.d, self.o, self.s = draw, origin, scale
        self.line = max(1, round(0.009 * scale))

    def xy(self, *pts: float) -> list[float]:
        return [self.o[i % 2] + v * self.s for i, v in enumerate(pts)]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill, outline=DARK) -> None:
        self.d.ellipse(self.xy(cx - rx, cy - ry, cx + rx, cy + ry), fill, outline, self.line)

    def rect(self, x1: float, y1: float, x2: float, y2: float, fill, outline=DARK) -> None:
        self.d.rectangle(self.xy(x1, y1, x2, y2), fill, outline, self.line)

    def poly(self, pts: list[float], fill, outline=DARK) -> None:
        self.d.polygon(self.xy(*pts), fill, outline, self.line)


def _nose(pen: _Pen, v: int, a: CarAttrs) -> None:
    if v < N_NEUTRAL:  # small white headlight, dark grille
        pen.ellipse(0.965, 0.215, (0.02, 0.03, 0.015)[v], (0.012, 0.01, 0.015)[v], LIGHT)
        pen.rect(0.985, 0.25, 1.0, 0.3, DARK)
    elif v in (3, 4):  # one big round lamp vs two stacked small ones
        for cy in (0.205, 0.275) if v == 4 else (0.235,):
            pen.ellipse(0.965, cy, 0.055 - 0.02 * (v == 4), 0.055 - 0.02 * (v == 4), YELLOW)
    else:  # grille with vertical vs horizontal cyan bars
        pen.rect(0.905, 0.2, 1.025, 0.325, DARK, None)
        for i in range(3):
            x, y = 0.92 + 0.04 * i, 0.21 + 0.04 * i
            pen.rect(*((x, 0.205, x + 0.025, 0.32) if v == 5 else (0.91, y, 1.02, y + 0.025)), CYAN)


def _tail(pen: _Pen, v: int, a: CarAttrs) -> None:
    if v < N_NEUTRAL:  # small red tail light
        pen.rect(0.0, (0.2, 0.21, 0.22)[v], 0.02, 0.25, (190, 20, 20))
    elif v == 3:  # tall wing on two struts
        pen.rect(0.04, 0.1, 0.055, 0.18, DARK)
        pen.rect(0.12, 0.1, 0.135, 0.18, DARK)
        pen.rect(-0.02, 0.075, 0.19, 0.11, ORANGE)
    elif v == 4:  # low ducktail wedge on the deck
        pen.poly([-0.02, 0.18, 0.17, 0.18, 0.17, 0.15, 0.0, 0.12], ORANGE)
    elif v == 5:  # two round tail lamps
        pen.ellipse(0.035, 0.215, 0.035, 0.03, MAGENTA)
        pen.ellipse(0.035, 0.28, 0.035, 0.03, MAGENTA)
    else:  # one tall lamp bar
        pen.rect(-0.01, 0.19, 0.04, 0.315, MAGENTA)


def _roof(pen: _Pen, v: int, a: CarAttrs) -> None:
    if v == 1:  # antenna
        pen.rect(0.6, -0.04, 0.605, 0.05, DARK, None)
    elif v == 2:  # low rails
        pen.rect(0.36, 0.03, 0.62, 0.045, (90, 90, 95), None)
    elif v == 3:  # taxi sign
        pen.poly([0.42, 0.05, 0.56, 0.05, 0.53, -0.035, 0.45, -0.035], YELLOW)
    elif v == 4:  # long light bar
        pen.rect(0.31, 0.015, 0.67, 0.05, YELLOW)
    elif v == 5:  # cargo box
        pen.rect(0.33, -0.045, 0.65, 0.05, LIME)
    elif v == 6:  # ladder rack
        pen.rect(0.31, -0.01, 0.67, 0.01, LIME)
        for x in (0.33, 0.43, 0.53, 0.63):
            pen.rect(x, -0.045, x + 0.025, 0.05, LIME)


def _windows(pen: _Pen, v: int, a: CarAttrs) -> None:
    cuts = {0: [0.5], 1: [0.47], 2: [0.53], 3: [0.42, 0.58], 4: [0.37, 0.5, 0.63]}.get(v, [0.5])
    pen.poly([0.245, 0.175, 0.335, 0.075, 0.635, 0.075, 0.765, 0.175], GLASS, None)
    for x in cuts:  # pillars in the body colour split the glass into windows
        pen.rect(x - 0.02, 0.07, x + 0.02, 0.18, a.body)
    if v == 5:  # round porthole
        pen.ellipse(0.5, 0.125, 0.045, 0.045, CYAN)
    elif v == 6:  # two diamond portholes
        for x in (0.39, 0.63):
            pen.poly([x, 0.08, x + 0.045, 0.125, x, 0.17, x - 0.045, 0.125], CYAN)


def _wheel_at(pen: _Pen, cx: float, v: int) -> None:
    pen.ellipse(cx, 0.32, 0.085, 0.085, (20, 20, 22), None)
    if v < N_NEUTRAL:  # grey hub: plain, with bolts, with a small cap
        pen.ellipse(cx, 0.32, 0.045, 0.045, (150, 150, 155))
        if v == 1:
            for t in np.linspace(0, 2 * math.pi, 5, endpoint=False):
                pen.ellipse(
                    cx + 0.025 * math.cos(t), 0.32 + 0.025 * math.sin(t), 0.007, 0.007, DARK
                )
        if v == 2:
            pen.ellipse(cx, 0.32, 0.015, 0.015, (200, 200, 205))
    elif v == 3:  # five-spoke star
        pts = []
        for i in range(10):
            t, r = math.pi * i / 5 - math.pi / 2, (0.07, 0.03)[i % 2]
            pts += [cx + r * math.cos(t), 0.32 + r * math.sin(t)]
        pen.poly(pts, YELLOW)
    elif v == 4:  # thick ring
        pen.ellipse(cx, 0.32, 0.07, 0.07, YELLOW)
        pen.ellipse(cx, 0.32, 0.035, 0.035, (20, 20, 22))
    else:  # big red hub, plain or with a white cross
        pen.ellipse(cx, 0.32, 0.065, 0.065, MAGENTA)
        if v == 6:
            pen.rect(cx - 0.06, 0.31, cx + 0.06, 0.33, LIGHT, None)
            pen.rect(cx - 0.01, 0.26, cx + 0.01, 0.38, LIGHT, None)


def _wheel(pen: _Pen, v: int, a: CarAttrs) -> None:
    _wheel_at(pen, 0.76, v)


def _door(pen: _Pen, v: int, a: CarAttrs) -> None:
    if v < N_NEUTRAL:  # door handle
        x = (0.43, 0.47, 0.51)[v]
        pen.rect(x, 0.215, x + 0.05, 0.225, DARK, None)
    elif v == 3:  # double stripe
        pen.rect(0.37, 0.22, 0.61, 0.255, ORANGE)
        pen.rect(0.37, 0.28, 0.61, 0.315, ORANGE)
    elif v == 4:  # zigzag stripe
        pen.poly([0.37, 0.28, 0.45, 0.215, 0.5, 0.265, 0.61, 0.2,
                  0.61, 0.245, 0.5, 0.31, 0.45, 0.26, 0.37, 0.325], ORANGE)  # fmt: skip
    elif v == 5:  # round badge
        pen.ellipse(0.49, 0.265, 0.05, 0.05, LIME)
    else:  # triangle badge
        pen.poly([0.44, 0.315, 0.54, 0.315, 0.49, 0.215], LIME)


DRAWERS = (_nose, _tail, _roof, _windows, _wheel, _door)


def _zone_px(zone: tuple[float, ...], a: CarAttrs) -> tuple[int, int, int, int]:
    """A car-unit box as a [x1, x2) × [y1, y2) pixel box on the 2× canvas."""
    (ox, oy), s = a.origin, a.scale
    x1, y1, x2, y2 = (2 * (o + v * s) for o, v in zip((ox, oy, ox, oy), zone, strict=True))
    return math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)


def _out_box(zone: tuple[float, ...], a: CarAttrs) -> Box:
    """The devkit box (1-based inclusive) of a car-unit box in the final, maybe flipped, image."""
    x1, y1, x2, y2 = _zone_px(zone, a)
    x1, y1, x2, y2 = x1 // 2, y1 // 2, -(-x2 // 2), -(-y2 // 2)  # 0-based, half-open
    if a.flip:
        x1, x2 = a.size[0] - x2, a.size[0] - x1
    return x1 + 1, y1 + 1, x2, y2


def _scene(a: CarAttrs) -> Image.Image:
    """Background and the bare car (body, cabin, rear wheel) on the 2× canvas."""
    w, h = 2 * a.size[0], 2 * a.size[1]
    img = Image.new("RGB", (w, h), a.sky)
    d = ImageDraw.Draw(img)
    d.rectangle([0, a.horizon * h, w, h], a.ground)
    for cx, cy, rx, ry in a.clouds:
        d.ellipse([(cx - rx) * w, (cy - ry) * h, (cx + rx) * w, (cy + ry) * h], a.cloud)
    pen = _Pen(d, (2 * a.origin[0], 2 * a.origin[1]), 2 * a.scale)
    pen.ellipse(0.5, 0.41, 0.52, 0.03, tuple(c // 2 for c in a.ground), None)  # shadow
    pen.poly([0.2, 0.185, 0.32, 0.05, 0.65, 0.05, 0.79, 0.185], a.body)  # cabin
    pen.d.rounded_rectangle(pen.xy(0.0, 0.18, 1.0, 0.335), 0.05 * pen.s, a.body, DARK, pen.line)
    _wheel_at(pen, 0.22, a.neutral[PARTS.index("wheel")])
    return img


def draw_car(a: CarAttrs, class_id: int) -> tuple[Image.Image, Box, Box]:
    """Draw one image of class `class_id`; return it, the car's box and the class part's box."""
    img = _scene(a)
    part, marker = class_part(class_id)
    for i, (name, drawer) in enumerate(zip(PARTS, DRAWERS, strict=True)):
        x1, y1, x2, y2 = _zone_px(ZONES[name], a)
        crop = img.crop((x1, y1, x2, y2))  # drawing on a crop keeps every part inside its box
        pen = _Pen(ImageDraw.Draw(crop), (2 * a.origin[0] - x1, 2 * a.origin[1] - y1), 2 * a.scale)
        drawer(pen, N_NEUTRAL + marker if i == part else a.neutral[i], a)
        img.paste(crop, (x1, y1))
    img = img.reduce(2)  # 2×2 box average: antialiasing that stays inside each pixel block
    if a.flip:
        img = ImageOps.mirror(img)
    noise = np.random.default_rng(a.noise_seed).normal(0, a.noise, (a.size[1], a.size[0], 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr), _out_box(ENVELOPE, a), _out_box(ZONES[PARTS[part]], a)


def _check_args(out: Path, n_classes: int, per_class: int, size: tuple[int, int]) -> None:
    if not 2 <= n_classes <= MAX_CLASSES:
        raise DataError(
            f"demo data: --classes (data.demo_classes) must be 2..{MAX_CLASSES}, got {n_classes}"
        )
    if per_class < 2:
        raise DataError(
            f"demo data: --per-class (data.demo_per_class) must be ≥ 2, got {per_class}"
        )
    if len(size) != 2 or min(size) < 64:
        raise DataError(f"demo data: --size (data.demo_size) must be WxH, each ≥ 64 px, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"demo data: {out} already exists and is not empty; choose a new --out")


def _annotations(rows: list[tuple[Box, int, str]]) -> np.ndarray:
    """A 1×N struct array like the devkit's (smallest unsigned int per value, as MATLAB saved it)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    arr = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (box, cls, fname) in enumerate(rows):
        nums = [np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16) for v in (*box, cls)]
        arr[0, i] = (*nums, np.array([fname]))
    return arr


def _savemat(path: Path, variables: dict) -> None:
    """`scipy.io.savemat` with a fixed header text (it stamps the time there) so reruns match."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables)
    header = b"MATLAB 5.0 MAT-file, Platform: posix, twincar_fast demo set".ljust(116)
    path.write_bytes(header + buf.getvalue()[116:])


def _write_split(
    root: Path, split: str, n_classes: int, per_class: int, size: tuple[int, int], seed: int
) -> tuple[list[tuple[Box, int, str]], list[tuple]]:
    """Draw one split's JPEGs; return its devkit rows and parts.csv rows."""
    (root / f"cars_{split}").mkdir()
    split_id = ("train", "test").index(split)
    labels = np.random.default_rng([seed, split_id]).permutation(
        np.repeat(np.arange(n_classes), per_class)
    )
    annos, parts = [], []
    for i, label in enumerate(labels):
        attrs = sample_attrs(np.random.default_rng([seed, split_id, i]), size)
        img, box, part_box = draw_car(attrs, int(label))
        fname = f"{i + 1:05d}.jpg"
        img.save(root / f"cars_{split}" / fname, quality=90)
        annos.append((box, int(label) + 1, fname))
        parts.append((fname, split, *part_box))
    return annos, parts


def make_demo_data(
    out: str | os.PathLike,
    n_classes: int = 12,
    per_class: int = 40,
    size: tuple[int, int] = (192, 128),
    seed: int = 0,
) -> Path:
    """Draw the synthetic fine-grained cars set into `out` in the devkit layout, plus parts.csv.

    Args:
        out: new (or empty) folder to create.
        n_classes: number of classes, 2..MAX_CLASSES.
        per_class: images per class in each of the train and test splits.
        size: image (width, height) in pixels.
        seed: drawing seed; the same seed gives byte-identical files.
    """
    out, size, start = Path(out), tuple(size), time.perf_counter()
    _check_args(out, n_classes, per_class, size)
    if out.is_dir():
        out.rmdir()  # empty: atomic_dir renames the finished set into its place
    with atomic_dir(out) as tmp:
        (tmp / "devkit").mkdir()
        names = np.empty((1, n_classes), dtype=object)
        names[0, :] = class_names(n_classes)
        _savemat(tmp / "devkit" / "cars_meta.mat", {"class_names": names})
        train, train_parts = _write_split(tmp, "train", n_classes, per_class, size, seed)
        test, test_parts = _write_split(tmp, "test", n_classes, per_class, size, seed)
        _savemat(tmp / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(train)})
        _savemat(tmp / "cars_test_annos_withlabels.mat", {"annotations": _annotations(test)})
        with open(tmp / "parts.csv", "w", newline="") as f:
            csv.writer(f).writerows(
                [("fname", "split", "x1", "y1", "x2", "y2"), *train_parts, *test_parts]
            )
    n, secs = len(train) + len(test), time.perf_counter() - start
    msg = f"demo data: {n} images, {n_classes} classes → {escape(str(out))} ({secs:.1f} s)"
    Console(stderr=True, highlight=False).print(msg)
    return out
