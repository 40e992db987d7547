"""The FFN ``fc2(gelu(fc1(x)))`` (tanh GELU) with the GELU inside its matmuls' epilogues.

Same function and gradients as the three modules in a row. The forward's first matmul
writes both the GELU output and its input; the backward's matmul into the hidden layer
applies the GELU derivative in its epilogue (:mod:`varcore.cublaslt`). That removes the
element-wise GELU passes over the ``(tokens, 4C)`` activations, forward and backward
(two passes over the largest activations of the block). Both the GELU's input and
output are kept for the backward, as inductor already did for the plain FFN (same peak memory).

Without gradients (evaluation, sampling) the first matmul writes only the GELU output.
The matmuls are custom ops, so ``torch.compile`` keeps them as calls in its graphs;
where cuBLASLt is not there (the CPU) they compute the same thing with plain torch ops,
which is how the CPU tests check the gradients this module writes out.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ..var import FFN
from . import cublaslt

log = logging.getLogger(__name__)
FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _cublaslt_runs(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the epilogue matmuls run for ``t``'s device in ``dtype``."""
    return t.is_cuda and dtype in FUSED_DTYPES and cublaslt.available()


def _use_cublaslt(t: torch.Tensor) -> bool:
    return _cublaslt_runs(t, t.dtype)


@functools.cache
def _warn_fallback(op: str, shapes: str, error: str) -> None:
    log.warning("cuBLASLt %s failed for %s (%s); computing it with torch ops instead", op, shapes, error)


def _cublaslt_or_plain(op: str, lt, plain, x: torch.Tensor, w: torch.Tensor, third: torch.Tensor):
    """``lt(x, w, third)`` where cuBLASLt runs for ``x``; elsewhere, or when cuBLASLt fails for a
    shape (e.g. no algorithm: warned once), ``plain(x, w, third)``: the same math with torch ops."""
    if _use_cublaslt(x):
        try:
            return lt(x, w, third)
        except cublaslt.CublasLtError as e:
            _warn_fallback(op, f"{tuple(x.shape)} x {tuple(w.shape)}", str(e))
    return plain(x, w, third)


@torch.library.custom_op("varcore::linear_gelu_aux", mutates_args=())
def linear_gelu_aux(x_NK: torch.Tensor, w_MK: torch.Tensor, b_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(h), h)`` with ``h = x W^T + b``."""
    def plain(x_NK, w_MK, b_M):
        h_NM = F.linear(x_NK, w_MK, b_M)
        return F.gelu(h_NM, approximate="tanh"), h_NM
    return _cublaslt_or_plain("linear_gelu_aux", cublaslt.linear_gelu_aux, plain, x_NK, w_MK, b_M)


@linear_gelu_aux.register_fake
def _(x_NK, w_MK, b_M):
    out = x_NK.new_empty(x_NK.shape[0], w_MK.shape[0])
    return out, torch.empty_like(out)


@torch.library.custom_op("varcore::linear_gelu", mutates_args=())
def linear_gelu(x_NK: torch.Tensor, w_MK: torch.Tensor, b_M: torch.Tensor) -> torch.Tensor:
    """``gelu(x W^T + b)`` (inference: the GELU input is not kept)."""
    return _cublaslt_or_plain("linear_gelu", cublaslt.linear_gelu,
                              lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"), x_NK, w_MK, b_M)


@linear_gelu.register_fake
def _(x_NK, w_MK, b_M):
    return x_NK.new_empty(x_NK.shape[0], w_MK.shape[0])


@torch.library.custom_op("varcore::matmul_dgelu", mutates_args=())
def matmul_dgelu(dy_NK: torch.Tensor, w_KM: torch.Tensor, h_NM: torch.Tensor) -> torch.Tensor:
    """``dh = (dy W) * gelu'(h)``."""
    return _cublaslt_or_plain("matmul_dgelu", cublaslt.matmul_dgelu,
                              lambda dy, w, h: torch.ops.aten.gelu_backward(dy @ w, h, approximate="tanh"),
                              dy_NK, w_KM, h_NM)


@matmul_dgelu.register_fake
def _(dy_NK, w_KM, h_NM):
    return torch.empty_like(h_NM)


class _GeluMLP(torch.autograd.Function):
    """``fc2(gelu(fc1 x))``; ``b2_C`` may be ``None`` (fc2's bias added by the caller)."""

    @staticmethod
    def forward(ctx, x_NC, w1_HC, b1_H, w2_CH, b2_C):
        g_NH, h_NH = linear_gelu_aux(x_NC, w1_HC, b1_H)
        ctx.save_for_backward(x_NC, w1_HC, w2_CH, g_NH, h_NH)
        ctx.has_b2 = b2_C is not None
        return F.linear(g_NH, w2_CH, b2_C)

    @staticmethod
    def backward(ctx, dy_NC):
        x_NC, w1_HC, w2_CH, g_NH, h_NH = ctx.saved_tensors
        dh_NH = matmul_dgelu(dy_NC, w2_CH, h_NH)
        return dh_NH @ w1_HC, dh_NH.t() @ x_NC, dh_NH.sum(0), dy_NC.t() @ g_NH, dy_NC.sum(0) if ctx.has_b2 else None


def fused_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the FFN's matmuls run in: the autocast dtype under autocast, else ``x``'s."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def gelu_mlp(x_BLC: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, fc2_bias: bool = True
             ) -> torch.Tensor:
    """``fc2(gelu(fc1(x), approximate="tanh"))`` through the fused matmuls, in :func:`fused_dtype`
    (the casts autocast would make are made here: custom ops are outside autocast).
    ``fc2_bias=False`` leaves fc2's bias out (the caller adds it, and gets its gradient)."""
    dt = fused_dtype(x_BLC)
    x_NC = x_BLC.reshape(-1, x_BLC.shape[-1]).to(dt)
    y_NC = _GeluMLP.apply(x_NC, fc1.weight.to(dt), fc1.bias.to(dt), fc2.weight.to(dt),
                          fc2.bias.to(dt) if fc2_bias else None)
    return y_NC.view(*x_BLC.shape[:-1], y_NC.shape[-1])


def gelu_mlp_inference(x_BLC: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, fc2_bias: bool = True
                       ) -> torch.Tensor:
    """The same FFN without gradients: the GELU in the first matmul's epilogue and nothing kept
    for a backward (one pass over the ``(tokens, 4C)`` activations instead of three);
    ``fc2_bias`` as in :func:`gelu_mlp`."""
    dt = fused_dtype(x_BLC)
    x_NC = x_BLC.reshape(-1, x_BLC.shape[-1]).to(dt)
    g_NH = linear_gelu(x_NC, fc1.weight.to(dt), fc1.bias.to(dt))
    y_NC = F.linear(g_NH, fc2.weight.to(dt), fc2.bias.to(dt) if fc2_bias else None)
    return y_NC.view(*x_BLC.shape[:-1], y_NC.shape[-1])


def fused_usable(x: torch.Tensor) -> bool:
    """Whether :func:`gelu_mlp` runs the epilogue matmuls for ``x`` (CUDA, bf16/fp16, cuBLASLt)."""
    return _cublaslt_runs(x, fused_dtype(x))


def without_fc2_bias(ffn: FFN, x_BLC: torch.Tensor) -> torch.Tensor:
    """The plain FFN's layers with fc2's bias left out (a fused residual add adds it)."""
    return ffn.drop(F.linear(ffn.hidden(x_BLC), ffn.fc2.weight))


def _with_layers(cls: type, ffn: FFN) -> FFN:
    new = cls.__new__(cls)
    torch.nn.Module.__init__(new)
    new.fc1, new.fc2, new.drop = ffn.fc1, ffn.fc2, ffn.drop
    return new.train(ffn.training)


class FusedFFN(FFN):
    """:class:`varcore.var.FFN` with the GELU inside its matmuls' epilogues. With gradients on,
    the first matmul also keeps the GELU input for the backward; without them (evaluation,
    sampling) it does not, and where the epilogue cannot run (the CPU, fp32) the plain FFN runs.
    Same parameters and state-dict keys as the FFN."""

    @classmethod
    def of(cls, ffn: FFN) -> "FusedFFN":
        """The fused FFN over ``ffn``'s own layers (the same parameters)."""
        return _with_layers(cls, ffn)

    def plain(self) -> FFN:
        """The plain FFN over the same layers."""
        return _with_layers(FFN, self)

    def forward(self, x_BLC: torch.Tensor, fc2_bias: bool = True) -> torch.Tensor:
        """The FFN; ``fc2_bias=False`` leaves fc2's bias out (a fused residual add adds it,
        :func:`varcore.fast.adaln.block_forward`)."""
        if not torch.is_grad_enabled():
            if not fused_usable(x_BLC):
                return super().forward(x_BLC) if fc2_bias else without_fc2_bias(self, x_BLC)
            return self.drop(gelu_mlp_inference(x_BLC, self.fc1, self.fc2, fc2_bias))
        return self.drop(gelu_mlp(x_BLC, self.fc1, self.fc2, fc2_bias))
