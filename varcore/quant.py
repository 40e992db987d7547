"""Multi-scale residual quantiser of VAR (paper Alg. 1 and 2).

One codebook Z of V entries is shared by all K scales. Encoding walks the scale list
``patch_nums`` from coarse to fine: the residual ``f_rest`` is area-downsampled to
``pn x pn``, quantised to token map ``r_k``, the looked-up codes are upsampled back
to the latent size, passed through ``phi_k`` and subtracted from the residual.
Decoding sums the same ``phi_k(z_k)`` terms into ``f_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import check_patch_nums, require
from .fast.bicubic import upsample_bicubic
from .scales import ScaleLayout


class Phi(nn.Conv2d):
    """Residual 3x3 conv blended with ratio ``r``: phi(z) = (1 - r) z + r conv(z)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return z_BChw.mul(1 - self.ratio) + super().forward(z_BChw).mul(self.ratio)


@dataclass
class CodebookUsage:
    """Per-scale codebook statistics of one batch: fraction of the V codes used and perplexity."""

    used_fraction: list[float]
    perplexity: list[float]


class MultiScaleQuantizer(nn.Module):
    """Residual quantiser over ``patch_nums`` with a shared codebook and K (or fewer) phi convs.

    ``num_phi`` distinct phi convolutions serve the K scales: ``num_phi == K`` gives one
    per scale, ``1`` a single shared one, values in between share each conv among
    neighbouring scales (the official code's "partially shared" variant uses 4).
    ``num_phi == 0`` makes phi the identity.
    """

    def __init__(self, vocab_size: int, Cvae: int, patch_nums: tuple[int, ...],
                 num_phi: int | None = None, phi_ratio: float = 0.5, beta: float = 0.25):
        super().__init__()
        patch_nums = tuple(patch_nums)
        check_patch_nums(patch_nums)
        K = len(patch_nums)
        num_phi = K if num_phi is None else num_phi
        require(vocab_size >= 2, "vocab_size", f"must be >= 2, got {vocab_size}")
        require(0 <= num_phi <= K, "num_phi", f"must be in [0, {K}] (number of scales), got {num_phi}")
        require(0.0 <= phi_ratio <= 1.0, "phi_ratio", f"must be in [0, 1], got {phi_ratio}")
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, Cvae, patch_nums
        self.beta = beta
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.embedding.weight.data.uniform_(-1.0 / vocab_size, 1.0 / vocab_size)
        self.phis = nn.ModuleList(Phi(Cvae, phi_ratio) for _ in range(num_phi))

    # ---- helpers -------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    def phi_index(self, k: int) -> int:
        """Which of the ``n`` phi convs serves scale index ``k`` (0-based), as the official code
        picks it: the conv whose tick is nearest to the scale's position ``k / (K-1)`` in [0, 1],
        ticks evenly spaced over ``[1/(3n), 1 - 1/(3n)]`` when ``n == 4`` and ``[1/(2n), 1 - 1/(2n)]``
        otherwise, the first on a tie (as float64 computes it). One conv per scale is the identity
        map; 4 convs over the paper's 10 scales give [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]."""
        n, K = len(self.phis), self.num_scales
        if n <= 1 or K == 1:
            return 0
        margin = 1 / (3 * n) if n == 4 else 1 / (2 * n)
        ticks = np.linspace(margin, 1 - margin, n)
        return int(np.argmin(np.abs(ticks - k / (K - 1))))

    def phi(self, k: int, z_BChw: torch.Tensor) -> torch.Tensor:
        """Apply the phi conv that serves scale index ``k`` (0-based)."""
        if len(self.phis) == 0:
            return z_BChw
        return self.phis[self.phi_index(k)](z_BChw)

    def _up(self, z_BChw: torch.Tensor) -> torch.Tensor:
        H = self.latent_size
        if z_BChw.shape[-1] == H:
            return z_BChw
        if z_BChw.is_cuda:  # the same map as two matmuls: CUDA's bicubic kernel is slow at these sizes
            return upsample_bicubic(z_BChw, H)
        return F.interpolate(z_BChw, size=(H, H), mode="bicubic")

    @staticmethod
    def _down(f_BChw: torch.Tensor, pn: int) -> torch.Tensor:
        return f_BChw if f_BChw.shape[-1] == pn else F.interpolate(f_BChw, size=(pn, pn), mode="area")

    def lookup(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """Token map -> code map ``(B, Cvae, h, w)``."""
        return self.embedding(idx_Bhw).permute(0, 3, 1, 2)

    def nearest(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (L2) for every position: ``(B, h, w)``."""
        B, C, h, w = f_BChw.shape
        f_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, C).float()
        Z_VC = self.embedding.weight.float()
        d_NV = f_NC.square().sum(1, keepdim=True) + Z_VC.square().sum(1) - 2.0 * f_NC @ Z_VC.T
        return d_NV.argmin(dim=1).view(B, h, w)

    # ---- Alg. 1: encode ----------------------------------------------------------------
    def _check_latent(self, f_BChw: torch.Tensor) -> None:
        H = self.latent_size
        if f_BChw.shape[1] != self.Cvae or f_BChw.shape[-2:] != (H, H):
            raise ValueError(
                f"latent must be (B, {self.Cvae}, {H}, {H}) for patch_nums={list(self.patch_nums)}, "
                f"got {tuple(f_BChw.shape)}")

    def f_to_idx(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Alg. 1: latent ``f`` -> K token maps ``r_k`` of shape ``(B, pn_k, pn_k)``."""
        self._check_latent(f_BChw)
        f_rest = f_BChw.detach().clone()
        idx_list = []
        for k, pn in enumerate(self.patch_nums):
            idx_Bhw = self.nearest(self._down(f_rest, pn))
            idx_list.append(idx_Bhw)
            f_rest = f_rest - self.phi(k, self._up(self.lookup(idx_Bhw)))
        return idx_list

    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, CodebookUsage]:
        """Training pass: straight-through ``f_hat``, commitment loss, codebook usage.

        The loss is averaged over scales of ``beta * ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2``
        where ``f_hat_k`` is the partial reconstruction after scale k (eq. 5's ||f - f_hat||),
        which trains the encoder towards the codes and the codebook and phi towards f.
        """
        self._check_latent(f_BChw)
        f = f_BChw.float()
        f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        loss = f.new_zeros(())
        used, ppl = [], []
        for k, pn in enumerate(self.patch_nums):
            idx_Bhw = self.nearest(self._down(f_rest, pn))
            z = self.phi(k, self._up(self.lookup(idx_Bhw)))
            f_hat = f_hat + z
            f_rest = f_rest - z.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
            counts = torch.bincount(idx_Bhw.flatten(), minlength=self.vocab_size).float()
            p = counts / counts.sum()
            used.append((counts > 0).float().mean().item())
            ppl.append(math.exp(-(p * p.clamp_min(1e-12).log()).sum().item()))
        f_hat_st = (f_hat.detach() - f.detach()) + f  # straight-through estimator
        return f_hat_st.to(f_BChw.dtype), loss / self.num_scales, CodebookUsage(used, ppl)

    # ---- Alg. 2: decode ----------------------------------------------------------------
    def idx_to_f_hat(self, idx_list: list[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        """Alg. 2: token maps of scales ``[0, upto)`` -> ``f_hat = sum_k phi_k(up(Z[r_k]))``."""
        upto = len(idx_list) if upto is None else upto
        B, H = idx_list[0].shape[0], self.latent_size
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H)
        for k in range(upto):
            f_hat = f_hat + self.phi(k, self._up(self.lookup(idx_list[k])))
        return f_hat

    # ---- the transformer's view ---------------------------------------------------------
    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input for scales 2..K: ``(B, L - pn_1^2, Cvae)``.

        The input at scale k+1 is the partial ``f_hat`` after scales 1..k, area-downsampled
        to ``pn_{k+1}``; the transformer predicts ``r_{k+1}`` from it.
        """
        B, H = idx_list[0].shape[0], self.latent_size
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H)
        inputs = []
        for k in range(self.num_scales - 1):
            f_hat, x_BChw = self.add_scale(k, f_hat, self.lookup(idx_list[k]))
            inputs.append(x_BChw.flatten(2).transpose(1, 2))
        if not inputs:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(inputs, dim=1)

    def add_scale(self, k: int, f_hat_BChw: torch.Tensor, z_BChw: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add sampled codes ``z_k`` (``(B, Cvae, pn_k, pn_k)``) of scale k to ``f_hat``.

        Returns the new ``f_hat`` and the next scale's transformer input (``f_hat``
        downsampled to ``pn_{k+1}``), or ``None`` after the last scale.
        """
        f_hat_BChw = f_hat_BChw + self.phi(k, self._up(z_BChw))
        if k + 1 == self.num_scales:
            return f_hat_BChw, None
        return f_hat_BChw, self._down(f_hat_BChw, self.patch_nums[k + 1])

    def split_tokens(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """Flat token sequence ``(B, L)`` -> list of token maps ``(B, pn, pn)``."""
        return ScaleLayout(self.patch_nums).split(idx_BL)


def flatten_tokens(idx_list: list[torch.Tensor]) -> torch.Tensor:
    """List of token maps ``(B, pn, pn)`` -> flat sequence ``(B, L)`` in scale order."""
    return ScaleLayout.flatten(idx_list)
