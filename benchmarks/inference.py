"""Benchmark 3, prediction: single-image latency and batch throughput of our `Predictor` (torch
and ONNX backends) vs. the reference snippet (TwinCar's README) and fastai's `learn.predict`, on
the same exported weights.

The limit row (`limit_ms`) decodes one image (JPEG draft, as ours), resizes it straight to the
model's size and runs the bare model's forward on the same device: the most any single-image
predictor of this fp32 model can reach; `ratio_to_limit` = limit / ours (1: ours costs nothing
over it). The model's forward pass alone on a preprocessed image is timed too (`forward_ms`, the
ceiling of the vs-learn.predict ratio). Single images are timed with the sides taking turns on
each image. Batches: ours, the reference, ONNX fp32 and its int8 copy (`twincar export --int8`),
plus the bare forward of one batch in torch and in onnxruntime, in turns (`onnx_forward_ceiling`:
the most the fp32 ONNX backend can gain over ours, since both decode alike).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks import reference
from benchmarks.measure import Timer, compare
from benchmarks.pipeline import race
from benchmarks.settings import Settings, ours_config
from twincar_fast.data import build_dls, read_annotations
from twincar_fast.model.learner import create_learner, create_model
from twincar_fast.ship.export import export_model
from twincar_fast.ship.onnx import export_onnx
from twincar_fast.ship.onnx_predict import OnnxPredictor
from twincar_fast.ship.predict import Predictor
from twincar_fast.ship.quantize import quantize_onnx


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


def decode_and_forward(predictor: Predictor) -> Callable[[str], None]:
    """The limit of single-image prediction: decode (JPEG draft), one resize to the model's size,
    scale and normalize, the bare model's forward on the predictor's device."""
    import numpy as np
    import torch
    from PIL import Image

    pre, dev = predictor.preprocess, predictor.device
    size = pre.img_size
    mean = torch.tensor(pre.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=dev).view(1, 3, 1, 1)

    def limit(p: str) -> None:
        with Image.open(p) as im:
            im.draft("RGB", (size, size))
            arr = np.array(im.convert("RGB").resize((size, size), Image.BILINEAR))
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(dev).float().div_(255)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            predictor.model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return limit


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
        export_onnx(Path(tmp) / "model")  # checked against PyTorch on the data's test images
        # an untrained model's top-1 is near-ties: the check is recorded, not required here
        _, int8_check = quantize_onnx(Path(tmp) / "model", min_top1=0)
        predictor = Predictor.from_path(Path(tmp) / "model")
        onnx = Predictor.from_path(Path(tmp) / "model", backend="onnx")
        int8 = Predictor.from_path(Path(tmp) / "model", backend="onnx-int8")
    predictor.batch_size = onnx.batch_size = int8.batch_size = s.batch_size
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
        "limit": decode_and_forward(predictor),
        "onnx": lambda p: onnx.predict([p]),
    }
    counts = {name: len(singles) for name in sides} | {"fastai": s.fastai_n}
    with learn.no_bar():
        ms = interleaved_median_ms(sides, singles, counts)
    ours_ms, ref_ms, fastai_ms, forward_ms, limit_ms, onnx_ms = (ms[k] for k in sides)
    single = compare(
        ours_ms,
        ref_ms,
        "ms",
        higher_is_better=False,
        fastai=fastai_ms,
        ratio_vs_fastai=round(fastai_ms / ours_ms, 3),
        forward_ms=forward_ms,
        ratio_vs_fastai_ceiling=round(fastai_ms / forward_ms, 3),
        limit_ms=limit_ms,
        ratio_to_limit=round(limit_ms / ours_ms, 3),
        onnx=onnx_ms,
        onnx_vs_torch=round(ours_ms / onnx_ms, 3),
        n_images={"ours": len(singles), "reference": len(singles), "fastai": s.fastai_n},
    )

    return single, _bench_batch(s, data_dir, predictor, onnx, int8, int8_check, ref_model)


def forward_ceiling(
    predictor: Predictor, onnx: OnnxPredictor, paths: Sequence[str], turns: int
) -> dict:
    """The bare forward of one batch in torch and in onnxruntime (fp32), in turns: the most
    that the ONNX backend's batch throughput can gain over ours (decoding is the same for both)."""
    import torch

    x_onnx = np.ascontiguousarray(np.stack([onnx._item(p) for p in paths]).transpose(0, 3, 1, 2))
    x_torch = predictor.preprocess.batch([predictor._item(p) for p in paths], predictor.device)
    x_torch = x_torch.contiguous(memory_format=torch.channels_last)

    def torch_forward(_: str) -> None:
        with torch.inference_mode():
            predictor.model(x_torch)
        if x_torch.is_cuda:  # a GPU's work is timed to its end
            torch.cuda.synchronize(x_torch.device)

    ms = interleaved_median_ms(
        {"torch": torch_forward, "onnx": lambda _: onnx.logits(x_onnx)},
        ["batch"] * turns,
        {"torch": turns, "onnx": turns},
    )
    return {
        "torch_ms": ms["torch"],
        "onnx_ms": ms["onnx"],
        "ratio": round(ms["torch"] / ms["onnx"], 3),
        "images": len(paths),
        "what": "bare forward of one batch, torch vs onnxruntime fp32, in turns; medians",
    }


def _bench_batch(
    s: Settings, data_dir: os.PathLike, predictor, onnx, int8, int8_check: dict, ref_model
) -> dict:
    """The batch-throughput entry: ours (torch), the reference, ONNX fp32 and int8."""
    batch = _test_images(data_dir, s.batch_n)
    size, dev = s.predict_img, predictor.device

    def timed(fn: Callable[[], object]) -> Callable[[], tuple[int, float]]:
        def run() -> tuple[int, float]:
            with Timer() as t:
                n = len(fn())
            return n, t.seconds

        return run

    sides = {
        "ours": timed(lambda: predictor.predict_proba(batch)),
        "reference": timed(
            lambda: reference.predict_batch(ref_model, batch, size, s.batch_size, dev)
        ),
        "onnx": timed(lambda: onnx.predict_proba(batch)),
        "onnx_int8": timed(lambda: int8.predict_proba(batch)),
    }
    best = race(sides, s.repeats)
    rate = {k: round(n / secs, 1) for k, (n, secs) in best.items()}
    return compare(
        rate["ours"],
        rate["reference"],
        "img/s",
        higher_is_better=True,
        onnx=rate["onnx"],
        onnx_vs_torch=round(rate["onnx"] / rate["ours"], 3),  # from the rounded figures shown
        onnx_forward_ceiling=forward_ceiling(predictor, onnx, batch[: s.batch_size], s.single_n),
        onnx_int8=rate["onnx_int8"],
        onnx_int8_vs_torch=round(rate["onnx_int8"] / rate["ours"], 3),
        onnx_int8_check=int8_check,
        n_images={k: n for k, (n, _) in best.items()},
        batch_size=s.batch_size,
    )
