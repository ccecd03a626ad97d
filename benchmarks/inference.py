"""Benchmark 3, prediction: single-image latency and batch throughput of our `Predictor` vs. the
reference snippet (TwinCar's README) and fastai's `learn.predict`, on the same exported weights.

The model's forward pass alone on one preprocessed image is timed too: no single-image predictor
of the same fp32 model can be faster, so `learn.predict / forward` is the ceiling of the
vs-learn.predict ratio on the machine (`ratio_vs_fastai_ceiling`). Single images are timed with
the four sides taking turns on each image.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import reference
from benchmarks.measure import Timer, compare
from benchmarks.pipeline import race
from benchmarks.settings import Settings, ours_config
from twincar_fast.data import build_dls, read_annotations
from twincar_fast.model.learner import create_learner, create_model
from twincar_fast.ship.export import export_model
from twincar_fast.ship.predict import Predictor


def interleaved_median_ms(
    sides: dict[str, Callable[[str], object]], paths: Sequence[str], counts: dict[str, int]
) -> dict[str, float]:
    """Median milliseconds of each side's `fn(path)`, the sides taking turns on every image.

    Each side gets one warm-up call, then times its first `counts[side]` paths; turns make a
    change of load on the machine hit every side alike.
    """
    for fn in sides.values():
        fn(paths[0])
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i, p in enumerate(paths):
        for name, fn in sides.items():
            if i < counts[name]:
                with Timer() as t:
                    fn(p)
                times[name].append(t.seconds * 1000)
    return {name: round(statistics.median(v), 2) for name, v in times.items()}


def forward_only(predictor: Predictor, paths: Sequence[str]) -> Callable[[str], None]:
    """A function running the predictor's model alone on each of `paths`, preprocessed beforehand."""
    import torch

    pre, dev = predictor.preprocess, predictor.device
    inputs = {
        p: pre.batch([pre.item(p)], dev).contiguous(memory_format=torch.channels_last)
        for p in paths
    }

    def forward(p: str) -> None:
        with torch.inference_mode():
            predictor.model(inputs[p])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return forward


def _test_images(data_dir: os.PathLike, n: int) -> list[str]:
    """`n` test-split image paths (repeating the split if it is smaller)."""
    paths = read_annotations(data_dir).query("split == 'test'")["path"].tolist()
    return [paths[i % len(paths)] for i in range(n)]


def bench_predict(s: Settings, data_dir: os.PathLike) -> tuple[dict, dict]:
    """Benchmark 3: (predict_single, predict_batch) entries, same weights on every side."""
    cfg = ours_config(s, data_dir, s.predict_arch, s.predict_img, s.predict_item)
    cfg.train.mixed_precision = "none"  # learn.predict in fp32, as the Predictor and reference
    learn = create_learner(cfg, build_dls(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        export_model(learn, Path(tmp) / "model", cfg)
        predictor = Predictor.from_path(Path(tmp) / "model")
    predictor.batch_size = s.batch_size
    ref_model = create_model(cfg.model, len(predictor.classes), pretrained=False)
    ref_model.load_state_dict(predictor.model.state_dict())
    ref_model.eval().to(predictor.device)
    size, dev = s.predict_img, predictor.device

    singles = _test_images(data_dir, s.single_n)
    sides = {
        "ours": lambda p: predictor.predict([p]),
        "reference": lambda p: reference.predict_one(ref_model, p, size, dev),
        "fastai": learn.predict,
        "forward": forward_only(predictor, singles),
    }
    counts = {name: len(singles) for name in sides} | {"fastai": s.fastai_n}
    with learn.no_bar():
        ms = interleaved_median_ms(sides, singles, counts)
    ours_ms, ref_ms, fastai_ms, forward_ms = (ms[k] for k in sides)
    single = compare(
        ours_ms,
        ref_ms,
        "ms",
        higher_is_better=False,
        fastai=fastai_ms,
        ratio_vs_fastai=round(fastai_ms / ours_ms, 3),
        forward_ms=forward_ms,
        ratio_vs_fastai_ceiling=round(fastai_ms / forward_ms, 3),
        n_images={"ours": len(singles), "reference": len(singles), "fastai": s.fastai_n},
    )

    batch = _test_images(data_dir, s.batch_n)

    def ours_batch() -> tuple[int, float]:
        with Timer() as t:
            n = len(predictor.predict_proba(batch))
        return n, t.seconds

    def ref_batch() -> tuple[int, float]:
        with Timer() as t:
            n = len(reference.predict_batch(ref_model, batch, size, s.batch_size, dev))
        return n, t.seconds

    best = race({"ours": ours_batch, "reference": ref_batch}, s.repeats)
    (n_o, s_o), (n_r, s_r) = best["ours"], best["reference"]
    throughput = compare(
        round(n_o / s_o, 1),
        round(n_r / s_r, 1),
        "img/s",
        higher_is_better=True,
        n_images={"ours": n_o, "reference": n_r},
        batch_size=s.batch_size,
    )
    return single, throughput
