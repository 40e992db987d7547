"""A training block's query/key L2 normalisation, with the projection's biases and the per-head
temperature, forward and backward as Triton kernels.

Attention in VAR is cosine attention (:class:`varcore.var.SelfAttention`)::

    q, k, v = split(x W_qkv + [q_bias, 0, v_bias])          per head, hd wide
    q' = q / |q| * temperature_h,   k' = k / |k|            -> attention(q', k', v)

Compiled, inductor fuses the normalisation into flex attention's forward, recomputes the norms for
the backward in kernels of its own, and computes the gradient in six more kernels: the q and k
normalisation backwards, the temperature's sum over the tokens, and the bias sums over the
stacked ``(q, k, v)`` gradient (round 17's d20 profile: 12.9 ms of a 238.8 ms step). Here:

- :func:`qkv_heads` runs the projection without its bias (a plain matmul), then one forward kernel:
  a program takes a run of tokens and, per token, adds the biases, normalises each head of ``q``
  and ``k`` in float32, multiplies ``q`` by its head's temperature, and writes ``q'``, ``k'`` and
  ``v`` (each ``(B, L, H, hd)``, the projection's dtype) and the reciprocal norms (8 bytes per head
  and token) for the backward. ``v`` is written, not viewed, so that its gradient comes to the
  backward kernel, which writes the projection's whole gradient in one pass.
- The backward is one kernel: per token it recomputes the normalised rows from the projection's
  output (kept from the forward, with the reciprocal norms) exactly as the forward computed them
  in float32, writes ``(B, L, 3C)``: the normalisation's gradient
  ``(g - xhat (xhat . g)) / |x|`` for q and k (``g / EPS`` where the norm's floor was taken) and
  v's gradient as it comes, and keeps running float32 sums, over its tokens, of the q and v
  biases' gradients and of ``g_q' xhat`` per head (the temperature's); the per-program sums are
  added up after it.

Roundings: the biases are added, in float32, to the projection's output as stored (the plain path
adds them, rounded to the autocast dtype, in the matmul's float32 epilogue, so its ``q`` and ``v``
are rounded once after the add, ours before and after it); the norms,
the normalisation and the products are float32 and each output is rounded once to the
projection's dtype. The gradients are float32 and rounded once. The backward's normalised rows
are the forward's float32 ones, as the plain path's recomputation has them, not the outputs read
back (round 18): rounded to bf16 (``2^-9`` relative), the projection ``g - xhat (xhat . g)``
keeps that error times the gradient's radial part, about half the kept part where the radial
part is 300 times it (the tests). In the d16 training run of ``benchmarks/grad_error.py`` the
gradients did not change measurably with it (RESULTS.md round 19: the radial parts there are
small). Keeping the projection's output costs ``3C`` values per token and block of memory (4.5
GiB more peak at d24, B=32) and no traffic: the backward reads it in place of ``q'`` and
``k'``. The ops are registered with their backward (``varscale::qkv_norm_*``), so compiled
blocks call them inside their graphs; CPU tensors, and attention without the L2 normalisation,
run :meth:`varcore.var.SelfAttention.qkv_heads` instead (:func:`fused_available`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..var import KVCache, SelfAttention

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["qkv_heads", "attention_forward", "fused_available", "KernelConfig", "EPS"]

EPS = 1e-12   # F.normalize's floor on the norm, as the plain path uses


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the kernels: the forward takes ``fwd_rows`` tokens per program, the backward
    ``bwd_rows`` (each backward program writes one partial sum per bias and temperature gradient,
    so fewer tokens mean more programs and more partial sums to add up), one token at a time;
    ``bwd_stages`` > 1 software-pipelines that loop (``tl.range(num_stages=...)``). The defaults
    are the sweep's best at d20 (B=64) on an H200 (``benchmarks/norm_parts.py --part qk
    --sweep``, RESULTS.md round 18; three stages, round 19: the backward 0.353 -> 0.253 ms)."""

    fwd_rows: int = 1
    fwd_warps: int = 4
    bwd_rows: int = 16
    bwd_warps: int = 8
    bwd_stages: int = 3


KERNEL_CONFIG = KernelConfig()


if triton is not None:
    @triton.jit
    def _head_tile(H, HD, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One token's ``(BLOCK_H, BLOCK_D)`` tile of heads x head dims: the head and dim
        indices, which heads and which elements are real, and each element's column in a row."""
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        head_ok = heads < H
        ok = head_ok[:, None] & (dims < HD)[None, :]
        return heads, dims, head_ok, ok, heads[:, None] * HD + dims[None, :]

    @triton.jit
    def qkv_norm_fwd_kernel(qkv_ptr, q_bias_ptr, v_bias_ptr, temp_ptr, q_ptr, k_ptr, v_ptr, rnorm_ptr, N, H, HD,
                            rows, EPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tokens ``[p * rows, (p + 1) * rows)`` (masked past ``N``), one ``(BLOCK_H, BLOCK_D)``
        tile (heads x head dims) of each of q, k and v at a time."""
        heads, dims, head_ok, ok, col = _head_tile(H, HD, BLOCK_H, BLOCK_D)
        C = H * HD
        q_bias = tl.load(q_bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
        v_bias = tl.load(v_bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
        temp = tl.load(temp_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
        first = tl.program_id(0).to(tl.int64) * rows
        for i in range(rows):
            n = first + i
            tok_ok = ok & (n < N)
            src = qkv_ptr + n * (3 * C) + col
            dst = n * C + col
            q = tl.load(src, mask=tok_ok, other=0.0).to(tl.float32) + q_bias
            k = tl.load(src + C, mask=tok_ok, other=0.0).to(tl.float32)
            v = tl.load(src + 2 * C, mask=tok_ok, other=0.0).to(tl.float32) + v_bias
            r_q = _reciprocal_norm(q, EPS)
            r_k = _reciprocal_norm(k, EPS)
            tl.store(q_ptr + dst, (q * tl.abs(r_q)[:, None] * temp[:, None]).to(q_ptr.dtype.element_ty),
                     mask=tok_ok)
            tl.store(k_ptr + dst, (k * tl.abs(r_k)[:, None]).to(k_ptr.dtype.element_ty), mask=tok_ok)
            tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=tok_ok)
            head_tok_ok = head_ok & (n < N)
            tl.store(rnorm_ptr + n * (2 * H) + heads, r_q, mask=head_tok_ok)
            tl.store(rnorm_ptr + n * (2 * H) + H + heads, r_k, mask=head_tok_ok)

    @triton.jit
    def _reciprocal_norm(x, EPS: tl.constexpr):
        """Per head (row of ``x``): ``1 / |x|``, or ``-1 / EPS`` where ``|x| < EPS`` (F.normalize's
        floor; the sign tells the backward the floor was taken, without comparing roundings)."""
        norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        return tl.where(norm >= EPS, 1.0 / tl.maximum(norm, EPS), -1.0 / EPS)   # no 1/0 in either branch

    @triton.jit
    def _normalise_backward(g, xhat, r):
        """The gradient through ``x / max(|x|, EPS)`` per head, from :func:`_reciprocal_norm`'s
        ``r``: ``r (g - xhat (xhat . g))``, or ``g / EPS`` where the floor was taken (``r < 0``)."""
        dot = tl.sum(g * xhat, axis=1)
        r_abs = tl.abs(r)[:, None]
        return tl.where((r > 0)[:, None], r_abs * (g - xhat * dot[:, None]), g * r_abs)

    @triton.jit
    def qkv_norm_bwd_kernel(g_q_ptr, g_k_ptr, g_v_ptr, qkv_ptr, q_bias_ptr, rnorm_ptr, temp_ptr, g_qkv_ptr,
                            part_ptr, N, L, H, HD, rows, gq_b, gq_l, gq_h, gk_b, gk_l, gk_h, gv_b, gv_l, gv_h,
                            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
        """Tokens ``[p * rows, (p + 1) * rows)``, one at a time: the projection's gradient
        ``(g_q_in, g_k_in, g_v)``, and this program's sums of ``g_q_in`` (q bias), ``g_v`` (v bias)
        and ``g_q' xhat_q`` per head (temperature) in ``part[p]``. ``xhat`` is the forward's
        (``(qkv + bias) |r|``, float32). The incoming gradients are read through their
        ``(B, L, H, hd)`` strides (last one 1)."""
        p = tl.program_id(0)
        heads, dims, head_ok, ok, col = _head_tile(H, HD, BLOCK_H, BLOCK_D)
        C = H * HD
        q_bias = tl.load(q_bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
        temp = tl.load(temp_ptr + heads, mask=head_ok, other=1.0).to(tl.float32)
        acc_q_bias = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        acc_v_bias = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        acc_temp = tl.zeros([BLOCK_H], dtype=tl.float32)
        first = p.to(tl.int64) * rows
        for i in tl.range(0, rows, 1, num_stages=STAGES):
            n = first + i
            tok_ok = ok & (n < N)
            head_tok_ok = head_ok & (n < N)
            b = n // L
            t = n % L
            src = qkv_ptr + n * (3 * C) + col
            dst = g_qkv_ptr + n * (3 * C) + col
            g_q = tl.load(g_q_ptr + b * gq_b + t * gq_l + heads[:, None] * gq_h + dims[None, :], mask=tok_ok,
                          other=0.0).to(tl.float32)
            r_q = tl.load(rnorm_ptr + n * (2 * H) + heads, mask=head_tok_ok, other=0.0)
            xhat_q = (tl.load(src, mask=tok_ok, other=0.0).to(tl.float32) + q_bias) * tl.abs(r_q)[:, None]
            acc_temp += tl.sum(g_q * xhat_q, axis=1)
            g_q_in = _normalise_backward(g_q * temp[:, None], xhat_q, r_q)
            tl.store(dst, g_q_in.to(g_qkv_ptr.dtype.element_ty), mask=tok_ok)
            acc_q_bias += g_q_in
            g_k = tl.load(g_k_ptr + b * gk_b + t * gk_l + heads[:, None] * gk_h + dims[None, :], mask=tok_ok,
                          other=0.0).to(tl.float32)
            r_k = tl.load(rnorm_ptr + n * (2 * H) + H + heads, mask=head_tok_ok, other=0.0)
            xhat_k = tl.load(src + C, mask=tok_ok, other=0.0).to(tl.float32) * tl.abs(r_k)[:, None]
            tl.store(dst + C, _normalise_backward(g_k, xhat_k, r_k).to(g_qkv_ptr.dtype.element_ty),
                     mask=tok_ok)
            g_v = tl.load(g_v_ptr + b * gv_b + t * gv_l + heads[:, None] * gv_h + dims[None, :], mask=tok_ok,
                          other=0.0)
            tl.store(dst + 2 * C, g_v.to(g_qkv_ptr.dtype.element_ty), mask=tok_ok)
            acc_v_bias += g_v.to(tl.float32)
        out = part_ptr + p.to(tl.int64) * (2 * C + H)
        tl.store(out + col, acc_q_bias, mask=ok)
        tl.store(out + C + col, acc_v_bias, mask=ok)
        tl.store(out + 2 * C + heads, acc_temp, mask=head_ok)


def _blocks(H: int, hd: int) -> dict:
    """The kernels' tile: heads x head dims, each rounded up to a power of two (masked past)."""
    return dict(BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(hd))


def launch_forward(kernel, qkv_BL3C: torch.Tensor, q_bias_C: torch.Tensor, v_bias_C: torch.Tensor,
                   temp_H: torch.Tensor, eps: float = EPS, config: KernelConfig = KERNEL_CONFIG):
    """Run the forward ``kernel`` (the Triton kernel, or it wrapped for tracing) over every token:
    ``(q', k', v, rnorm)``, the first three ``(B, L, H, hd)`` in ``qkv``'s dtype, ``rnorm``
    ``(B * L, 2, H)`` float32 (q's reciprocal norms, then k's; negative where the floor was taken)."""
    B, L, C3 = qkv_BL3C.shape
    H = temp_H.numel()
    C = C3 // 3
    hd = C // H
    q_BLHc = torch.empty(B, L, H, hd, dtype=qkv_BL3C.dtype, device=qkv_BL3C.device)
    k_BLHc, v_BLHc = torch.empty_like(q_BLHc), torch.empty_like(q_BLHc)
    rnorm_N2H = torch.empty(B * L, 2, H, dtype=torch.float32, device=qkv_BL3C.device)
    grid = (triton.cdiv(B * L, config.fwd_rows),)
    kernel[grid](qkv_BL3C, q_bias_C, v_bias_C, temp_H, q_BLHc, k_BLHc, v_BLHc, rnorm_N2H, B * L, H, hd,
                 config.fwd_rows, EPS=eps, num_warps=config.fwd_warps, **_blocks(H, hd))
    return q_BLHc, k_BLHc, v_BLHc, rnorm_N2H


def launch_backward(kernel, g_q_BLHc: torch.Tensor, g_k_BLHc: torch.Tensor, g_v_BLHc: torch.Tensor,
                    qkv_BL3C: torch.Tensor, q_bias_C: torch.Tensor, rnorm_N2H: torch.Tensor, temp_H: torch.Tensor,
                    config: KernelConfig = KERNEL_CONFIG):
    """Run the backward ``kernel``: ``(g_qkv (B, L, 3C) in qkv's dtype, g_q_bias (C), g_v_bias (C),
    g_temp (H))``, the last three float32. ``g_*`` are ``(B, L, H, hd)`` with any strides but a
    unit last one; ``qkv``, ``q_bias`` and ``temp`` are the forward's inputs, ``rnorm`` its output."""
    B, L, C3 = qkv_BL3C.shape
    H, C = temp_H.numel(), C3 // 3
    hd = C // H
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (g_q_BLHc, g_k_BLHc, g_v_BLHc)]
    g_qkv_BL3C = torch.empty(B, L, 3 * C, dtype=qkv_BL3C.dtype, device=qkv_BL3C.device)
    programs = triton.cdiv(B * L, config.bwd_rows)
    part_P2CH = torch.empty(programs, 2 * C + H, dtype=torch.float32, device=qkv_BL3C.device)
    kernel[(programs,)](*grads, qkv_BL3C, q_bias_C, rnorm_N2H, temp_H, g_qkv_BL3C, part_P2CH, B * L, L, H, hd,
                        config.bwd_rows, *(st for g in grads for st in g.stride()[:3]),
                        STAGES=config.bwd_stages, num_warps=config.bwd_warps, **_blocks(H, hd))
    sums = part_P2CH.sum(0)
    # each gradient its own tensor (an op's outputs may not alias)
    return g_qkv_BL3C, sums[:C].clone(), sums[C:2 * C].clone(), sums[2 * C:].clone()


# ---- the ops, with their backward --------------------------------------------------------------
if triton is not None:
    @torch.library.triton_op("varscale::qkv_norm_fwd", mutates_args=())
    def _fwd(qkv_BL3C: torch.Tensor, q_bias_C: torch.Tensor, v_bias_C: torch.Tensor, temp_H: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward kernel as an op: ``(q', k', v, rnorm)`` (:func:`launch_forward`)."""
        return launch_forward(torch.library.wrap_triton(qkv_norm_fwd_kernel), qkv_BL3C, q_bias_C, v_bias_C,
                              temp_H, eps)

    @torch.library.triton_op("varscale::qkv_norm_bwd", mutates_args=())
    def _bwd(g_q_BLHc: torch.Tensor, g_k_BLHc: torch.Tensor, g_v_BLHc: torch.Tensor, qkv_BL3C: torch.Tensor,
             q_bias_C: torch.Tensor, rnorm_N2H: torch.Tensor, temp_H: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The backward kernel as an op (:func:`launch_backward`)."""
        return launch_backward(torch.library.wrap_triton(qkv_norm_bwd_kernel), g_q_BLHc, g_k_BLHc, g_v_BLHc,
                               qkv_BL3C, q_bias_C, rnorm_N2H, temp_H)

    def _setup(ctx, inputs, output):
        """Save the projection's output, the q bias, the temperatures and the reciprocal norms:
        what the backward recomputes the forward's normalised rows from."""
        qkv_BL3C, q_bias_C, v_bias_C, temp_H, _ = inputs
        _, _, _, rnorm_N2H = output
        ctx.save_for_backward(qkv_BL3C, q_bias_C, rnorm_N2H, temp_H)
        ctx.dtypes = (q_bias_C.dtype, v_bias_C.dtype, temp_H.dtype)

    def _backward(ctx, g_q_BLHc, g_k_BLHc, g_v_BLHc, _g_rnorm):
        """Gradients of ``(qkv, q_bias, v_bias, temp, eps)``, each in its input's dtype."""
        qkv_BL3C, q_bias_C, rnorm_N2H, temp_H = ctx.saved_tensors
        B, L, C3 = qkv_BL3C.shape
        H = temp_H.numel()
        grads = [qkv_BL3C.new_zeros(B, L, H, C3 // (3 * H)) if g is None else g
                 for g in (g_q_BLHc, g_k_BLHc, g_v_BLHc)]
        g_qkv, g_q_bias, g_v_bias, g_temp = torch.ops.varscale.qkv_norm_bwd(*grads, qkv_BL3C, q_bias_C, rnorm_N2H,
                                                                           temp_H)
        q_dt, v_dt, t_dt = ctx.dtypes
        return g_qkv, g_q_bias.to(q_dt), g_v_bias.to(v_dt), g_temp.to(t_dt), None

    _fwd.register_autograd(_backward, setup_context=_setup)


# ---- when the kernels run, and the plain path otherwise ----------------------------------------
def fused_available(attn: SelfAttention, x_BLC: torch.Tensor) -> bool:
    """Whether the kernels run: a CUDA input, Triton importable, and the L2-normalised attention."""
    return triton is not None and x_BLC.is_cuda and attn.l2_norm


def qkv_heads(attn: SelfAttention, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`varcore.var.SelfAttention.qkv_heads` through the kernels where they run
    (:func:`fused_qkv_heads`), the module's own elsewhere."""
    if not fused_available(attn, x_BLC):
        return attn.qkv_heads(x_BLC)
    return fused_qkv_heads(attn, x_BLC)


def fused_qkv_heads(attn: SelfAttention, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projection without its bias, then the forward kernel: ``(B, H, L, hd)`` views of
    ``(B, L, H, hd)`` q', k', v (any device the ops run on: the tests run it in the interpreter)."""
    qkv_BL3C = F.linear(x_BLC, attn.qkv.weight)
    q, k, v, _ = torch.ops.varscale.qkv_norm_fwd(qkv_BL3C, attn.q_bias, attn.v_bias, attn.temperature_H(), EPS)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_forward(attn: SelfAttention, x_BLC: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
    """:meth:`varcore.var.SelfAttention.forward` with the q/k normalisation through the kernels
    (an execution plan sets it as a block's attention forward)."""
    return attn.attend(*qkv_heads(attn, x_BLC), kv_cache)
