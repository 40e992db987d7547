"""A block's residual add, LayerNorm and AdaLN modulation as one Triton kernel, for sampling.

Each block of the compiled sampling engine starts with two of these: the previous branch's
gated residual add into the float32 stream, then ``modulate(ln(x), scale, shift)`` as the input
of the next matmul (:func:`varcore.fast.static_sampler.deferred_block`). Inductor fuses each pair
into one looped reduction kernel (each row read twice), compiled for a dynamic token count: at
d24, B=64 on an H200 the two kernels moved their 77 GB per batch at 2.2 and 3.5 TB/s (29 ms,
r13-4), and one of them took twice as long when another case had run first in the same process
(r12-5). Here each program holds one row in registers, so the stream is read once and written
once (3.8 TB/s at d24, r15-2):

    x_out = x + (y * gate)            # the branch's product rounded to its dtype, as eager
    h     = ln(x_out) * (1 + scale) + shift,   written in ``out_dtype``

with the plain path's roundings: the product ``y * gate`` and ``1 + scale`` in the branch's and
the modulation's dtype (bf16 under autocast), the LayerNorm in float32, ``h`` rounded once to
``out_dtype`` (what the following autocast matmul reads). Only the LayerNorm's summation order
differs, so ``x_out`` is the eager value bit for bit and ``h`` is within one rounding step of it.

:func:`add_ln_modulate` runs the kernel for CUDA tensors (registered as ``varscale::add_ln_modulate``
so ``torch.compile`` graphs call it) and the eager composition elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..var import modulate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["add_ln_modulate", "fused_available", "modulation_ok"]


if triton is not None:
    @triton.jit
    def add_ln_modulate_kernel(x_ptr, y_ptr, gate_ptr, scale_ptr, shift_ptr, x_out_ptr, h_ptr,
                               l, C, gate_stride, scale_stride, shift_stride, EPS: tl.constexpr, BLOCK_C: tl.constexpr):
        """One row of ``(B*l, C)``: the modulation vectors are those of batch row ``row // l``."""
        row = tl.program_id(0).to(tl.int64)
        b = row // l
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        at = row * C + cols
        y = tl.load(y_ptr + at, mask=mask, other=0.0)
        gate = tl.load(gate_ptr + b * gate_stride + cols, mask=mask, other=0.0)
        branch = (y.to(tl.float32) * gate.to(tl.float32)).to(y.dtype)
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) + branch.to(tl.float32)
        tl.store(x_out_ptr + at, x.to(x_out_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=0) / C
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / C + EPS)
        scale = tl.load(scale_ptr + b * scale_stride + cols, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + b * shift_stride + cols, mask=mask, other=0.0)
        one_plus = (scale.to(tl.float32) + 1.0).to(scale.dtype).to(tl.float32)
        h = (d * rstd) * one_plus + shift.to(tl.float32)
        tl.store(h_ptr + at, h.to(h_ptr.dtype.element_ty), mask=mask)


def launch(kernel, x_BlC: torch.Tensor, y_BlC: torch.Tensor, gate_B1C: torch.Tensor, scale_B1C: torch.Tensor,
           shift_B1C: torch.Tensor, eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``kernel`` (the Triton kernel, or it wrapped for tracing) over every row of ``x``;
    returns ``(x_out, h)``. ``x``/``y`` contiguous ``(B, l, C)``, modulation vectors ``(B, 1, C)``
    with a contiguous last dimension (views of one AdaLN projection are fine)."""
    B, l, C = x_BlC.shape
    x_out = torch.empty(x_BlC.shape, dtype=torch.promote_types(x_BlC.dtype, y_BlC.dtype), device=x_BlC.device)
    h_BlC = torch.empty(x_BlC.shape, dtype=out_dtype, device=x_BlC.device)
    block_c = triton.next_power_of_2(C)
    kernel[(B * l,)](x_BlC, y_BlC, gate_B1C, scale_B1C, shift_B1C, x_out, h_BlC, l, C,
                     gate_B1C.stride(0), scale_B1C.stride(0), shift_B1C.stride(0),
                     EPS=eps, BLOCK_C=block_c, num_warps=min(max(block_c // 256, 1), 8))
    return x_out, h_BlC


if triton is not None:
    @torch.library.triton_op("varscale::add_ln_modulate", mutates_args=())
    def _add_ln_modulate_op(x_BlC: torch.Tensor, y_BlC: torch.Tensor, gate_B1C: torch.Tensor,
                            scale_B1C: torch.Tensor, shift_B1C: torch.Tensor, eps: float,
                            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return launch(torch.library.wrap_triton(add_ln_modulate_kernel), x_BlC, y_BlC, gate_B1C, scale_B1C,
                      shift_B1C, eps, out_dtype)


def fused_available(x_BlC: torch.Tensor, ln: nn.LayerNorm) -> bool:
    """Whether :func:`add_ln_modulate` runs the kernel for this stream and LayerNorm: a CUDA
    tensor, Triton importable, a LayerNorm over the last dimension without affine parameters."""
    return (triton is not None and x_BlC.is_cuda and ln.weight is None and ln.bias is None
            and tuple(ln.normalized_shape) == (x_BlC.shape[-1],))


def modulation_ok(v_B1C: torch.Tensor, x_BlC: torch.Tensor) -> bool:
    """Whether the kernels read ``v`` as a modulation vector of ``x``: ``(B, 1, C)`` with a
    contiguous last dimension (views of one AdaLN projection are fine)."""
    return v_B1C.dim() == 3 and v_B1C.shape[1] == 1 and v_B1C.shape[2] == x_BlC.shape[2] and v_B1C.stride(2) == 1 \
        and v_B1C.shape[0] == x_BlC.shape[0]


def add_ln_modulate(x_BlC: torch.Tensor, y_BlC: torch.Tensor, gate_B1C: torch.Tensor, ln: nn.LayerNorm,
                    scale_B1C: torch.Tensor, shift_B1C: torch.Tensor,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = x + y * gate`` and ``modulate(ln(x), scale, shift)``: one kernel on CUDA (``h`` in
    ``out_dtype``, the dtype the next autocast matmul casts to), the eager composition
    elsewhere (``h`` then in the stream's dtype, ``out_dtype`` unused) or when a modulation
    vector is not laid out as the kernel reads it."""
    if fused_available(x_BlC, ln) and all(modulation_ok(v, x_BlC) for v in (gate_B1C, scale_B1C, shift_B1C)):
        return torch.ops.varscale.add_ln_modulate(x_BlC.contiguous(), y_BlC.contiguous(), gate_B1C, scale_B1C,
                                                  shift_B1C, ln.eps, out_dtype or x_BlC.dtype)
    x_BlC = x_BlC + y_BlC.mul(gate_B1C)
    return x_BlC, modulate(ln(x_BlC), scale_B1C, shift_B1C)
