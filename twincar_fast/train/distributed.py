"""Several processes on one experiment: fastai's `DistributedTrainer` over Hugging Face Accelerate.

Started by `accelerate launch -m twincar_fast.run`, `torchrun -m twincar_fast.run` or
`twincar train --processes N` (Accelerate's launcher). Each process trains one shard of every
batch of `data.batch_size` images (the batch size is per process); NCCL and one GPU per process on
GPUs, gloo on CPUs. Rank 0 claims the run folder and is the only one to write; validation
predictions are gathered from every rank (fastai's `DistributedDL` drops the padding), so the
metrics — and every early-stopping, plateau and checkpoint decision taken from them — are the same
on all ranks and equal a single-process evaluation. After the fit the other ranks end and rank 0
exports, evaluates and reports as a single process.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import Learner
from fastai.torch_core import num_distrib, rank_distrib
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from twincar_fast.config import ExperimentConfig
from twincar_fast.console import console
from twincar_fast.errors import ConfigError, TwincarError

__all__ = [
    "CpuSafeDistributedDL",
    "Distributed",
    "batchnorm_kinds",
    "broadcast_object",
    "check_distributed",
    "distributed",
    "distributed_fit",
    "init_distributed",
    "is_main",
    "launch",
    "rank_tag",
    "rank_streams",
    "leave_group",
    "revert_sync_bn",
    "scaled_lr",
    "sum_across",
    "unwrapped",
]

_EXTRA = 'pip install -e ".[distributed]"'


def distributed() -> bool:
    """Whether a launcher started this process (WORLD_SIZE set), even as its only one: DDP runs
    then too, as in fastai's `distrib_ctx` (so `torchrun --nproc_per_node 1` checks NCCL)."""
    return num_distrib() >= 1


def is_main() -> bool:
    """Whether this process writes: rank 0, or the only process."""
    return rank_distrib() == 0


def rank_tag() -> str:
    """' (rank r of n)' for lines every process prints; '' when single-process."""
    return f" (rank {rank_distrib()} of {num_distrib()})" if distributed() else ""


def _ready() -> bool:
    """Whether collectives can run now (several processes, the process group up)."""
    return distributed() and torch.distributed.is_initialized()


def init_distributed() -> None:
    """Join the launcher's process group through Accelerate (NCCL on GPUs, gloo on CPUs).

    Raises:
        TwincarError: Accelerate is missing, or more processes than GPUs were started.
    """
    if not distributed() or torch.distributed.is_initialized():
        return
    try:
        from accelerate import PartialState
    except ModuleNotFoundError:
        raise TwincarError(f"several processes need Hugging Face Accelerate: {_EXTRA}") from None
    gpus = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", rank_distrib()))
    if gpus and local >= gpus:
        raise TwincarError(
            f"{num_distrib()} processes on a machine with {gpus} GPU(s): start at most {gpus}"
        )
    PartialState(cpu=not gpus)  # sets this process's GPU (LOCAL_RANK) and the backend
    if not is_main():
        console.quiet = True  # one console: rank 0's


def _collective_device() -> torch.device:
    """Where tensors must be for the backend's collectives: this GPU for NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (itself when single-process)."""
    if not _ready():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def sum_across(values: Sequence[float | torch.Tensor]) -> list[float]:
    """Each value summed over all ranks, in one collective (the values themselves when alone)."""
    t = torch.stack([torch.as_tensor(v).detach().cpu().double() for v in values])  # MPS: no f64
    if _ready():
        t = t.to(_collective_device())
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def leave_group() -> None:
    """End this process's part in the group after the fit; rank 0 goes on as a single process.

    fastai decides whether to gather predictions from WORLD_SIZE alone, so rank 0's later
    `get_preds` (export, test evaluation, report) would wait for ranks that have ended.
    """
    if not _ready():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os.environ.pop("WORLD_SIZE")


def scaled_lr(cfg: ExperimentConfig, lr):
    """`lr` under `train.lr_scale`: `linear` multiplies it by the number of processes."""
    if cfg.train.lr_scale == "linear" and distributed():
        return lr * num_distrib()
    return lr


class CpuSafeDistributedDL(DistributedDL):
    """fastai's `DistributedDL`, broadcasting rank 0's order on the backend's device.

    fastai's `_broadcast` moves the indices to `.cuda()` (NCCL's need), which fails under gloo on
    a machine without GPUs, and its padding divides by the split's size, which fails on an empty
    split; everything else is fastai's (sharding, padding, gathering, unpadding).
    """

    def _broadcast(self, t, rank):
        t = torch.tensor(t, dtype=torch.long, device=_collective_device())
        torch.distributed.broadcast(t, rank)
        return t.cpu().tolist()

    def get_idxs(self):
        if self.dl.n == 0:  # an empty split (data.valid_pct 0): fastai's padding divides by it
            self.n = self.n_padded = 0
            return []
        return super().get_idxs()


def batchnorm_kinds(model: nn.Module) -> dict[str, type]:
    """Each BatchNorm layer's class by name (what `revert_sync_bn` restores)."""
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def revert_sync_bn(model: nn.Module, kinds: dict[str, type]) -> nn.Module:
    """`model` with every `SyncBatchNorm` back to its class in `kinds` (weights and statistics
    kept): the inverse of torch's `convert_sync_batchnorm`, which keeps no record of it."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.SyncBatchNorm):
            continue
        bn = kinds[name](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        state = m.state_dict()
        bn.load_state_dict(state)
        bn.train(m.training)
        parent, _, attr = name.rpartition(".")
        model.get_submodule(parent).add_module(attr, bn.to(next(iter(state.values())).device))
    return model


def unwrapped(dl):
    """The loader itself, also inside fastai's `DistributedDL`."""
    return getattr(dl, "dl", dl)


def rank_streams(learn: Learner) -> None:
    """On rank r > 0: random streams of its own (augmentation draws, dropout), derived from the
    state every rank shares (one seed, or the resumed checkpoint's), so that the ranks' shards are
    not augmented with the same draws in the same order. Rank 0 keeps its stream."""
    r = rank_distrib()
    if not r:
        return
    s = random.getrandbits(62) + r  # the same base on every rank, a different stream on each
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    for i, dl in enumerate(learn.dls.loaders):
        unwrapped(dl).rng.seed(s + 1_000 * (i + 1))


class Distributed(DistributedTrainer):
    """fastai's `DistributedTrainer` (DDP through Accelerate) with CPU-safe loaders, and the
    model handed back with plain BatchNorm after a `sync_bn` fit (for export and one process)."""

    def __init__(self, sync_bn: bool = False):
        super().__init__(sync_bn=sync_bn, cpu=not torch.cuda.is_available())

    def _wrap_dl(self, dl):
        if isinstance(dl, DistributedDL):
            return dl
        return CpuSafeDistributedDL(dl, device=self.learn.model.device)

    def before_fit(self):
        self.kinds = batchnorm_kinds(self.learn.model)
        rank_streams(self.learn)
        super().before_fit()

    def after_fit(self):
        super().after_fit()
        if self.sync_bn:
            self.learn.model = revert_sync_bn(self.learn.model, self.kinds)


@contextmanager
def distributed_fit(learn: Learner, cfg: ExperimentConfig) -> Iterator[None]:
    """fastai's `distrib_ctx` with `Distributed`: DDP for the fits in the block when launched
    with several processes, the progress bar on rank 0 only."""
    if not distributed():
        yield
        return
    cb = Distributed(sync_bn=cfg.train.sync_bn)
    learn.add_cb(cb)
    bar = None
    if not is_main() and hasattr(learn, "progress"):
        bar = learn.progress
        learn.remove_cb(ProgressCallback)
    try:
        yield
    finally:
        learn.remove_cb(cb)
        if bar is not None:
            learn.add_cb(bar)


def check_distributed(cfg: ExperimentConfig) -> None:
    """ConfigError for what several processes can't do (yet), checked before any work."""
    if not distributed():
        return
    if cfg.train.sync_bn and not torch.cuda.is_available():
        raise ConfigError(
            "train.sync_bn: torch's SyncBatchNorm works only on GPUs; set train.sync_bn=false "
            "for processes on CPUs"
        )
    if cfg.data.img_size_schedule:
        raise ConfigError(
            "data.img_size_schedule rebuilds the loaders mid-fit, which the distributed loaders "
            "don't follow yet; train progressive resizing in one process"
        )


def launch(processes: int, argv: Sequence[str]) -> int:
    """Start `python -m twincar_fast.run ARGV` in `processes` processes with Accelerate's
    launcher (one GPU each; gloo on CPUs); the launcher's exit code."""
    gpus = torch.cuda.device_count()
    if gpus and processes > gpus:
        raise TwincarError(f"--processes {processes}: this machine has {gpus} GPU(s)")
    try:
        import accelerate  # noqa: F401 - only whether it is installed
    except ModuleNotFoundError:
        raise TwincarError(f"--processes needs Hugging Face Accelerate: {_EXTRA}") from None
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", str(processes), "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # ours: train.mixed_precision
    return subprocess.run([*cmd, "-m", "twincar_fast.run", *argv]).returncode
