"""`twincar predict`: image files, folders and globs → predictions (torch or ONNX backend, flip TTA,
Grad-CAM++ overlays), with their car boxes, on the console and in a file.

Boxes come from a CSV (`image, x1, y1, x2, y2`) or from a prepared data set's annotations.csv
(for the images it lists); a model trained on car-box crops that gets an image without a box says
so once. Unreadable images are listed with their reason and the others still predicted. The
console shows a table in a terminal (paths shortened from the left, to fit) and one plain
tab-separated line per image otherwise; `--out` writes CSV or JSON.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from twincar_fast.console import console, plain_output
from twincar_fast.data.images import image_problem
from twincar_fast.data.layouts import IMAGE_SUFFIXES
from twincar_fast.errors import TwincarError
from twincar_fast.files import write_csv, write_json
from twincar_fast.ship.boxes import ImageBoxes, image_boxes
from twincar_fast.ship.inputs import BACKENDS, box_warning
from twincar_fast.ship.predict import Predictor

__all__ = ["collect_images", "predict_files", "results_table", "shorten_left"]


def shorten_left(text: str, width: int) -> str:
    """`text` cut to `width` characters from the left ("…" + its end), so file names stay."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def results_table(rows: list[dict], top_k: int) -> pd.DataFrame:
    """One row per image: image, label, prob, the top-k pairs, class_id, box, cam and any error."""
    out = []
    for r in rows:
        row = {"image": r["image"], "label": r.get("label"), "prob": r.get("prob")}
        for i in range(1, top_k + 1):  # the same columns on every row, errors too
            t = r["topk"][i - 1] if len(r.get("topk", [])) >= i else {}
            row[f"top{i}"], row[f"top{i}_prob"] = t.get("label"), t.get("prob")
        row["class_id"] = r.get("class_id")
        box = r.get("box")
        row["box"] = "none" if box is None else " ".join(f"{v:g}" for v in box)
        if "cam" in r or any("cam" in x for x in rows):
            row["cam"] = r.get("cam", "")
        row["error"] = r.get("error", "")
        out.append(row)
    return pd.DataFrame(out)


def _print(rows: list[dict], model: Path, top_k: int) -> None:
    """A table in a terminal (paths shortened from the left), plain tab-separated lines otherwise
    (rich would expand the tabs)."""
    if plain_output():
        for r in rows:
            if "error" in r:
                print(f"{r['image']}\terror: {r['error']}")
                continue
            others = ", ".join(f"{t['label']} {t['prob']:.2f}" for t in r["topk"])
            print(f"{r['image']}\t{r['label']}\t{r['prob']:.3f}\t{others}")
        return
    from rich.table import Table

    width = max(20, console.width // 3)
    table = Table(title=f"predictions ({shorten_left(str(model), console.width - 20)})")
    table.add_column("image", no_wrap=True, max_width=width)
    table.add_column("prediction")
    table.add_column("prob", justify="right")
    table.add_column(f"top {top_k}")
    for r in rows:
        image = shorten_left(r["image"], width)
        if "error" in r:
            table.add_row(image, "[red]error[/red]", "", r["error"])
            continue
        others = ", ".join(f"{t['label']} {t['prob']:.2f}" for t in r["topk"])
        table.add_row(image, r["label"], f"{r['prob']:.3f}", others)
    console.print(table)


def _write(path: Path, rows: list[dict], top_k: int) -> Path:
    """--out as CSV (one row per image) or JSON (the list of result dicts)."""
    if path.suffix.lower() == ".json":
        return write_json(path, rows)
    if path.suffix.lower() != ".csv":
        raise TwincarError(f"--out {path}: give a .csv or .json file name")
    return write_csv(path, results_table(rows, top_k))


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_images(args: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from files, folders (recursive, image extensions) and glob patterns, in order;
    each path as given (a folder's images joined to it); one-line errors for what matches none."""
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise TwincarError(f"{p}: no image files in this folder (or below it)")
        elif not p.exists() and _has_glob(str(arg)):
            found = sorted(
                Path(f) for f in glob.glob(str(arg), recursive=True) if Path(f).is_file()
            )
            if not found:
                raise TwincarError(f"{arg}: no file matches this pattern")
        elif p.is_file():
            found = [p]
        else:
            raise TwincarError(f"image not found: {p} (check the path)")
        paths += found
    return list(dict.fromkeys(paths))  # a file named twice is predicted once


def _batches(predictor, good: list[Path], wanted: list, top_k: int, tta: bool) -> list[dict]:
    """Predictions batch by batch, with a progress bar on a terminal's stderr for many images."""
    from rich.console import Console
    from rich.progress import track

    n, bs = len(good), predictor.batch_size
    batches = predictor.predict_batches(good, top_k=top_k, boxes=wanted, tta=tta)
    if n > bs and sys.stderr.isatty():
        total = -(-n // bs)
        batches = track(
            batches, "predicting", total=total, console=Console(stderr=True), transient=True
        )
    return [row for rows in batches for row in rows]


def _predict_rows(
    predictor, paths: list[Path], problems: dict, known: dict, top_k: int, tta: bool = False
) -> list[dict]:
    """Result rows in the order of `paths`: predictions of the readable ones, errors of the rest."""
    good = [p for p in paths if problems[str(p)] is None]
    wanted = [known.get(str(p)) for p in good]
    no_box = sum(b is None for b in wanted)
    if predictor.preprocess.bbox_crop and no_box:
        print(f"warning: {box_warning(no_box, len(good))}", file=sys.stderr)  # stdout: the data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said above, once
        results = iter(_batches(predictor, good, wanted, top_k, tta))
    return [
        {"image": str(p), **next(results)}
        if problems[str(p)] is None
        else {"image": str(p), "error": problems[str(p)]}
        for p in paths
    ]


def predict_files(
    model: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    top_k: int = 5,
    boxes: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    tta: bool = False,
    cam: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str | None = None,
    backend: str = "torch",
) -> list[dict]:
    """Classify image files with an exported model, print them, optionally write `out`.

    Args:
        model: learner.pkl, model.safetensors or a models/<run> folder.
        images: image files, folders (searched recursively) and glob patterns.
        top_k: classes listed per image.
        boxes: a CSV of car boxes (image, x1, y1, x2, y2).
        data: a prepared data set whose annotations.csv holds boxes for the images it lists.
        out: a .csv or .json file for the results.
        trust_pickle: allow loading a learner.pkl (a pickle can run any code).
        tta: average each image's probabilities with its horizontal flip's.
        cam: a folder for a Grad-CAM++ overlay of the top class per image (torch backend).
        batch_size: images per forward pass.
        device: where the torch backend runs (default: CUDA, then MPS, then the CPU).
        backend: "torch", "onnx" (the folder's model.onnx, onnxruntime on the CPU) or
            "onnx-int8" (its model.int8.onnx).
    """
    _check_args(top_k, out, cam, batch_size, backend)
    paths, problems, found = _inputs(images, boxes, data)  # before the model: a typo costs no load
    predictor = Predictor.from_path(
        model, device=device, trust_pickle=trust_pickle, backend=backend
    )
    predictor.batch_size = batch_size
    rows = _predict_rows(predictor, paths, problems, found.boxes, top_k, tta)
    _report(rows, predictor, Path(model), top_k, out, cam)
    return rows


def _inputs(
    images: Sequence[str | os.PathLike], boxes, data
) -> tuple[list[Path], dict, ImageBoxes]:
    """The image files, each one's problem (None: fine) and the boxes found for them; a one-line
    error when no image can be predicted."""
    paths = collect_images(images)
    problems = {str(p): image_problem(p) for p in paths}
    readable = [str(p) for p in paths if problems[str(p)] is None]
    found = image_boxes(paths, boxes, data, readable)
    if found.warning(boxes):
        print(f"warning: {found.warning(boxes)}", file=sys.stderr)
    problems.update({p: problems[p] or why for p, why in found.problems.items()})
    if paths and all(problems.values()):
        first = str(paths[0])
        raise TwincarError(f"{first}: {problems[first]}; nothing to predict")
    return paths, problems, found


def _report(rows: list[dict], predictor, model: Path, top_k: int, out, cam) -> None:
    """Write the Grad-CAM++ overlays into `cam`, print the results, write `out` (.csv/.json)
    and say how many images failed."""
    if cam is not None:
        from twincar_fast.ship.cam import write_cams

        write_cams(predictor, rows, cam)
    top_k = min(top_k, len(predictor.classes))
    _print(rows, model, top_k)
    if out is not None:
        print(f"predictions → {_write(Path(out), rows, top_k)}", file=sys.stderr)
    failed = sum("error" in r for r in rows)
    if failed:
        print(
            f"{failed} of {len(rows)} image(s) could not be read or have a bad box (listed above)",
            file=sys.stderr,
        )


def _check_args(top_k: int, out, cam, batch_size: int, backend: str) -> None:
    """One-line errors for option values, before any file is read."""
    if top_k < 1:
        raise TwincarError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise TwincarError(f"--batch-size must be at least 1, got {batch_size}")
    if out is not None and Path(out).suffix.lower() not in (".csv", ".json"):
        raise TwincarError(f"--out {out}: give a .csv or .json file name")
    if backend not in BACKENDS:
        raise TwincarError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if cam is not None and backend != "torch":
        raise TwincarError("--cam needs --backend torch (Grad-CAM++ needs PyTorch's gradients)")
