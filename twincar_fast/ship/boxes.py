"""`twincar predict --boxes/--data`: car boxes for the images given, each row checked.

A boxes CSV (`image, x1, y1, x2, y2`) names an image by its path (as given on the command line,
relative to the CSV's folder or to the working folder) or by its bare file name when exactly one
image given has that name. A bad row (a coordinate that is empty, not a number or not finite; an
inverted or empty box; a box outside its image) is an error of that image, listed with the
others' predictions; two rows for one image, or a name shared by two images, end in a one-line
error; rows that match no image are named in one warning line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from twincar_fast.data.dataset import BBOX_COLUMNS, read_annotations
from twincar_fast.data.images import image_size
from twincar_fast.errors import TwincarError
from twincar_fast.ship.inputs import box_problem, box_shape_problem

__all__ = ["BOX_CSV", "ImageBoxes", "image_boxes", "read_box_csv"]

BOX_CSV = ["image", "x1", "y1", "x2", "y2"]
_SHOWN = 5  # unmatched rows named in the warning


@dataclass
class ImageBoxes:
    """Per image given (its path as given): the box, or why its row is unusable."""

    boxes: dict[str, tuple] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # "row N (image)" of rows matching nothing

    def warning(self, csv: str | os.PathLike) -> str | None:
        """The one warning line for rows that match no image, or None."""
        if not self.unmatched:
            return None
        more = len(self.unmatched) - _SHOWN
        shown = ", ".join(self.unmatched[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
        return (
            f"--boxes {csv}: {len(self.unmatched)} row(s) match no image given, ignored: {shown} "
            "(name each image by its path as given, or by its file name)"
        )


def _key(path: str | os.PathLike) -> str:
    """An image's match key: its resolved absolute path."""
    return str(Path(path).expanduser().resolve())


def read_box_csv(csv: str | os.PathLike) -> pd.DataFrame:
    """The rows of a boxes CSV as text (each coordinate parsed per row later); one-line errors."""
    csv = Path(csv)
    if not csv.is_file():
        raise TwincarError(f"--boxes {csv}: file not found")
    how = "give a CSV with the header image,x1,y1,x2,y2 and one row per image"
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise TwincarError(f"--boxes {csv}: the file is empty; {how}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())[:160]
        raise TwincarError(f"--boxes {csv}: not a readable CSV ({reason}); {how}") from None
    missing = [c for c in BOX_CSV if c not in df.columns]
    if missing:
        raise TwincarError(
            f"--boxes {csv}: missing column(s) {', '.join(missing)}; "
            "columns must be image,x1,y1,x2,y2 (1-based inclusive pixels)"
        )
    if df.empty:
        raise TwincarError(f"--boxes {csv}: no rows under the header; {how}")
    return df[BOX_CSV]


def _parse(raw: Sequence[str]) -> tuple[tuple | None, str | None]:
    """(box, None) of a row's 4 coordinates as text, or (None, why they are no box)."""
    values = []
    for name, text in zip(BOX_CSV[1:], raw, strict=True):
        text = str(text).strip()
        try:
            v = float(text)
        except ValueError:
            what = "is empty" if not text else f"{text!r} is not a number"
            return None, f"box coordinate {name} {what}"
        if not math.isfinite(v):
            return None, f"box coordinate {name} {text!r} is not a finite number"
        values.append(v)
    box = tuple(values)
    problem = box_shape_problem(box)
    return (None, problem) if problem else (box, None)


def _match(image: str, csv: Path, by_key: dict, by_name: dict, where: str) -> str | None:
    """The image given (as given) that a row names: by path, then by a unique file name."""
    p = Path(image)
    for key in (_key(p if p.is_absolute() else csv.parent / p), _key(p)):
        if key in by_key:
            return by_key[key]
    if image != p.name:  # a path that matches nothing is not taken for its file name
        return None
    named = by_name.get(image, [])
    if len(named) > 1:
        raise TwincarError(
            f"--boxes {csv}: {where} names '{image}', the file name of {len(named)} images "
            f"given ({', '.join(named[:3])}); write the image's path as given instead"
        )
    return named[0] if named else None


def _csv_boxes(csv: Path, given: list[str], out: ImageBoxes) -> None:
    """Fill `out` from a boxes CSV: each row matched to an image given and checked."""
    by_key = {_key(g): g for g in given}
    by_name: dict[str, list[str]] = {}
    for g in given:
        by_name.setdefault(Path(g).name, []).append(g)
    seen: dict[str, int] = {}
    for i, (image, *raw) in enumerate(read_box_csv(csv).itertuples(index=False)):
        line = i + 2  # the header is line 1
        target = _match(str(image), csv, by_key, by_name, f"row {line}")
        if target is None:
            out.unmatched.append(f"row {line} ({image})")
            continue
        if target in seen:
            raise TwincarError(
                f"--boxes {csv}: rows {seen[target]} and {line} both give a box for {target}; "
                "keep one row per image"
            )
        seen[target] = line
        box, problem = _parse(raw)
        out.boxes.pop(target, None)  # the CSV's row replaces the data set's box
        out.problems.pop(target, None)
        if problem is not None:
            out.problems[target] = f"{problem} (--boxes {csv.name} row {line})"
        else:
            out.boxes[target] = box


def _data_boxes(data: str | os.PathLike, given: list[str], out: ImageBoxes) -> None:
    """Boxes from a prepared set's annotations.csv for the images given that it lists."""
    by_key = {_key(g): g for g in given}
    df = read_annotations(data)
    for path, *raw in df[["path", *BBOX_COLUMNS]].itertuples(index=False):
        target = by_key.get(_key(path))
        if target is None:
            continue
        if all(pd.isna(v) for v in raw):
            continue  # listed without a box
        box, problem = _parse([str(v) for v in raw])
        if problem is not None:
            out.problems[target] = f"{problem} (annotations.csv of {data})"
        else:
            out.boxes[target] = box


def image_boxes(
    images: Sequence[str | os.PathLike],
    csv: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    readable: Sequence[str] | None = None,
) -> ImageBoxes:
    """The box (or its problem) of each image given, from `data`'s annotations then `csv`; a box
    outside its image is a problem of that image (checked for the `readable` images)."""
    given = [str(p) for p in images]
    out = ImageBoxes()
    if data is not None:
        _data_boxes(data, given, out)
    if csv is not None:
        _csv_boxes(Path(csv), given, out)
    for image in readable if readable is not None else given:
        box = out.boxes.get(image)
        problem = box_problem(box, image_size(image)) if box is not None else None
        if problem is not None:
            del out.boxes[image]
            out.problems[image] = problem
    return out
