"""GroupNorm + SiLU over channels-last activations as Triton kernels, for the compiled decoder.

The VQ-VAE decoder runs channels-last (its convolutions are NHWC), and every ResBlock starts
with ``silu(group_norm(x))``. Inductor's kernels for it read each group's channels with a
stride of ``C`` and, after an upsampling, through the sub-pixel phase interleave: at B=64 the
decoder's GroupNorm kernels took about 30 ms of its 90 ms on an H200 (r13-4), against ~8 ms
for the bytes they move. Here each pass reads whole pixels (``C`` contiguous channels):

1. per-channel partial sums over blocks of pixels (one program per image and pixel block);
   the group means from them (small tensors);
2. the same pass over ``(x - mean)^2``: the variance from centred values (two passes, not
   ``E[x^2] - mean^2``, which cancels when the mean is large against the spread);
3. ``y = silu((x - mean) * rstd * weight + bias)``, written once in ``x``'s dtype.

Statistics in float32 as torch's GroupNorm under autocast; only the summation order differs.
:func:`group_norm_silu` runs this for CUDA tensors (``varscale::group_norm_silu``, traceable by
``torch.compile``) and ``silu(group_norm(x))`` elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["group_norm_silu", "fused_available"]

TILE_ELEMENTS = 8192   # pixels x channels (padded to a power of two) one program holds per step
TARGET_PROGRAMS = 1024  # programs per statistics pass (several per SM on an H200's 132)


if triton is not None:
    @triton.jit
    def channel_sums_kernel(x_ptr, shift_ptr, out_ptr, HW, C, T, P_PER_PROG, BLOCK_P: tl.constexpr,
                            BLOCK_C: tl.constexpr, CENTRED: tl.constexpr):
        """``out[n, t, c]`` = sum over pixel block ``t`` of image ``n`` of ``x`` (or, ``CENTRED``,
        of ``(x - shift[n, c])^2``); ``x`` is ``(N, HW, C)`` contiguous."""
        n = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        if CENTRED:
            shift = tl.load(shift_ptr + n * C + cols, mask=cmask, other=0.0)
        base = x_ptr + n * HW * C
        for i in range(0, P_PER_PROG, BLOCK_P):
            p = t * P_PER_PROG + i + tl.arange(0, BLOCK_P)
            m = (p < HW)[:, None] & cmask[None, :]
            v = tl.load(base + p.to(tl.int64)[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if CENTRED:
                v = tl.where(m, v - shift[None, :], 0.0)
                v = v * v
            acc += tl.sum(v, axis=0)
        tl.store(out_ptr + (n * T + t) * C + cols, acc, mask=cmask)

    @triton.jit
    def norm_silu_kernel(x_ptr, mean_ptr, a_ptr, b_ptr, y_ptr, HW, C, BLOCK_P: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        """``y = silu((x - mean[n, c]) * a[n, c] + b[n, c])`` over one block of pixels."""
        n = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        m = (p < HW)[:, None] & cmask[None, :]
        at = n * HW * C + p.to(tl.int64)[:, None] * C + cols[None, :]
        mean = tl.load(mean_ptr + n * C + cols, mask=cmask, other=0.0)
        a = tl.load(a_ptr + n * C + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + n * C + cols, mask=cmask, other=0.0)
        x = tl.load(x_ptr + at, mask=m, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * a[None, :] + b[None, :]
        tl.store(y_ptr + at, (y * tl.sigmoid(y)).to(y_ptr.dtype.element_ty), mask=m)


def _tiles(HW: int, C: int, N: int) -> tuple[int, int, int, int]:
    block_c = triton.next_power_of_2(C)
    block_p = max(1, TILE_ELEMENTS // block_c)
    per_prog = max(block_p, triton.cdiv(triton.cdiv(HW, max(1, TARGET_PROGRAMS // N)), block_p) * block_p)
    return block_c, block_p, per_prog, triton.cdiv(HW, per_prog)


def launch(kernels, x_BChw: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
           eps: float) -> torch.Tensor:
    """``silu(group_norm(x))`` for channels-last contiguous ``x``, through ``kernels``
    (``(channel_sums, norm_silu)``: the Triton kernels, or them wrapped for tracing)."""
    sums, apply = kernels
    N, C, H, W = x_BChw.shape
    HW, cpg = H * W, C // groups
    block_c, block_p, per_prog, T = _tiles(HW, C, N)
    warps = 8 if block_c * block_p >= 4096 else 4
    count = HW * cpg

    def group_stat(shift_NC: torch.Tensor | None) -> torch.Tensor:   # (N, C): the group's mean of x or (x - mean)^2
        part_NTC = torch.empty(N, T, C, dtype=torch.float32, device=x_BChw.device)
        sums[(N, T)](x_BChw, part_NTC if shift_NC is None else shift_NC, part_NTC, HW, C, T, per_prog,
                     BLOCK_P=block_p, BLOCK_C=block_c, CENTRED=shift_NC is not None, num_warps=warps)
        g_NG = part_NTC.sum(1).view(N, groups, cpg).sum(-1) / count
        return g_NG.repeat_interleave(cpg, dim=1).contiguous()

    mean_NC = group_stat(None)
    rstd_NC = torch.rsqrt(group_stat(mean_NC) + eps)
    a_NC = rstd_NC if weight is None else rstd_NC * weight.float()
    b_NC = torch.zeros_like(a_NC) if bias is None else bias.float().expand(N, C).contiguous()
    y = torch.empty_like(x_BChw, memory_format=torch.channels_last)
    apply[(N, triton.cdiv(HW, block_p))](x_BChw, mean_NC, a_NC.contiguous(), b_NC, y, HW, C,
                                         BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return y


if triton is not None:
    @torch.library.triton_op("varscale::group_norm_silu", mutates_args=())
    def _group_norm_silu_op(x_BChw: torch.Tensor, groups: int, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        wrap = torch.library.wrap_triton
        return launch((wrap(channel_sums_kernel), wrap(norm_silu_kernel)), x_BChw, groups, weight, bias, eps)


def fused_available(x_BChw: torch.Tensor, gn: nn.GroupNorm) -> bool:
    """Whether :func:`group_norm_silu` runs the kernels: CUDA, Triton, a 4-d input whose channels
    the GroupNorm normalises, at most 1024 of them (one padded row of a tile)."""
    return (triton is not None and x_BChw.is_cuda and x_BChw.dim() == 4 and x_BChw.shape[1] == gn.num_channels
            and gn.num_channels <= 1024)


def group_norm_silu(x_BChw: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """``silu(gn(x))``: the Triton kernels on CUDA (output channels-last, in ``x``'s dtype: the
    dtype the following autocast convolution reads), the eager modules elsewhere."""
    if fused_available(x_BChw, gn):
        return torch.ops.varscale.group_norm_silu(x_BChw.contiguous(memory_format=torch.channels_last),
                                                  gn.num_groups, gn.weight, gn.bias, gn.eps)
    return F.silu(gn(x_BChw))
