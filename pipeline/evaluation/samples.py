"""Class-balanced sample sets: every depth is sampled with the same labels, seeds and settings."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm import tqdm

from varcore import ar
from varcore.sample import SamplingConfig, generate
from varcore.var import VAR
from varcore.vqvae import VQVAE

from ..images import grid, to_float_images, to_uint8_images
from .config import SamplingParams


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """``per_class`` of each class, class by class: ``(num_classes * per_class,)``."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` items of each class, drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than the {per_class} asked for")
        picks.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as the speed benchmarks sample), float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sample_images(var: VAR, vq: VQVAE, labels: torch.Tensor, sampling: SamplingParams, seed: int, batch_size: int,
                  desc: str = "sample") -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` images of ``labels``, drawn batch by batch from one seeded generator
    (scale by scale for a VAR, token by token for the raster baseline :class:`varcore.ar.RasterAR`)."""
    device = next(var.parameters()).device
    draw = ar.generate if isinstance(var, ar.RasterAR) else generate
    cfg = SamplingConfig(cfg=sampling.cfg, top_k=sampling.top_k, top_p=sampling.top_p, engine=sampling.engine)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(labels), batch_size), desc=desc, unit="batch", mininterval=2):
        with autocast(device):
            img = draw(var, vq, labels[i:i + batch_size].to(device), cfg, gen)
        out.append(to_uint8_images(img))
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vq: VQVAE, images_NHWC: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The tokenizer's round trip image -> tokens -> image: uint8 ``(N, 3, H, W)``."""
    device = vq.quantizer.embedding.weight.device
    out = []
    for i in range(0, len(images_NHWC), batch_size):
        x = to_float_images(images_NHWC[i:i + batch_size]).to(device)
        out.append(to_uint8_images(vq.idx_to_img(vq.img_to_idx(x))))
    return torch.cat(out)


def class_grid(images: torch.Tensor, labels: torch.Tensor, columns: int) -> np.ndarray:
    """One row per class of its first ``columns`` images: uint8 ``(classes S, columns S, 3)``."""
    rows = [images[labels == c][:columns] for c in torch.unique(labels).tolist()]
    return grid(rows)
