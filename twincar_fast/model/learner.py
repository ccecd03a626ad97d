"""A timm model by name inside a fastai Learner: head, parameter groups, freezing, LRs and loss.

The model keeps fastai's layout `nn.Sequential(body, head)`: `model[0]` is fastai's `TimmBody`
around a headless timm model (`num_classes=0`), `model[1]` the classifier head, so fastai's
`freeze_to`, `Interpretation` and `load_learner` work unchanged. Parameter groups follow the timm
model's stages (`feature_info`): ResNets give `stem, layer1, layer2, layer3, layer4, head`.
"""

from __future__ import annotations

import logging
from functools import partial

import fastai.callback.progress  # noqa: F401 - progress bars for notebooks and terminals
import fastai.callback.schedule  # noqa: F401 - adds Learner.lr_find, fit_one_cycle, fit_flat_cos
import numpy as np
import timm
import torch
from fastai.callback.training import BnFreeze
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam, Lamb, OptimWrapper, RMSProp, ranger
from fastai.vision.learner import TimmBody, add_head, create_head
from torch import nn

from twincar_fast.config import ExperimentConfig, ModelConfig, TrainConfig
from twincar_fast.data import resolve_device
from twincar_fast.data.model_input import check_arch
from twincar_fast.errors import ConfigError
from twincar_fast.model.hub import check_hub_reachable
from twincar_fast.model.precision import apply_speedups
from twincar_fast.model.weights import load_weights

__all__ = [
    "apply_freeze",
    "create_learner",
    "create_model",
    "freeze_all_but_head",
    "frozen_count",
    "group_lrs",
    "group_names",
    "lr_for",
    "param_groups",
    "splitter",
]

log = logging.getLogger(__name__)


def torch_sgd(params, lr=1e-3, mom: float = 0.9, nesterov: bool = False, wd: float = 0.0):
    """torch's SGD (L2 weight decay, Nesterov option) behind fastai's `OptimWrapper`.

    fastai's own SGD has no Nesterov momentum and decouples weight decay; the published ResNet
    recipes on Stanford Cars use torch's. `lr` may be one LR per group (fastai's slices).
    """
    opt = OptimWrapper(
        params, torch.optim.SGD, lr=1e-3, momentum=mom, nesterov=nesterov, weight_decay=wd
    )
    opt.set_hyper("lr", lr)
    return opt


# fastai optimizers, named as torch's: `adamw` decouples weight decay (torch.optim.AdamW), `adam`
# adds it to the gradient as L2 (torch.optim.Adam; resnet18 on the demo: 73% vs adamw's 82%).
# Norm and bias parameters get none (fastai's `wd_bn_bias=False`, as timm) with fastai's
# optimizers; torch's SGD decays every parameter, as torchvision's reference recipes do.
OPTIMIZERS = {
    "adamw": partial(Adam, decouple_wd=True),
    "adam": partial(Adam, decouple_wd=False),
    "sgd": torch_sgd,
    "rmsprop": RMSProp,
    "ranger": ranger,
    "lamb": Lamb,
}
_HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)
try:  # huggingface_hub talks through httpx, whose errors are not OSErrors
    import httpx

    _HUB_ERRORS += (httpx.HTTPError,)
except ImportError:  # pragma: no cover - httpx ships with huggingface_hub
    pass


# ---------------------------------------------------------------- model


def _timm_body(arch: str, pretrained: bool, num_classes: int = 0) -> TimmBody:
    """fastai's TimmBody around `arch` (headless by default), with hub weights when `pretrained`."""
    if pretrained:
        check_hub_reachable(arch)
    try:
        net = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except _HUB_ERRORS as e:
        reason = (str(e).split(". ")[0].splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(
            f"model.pretrained: can't download {arch} weights from the timm hub ({reason}); "
            "set model.weights to a local .safetensors/.pth file, or model.pretrained: false"
        ) from None
    body = TimmBody(net, pretrained=pretrained)
    # channels-last feature maps (swin & co.) can't go through a 2-d pool: use timm's own pooling
    body.needs_pool = body.needs_pool and getattr(net, "output_fmt", "NCHW") == "NCHW"
    return body


def _mlp_head(nf: int, n_classes: int, hidden: int, dropout: float, pool: bool) -> nn.Sequential:
    """TwinCar's head: [avg pool → flatten →] Linear → ReLU → Dropout → Linear."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pool else []
    layers += [nn.Linear(nf, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(hidden, n_classes))


def _timm_classifier_model(arch: str, n_classes: int, pretrained: bool) -> nn.Module:
    """`Sequential(TimmBody, classifier)` cut from `timm.create_model(arch, num_classes=n_classes)`:
    the body keeps timm's pooling and pre-logits, the head is timm's classifier (and its init)."""
    body = _timm_body(arch, pretrained, n_classes)
    head = body.model.get_classifier()
    body.model.reset_classifier(0)
    body.needs_pool = False  # the timm model pools itself
    return nn.Sequential(body, head)


def create_model(
    model_cfg: ModelConfig, n_classes: int, pretrained: bool | None = None
) -> nn.Module:
    """`nn.Sequential(timm body, head)` for `n_classes`, usable without fastai's Learner.

    Args:
        model_cfg: arch, head and where the weights come from.
        n_classes: outputs of the head.
        pretrained: None = as the config says (`model.weights` file if set, else hub weights when
            `model.pretrained`); False = random init (to load a saved model into); True = the
            config's weights file, else hub weights.
    """
    check_arch(model_cfg.arch)
    weights = model_cfg.weights if pretrained is not False else None
    hub = (model_cfg.pretrained if pretrained is None else pretrained) and not weights
    if model_cfg.head == "timm":
        model = _timm_classifier_model(model_cfg.arch, n_classes, bool(hub))
    else:
        model = _headed_model(model_cfg, n_classes, bool(hub))
    if weights:
        load_weights(model, weights, n_classes)
    return model


def _headed_model(model_cfg: ModelConfig, n_classes: int, hub: bool) -> nn.Module:
    """fastai's `Sequential(TimmBody, head)` with the fastai or TwinCar (mlp) head."""
    body = _timm_body(model_cfg.arch, pretrained=hub)
    nf = body.model.num_features
    if model_cfg.head == "fastai":
        head = create_head(
            nf, n_classes, [model_cfg.head_hidden], ps=model_cfg.head_dropout, pool=body.needs_pool
        )
        model = add_head(body, nf, n_classes, head=head)  # fastai's kaiming init of the head
    else:
        head = _mlp_head(
            nf, n_classes, model_cfg.head_hidden, model_cfg.head_dropout, body.needs_pool
        )
        model = add_head(body, nf, n_classes, head=head, init=None)  # torch's default init
    return model


# ---------------------------------------------------------------- parameter groups


def param_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(name, parameters) per group, in order: stem, the timm stages (`feature_info`), head."""
    net = model[0].model
    stages = [f["module"] for f in getattr(net, "feature_info", None) or []]
    groups: dict[str, list[nn.Parameter]] = {}
    current = "stem" if stages else "body"
    for name, p in net.named_parameters():
        # a parameter belongs to the stage holding it; stage-less layers join the stage before them
        current = next((s for s in stages if name == s or name.startswith(f"{s}.")), current)
        groups.setdefault(current, []).append(p)
    groups["head"] = list(model[1].parameters())
    return [(n, ps) for n, ps in groups.items() if ps]


def group_names(model: nn.Module) -> list[str]:
    """Names of the parameter groups, in optimizer order (ResNet: stem, layer1..layer4, head)."""
    return [name for name, _ in param_groups(model)]


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """fastai splitter: the parameter lists of `param_groups`, in order."""
    return [ps for _, ps in param_groups(model)]


def frozen_count(train_cfg: TrainConfig, names: list[str]) -> int:
    """How many leading groups `train.freeze` freezes; ConfigError unless it names a prefix of `names`."""
    freeze = list(dict.fromkeys(train_cfg.freeze))
    unknown = [g for g in freeze if g not in names]
    if unknown:
        raise ConfigError(
            f"train.freeze: no parameter group {unknown[0]!r} in this model; "
            f"valid groups, in order: {', '.join(names[:-1])}"
        )
    if "head" in freeze:
        raise ConfigError("train.freeze: the head can't be frozen; list body groups only")
    if set(freeze) != set(names[: len(freeze)]):
        raise ConfigError(
            f"train.freeze: frozen groups must be the first ones in order ({', '.join(names[:-1])}); "
            f"e.g. {names[: len(freeze)]} instead of {freeze}"
        )
    return len(freeze)


def apply_freeze(learn: Learner, cfg: ExperimentConfig) -> None:
    """Freeze the groups listed in `train.freeze`, train the rest (clears the optimizer state)."""
    learn.freeze_to(frozen_count(cfg.train, group_names(learn.model)))


def freeze_all_but_head(learn: Learner) -> None:
    """Freeze every group but the head, for a head-only warm-up stage."""
    learn.freeze()


# ---------------------------------------------------------------- learning rates


def group_lrs(lr: float | list[float], names: list[str], n_frozen: int) -> list[float]:
    """One LR per group from `train.lr`; frozen groups (only their norm layers may train) get the first.

    Args:
        lr: one value for every group; `[low, high]`, spread geometrically over the trainable
            groups so the first trainable group gets `low` and the head `high`; a value per group
            (as many as groups); or a value per trainable group (as many as trainable groups).
        names: the group names, in order.
        n_frozen: how many leading groups are frozen.
    """
    n, n_train = len(names), len(names) - n_frozen
    if not isinstance(lr, list):
        return [float(lr)] * n
    if len(lr) == 2:
        low, high = lr
        spread = [high] if n_train == 1 else list(np.geomspace(low, high, n_train))
        return [float(v) for v in [low] * n_frozen + spread]
    if len(lr) == n:
        return [float(v) for v in lr]
    if len(lr) == n_train:
        return [float(v) for v in [lr[0]] * n_frozen + lr]
    raise ConfigError(
        f"train.lr: {len(lr)} values don't fit; give one LR, [low, high], or one per group "
        f"({n}: {', '.join(names)}) or per trainable group ({n_train})"
    )


def lr_for(cfg: ExperimentConfig, learn: Learner) -> float | np.ndarray:
    """The `lr`/`lr_max` to give `learn.fit*`: a float, or one LR per group (for the config's freeze)."""
    if not isinstance(cfg.train.lr, list):
        return float(cfg.train.lr)
    names = group_names(learn.model)
    return np.array(group_lrs(cfg.train.lr, names, frozen_count(cfg.train, names)))


# ---------------------------------------------------------------- learner


def make_loss(train_cfg: TrainConfig) -> nn.Module:
    """Label-smoothing cross entropy with ε = `train.label_smoothing`, plain CE when it is 0."""
    if train_cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropyFlat(eps=train_cfg.label_smoothing)
    return CrossEntropyLossFlat()


def make_opt_func(train_cfg: TrainConfig) -> partial:
    """The fastai optimizer named by `train.optimizer`, with `train.weight_decay` (and momentum)."""
    if train_cfg.optimizer == "sgd":
        t = train_cfg
        return partial(torch_sgd, mom=t.momentum, nesterov=t.nesterov, wd=t.weight_decay)
    return partial(OPTIMIZERS[train_cfg.optimizer], wd=train_cfg.weight_decay)


def create_learner(cfg: ExperimentConfig, dls: DataLoaders) -> Learner:
    """A fastai Learner: timm model + head, loss, optimizer, groups, `train.freeze` applied, LRs set."""
    device = resolve_device(cfg.train.device)
    model = create_model(cfg.model, len(dls.vocab))
    frozen_count(cfg.train, group_names(model))  # a bad freeze list fails before anything else
    dls.to(device)
    learn = Learner(
        dls,
        model,
        loss_func=make_loss(cfg.train),
        opt_func=make_opt_func(cfg.train),
        splitter=splitter,
        wd=cfg.train.weight_decay,
        train_bn=cfg.train.train_bn,
        metrics=accuracy,
        cbs=None if cfg.train.train_bn else BnFreeze(),  # frozen BN keeps its running stats too
    )
    learn.lr = lr_for(cfg, learn)
    apply_freeze(learn, cfg)
    learn.opt.set_hypers(lr=learn.lr)
    apply_speedups(learn, cfg.train, device)
    return learn
