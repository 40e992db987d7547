"""The default profile's feature network: a small CNN classifier of the real train split.

FID/KID/precision/recall compare distributions of features and IS reads class probabilities,
so the features must be trained on images like the ones scored: ImageNet's Inception cannot be
downloaded here and does not know Fashion-MNIST, and a randomly initialised network does not rank
generators (it scores a two-class collapse better than a blur; IS stays at 1). This one sees only
the train split; its val accuracy is reported with every number it produces.

Features: the global average of the last conv block (``4 * width`` values, after ReLU, as
Inception's pool3 features are); logits: one linear layer on them (IS applies the softmax).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoints import config_from, load_weights, read_checkpoint, write_checkpoint
from ..images import to_float_images
from .config import ClassifierParams

log = logging.getLogger(__name__)
CLASSIFIER_FORMAT = "varscale.classifier.v1"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int
    image_size: int
    width: int = 32

    @property
    def feature_dim(self) -> int:
        return 4 * self.width


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three resolutions of 3x3 conv blocks (width, 2 width, 4 width channels), global average, linear."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.trunk = nn.Sequential(_conv(3, w), _conv(w, w), nn.MaxPool2d(2),
                                   _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),
                                   _conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, cfg.num_classes)

    def features(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """``(B, 4 width)`` features of float images in [-1, 1] (resized to the training size)."""
        s = self.cfg.image_size
        if x_B3HW.shape[-2:] != (s, s):
            x_B3HW = F.interpolate(x_B3HW, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return self.trunk(x_B3HW)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_B3HW))


def _batches(n: int, batch_size: int, order: np.ndarray | None = None):
    idx = np.arange(n) if order is None else order
    for i in range(0, n, batch_size):
        yield np.sort(idx[i:i + batch_size])


@torch.no_grad()
def accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy on uint8 ``(N, H, W, 3)`` images."""
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for sel in _batches(len(images), batch_size):
        logits = model(to_float_images(images[sel]).to(device))
        right += int((logits.argmax(1).cpu() == torch.from_numpy(labels[sel])).sum())
    return right / len(images)


def train_classifier(p: ClassifierParams, images: np.ndarray, labels: np.ndarray, num_classes: int,
                     device: torch.device) -> SmallCNN:
    """AdamW with a cosine learning rate over ``epochs`` passes; batches in a seeded order."""
    torch.manual_seed(p.seed)
    model = SmallCNN(ClassifierConfig(num_classes, images.shape[1], p.width)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps = p.epochs * ((len(images) + p.batch_size - 1) // p.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(p.seed)
    bar = tqdm(total=steps, desc="classifier", unit="step", mininterval=2)
    model.train()
    for _ in range(p.epochs):
        for sel in _batches(len(images), p.batch_size, rng.permutation(len(images))):
            x = to_float_images(images[sel]).to(device)
            loss = F.cross_entropy(model(x), torch.from_numpy(labels[sel]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def save_classifier(path: str | Path, model: SmallCNN, extra: dict[str, Any] | None = None) -> None:
    write_checkpoint(path, CLASSIFIER_FORMAT, model.cfg, model.state_dict(), extra)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SmallCNN, dict[str, Any]]:
    ckpt = read_checkpoint(path, CLASSIFIER_FORMAT, "classifier", "train_classifier", map_location)
    model = SmallCNN(config_from(path, ClassifierConfig, ckpt["config"]))
    load_weights(path, model, ckpt["state_dict"])
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}
