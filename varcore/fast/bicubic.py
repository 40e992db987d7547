"""Bicubic upsampling of small code maps as two matmuls (the quantiser's ``phi`` inputs on CUDA).

``F.interpolate(mode="bicubic")`` is separable, so upsampling ``(B, C, h, h)`` to ``H x H`` is
``A z A^T`` with one ``(H, h)`` matrix per size pair. CUDA's bicubic kernel loops over ``B*C`` in
each thread, which is slow for the quantiser's 16x16 outputs; two small matmuls are not.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n_out, n_in)`` matrix A with ``interpolate(z, bicubic) = A z A^T`` (the interpolation
    is separable): column j is the upsampled j-th basis vector (along height, width 1 -> 1).
    Cached per device: a host-to-device copy at every call would stall the launch queue."""
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1)
    A = F.interpolate(basis, size=(n_out, 1), mode="bicubic")[:, 0, :, 0].T
    return A.to(device=device, dtype=dtype)


def upsample_bicubic(z_BChw: torch.Tensor, H: int) -> torch.Tensor:
    """``F.interpolate(z, (H, H), mode="bicubic")`` as two matmuls, in z's dtype even under autocast."""
    A_Hh = bicubic_matrix(z_BChw.shape[-1], H, z_BChw.device, z_BChw.dtype)
    with torch.autocast(z_BChw.device.type, enabled=False):
        return A_Hh @ z_BChw @ A_Hh.T
