"""Attention kernels for the block-causal mask, swapped into a built model by the execution plan.

Each is a drop-in for :class:`varcore.var.BlockCausalAttention` (``core(q, k, v, dropout_p,
scale) -> o``, all ``(B, H, L, hd)``) and computes the same function:

- :class:`FlexBlockCausal`: FlexAttention with the block mask of :mod:`varcore.fast.flex`
  (tiles no query of the tile may see are skipped; CUDA under ``torch.compile``), through
  flex's Triton kernels or its FlashAttention-4 backend.
- :class:`ScaleSplitAttention`: the mask as unmasked calls. The queries of each scale after
  a prefix see every key of the scales up to theirs, so each such scale is one SDPA call
  without a mask (which the flash and cuDNN kernels run); the first ``prefix_scales`` scales
  (where a call per scale costs more in launches than it saves) attend in one masked call.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import require
from ..scales import ScaleLayout
from . import flex
from .fa4 import fa4_attention

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


class FlexBlockCausal(nn.Module):
    """FlexAttention under the block mask built for ``device`` (the mask is not a tensor and
    does not move with the module: build the core on the device the model runs on).

    ``backend``: ``triton`` (flex's own kernels, tiles of :data:`varcore.fast.flex.FLEX_KERNEL_OPTIONS`)
    or ``flash`` (FlashAttention-4's CuTe kernels through flex, CUDA only, under ``torch.compile``)."""

    def __init__(self, patch_nums: tuple[int, ...], device: torch.device | str, backend: str = "triton"):
        super().__init__()
        if flex.flex_attention is None:   # pragma: no cover - torch < 2.5
            raise RuntimeError("attention='flex' needs FlexAttention (torch >= 2.5)")
        require(backend in ("triton", "flash"), "backend", f"must be 'triton' or 'flash', got {backend!r}")
        cuda = torch.device(device).type == "cuda"
        if backend == "flash":
            require_flash(cuda)
            block, options = flex.FLASH_MASK_BLOCK, flex.FLASH_KERNEL_OPTIONS
        else:
            block, options = flex.mask_block(), flex.FLEX_KERNEL_OPTIONS if cuda else None
        self.block_mask = flex.flex_block_mask(tuple(patch_nums), str(device), block)
        self.kernel_options = options

    def forward(self, q_BHLc, k_BHLc, v_BHLc, dropout_p: float, scale: float | None) -> torch.Tensor:
        if dropout_p:
            raise ValueError("flex attention has no dropout: use attention 'per_scale' or 'dense' "
                             "with attn_drop_rate > 0")
        return flex.flex_attention(q_BHLc, k_BHLc, v_BHLc, block_mask=self.block_mask, scale=scale,
                                   kernel_options=self.kernel_options)


class ScaleSplitAttention(nn.Module):
    """The block-causal mask as one masked call over the first ``prefix_scales`` scales and one
    unmasked call per later scale (queries of scale k against keys ``[0, end_k)``).
    ``backends``: SDPA kernels (names of :data:`SDPA_BACKENDS`) tried for the unmasked calls,
    in order; ``("fa4",)`` runs them through FlashAttention-4; ``()``: SDPA's own choice."""

    def __init__(self, patch_nums: tuple[int, ...], prefix_scales: int = 1, backends: tuple[str, ...] = ()):
        super().__init__()
        lay = ScaleLayout(patch_nums)
        require(1 <= prefix_scales <= lay.K, "attn_prefix_scales",
                f"must be in [1, {lay.K}] for {lay.K} scales, got {prefix_scales}")
        check_backends(tuple(backends))
        P = lay.ends[prefix_scales - 1]
        self.register_buffer("prefix_mask_PP", lay.block_causal_mask()[:P, :P], persistent=False)
        self.ends = lay.ends[prefix_scales:]
        self.fa4 = tuple(backends) == ("fa4",)
        self.backends = () if self.fa4 else tuple(SDPA_BACKENDS[b] for b in backends)

    def forward(self, q_BHLc, k_BHLc, v_BHLc, dropout_p: float, scale: float | None) -> torch.Tensor:
        P = start = self.prefix_mask_PP.shape[0]
        outs = [F.scaled_dot_product_attention(q_BHLc[:, :, :P], k_BHLc[:, :, :P], v_BHLc[:, :, :P],
                                               attn_mask=self.prefix_mask_PP, dropout_p=dropout_p, scale=scale)]
        with sdpa_kernel(list(self.backends), set_priority=True) if self.backends else contextlib.nullcontext():
            for end in self.ends:
                q_BHlc, k_BHec, v_BHec = q_BHLc[:, :, start:end], k_BHLc[:, :, :end], v_BHLc[:, :, :end]
                if self.fa4:
                    outs.append(fa4_attention(q_BHlc, k_BHec, v_BHec, scale))
                else:
                    outs.append(F.scaled_dot_product_attention(q_BHlc, k_BHec, v_BHec, dropout_p=dropout_p,
                                                               scale=scale))
                start = end
        # joined along L in (B, L, H, hd) order, so the output projection reads it without a copy
        return torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)


def require_flash(cuda: bool) -> None:
    """The FlashAttention-4 backend's needs, as a :class:`varcore.ConfigError` on ``attention``."""
    require(cuda and flex.flash_available(), "attention",
            "flex_flash needs a CUDA device, torch >= 2.10 and FlashAttention-4 "
            "(pip install flash-attn-4; Hopper or newer)")


def check_backends(backends: tuple[str, ...]) -> None:
    """SDPA backend names, or ``("fa4",)`` alone."""
    bad = [b for b in backends if b not in SDPA_BACKENDS and b != "fa4"]
    require(not bad, "attn_backends", f"unknown SDPA backends {bad}; choose from {sorted(SDPA_BACKENDS)} or fa4")
    require("fa4" not in backends or backends == ("fa4",), "attn_backends",
            "fa4 (FlashAttention-4) must be the only entry")
