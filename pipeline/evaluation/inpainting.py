"""In-painting measured (paper Sec. 7 in numbers): VAR's zero-shot in-painting against two baselines.

Held-out val images get a hole each (params ``zeroshot.holes``, cycled). Every method's output is
composited into the original outside the hole, so all of them keep the same pixels there and
every difference is inside the hole:

- ``var_inpaint``: VAR teacher-forces the tokens outside the hole at every scale and samples the
  rest (:func:`varcore.sample.inpaint`), conditioned on the image's class;
- ``uncond_fill``: an unconditional sample of the same model (the null class) pasted into the hole;
- ``class_fill``: a sample of the image's class pasted into the hole;
- ``original``: the images without a hole (the floor of FID for this many images).

Scored by the error inside the hole (MSE of pixels in [0, 1], averaged over hole pixels; LPIPS of
the whole image when VGG16 weights are given) and by FID/KID/precision/recall of the filled images
against the val images that did not get holes, with the pipeline's feature network.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from varcore.sample import SamplingConfig, box_mask, edit_class, generate, inpaint, outpaint
from varcore.var import VAR
from varcore.vqvae import VQVAE

from ..images import grid, to_float_images, to_uint8_images
from .config import Box, SamplingParams
from .samples import autocast

METHODS = ("var_inpaint", "uncond_fill", "class_fill", "original")
GREY = 128   # the hole in the "masked" row of the picture


def box_pixels(box: Box, size: int) -> tuple[int, int, int, int]:
    """Fractional (top, left, bottom, right) -> pixel box, end-exclusive, at least one pixel."""
    top, left, bottom, right = (round(f * size) for f in box)
    return top, left, max(bottom, top + 1), max(right, left + 1)


def box_masks(boxes: list[Box], size: int) -> torch.Tensor:
    """bool ``(N, size, size)``, True inside box i for image i (:func:`varcore.sample.box_mask` per box)."""
    return torch.cat([box_mask(1, size, box_pixels(b, size)) for b in boxes])


def hole_masks(n: int, size: int, holes: tuple[Box, ...]) -> torch.Tensor:
    """The hole of image i is ``holes[i % len(holes)]``: ``(n, size, size)`` bool."""
    return box_masks([holes[i % len(holes)] for i in range(n)], size)


def composite(filled_B3HW: torch.Tensor, original_B3HW: torch.Tensor, hole_BHW: torch.Tensor) -> torch.Tensor:
    """``filled`` inside the hole, ``original`` everywhere else."""
    return torch.where(hole_BHW.unsqueeze(1), filled_B3HW, original_B3HW)


def _sampling(s: SamplingParams) -> SamplingConfig:
    return SamplingConfig(cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, engine=s.engine)


@torch.no_grad()
def fill_holes(var: VAR, vq: VQVAE, images_NHWC: np.ndarray, labels_N: np.ndarray, holes_NHW: torch.Tensor,
               sampling: SamplingParams, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
    """uint8 ``(N, 3, H, W)`` images of every method in :data:`METHODS`, batch by batch; each method
    draws from its own generator seeded with ``seed`` (a method's images do not depend on the others)."""
    device = next(var.parameters()).device
    cfg = _sampling(sampling)
    gens = {m: torch.Generator(device=device).manual_seed(seed) for m in METHODS}
    null = var.cfg.num_classes
    draw: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "var_inpaint": lambda x, lab, hole: inpaint(var, vq, x, hole, lab, cfg, gens["var_inpaint"])[0],
        "uncond_fill": lambda x, lab, hole: generate(var, vq, torch.full_like(lab, null), cfg, gens["uncond_fill"]),
        "class_fill": lambda x, lab, hole: generate(var, vq, lab, cfg, gens["class_fill"]),
        "original": lambda x, lab, hole: x,
    }
    out: dict[str, list[torch.Tensor]] = {m: [] for m in METHODS}
    for i in tqdm(range(0, len(images_NHWC), batch_size), desc="in-painting", unit="batch", mininterval=2):
        x = to_float_images(images_NHWC[i:i + batch_size]).to(device)
        lab = torch.from_numpy(np.asarray(labels_N[i:i + batch_size], dtype=np.int64)).to(device)
        hole = holes_NHW[i:i + batch_size].to(device)
        for m in METHODS:
            with autocast(device):
                filled = draw[m](x, lab, hole).float()
            out[m].append(to_uint8_images(composite(filled, x, hole)).cpu())
    return {m: torch.cat(v) for m, v in out.items()}


def hole_mse(filled: torch.Tensor, original: torch.Tensor, holes_NHW: torch.Tensor) -> float:
    """Mean squared error of pixels in [0, 1] over every hole pixel and channel (uint8 inputs)."""
    diff2 = ((filled.double() - original.double()) / 255.0).square()   # (N, 3, H, W)
    mask = holes_NHW.unsqueeze(1).expand_as(diff2)
    return float(diff2[mask].mean())


@torch.no_grad()
def mean_lpips(lpips_net: torch.nn.Module, filled: torch.Tensor, original: torch.Tensor, device: torch.device,
               batch_size: int = 250) -> float:
    """Mean LPIPS between the filled and the original images (uint8; the net takes [-1, 1])."""
    total = 0.0
    for i in range(0, len(filled), batch_size):
        a = filled[i:i + batch_size].to(device).float() / 127.5 - 1
        b = original[i:i + batch_size].to(device).float() / 127.5 - 1
        total += float(lpips_net(a, b).sum())
    return total / len(filled)


@torch.no_grad()
def picture(var: VAR, vq: VQVAE, images_NHWC: np.ndarray, labels_N: np.ndarray, holes_NHW: torch.Tensor,
            filled: dict[str, torch.Tensor], keep: Box, edit: Box, sampling: SamplingParams, seed: int
            ) -> tuple[np.ndarray, list[str]]:
    """Rows: original, masked, VAR in-painted, unconditional fill, class fill, out-painted (keep the
    ``keep`` box), edited (``edit`` box redrawn under the next class); the row names."""
    device = next(var.parameters()).device
    cfg, n, size = _sampling(sampling), len(images_NHWC), images_NHWC.shape[1]
    x = to_float_images(images_NHWC).to(device)
    lab = torch.from_numpy(np.asarray(labels_N, dtype=np.int64)).to(device)
    keep_m = box_masks([keep] * n, size).to(device)
    with autocast(device):
        out = outpaint(var, vq, x, keep_m, lab, cfg, torch.Generator(device=device).manual_seed(seed))[0].float()
        new = (lab + 1) % var.cfg.num_classes
        edited = edit_class(var, vq, x, box_pixels(edit, size), new, cfg,
                            torch.Generator(device=device).manual_seed(seed))[0].float()
    edit_m = box_masks([edit] * n, size).to(device)
    original = to_uint8_images(x).cpu()
    masked = original.clone()
    masked[holes_NHW.unsqueeze(1).expand_as(masked)] = GREY
    rows = [original, masked, filled["var_inpaint"], filled["uncond_fill"], filled["class_fill"],
            to_uint8_images(composite(out, x, ~keep_m)).cpu(), to_uint8_images(composite(edited, x, edit_m)).cpu()]
    names = ["original", "masked", "VAR in-painted", "unconditional sample in the hole",
             "class sample in the hole", "out-painted (centre kept)", "edited (box under the next class)"]
    return grid(rows), names


def summary(scores: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The flat numbers ``metrics/zeroshot.json`` holds: ``<method>/<metric>``."""
    return {f"{m}/{k}": v for m, s in scores.items() for k, v in s.items() if isinstance(v, float)}
