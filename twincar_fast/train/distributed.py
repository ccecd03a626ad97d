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

import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
from twincar_fast.run_folder import CONFIG_YAML, RUN_NOTE_ENV

__all__ = [
    "CpuSafeDistributedDL",
    "Distributed",
    "batchnorm_kinds",
    "broadcast_object",
    "check_distributed",
    "distributed",
    "distributed_fit",
    "gather_objects",
    "init_distributed",
    "is_main",
    "launch",
    "rank_tag",
    "rank_streams",
    "leave_group",
    "own_rng",
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


def gather_objects(obj) -> list | None:
    """Every rank's `obj` in rank order, on every rank; None when single-process."""
    if not _ready():
        return None
    out = [None] * num_distrib()
    torch.distributed.all_gather_object(out, obj)
    return out


def own_rng(learn: Learner, state: dict) -> dict:
    """This rank's random states from a checkpoint's `rng_state`: its own when as many processes
    saved it (noted on `learn`, so `rank_streams` keeps them), else rank 0's."""
    ranks = state.get("ranks")
    if distributed() and ranks and len(ranks) == num_distrib():
        learn.own_rng_restored = True
        return ranks[rank_distrib()]
    return state


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
        skip = getattr(getattr(self.learn, "skip_to_epoch", None), "_skip_to", 0)
        if not (skip and getattr(self.learn, "own_rng_restored", False)):
            rank_streams(self.learn)  # (a fit resumed mid-way goes on with each rank's own)
        self.learn.own_rng_restored = False
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


def check_distributed(cfg: ExperimentConfig, processes: int | None = None) -> None:
    """ConfigError for what several processes can't do (yet), checked before any work: in each
    launched process, and by `launch` for the `processes` it is about to start."""
    if not distributed() and (processes or 1) < 2:
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


@contextmanager
def _quiet_launcher() -> Iterator[None]:
    """torch elastic's own log lines (which process failed, SIGTERM sent) off while it runs: the
    processes print their own one-line errors, and `launch` says the rest in one line."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("torch.distributed", "accelerate"))
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _failure(error, run_dir: str | None, processes: int) -> int:
    """The exit code of a failed launch; a one-line TwincarError unless the processes have said
    it themselves (exit code 2: each printed its one-line error)."""
    rank, first = error.get_first_failure()
    if first.exitcode == 2:
        return 2
    how = (
        f"was killed ({first.signal_name()})"
        if first.exitcode < 0
        else f"ended with exit code {first.exitcode} (see its output above)"
    )
    config = Path(run_dir) / CONFIG_YAML if run_dir else None
    if config is None or not config.is_file():
        raise TwincarError(
            f"process rank {rank} of {processes} {how} before the run had started; "
            "run the same command again"
        )
    raise TwincarError(
        f"process rank {rank} of {processes} {how}; {run_dir} keeps its finished epochs: continue "
        f"with `twincar train {config} --resume {run_dir} --processes {processes}`"
    )


def launch(
    processes: int,
    argv: Sequence[str],
    cfg: ExperimentConfig | None = None,
    resume: str | os.PathLike | None = None,
) -> int:
    """Run `python -m twincar_fast.run ARGV` in `processes` processes through Accelerate's
    launcher (one GPU each; gloo on CPUs), in this process; their exit code (0: all ended well).

    `cfg` (ARGV's config) is checked for what several processes refuse before any starts; a
    process that fails on its own prints its one line, one that is killed gets one line here,
    with the command that resumes the run (rank 0 notes its folder in RUN_NOTE_ENV's file).
    """
    gpus = torch.cuda.device_count()
    if gpus and processes > gpus:
        raise TwincarError(f"--processes {processes}: this machine has {gpus} GPU(s)")
    try:
        from accelerate.commands.launch import launch_command, launch_command_parser
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ModuleNotFoundError:
        raise TwincarError(f"--processes needs Hugging Face Accelerate: {_EXTRA}") from None
    if cfg is not None:
        check_distributed(cfg, processes)
    cmd = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # ours: train.mixed_precision
    args = launch_command_parser().parse_args([*cmd, "-m", "twincar_fast.run", *argv])
    with tempfile.TemporaryDirectory() as tmp, _quiet_launcher():
        note = Path(tmp) / "run"
        os.environ[RUN_NOTE_ENV] = str(note)  # the processes inherit it
        try:
            launch_command(args)
        except ChildFailedError as e:
            run_dir = str(resume) if resume else (note.read_text() if note.is_file() else None)
            return _failure(e, run_dir, processes)
        finally:
            os.environ.pop(RUN_NOTE_ENV, None)
    return 0
