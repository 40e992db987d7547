"""A training block's LayerNorm + AdaLN modulation, with the gated residual add before it, forward
and backward as Triton kernels.

A block computes (:class:`varcore.var.AdaLNBlock`)::

    h1 = ln(x) * (1 + scale1) + shift1                       -> attention -> y1
    x' = x + drop_path(y1 * gamma1)
    h2 = ln(x') * (1 + scale2) + shift2                      -> FFN -> y2
    out = x' + drop_path(y2 * gamma2)

Compiled, inductor splits each LayerNorm + modulation into a forward kernel, a backward kernel and
separate reductions over the tokens for the modulation's gradients (``scale``, ``shift``, ``gamma``
are per image, so their gradients are sums over an image's tokens), and adds the stream's two
gradients in a kernel of its own. Here:

- :func:`ln_modulate` and :func:`add_ln_modulate` (``x'`` and ``h2``) are one forward kernel each;
  a program takes a tile of rows of one image, with that image's modulation vectors, so the
  stream is read once. They also write each row's mean and reciprocal standard deviation
  (8 bytes per token) for the backward.
- The backward is one kernel: a program per (image, chunk of its rows) recomputes the normalised
  rows from the stored stream, writes the stream's gradient (the residual's gradient added in) and
  the branch's, and keeps running sums of the gradients of ``scale``, ``shift`` and ``gamma`` in
  registers; the per-chunk sums are added up after it.
- :func:`var_forward` hands each block's last add (``out = x' + drop_path(y2 gamma2)``) to the next
  block's first LayerNorm, and the last block's to the head's, through :func:`add_ln_modulate`. So
  every stream tensor is written by one kernel and read by one, forward and backward.
- The branches' last linears (the output projection, fc2) leave their bias to the add kernel
  (:func:`block_forward`): the forward adds it to ``y``, and the backward sums its gradient (the
  branch's, over every token) from the rows it already reads. Otherwise that gradient is a
  reduction of its own over the branch's gradient, one pass over ``(tokens, C)`` per linear: at
  d20, B=64 on an H200 the step's kernels took 0.7 ms less (RESULTS.md round 22).

Roundings: the branch ``y * gamma`` (and the drop-path division) in float32 and the stream
rounded once to its dtype, as inductor's compiled composition does (eager rounds the product to
bf16 first); the LayerNorm in float32 over the stream as stored (bf16 under autocast); ``1 +
scale`` in float32, as inductor's composition computes it (eager rounds it to the modulation's
dtype, where in bf16 a scale under 2^-8, or 2^-9 if negative, is lost); and ``h`` rounded once to
``out_dtype`` (what the next autocast matmul casts to). Gradients are computed in float32 and
rounded once. In float32 the trainer's step through these kernels follows the plain path's loss
curve to 2e-6 over 30 steps at d16. In bf16 its curve drifts from float32's by 0.028 (0.030 since
the branch biases are added here, round 22), eager's composition by 0.037 and inductor's by
0.010: inductor drops the roundings to bf16 that fall inside the kernels it fuses
(``emulate_precision_casts`` off); with them kept it drifts by 0.039 and errs in every gradient
as eager and these kernels do. With a float32 stream
(``residual_dtype="float32"``) the kernels' curve drifts by 0.0007: the drift is the bf16
stream's, as the official code has it (RESULTS.md round 20). The ops are registered with their
backward (``varscale::adaln_*``), so compiled blocks call them inside their graphs; CPU tensors,
and layouts the kernels do not read, run the eager composition instead (:func:`fused_available`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..var import FFN, VAR, AdaLNBlock, AdaLNHead, DropPath, SelfAttention, modulate
from . import add_norm, qk_norm
from .fused_mlp import FusedFFN, fused_dtype, without_fc2_bias

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["ln_modulate", "add_ln_modulate", "block_forward", "head_forward", "var_forward", "fused_available",
           "KernelConfig"]


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the kernels: the forward takes ``fwd_rows`` rows of one image per program; the
    backward ``bwd_rows`` rows of one image per program, ``bwd_tile`` at a time (each program
    writes one partial sum per modulation gradient, so fewer rows mean more programs and more
    partial sums to add up). ``bwd_stages`` > 1 software-pipelines the backward's loop over its
    rows (``tl.range(num_stages=...)``: the next rows' loads in flight while one is computed). The
    tiles are the sweep's best over d20 (B=64) and d30 (B=32) on an H200
    (``benchmarks/norm_parts.py --sweep``, RESULTS.md rounds 17, 19 and 21): three stages took
    the pair of backward kernels from 0.453 to 0.351 ms at d20 (round 19) and 32 rows, 2 at a
    time, to 0.323 ms (d30: 0.237 -> 0.226 ms, round 21)."""

    fwd_rows: int = 2
    fwd_warps: int = 4
    bwd_rows: int = 32
    bwd_tile: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 3


KERNEL_CONFIG = KernelConfig()


if triton is not None:
    @triton.jit
    def adaln_fwd_kernel(x_ptr, y_ptr, bias_ptr, gate_ptr, keep_ptr, keep_p_ptr, scale_ptr, shift_ptr,
                         x_out_ptr, h_ptr, mean_ptr, rstd_ptr, l, C, gate_stride, scale_stride, shift_stride,
                         EPS: tl.constexpr, HAS_ADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """Rows ``[chunk * ROWS, (chunk + 1) * ROWS)`` of image ``b`` (a ``(ROWS, BLOCK_C)`` tile),
        with that image's modulation vectors; ``HAS_BIAS``: the branch is ``y + bias``, the bias
        rounded to ``y``'s dtype first (as autocast casts a linear's bias)."""
        b = tl.program_id(0)
        r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        ok = (r < l)[:, None] & col_ok[None, :]
        row = b.to(tl.int64) * l + r
        at = row[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0)
        if HAS_ADD:
            y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(y_ptr.dtype.element_ty)
                y += bias.to(tl.float32)[None, :]
            gate = tl.load(gate_ptr + b * gate_stride + cols, mask=col_ok, other=0.0)
            branch = y * gate.to(tl.float32)[None, :]
            if HAS_KEEP:
                branch = branch * tl.load(keep_ptr + b).to(tl.float32) / tl.load(keep_p_ptr).to(tl.float32)
            x = (x.to(tl.float32) + branch).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + at, x, mask=ok)
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=1) / C
        d = tl.where(ok, xf - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=1) / C + EPS)
        tl.store(mean_ptr + row, mean, mask=r < l)
        tl.store(rstd_ptr + row, rstd, mask=r < l)
        scale = tl.load(scale_ptr + b * scale_stride + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + b * shift_stride + cols, mask=col_ok, other=0.0)
        one_plus = scale.to(tl.float32) + 1.0
        h = (d * rstd[:, None]) * one_plus[None, :] + shift.to(tl.float32)[None, :]
        tl.store(h_ptr + at, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def adaln_bwd_kernel(g_h_ptr, g_res_ptr, x_ptr, y_ptr, bias_ptr, gate_ptr, keep_ptr, keep_p_ptr, scale_ptr,
                         mean_ptr, rstd_ptr, g_x_ptr, g_y_ptr, part_ptr, l, C, rows, B, chunks,
                         gate_stride, scale_stride,
                         HAS_ADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                         HAS_KEEP: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        """Rows ``[chunk * rows, (chunk + 1) * rows)`` of image ``b``, ``TILE`` at a time: the
        stream's gradient ``g_res + rstd (g - xhat mean(g xhat) - mean(g))`` with
        ``g = g_h (1 + scale)``, the branch's ``g_x gate keep / keep_p``, and this chunk's sums of
        ``g_h xhat`` (scale), ``g_h`` (shift), ``g_x (y + bias) keep / keep_p`` (gate) and
        ``g_x gate keep / keep_p`` (the bias, whose gradient is the branch's summed over every
        token), written to ``part[k, b, chunk]``."""
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        scale = tl.load(scale_ptr + b * scale_stride + cols, mask=col_ok, other=0.0)
        one_plus = (scale.to(tl.float32) + 1.0)[None, :]
        acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_ADD:
            gate_C = tl.load(gate_ptr + b * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
            gate = gate_C[None, :]
            if HAS_BIAS:
                bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
            if HAS_KEEP:
                gate_keep = tl.load(keep_ptr + b).to(tl.float32) / tl.load(keep_p_ptr).to(tl.float32)
            else:
                gate_keep = 1.0
        last = tl.minimum((chunk + 1) * rows, l)
        for first in tl.range(chunk * rows, last, TILE, num_stages=STAGES):
            r = first + tl.arange(0, TILE)
            r_ok = r < last
            ok = r_ok[:, None] & col_ok[None, :]
            row = b.to(tl.int64) * l + r
            at = row[:, None] * C + cols[None, :]
            g_h = tl.load(g_h_ptr + at, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row, mask=r_ok, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=r_ok, other=0.0)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = g_h * one_plus
            c1 = tl.sum(g * xhat, axis=1) / C
            c2 = tl.sum(g, axis=1) / C
            g_x = rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None])
            if HAS_RES:
                g_x += tl.load(g_res_ptr + at, mask=ok, other=0.0).to(tl.float32)
            tl.store(g_x_ptr + at, g_x.to(g_x_ptr.dtype.element_ty), mask=ok)
            acc_scale += tl.sum(g_h * xhat, axis=0)
            acc_shift += tl.sum(g_h, axis=0)
            if HAS_ADD:
                y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
                tl.store(g_y_ptr + at, (g_x * (gate * gate_keep)).to(g_y_ptr.dtype.element_ty), mask=ok)
                if HAS_BIAS:   # the branch as the forward computed it
                    y += bias[None, :]
                    acc_gx += tl.sum(g_x, axis=0)
                acc_gate += tl.sum(g_x * y, axis=0)
        part = (b * chunks + chunk).to(tl.int64) * C + cols
        plane = B * chunks * C
        tl.store(part_ptr + part, acc_scale, mask=col_ok)
        tl.store(part_ptr + plane + part, acc_shift, mask=col_ok)
        if HAS_ADD:
            if HAS_BIAS:
                tl.store(part_ptr + 3 * plane + part, acc_gx * gate_C * gate_keep, mask=col_ok)
            tl.store(part_ptr + 2 * plane + part, acc_gate * gate_keep, mask=col_ok)


def launch_forward(kernel, x_BlC, y_BlC, gate_B1C, keep_B, keep_p, scale_B1C, shift_B1C, eps: float,
                   out_dtype: torch.dtype, config: KernelConfig = KERNEL_CONFIG, bias_C=None):
    """Run the forward ``kernel`` (the Triton kernel, or it wrapped for tracing) over every row:
    ``(x_out, h, mean, rstd)``; without ``y`` (no residual add) ``x_out`` is an empty tensor.
    ``keep_B`` (float 0/1 per image) and ``keep_p`` (0-dim) are the drop-path mask, or ``None``;
    ``bias_C`` (contiguous, or ``None``) is added to ``y``."""
    B, l, C = x_BlC.shape
    has_add, has_keep, has_bias = y_BlC is not None, keep_B is not None, bias_C is not None
    dt = torch.promote_types(x_BlC.dtype, y_BlC.dtype) if has_add else x_BlC.dtype
    x_out = torch.empty(x_BlC.shape if has_add else (0,), dtype=dt, device=x_BlC.device)
    h_BlC = torch.empty(x_BlC.shape, dtype=out_dtype, device=x_BlC.device)
    mean_N = torch.empty(B * l, dtype=torch.float32, device=x_BlC.device)
    rstd_N = torch.empty_like(mean_N)
    none = x_BlC   # a pointer the kernel never reads (its branch is compiled out)
    grid = (B, triton.cdiv(l, config.fwd_rows))
    kernel[grid](x_BlC, y_BlC if has_add else none, bias_C if has_bias else none, gate_B1C if has_add else none,
                 keep_B if has_keep else none, keep_p if has_keep else none, scale_B1C, shift_B1C,
                 x_out if has_add else none, h_BlC, mean_N, rstd_N, l, C, gate_B1C.stride(0) if has_add else 0,
                 scale_B1C.stride(0), shift_B1C.stride(0), EPS=eps, HAS_ADD=has_add, HAS_BIAS=has_bias,
                 HAS_KEEP=has_keep, ROWS=config.fwd_rows, BLOCK_C=triton.next_power_of_2(C),
                 num_warps=config.fwd_warps)
    return x_out, h_BlC, mean_N, rstd_N


def launch_backward(kernel, g_h_BlC, g_res_BlC, x_BlC, y_BlC, gate_B1C, keep_B, keep_p, scale_B1C, mean_N, rstd_N,
                    config: KernelConfig = KERNEL_CONFIG, bias_C=None):
    """Run the backward ``kernel``: ``(g_x, g_y, g_gate, g_scale, g_shift, g_bias)``, the
    modulation's gradients ``(B, 1, C)`` and the bias's ``(C,)`` in their own dtypes; without
    ``y`` ``g_y`` and ``g_gate`` are empty, without ``bias_C`` ``g_bias`` is."""
    B, l, C = x_BlC.shape
    has_add, has_res, has_keep = y_BlC is not None, g_res_BlC is not None, keep_B is not None
    has_bias = has_add and bias_C is not None
    chunks = triton.cdiv(l, config.bwd_rows)
    g_x = torch.empty(x_BlC.shape, dtype=x_BlC.dtype, device=x_BlC.device)
    g_y = torch.empty(y_BlC.shape if has_add else (0,), dtype=y_BlC.dtype if has_add else x_BlC.dtype,
                      device=x_BlC.device)
    part = torch.empty(4 if has_bias else 3 if has_add else 2, B, chunks, C, dtype=torch.float32,
                       device=x_BlC.device)
    none = x_BlC
    kernel[(B, chunks)](g_h_BlC, g_res_BlC if has_res else none, x_BlC, y_BlC if has_add else none,
                        bias_C if has_bias else none, gate_B1C if has_add else none, keep_B if has_keep else none,
                        keep_p if has_keep else none, scale_B1C, mean_N, rstd_N, g_x, g_y if has_add else none, part,
                        l, C, config.bwd_rows, B, chunks, gate_B1C.stride(0) if has_add else 0, scale_B1C.stride(0),
                        HAS_ADD=has_add, HAS_BIAS=has_bias, HAS_RES=has_res, HAS_KEEP=has_keep, TILE=config.bwd_tile,
                        BLOCK_C=triton.next_power_of_2(C), STAGES=config.bwd_stages, num_warps=config.bwd_warps)
    sums_KB1C = part[:3].sum(2, keepdim=True)   # each gradient its own tensor (an op's outputs may not alias)
    g_scale = sums_KB1C[0].to(scale_B1C.dtype, copy=True)
    g_shift = sums_KB1C[1].to(scale_B1C.dtype, copy=True)
    g_gate = sums_KB1C[2].to(gate_B1C.dtype, copy=True) if has_add else g_scale.new_empty(0)
    g_bias = part[3].sum((0, 1)).to(bias_C.dtype) if has_bias else g_scale.new_empty(0)
    return g_x, g_y, g_gate, g_scale, g_shift, g_bias


# ---- the ops, with their backward --------------------------------------------------------------
if triton is not None:
    @torch.library.triton_op("varscale::adaln_ln_fwd", mutates_args=())
    def _ln_fwd(x_BlC: torch.Tensor, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor, eps: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, h, mean, rstd = launch_forward(torch.library.wrap_triton(adaln_fwd_kernel), x_BlC, None, None, None, None,
                                          scale_B1C, shift_B1C, eps, out_dtype)
        return h, mean, rstd

    @torch.library.triton_op("varscale::adaln_add_ln_fwd", mutates_args=())
    def _add_ln_fwd(x_BlC: torch.Tensor, y_BlC: torch.Tensor, gate_B1C: torch.Tensor, keep_B: torch.Tensor | None,
                    keep_p: torch.Tensor | None, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor, eps: float,
                    out_dtype: torch.dtype, bias_C: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_forward(torch.library.wrap_triton(adaln_fwd_kernel), x_BlC, y_BlC, gate_B1C, keep_B, keep_p,
                              scale_B1C, shift_B1C, eps, out_dtype, bias_C=bias_C)

    @torch.library.triton_op("varscale::adaln_ln_bwd", mutates_args=())
    def _ln_bwd(g_h_BlC: torch.Tensor, x_BlC: torch.Tensor, scale_B1C: torch.Tensor, mean_N: torch.Tensor,
                rstd_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g_x, _, _, g_scale, g_shift, _ = launch_backward(torch.library.wrap_triton(adaln_bwd_kernel), g_h_BlC, None,
                                                         x_BlC, None, None, None, None, scale_B1C, mean_N, rstd_N)
        return g_x, g_scale, g_shift

    @torch.library.triton_op("varscale::adaln_add_ln_bwd", mutates_args=())
    def _add_ln_bwd(g_h_BlC: torch.Tensor, g_res_BlC: torch.Tensor, x_BlC: torch.Tensor, y_BlC: torch.Tensor,
                    gate_B1C: torch.Tensor, keep_B: torch.Tensor | None, keep_p: torch.Tensor | None,
                    scale_B1C: torch.Tensor, mean_N: torch.Tensor, rstd_N: torch.Tensor,
                    bias_C: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_backward(torch.library.wrap_triton(adaln_bwd_kernel), g_h_BlC, g_res_BlC, x_BlC, y_BlC,
                               gate_B1C, keep_B, keep_p, scale_B1C, mean_N, rstd_N, bias_C=bias_C)

    def _ln_setup(ctx, inputs, output):
        x_BlC, scale_B1C, _, _, _ = inputs
        _, mean_N, rstd_N = output
        ctx.save_for_backward(x_BlC, scale_B1C, mean_N, rstd_N)

    def _ln_backward(ctx, g_h_BlC, _g_mean, _g_rstd):
        x_BlC, scale_B1C, mean_N, rstd_N = ctx.saved_tensors
        g_x, g_scale, g_shift = torch.ops.varscale.adaln_ln_bwd(g_h_BlC.contiguous(), x_BlC, scale_B1C, mean_N,
                                                                rstd_N)
        return g_x, g_scale, g_shift, None, None

    def _add_ln_setup(ctx, inputs, output):
        _, y_BlC, gate_B1C, keep_B, keep_p, scale_B1C, _, _, _, bias_C = inputs
        x_out, _, mean_N, rstd_N = output
        ctx.save_for_backward(x_out, y_BlC, gate_B1C, keep_B, keep_p, scale_B1C, mean_N, rstd_N, bias_C)

    def _add_ln_backward(ctx, g_xout_BlC, g_h_BlC, _g_mean, _g_rstd):
        x_out, y_BlC, gate_B1C, keep_B, keep_p, scale_B1C, mean_N, rstd_N, bias_C = ctx.saved_tensors
        g_x, g_y, g_gate, g_scale, g_shift, g_bias = torch.ops.varscale.adaln_add_ln_bwd(
            g_h_BlC.contiguous(), g_xout_BlC.contiguous(), x_out, y_BlC, gate_B1C, keep_B, keep_p, scale_B1C,
            mean_N, rstd_N, bias_C)
        return g_x, g_y, g_gate, None, None, g_scale, g_shift, None, None, None if bias_C is None else g_bias

    _ln_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)
    _add_ln_fwd.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


# ---- when the kernels run, and the eager composition otherwise ---------------------------------
def fused_available(x_BlC: torch.Tensor, ln: nn.LayerNorm, *vectors_B1C: torch.Tensor) -> bool:
    """Whether the kernels run: the sampling kernel's conditions (:mod:`varcore.fast.add_norm`: a
    CUDA stream, Triton importable, a LayerNorm over the last dimension without affine
    parameters, ``(B, 1, C)`` modulation vectors with a contiguous last dimension)."""
    return add_norm.fused_available(x_BlC, ln) and all(add_norm.modulation_ok(v, x_BlC) for v in vectors_B1C)


def ln_modulate(x_BlC: torch.Tensor, ln: nn.LayerNorm, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor
                ) -> torch.Tensor:
    """``modulate(ln(x), scale, shift)``: the forward and backward kernels where they run."""
    if not fused_available(x_BlC, ln, scale_B1C, shift_B1C):
        return modulate(ln(x_BlC), scale_B1C, shift_B1C)
    h, _, _ = torch.ops.varscale.adaln_ln_fwd(x_BlC.contiguous(), scale_B1C, shift_B1C, ln.eps, fused_dtype(x_BlC))
    return h


def add_ln_modulate(x_BlC: torch.Tensor, y_BlC: torch.Tensor, gate_B1C: torch.Tensor, keep_B11: torch.Tensor | None,
                    keep_p: torch.Tensor, ln: nn.LayerNorm, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor,
                    bias_C: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = x + drop_path((y + bias) * gate)`` and ``modulate(ln(x), scale, shift)``, with the
    drop-path mask ``keep_B11`` already drawn (:meth:`varcore.var.DropPath.keep_mask`; ``None``:
    all kept) and ``bias_C`` the branch's last linear's bias (``None``: ``y`` has it): the kernels
    where they run (``y`` is not changed in place there), eager's composition elsewhere."""
    if not fused_available(x_BlC, ln, gate_B1C, scale_B1C, shift_B1C):
        y_BlC = y_BlC if bias_C is None else y_BlC + bias_C.to(y_BlC.dtype)
        x_BlC = x_BlC + DropPath.apply_mask(y_BlC.mul_(gate_B1C), keep_B11, keep_p)
        return x_BlC, modulate(ln(x_BlC), scale_B1C, shift_B1C)
    keep_B = None if keep_B11 is None else keep_B11.view(-1).float()
    x_out, h, _, _ = torch.ops.varscale.adaln_add_ln_fwd(x_BlC.contiguous(), y_BlC.contiguous(), gate_B1C, keep_B,
                                                         None if keep_B is None else keep_p, scale_B1C, shift_B1C,
                                                         ln.eps, fused_dtype(x_BlC),
                                                         None if bias_C is None else bias_C.contiguous())
    return x_out, h


# ---- the model, its blocks and its head through them (an execution plan sets these forwards) ---
# A block hands its last residual add to the next LayerNorm: ``Pending`` is that add's branch,
# gate, drop-path mask, keep probability and bias (``None``: in the branch), so each stream tensor
# is made by one kernel and read by one (no separate add kernels, forward or backward, and no
# autograd sum of the stream's gradient).
Pending = tuple


def _stream_in(block_ln: nn.LayerNorm, x_BLC: torch.Tensor, pending: Pending | None, scale_B1C: torch.Tensor,
               shift_B1C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream after the previous block's pending add, and its LayerNorm + modulation."""
    if pending is None:
        return x_BLC, ln_modulate(x_BLC, block_ln, scale_B1C, shift_B1C)
    y_BLC, gate_B1C, keep_B11, keep_p, bias_C = pending
    return add_ln_modulate(x_BLC, y_BLC, gate_B1C, keep_B11, keep_p, block_ln, scale_B1C, shift_B1C, bias_C)


def _bias_folds(block: AdaLNBlock, x_BLC: torch.Tensor, *vectors_B1C: torch.Tensor) -> bool:
    """Whether the block's output projection and fc2 leave their bias to the add kernels (which
    add it, and sum its gradient from the rows they already read, instead of a reduction of its
    own over the branch's gradient): where the kernels run and no dropout follows the linear."""
    inactive = all(d.p == 0 or not d.training for d in (block.attn.proj_drop, block.ffn.drop))
    return inactive and fused_available(x_BLC, block.ln, *vectors_B1C)


def _attention_branch(attn: SelfAttention, h_BLC: torch.Tensor, kv_cache, fold: bool):
    """The attention branch and the bias it leaves out (``None``: none left out)."""
    if not fold:
        return qk_norm.attention_forward(attn, h_BLC, kv_cache), None
    o_BHLc = attn.heads(*qk_norm.qkv_heads(attn, h_BLC), kv_cache)
    return F.linear(attn.merge_heads(o_BHLc), attn.proj.weight), attn.proj.bias


def _ffn_branch(ffn: FFN, h_BLC: torch.Tensor, fold: bool):
    """The FFN branch and the bias it leaves out (``None``: none left out)."""
    if not fold:
        return ffn(h_BLC), None
    y_BLC = ffn(h_BLC, fc2_bias=False) if isinstance(ffn, FusedFFN) else without_fc2_bias(ffn, h_BLC)
    return y_BLC, ffn.fc2.bias


def block_forward(block: AdaLNBlock, x_BLC: torch.Tensor, cond_BD: torch.Tensor, kv_cache=None,
                  pending: Pending | None = None, defer: bool = False):
    """:meth:`varcore.var.AdaLNBlock.forward` with the LayerNorms, and the attention's q/k
    normalisation (:mod:`varcore.fast.qk_norm`), through the kernels: the same function, the same
    random draws in the same order. ``pending``: the previous block's last
    add, done here; ``defer``: return ``(x, pending)``, this block's last add left to the next.
    Where the kernels run, the output projection's and fc2's biases are added by them
    (:func:`_bias_folds`)."""
    gamma1, gamma2, scale1, scale2, shift1, shift2 = block.modulation(cond_BD)
    x_BLC, h_BLC = _stream_in(block.ln, x_BLC, pending, scale1, shift1)
    fold = _bias_folds(block, x_BLC, gamma1, gamma2, scale2, shift2)
    y_BLC, bias_C = _attention_branch(block.attn, h_BLC, kv_cache, fold)
    x_BLC, h_BLC = add_ln_modulate(x_BLC, y_BLC, gamma1, block.drop_path.keep_mask(y_BLC), block.drop_path.keep_p,
                                   block.ln, scale2, shift2, bias_C)
    y_BLC, bias_C = _ffn_branch(block.ffn, h_BLC, fold and defer)
    if defer:
        return x_BLC, (y_BLC, gamma2, block.drop_path.keep_mask(y_BLC), block.drop_path.keep_p, bias_C)
    return x_BLC + block.drop_path(y_BLC.mul_(gamma2))


def head_forward(head: AdaLNHead, x_BLC: torch.Tensor, cond_BC: torch.Tensor, pending: Pending | None = None
                 ) -> torch.Tensor:
    """:meth:`varcore.var.AdaLNHead.forward` with its LayerNorm through the kernels (``pending``:
    the last block's last add, done here)."""
    scale, shift = head.ada_lin(cond_BC).view(-1, 1, 2, x_BLC.shape[-1]).unbind(2)
    return head.head(_stream_in(head.ln, x_BLC, pending, scale, shift)[1])


def var_forward(model: VAR, label_B: torch.Tensor, x_BlCvae: torch.Tensor) -> torch.Tensor:
    """:meth:`varcore.var.VAR.forward` with each block's last residual add deferred into the next
    LayerNorm kernel (the blocks' and head's forwards must be :func:`block_forward` and
    :func:`head_forward`, as :func:`varcore.fast.apply_plan` sets them)."""
    x_BLC, cond_BC, cond_BD = model.embed(label_B, x_BlCvae)
    pending = None
    for block in model.blocks:
        x_BLC, pending = block(x_BLC, cond_BD, pending=pending, defer=True)
    return model.head(x_BLC, cond_BC, pending=pending)
