"""Numerics of a learner on its device: bf16/fp16 autocast, channels-last and torch.compile.

fastai's `MixedPrecision` is CUDA-only; on CPUs that compute bf16 natively `CpuAutocast` gives the
same autocast there. `apply_speedups` picks what `train.mixed_precision` etc. mean on a device.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner

from twincar_fast.config import TrainConfig

__all__ = ["CpuAutocast", "apply_speedups", "cpu_has_bf16", "device_info", "precision_for"]

log = logging.getLogger(__name__)


class CpuAutocast(Callback):
    """bf16 autocast of the forward pass and loss on the CPU (fastai's MixedPrecision is CUDA-only).

    bf16 needs no loss scaling; predictions go back to fp32 for the loss and the metrics.
    """

    order = 10  # where fastai's MixedPrecision sits

    def before_batch(self) -> None:
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self.autocast.__enter__()

    def after_pred(self) -> None:
        self.learn.pred = self.pred.float()

    def after_loss(self) -> None:
        self._leave()

    def after_cancel_batch(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if getattr(self, "autocast", None) is not None:
            self.autocast.__exit__(None, None, None)
            self.autocast = None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast pays off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def precision_for(train_cfg: TrainConfig, device: torch.device) -> str:
    """`train.mixed_precision` resolved for `device`: bf16, fp16 or none."""
    mode = train_cfg.mixed_precision
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if mode == "auto" else mode
    if device.type == "cpu":
        if mode == "auto":
            return "bf16" if cpu_has_bf16() else "none"
        if mode == "fp16":
            log.info("fp16 autocast is CUDA-only; training in fp32 on the CPU (bf16 works there)")
            return "none"
        return mode
    if mode in ("bf16", "fp16"):
        log.info("mixed precision runs on CUDA and CPU; training in fp32 on %s", device)
    return "none"


def apply_speedups(learn: Learner, train_cfg: TrainConfig, device: torch.device) -> None:
    """Mixed precision and channels-last on CUDA and CPU (bf16 there), torch.compile on CUDA."""
    import fastai.callback.channelslast  # noqa: F401 - patches Learner.to_channelslast
    import fastai.callback.fp16  # noqa: F401 - patches Learner.to_fp16/to_bf16

    mode = precision_for(train_cfg, device)
    if mode == "bf16" and device.type == "cpu":
        learn.add_cb(CpuAutocast())
    elif mode == "bf16":
        learn.to_bf16()
    elif mode == "fp16":
        learn.to_fp16()
    if train_cfg.channels_last and device.type in ("cuda", "cpu"):
        learn.to_channelslast(use_amp=False)
    if train_cfg.compile and device.type == "cuda":
        learn.model.compile()  # in place: model[0]/model[1] and state-dict keys stay as they are
    elif train_cfg.compile:
        log.info("torch.compile is used on CUDA only; running eagerly on %s", device)


def _processor(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(train_cfg: TrainConfig, device: torch.device) -> dict:
    """What a run computes on: device (`cuda:0`, `cpu`), precision, torch threads, processor.

    Results differ between machines mainly through these: bf16 autocast only runs on CPUs with
    native bf16, and the thread count changes the order of float sums.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mode = precision_for(train_cfg, device)
    return {
        "device": str(device),
        "precision": {
            "none": "fp32",
            "bf16": "bf16 autocast",
            "fp16": "fp16 autocast + GradScaler",
        }[mode],
        "torch_threads": torch.get_num_threads(),
        "processor": _processor(device),
    }
