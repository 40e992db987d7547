"""The L2 normalisation of queries and keys with a per-head temperature (cosine attention),
as one autograd function with its backward written out.

``y = s_h * x / max(||x||, eps)`` over the head dimension, computed in float32 (float64 for
float64 input) and returned in ``out_dtype``. Autograd's own backward of ``F.normalize(x) * s``
takes the temperature gradient as a sum over every element of ``x`` and ``dy`` (a second pass
over both) and splits the norm's backward into several kernels. Written out, everything comes from one per-row dot product
``r = x . dy``:

    dx = s / n * (dy - x r / n^2)          (n = ||x||; only dy / n where n < eps)
    ds_h = sum over rows of head h of r / n

so a compiled backward reads ``x`` and ``dy`` once, writes ``dx``, and reduces a tensor with
one value per row for ``ds``. Same function as ``F.normalize(x, dim=-1, eps=eps) * s``.
"""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype where that is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _L2NormScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BLHc: torch.Tensor, scale_H: torch.Tensor | None, eps: float, out_dtype: torch.dtype):
        x = _wide(x_BLHc)
        norm_BLH1 = x.pow(2).sum(-1, keepdim=True).sqrt()
        y = x * norm_BLH1.clamp_min(eps).reciprocal()
        if scale_H is not None:
            y = y * _wide(scale_H).view(1, 1, -1, 1)
        ctx.save_for_backward(x_BLHc, norm_BLH1, scale_H)
        ctx.eps = eps
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable   # the saved norms are constants here: no double backward
    def backward(ctx, dy: torch.Tensor):
        x_BLHc, norm_BLH1, scale_H = ctx.saved_tensors
        inv_BLH1 = norm_BLH1.clamp_min(ctx.eps).reciprocal()
        x, g = _wide(x_BLHc), _wide(dy)
        r_BLH1 = (x * g).sum(-1, keepdim=True)
        dx = ds = None
        if ctx.needs_input_grad[0]:
            # through the norm only where it is not clamped (clamp_min passes no gradient below eps)
            through_norm = torch.where(norm_BLH1 >= ctx.eps, r_BLH1 * inv_BLH1 * inv_BLH1, torch.zeros_like(r_BLH1))
            dx = (g - x * through_norm) * inv_BLH1
            if scale_H is not None:
                dx = dx * _wide(scale_H).view(1, 1, -1, 1)
            dx = dx.to(x_BLHc.dtype)
        if scale_H is not None and ctx.needs_input_grad[1]:
            ds = (r_BLH1 * inv_BLH1).sum(dim=(0, 1, 3)).reshape(scale_H.shape).to(scale_H.dtype)
        return dx, ds, None, None


def l2_norm_scale(x_BLHc: torch.Tensor, scale_H: torch.Tensor | None = None, eps: float = 1e-12,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.normalize(x, dim=-1, eps=eps) * scale_H`` per head (``x`` is ``(B, L, H, hd)``, ``scale_H``
    holds H values in any shape), in ``out_dtype`` (default: ``x``'s), with the one-pass backward
    described in the module."""
    return _L2NormScale.apply(x_BLHc, scale_H, eps, out_dtype or x_BLHc.dtype)
