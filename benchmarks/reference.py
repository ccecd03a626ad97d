"""The reference: TwinCar's pipeline as a plain PyTorch/torchvision program.

This is what the benchmark measures our toolkit against, written the way TwinCar did it: a
torchvision-style `Dataset` over the prepared `annotations.csv`, per-item PIL augmentation
(RandomResizedCrop, flip, rotation, ColorJitter, GaussianBlur, ToTensor, Normalize) in the
DataLoader workers, a `WeightedRandomSampler` for class-balanced batches, a hand-written epoch
loop (Adam, label-smoothing cross entropy, a validation pass), and prediction as in TwinCar's
README (PIL open, Resize 256, CenterCrop 224, ToTensor, Normalize, forward). It imports nothing
from `twincar_fast`: the harness hands it the same items and the same `nn.Module`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class CarsDataset(Dataset):
    """Items from a DataFrame with absolute `path` and `class_id` columns, opened with PIL."""

    def __init__(self, df: pd.DataFrame, transform: transforms.Compose):
        self.paths = [str(p) for p in df["path"]]
        self.labels = [int(c) for c in df["class_id"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.open(self.paths[i]).convert("RGB")
        return self.transform(img), self.labels[i]


def train_transform(size: int = 224) -> transforms.Compose:
    """TwinCar's per-item training augmentation, with the recipe's strengths (see AugConfig)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.35, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(10),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            transforms.RandomApply([transforms.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(size: int = 224) -> transforms.Compose:
    """TwinCar's README preprocessing: Resize 256, CenterCrop 224 (scaled with `size`)."""
    return transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def balanced_sampler(labels: Sequence[int], seed: int = 42) -> WeightedRandomSampler:
    """Class-balanced sampling with replacement: each item weighted by 1 / its class count."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=gen)


def train_loader(
    df: pd.DataFrame,
    size: int,
    batch_size: int,
    num_workers: int,
    seed: int = 42,
    pin_memory: bool = False,
) -> DataLoader:
    """The training DataLoader: per-item augmentation, balanced sampler, full batches only."""
    ds = CarsDataset(df, train_transform(size))
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=balanced_sampler(ds.labels, seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,  # like fastai's training loader, so both sides see the same images
    )


def valid_loader(
    df: pd.DataFrame, size: int, batch_size: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """The validation DataLoader: README preprocessing, in order."""
    ds = CarsDataset(df, eval_transform(size))
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory
    )


def freeze(model: nn.Module, prefixes: Sequence[str]) -> None:
    """Freeze the parameters whose names start with one of `prefixes` (TwinCar froze layers 1-2)."""
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)


def train_one_epoch(
    model: nn.Module,
    train_dl: DataLoader,
    valid_dl: DataLoader | None,
    lr: float = 1e-3,
    label_smoothing: float = 0.1,
    device: str | torch.device = "cpu",
) -> dict:
    """One epoch of TwinCar's plain loop (Adam, label smoothing) plus a validation pass."""
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    n_train, total = 0, 0.0
    for xb, yb in train_dl:
        xb, yb = xb.to(device), yb.to(device)
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        n_train += len(yb)
        total += loss.item() * len(yb)
    n_valid, correct = 0, 0
    if valid_dl is not None:
        model.eval()
        with torch.no_grad():
            for xb, yb in valid_dl:
                xb, yb = xb.to(device), yb.to(device)
                correct += (model(xb).argmax(1) == yb).sum().item()
                n_valid += len(yb)
    return {
        "train_loss": total / max(n_train, 1),
        "valid_acc": correct / max(n_valid, 1),
        "n_train": n_train,
        "n_valid": n_valid,
    }


def predict_one(
    model: nn.Module, path: str | Path, size: int = 224, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """TwinCar's README snippet: class probabilities of one image file."""
    transform = eval_transform(size)
    img = Image.open(path).convert("RGB")
    with torch.no_grad():
        logits = model(transform(img).unsqueeze(0).to(device))
    return logits.softmax(1)[0]


def predict_batch(
    model: nn.Module,
    paths: Sequence[str | Path],
    size: int = 224,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The README snippet batched: transform each image, stack `batch_size` of them, forward."""
    transform = eval_transform(size)
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            xb = torch.stack([transform(Image.open(p).convert("RGB")) for p in chunk])
            out.append(model(xb.to(device)).softmax(1).cpu())
    return torch.cat(out)
