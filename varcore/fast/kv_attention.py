"""One scale's queries attending over the KV cache, as one Triton kernel, for sampling.

At each scale of sampling, every block attends the scale's ``l`` queries to the ``S`` cached
keys of the scales so far (``S = l + everything before``), without a mask: the cache holds
exactly what the scale may see. Head dim is 64 at every depth. SDPA on the cache views runs
cuDNN's kernels there: over a d24 batch of 64 on an H200, 5.4 TFLOP in 29.9 ms (181 TFLOP/s, the
matmuls run at 690), of which 1.3 ms per scale for the tiny scales 2-6. This kernel takes 22.5
ms (RESULTS.md round 16).

The kernel is FlashAttention's forward: one program per ``BLOCK_M`` queries of one (image,
head), the keys and values streamed in ``BLOCK_N``-token tiles with the online softmax, the
scores and their sums in float32, the probabilities rounded to the values' dtype for the second
product (as the flash kernels of SDPA do), the output rounded once. It reads queries, keys and
values in the layouts the block makes them (``(B, l, H, hd)`` projections and ``(B, L, H, hd)``
caches seen as ``(B, H, ., hd)``) and writes the output in ``(B, l, H, hd)`` memory, the layout
the output projection reads, so no transposing copy is made on either side.

:func:`kv_attention` runs it for 16-bit CUDA tensors (registered as ``varscale::kv_attention`` so
``torch.compile`` graphs call it) and SDPA elsewhere; :class:`KernelKVCache` is the KV cache whose
``attend`` uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..var import KVCache

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["kv_attention", "KernelKVCache", "kernel_available", "config_for", "KERNEL_CONFIGS"]

# Tiles and warps of the kernel (head dim 64) by the number of queries ``l`` (up to ``max_l``), as
# `benchmarks/sample_parts.py --kv-attention --kv-sweep` measured them on an H200 (RESULTS.md
# round 16): small scales run fastest with narrow key tiles, the last scale with 128 queries
# over two warp groups. In the sampling engine's graph of the middle scales (a dynamic ``l``) the
# choice is a guard: scales 2..7 and 8..9 compile to a graph each.
KERNEL_CONFIGS: tuple[tuple[int | None, dict], ...] = (
    (64, {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}),
    (192, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
    (None, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}),
)
LOG2E = 1.4426950408889634


if triton is not None:
    @triton.jit
    def _tile(q, k_ptrs, v_ptrs, m_i, l_i, acc, seen, QK_SCALE_LOG2E: tl.constexpr, MASKED: tl.constexpr):
        """One tile of keys and values into the running max ``m_i``, sum ``l_i`` and output ``acc``
        (``MASKED``: the last, partial tile, whose keys past ``S`` are loaded as zeros and given no weight)."""
        if MASKED:
            k = tl.load(k_ptrs, mask=seen[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=seen[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k)) * QK_SCALE_LOG2E
        if MASKED:
            s = tl.where(seen[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def kv_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, l, S, H,
                            sq_b, sq_h, sq_l, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_l,
                            QK_SCALE_LOG2E: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """Queries ``[BLOCK_M * program_id(0), + BLOCK_M)`` of (image, head) ``program_id(1)``
        against keys ``[0, S)``: whole tiles without bounds checks, then the partial one; softmax
        by exp2 of scores pre-scaled by ``log2(e)``."""
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HD)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :], mask=rows[:, None] < l,
                    other=0.0)
        k_ptrs = k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_s + dims[None, :]
        v_ptrs = v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_s + dims[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        whole = S // BLOCK_N * BLOCK_N
        for start in range(0, whole, BLOCK_N):
            m_i, l_i, acc = _tile(q, k_ptrs + start * sk_s, v_ptrs + start * sv_s, m_i, l_i, acc, cols < BLOCK_N,
                                  QK_SCALE_LOG2E, False)
        if whole < S:
            m_i, l_i, acc = _tile(q, k_ptrs + whole * sk_s, v_ptrs + whole * sv_s, m_i, l_i, acc, whole + cols < S,
                                  QK_SCALE_LOG2E, True)
        o = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_l + dims[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=rows[:, None] < l)


def config_for(l: int) -> dict:
    """The kernel's tiles and warps for ``l`` queries (:data:`KERNEL_CONFIGS`)."""
    for max_l, config in KERNEL_CONFIGS:
        if max_l is None or l <= max_l:
            return config
    raise AssertionError("KERNEL_CONFIGS ends with a catch-all")


def launch(kernel, q_BHlc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, scale: float | None,
           config: dict | None = None) -> torch.Tensor:
    """Run ``kernel`` (the Triton kernel, or it wrapped for tracing); returns ``(B, H, l, hd)``
    laid out ``(B, l, H, hd)`` in memory. Inputs may be any views with a contiguous last dimension.
    ``config``: tiles and warps (None: :func:`config_for` ``l``)."""
    B, H, l, c = q_BHlc.shape
    S = k_BHSc.shape[2]
    cfg = config or config_for(l)
    o_BHlc = torch.empty_strided((B, H, l, c), (l * H * c, c, H * c, 1), dtype=q_BHlc.dtype, device=q_BHlc.device)
    qk_scale = 1.0 / math.sqrt(c) if scale is None else float(scale)
    grid = (triton.cdiv(l, cfg["BLOCK_M"]), B * H)
    kernel[grid](q_BHlc, k_BHSc, v_BHSc, o_BHlc, l, S, H,
                 q_BHlc.stride(0), q_BHlc.stride(1), q_BHlc.stride(2),
                 k_BHSc.stride(0), k_BHSc.stride(1), k_BHSc.stride(2),
                 v_BHSc.stride(0), v_BHSc.stride(1), v_BHSc.stride(2),
                 o_BHlc.stride(0), o_BHlc.stride(1), o_BHlc.stride(2),
                 QK_SCALE_LOG2E=qk_scale * LOG2E, HD=c, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o_BHlc


if triton is not None:
    @torch.library.triton_op("varscale::kv_attention", mutates_args=())
    def _kv_attention_op(q_BHlc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor,
                         scale: float | None) -> torch.Tensor:
        return launch(torch.library.wrap_triton(kv_attention_kernel), q_BHlc, k_BHSc, v_BHSc, scale)


def kernel_available(q_BHlc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor) -> bool:
    """Whether :func:`kv_attention` runs the kernel: CUDA, Triton importable, one 16-bit dtype,
    a power-of-two head dim of at least 16, contiguous last dimensions, and at most 65535
    (image, head) pairs (the grid's second dimension)."""
    B, H, _, c = q_BHlc.shape
    return (triton is not None and q_BHlc.is_cuda and q_BHlc.dtype in (torch.bfloat16, torch.float16)
            and k_BHSc.dtype == q_BHlc.dtype == v_BHSc.dtype and c >= 16 and c & (c - 1) == 0
            and all(t.stride(-1) == 1 for t in (q_BHlc, k_BHSc, v_BHSc)) and B * H <= 65535)


def kv_attention(q_BHlc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor,
                 scale: float | None) -> torch.Tensor:
    """``softmax(q k^T scale) v`` without a mask: the kernel where :func:`kernel_available`, SDPA elsewhere."""
    if kernel_available(q_BHlc, k_BHSc, v_BHSc):
        return torch.ops.varscale.kv_attention(q_BHlc, k_BHSc, v_BHSc, scale)
    return F.scaled_dot_product_attention(q_BHlc, k_BHSc, v_BHSc, scale=scale)


class KernelKVCache(KVCache):
    """The compiled sampling engine's KV cache: appends as :class:`varcore.var.KVCache` (traceable,
    so inductor writes keys and values into their slots), attention through :func:`kv_attention`."""

    def attend(self, q_BHlc, k_BHlc, v_BHlc, scale: float | None) -> torch.Tensor:
        k_BHSc, v_BHSc = self.append(k_BHlc, v_BHlc)
        return kv_attention(q_BHlc, k_BHSc, v_BHSc, scale)
