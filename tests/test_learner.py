"""Learner: timm model + head, parameter groups, freezing, discriminative LRs, loss, weights files."""

from __future__ import annotations

import dataclasses
import socket

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import make_tiny_cfg
from fastai.callback.fp16 import AMPMode
from fastai.layers import AdaptiveConcatPool2d
from fastai.optimizer import l2_reg, weight_decay
from fastai.torch_core import norm_bias_params
from torch import nn

from twincar_fast.config import ModelConfig
from twincar_fast.data import build_dls
from twincar_fast.errors import ConfigError
from twincar_fast.model.learner import (
    create_learner,
    create_model,
    freeze_all_but_head,
    group_lrs,
    group_names,
    lr_for,
    make_loss,
    param_groups,
    splitter,
)
from twincar_fast.model.precision import (
    apply_speedups,
    cpu_has_bf16,
    device_info,
    precision_for,
)

RESNET_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


@pytest.fixture(scope="module")
def dls(tiny_data, tmp_path_factory):
    """Tiny train/valid DataLoaders built by the package's own data pipeline."""
    return build_dls(make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("dls")))


def with_train(cfg, **kw):
    """`cfg` with some `train` fields replaced."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw))


def one_line_error(fn, *args, match: str) -> str:
    """Call `fn`, expect a one-line ConfigError containing `match`, return its message."""
    with pytest.raises(ConfigError, match=match) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- model and groups


@pytest.mark.parametrize(
    "arch, groups",
    [
        ("test_resnet", RESNET_GROUPS),
        ("resnet18", RESNET_GROUPS),
        ("test_efficientnet", ["stem", *(f"blocks.{i}" for i in range(5)), "head"]),
        ("test_convnext", ["stem", *(f"stages.{i}" for i in range(4)), "head"]),
    ],
)
@pytest.mark.parametrize("head", ["mlp", "fastai"])
def test_create_model_groups_and_output(arch, groups, head):
    model = create_model(ModelConfig(arch=arch, pretrained=False, head=head, head_hidden=16), 5)
    assert group_names(model) == groups
    split = splitter(model)
    assert sum(len(ps) for ps in split) == len(list(model.parameters()))  # each param once
    assert {id(p) for ps in split for p in ps} == {id(p) for p in model.parameters()}
    assert [id(p) for p in split[-1]] == [id(p) for p in model[1].parameters()]
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    kinds = {type(m) for m in model[1].modules()}
    if head == "fastai":
        assert AdaptiveConcatPool2d in kinds and nn.BatchNorm1d in kinds
    else:
        linears = [m for m in model[1] if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [
            (model[0].model.num_features, 16),
            (16, 5),
        ]
        assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model[1])


# ---------------------------------------------------------------- freezing and LRs


def snapshot(model):
    """Copies of every parameter and buffer, by state-dict name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("train_bn", [True, False])
def test_fit_keeps_frozen_groups(tiny_cfg, dls, train_bn):
    cfg = with_train(tiny_cfg, train_bn=train_bn, lr=[1e-3, 1e-2])
    learn = create_learner(cfg, dls)
    name_of = {id(p): n for n, p in learn.model.state_dict(keep_vars=True).items()}
    norm = {id(p) for p in norm_bias_params(learn.model, with_bias=False)}
    before = snapshot(learn.model)
    learn.fit(1)
    after = snapshot(learn.model)
    for group, params in param_groups(learn.model):
        frozen = group in ("stem", "layer1", "layer2")
        for p in params:
            changed = not torch.equal(before[name_of[id(p)]], after[name_of[id(p)]])
            if id(p) in norm and frozen:
                assert changed == train_bn, (group, name_of[id(p)])
            elif frozen:
                assert not changed, (group, name_of[id(p)])
        if not frozen:
            assert all(
                not torch.equal(before[name_of[id(p)]], after[name_of[id(p)]])
                for p in params
                if p.ndim > 1
            ), group
    stem_mean = "0.model.bn1.running_mean"
    assert torch.equal(before[stem_mean], after[stem_mean]) == (not train_bn)
    # the flat `fit` kept the per-group LRs the config asked for
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 1e-3, 10**-2.5, 1e-2]
    )


@pytest.mark.parametrize(
    "lr, freeze, expected",
    [
        (3e-3, ["stem", "layer1", "layer2"], [3e-3] * 6),
        ([1e-4, 1e-2], ["stem", "layer1", "layer2"], [1e-4, 1e-4, 1e-4, 1e-4, 1e-3, 1e-2]),
        ([1e-4, 1e-2], [], [1e-4, 10**-3.6, 10**-3.2, 10**-2.8, 10**-2.4, 1e-2]),
        ([1, 2, 3, 4, 5, 6], ["stem"], [1, 2, 3, 4, 5, 6]),
        ([4, 5, 6], ["stem", "layer1", "layer2"], [4, 4, 4, 4, 5, 6]),
    ],
)
def test_optimizer_lr_per_group(tiny_cfg, dls, lr, freeze, expected):
    cfg = with_train(tiny_cfg, lr=lr, freeze=freeze)
    learn = create_learner(cfg, dls)
    learn.opt.set_hypers(lr=lr_for(cfg, learn))
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx(expected)
    assert learn.opt.frozen_idx == len(freeze)
    trainable = [all(p.requires_grad for p in ps if p.ndim > 1) for ps in splitter(learn.model)]
    assert trainable == [i >= len(freeze) for i in range(6)]


def test_head_only_stage_and_lr_errors(tiny_cfg, dls):
    learn = create_learner(tiny_cfg, dls)
    freeze_all_but_head(learn)
    assert [any(p.requires_grad for p in ps if p.ndim > 1) for ps in splitter(learn.model)] == [
        False
    ] * 5 + [True]
    bad = with_train(tiny_cfg, lr=[1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    msg = one_line_error(group_lrs, bad.train.lr, RESNET_GROUPS, 3, match="train.lr")
    assert "6" in msg and "3" in msg


# ---------------------------------------------------------------- loss and optimizer


def test_label_smoothing_in_the_loss(tiny_cfg):
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0]])
    target = torch.tensor([0, 3])
    eps = 0.1
    logp = F.log_softmax(logits, dim=1)
    ce = F.cross_entropy(logits, target)
    expected = (1 - eps) * ce + eps * (-logp.mean(dim=1)).mean()
    loss = make_loss(with_train(tiny_cfg, label_smoothing=eps).train)(logits, target)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(loss) - float(ce)) > 1e-3
    plain = make_loss(with_train(tiny_cfg, label_smoothing=0.0).train)(logits, target)
    assert float(plain) == pytest.approx(float(ce), rel=1e-6)


@pytest.mark.parametrize("name, wd_step", [("adam", l2_reg), ("adamw", weight_decay)])
def test_optimizer_and_weight_decay(tiny_cfg, dls, name, wd_step):
    learn = create_learner(with_train(tiny_cfg, optimizer=name, weight_decay=0.05), dls)
    assert wd_step in learn.opt.cbs
    assert all(h["wd"] == 0.05 for h in learn.opt.hypers)
    # CPU: fp32 weights, channels-last; bf16 autocast only where the CPU has native bf16
    assert not hasattr(learn, "mixed_precision") and hasattr(learn, "channels_last")
    assert hasattr(learn, "cpu_autocast") == cpu_has_bf16()
    assert next(learn.model.parameters()).dtype == torch.float32


def test_mixed_precision_resolved_per_device(tiny_cfg):
    t = tiny_cfg.train
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert precision_for(t, cpu) == ("bf16" if cpu_has_bf16() else "none")  # auto
    for asked, on_cpu in [("bf16", "bf16"), ("fp16", "none"), ("none", "none")]:
        assert precision_for(dataclasses.replace(t, mixed_precision=asked), cpu) == on_cpu
    assert precision_for(dataclasses.replace(t, mixed_precision="bf16"), mps) == "none"
    assert (
        precision_for(dataclasses.replace(t, mixed_precision="fp16"), torch.device("cuda"))
        == "fp16"
    )


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-gpu", "t4-v100"])
def test_cuda_auto_precision_is_bf16_or_fp16_with_a_grad_scaler(tiny_cfg, dls, monkeypatch, bf16):
    """auto on CUDA: bf16 autocast where the GPU has it (A100, H100), else fp16 with fastai's
    GradScaler (T4, V100: Colab's and Kaggle's); summary.json's machine says which."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda = torch.device("cuda")
    assert precision_for(tiny_cfg.train, cuda) == ("bf16" if bf16 else "fp16")
    learn = create_learner(tiny_cfg, dls)
    apply_speedups(learn, tiny_cfg.train, cuda)
    assert learn.mixed_precision.amp_mode == (AMPMode.BF16 if bf16 else AMPMode.FP16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    info = device_info(tiny_cfg.train, cuda)
    assert info["precision"] == ("bf16 autocast" if bf16 else "fp16 autocast + GradScaler")
    assert info["device"] == "cuda:0" and info["processor"] == "Tesla T4"


def test_cuda_speedups_are_wired(tiny_cfg, dls):
    """On CUDA: bf16 autocast, channels-last and an in-place compile (wired here, run on a GPU)."""
    learn = create_learner(tiny_cfg, dls)
    fast = with_train(tiny_cfg, mixed_precision="bf16", channels_last=True, compile=True)
    apply_speedups(learn, fast.train, torch.device("cuda"))
    assert learn.mixed_precision.amp_mode == AMPMode.BF16
    assert hasattr(learn, "channels_last")
    assert learn.model._compiled_call_impl is not None  # compiled in place: model[0] still works
    assert group_names(learn.model) == RESNET_GROUPS


# ---------------------------------------------------------------- local weights


@pytest.fixture(scope="module")
def torchvision_r18(tmp_path_factory):
    """A torchvision resnet18 state dict saved as .pth and .safetensors."""
    out = tmp_path_factory.mktemp("tv")
    torch.manual_seed(1)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, out / "r18.pth")
    safetensors.torch.save_file(sd, out / "r18.safetensors")
    return sd, out


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_torchvision_weights_load_exactly(torchvision_r18, suffix):
    sd, out = torchvision_r18
    cfg = ModelConfig(arch="resnet18", pretrained=True, weights=str(out / f"r18.{suffix}"))
    body = create_model(cfg, 4)[0].model.state_dict()  # pretrained: the file wins over the hub
    assert set(sd) - set(body) == {"fc.weight", "fc.bias"}
    assert all(torch.equal(body[k], sd[k]) for k in body)


def test_timm_and_own_weights_load_exactly(tmp_path):
    net = timm.create_model("test_resnet", pretrained=False)  # with its 1000-class classifier
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    cfg = ModelConfig(arch="test_resnet", pretrained=False, weights=str(tmp_path / "timm.pth"))
    body = create_model(cfg, 4)[0].model.state_dict()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in body.items())

    saved = create_model(dataclasses.replace(cfg, weights=None), 4)
    safetensors.torch.save_file(saved.state_dict(), tmp_path / "own.safetensors")
    loaded = create_model(dataclasses.replace(cfg, weights=str(tmp_path / "own.safetensors")), 4)
    assert loaded.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.state_dict().items())


# ---------------------------------------------------------------- bad input


def test_unknown_arch_suggests_names():
    msg = one_line_error(create_model, ModelConfig(arch="resnet5o"), 4, match="model.arch")
    assert "resnet50" in msg


def test_bad_freeze_lists(tiny_cfg, dls):
    msg = one_line_error(
        create_learner, with_train(tiny_cfg, freeze=["layer9"]), dls, match="'layer9'"
    )
    assert "stem, layer1, layer2, layer3, layer4" in msg
    cfg = dataclasses.replace(
        tiny_cfg, model=dataclasses.replace(tiny_cfg.model, arch="test_efficientnet")
    )
    msg = one_line_error(create_learner, cfg, dls, match="train.freeze")  # ResNet names, no ResNet
    assert "blocks.0" in msg
    one_line_error(create_learner, with_train(tiny_cfg, freeze=["layer1"]), dls, match="first ones")
    one_line_error(create_learner, with_train(tiny_cfg, freeze=["stem", "head"]), dls, match="head")


def test_weights_for_another_model(torchvision_r18, tmp_path):
    _, out = torchvision_r18
    cfg = ModelConfig(arch="test_resnet", pretrained=False, weights=str(out / "r18.pth"))
    msg = one_line_error(create_model, cfg, 4, match="is not for test_resnet")
    assert "r18.pth" in msg and "shape" in msg
    own = ModelConfig(arch="test_resnet", pretrained=False, head_hidden=16)
    safetensors.torch.save_file(create_model(own, 4).state_dict(), tmp_path / "four.safetensors")
    five = dataclasses.replace(own, weights=str(tmp_path / "four.safetensors"))
    msg = one_line_error(create_model, five, 5, match="head for 4 classes")
    assert "four.safetensors" in msg and "5" in msg
    (tmp_path / "junk.pth").write_text("not a state dict")
    junk = dataclasses.replace(own, weights=str(tmp_path / "junk.pth"))
    one_line_error(create_model, junk, 4, match="junk.pth is not a readable")
    missing = dataclasses.replace(own, weights=str(tmp_path / "nope.pth"))
    one_line_error(create_model, missing, 4, match="nope.pth not found")


def test_pretrained_without_network(monkeypatch, tmp_path, torchvision_r18):
    def no_network(*args, **kwargs):
        raise OSError("tests never reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = ModelConfig(arch="test_resnet", pretrained=True)
    msg = one_line_error(create_model, cfg, 4, match="model.pretrained")
    assert "model.weights" in msg and "model.pretrained: false" in msg
    # a local weights file needs no network even with pretrained: true
    _, out = torchvision_r18
    local = ModelConfig(arch="resnet18", pretrained=True, weights=str(out / "r18.safetensors"))
    assert create_model(local, 4).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_pretrained_offline_is_said_at_once(monkeypatch, tmp_path, capsys):
    """Issue 12.14: offline, the error came after ~46 s of hub retries and 20 'Retrying' lines."""
    import socket

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = ModelConfig(arch="test_resnet", pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = one_line_error(create_model, cfg, 4, match="model.pretrained")
    assert "HF_HUB_OFFLINE is set (offline)" in msg and "model.weights" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    msg = one_line_error(create_model, cfg, 4, match="model.pretrained")
    assert "no network to download test_resnet" in msg
    assert "Retrying" not in capsys.readouterr().err


def test_weights_folder_is_named_as_a_folder(tmp_path):
    """Issue 12.18: a folder given as model.weights was reported as 'not found'."""
    cfg = ModelConfig(arch="test_resnet", pretrained=False, weights=str(tmp_path))
    assert "is a folder" in one_line_error(create_model, cfg, 4, match="model.weights")


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_timm_head_is_the_models_own_classifier(arch):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch, pretrained=False, head="timm"), 5)
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=5)
    assert model[1] is not None and isinstance(model[1], nn.Linear)
    assert group_names(model)[-1] == "head"
    assert [id(p) for p in splitter(model)[-1]] == [id(p) for p in model[1].parameters()]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # same init, same logits


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_no_weight_decay_on_norm_and_bias(tiny_cfg, dls, name):
    cfg = with_train(tiny_cfg, optimizer=name, weight_decay=0.5, lr=0.1)
    learn = create_learner(cfg, dls)
    no_wd = {id(p) for p in norm_bias_params(learn.model, with_bias=True)}
    params = [p for p in learn.model.parameters() if p.requires_grad]
    assert no_wd and len(no_wd) < len(params)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)  # only weight decay can move a parameter in this step
    learn.opt.step()
    for p, old in zip(params, before, strict=True):
        if id(p) in no_wd:
            torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
        elif name == "adamw":  # decoupled: p ← p·(1 − lr·wd)
            torch.testing.assert_close(p.detach(), old * (1 - 0.1 * 0.5))
        else:  # L2 in the gradient: Adam's first step moves every decayed weight by about lr
            moved = (p.detach() - old)[old.abs() > 1e-3].abs()
            assert moved.numel() and torch.allclose(moved, torch.full_like(moved, 0.1), rtol=0.05)
