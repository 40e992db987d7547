"""Two cuBLASLt matmuls with GELU epilogues, the pair an FFN's training step needs.

cuBLASLt can apply the tanh-approximated GELU (and keep its input) in the epilogue of the
first FFN matmul, and the GELU's derivative with the bias gradient in the epilogue of the
matmul that back-propagates into it. Torch runs these as separate element-wise passes over
the ``(tokens, 4C)`` activations (at d24 about 13 ms of a 222 ms step, RESULTS.md round 7)
and does not expose the epilogues that keep the GELU input (``torch._addmm_activation``
has GELU but returns only its output). This module calls the library torch already loaded
through ``ctypes``; :func:`available` says whether it could.

Row-major torch matrices are column-major cuBLAS matrices transposed, so ``Y = X W^T``
(``X`` ``(N, K)``, ``W`` ``(M, K)``) is the column-major ``Y^T = op(W) X^T`` with
``op = transpose``: m = M rows of the output per token, n = N tokens, k = K.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch

log = logging.getLogger(__name__)

# cublasLt.h constants (ABI values)
_CUBLAS_COMPUTE_32F = 68
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = {"A": 5, "B": 6, "C": 7, "D": 8}
EPILOGUE_GELU_AUX_BIAS = 164   # D = gelu(AB + bias), aux = AB + bias
EPILOGUE_DGELU_BGRAD = 208     # D = AB * gelu'(aux), bias = sum of D over n
_DTYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}
MAX_WORKSPACE_BYTES = 32 << 20


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    """A cuBLASLt call returned a status other than success."""


def _loaded_path() -> str | None:
    """Path of the libcublasLt that this process (torch) has mapped, if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcublasLt.so" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


@functools.cache
def _lib():
    """The cuBLASLt library torch uses, or None (no CUDA, or not found)."""
    if not torch.cuda.is_available():
        return None
    torch.ones(1, device="cuda") @ torch.ones(1, device="cuda")   # makes torch load cuBLAS(Lt)
    for name in (_loaded_path(), ctypes.util.find_library("cublasLt"), "libcublasLt.so.13", "libcublasLt.so.12"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        P, V, I, S = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_size_t
        sigs = {
            "cublasLtCreate": [V],
            "cublasLtMatmulDescCreate": [V, I, I],
            "cublasLtMatmulDescSetAttribute": [P, I, P, S],
            "cublasLtMatrixLayoutCreate": [V, I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
            "cublasLtMatmulPreferenceCreate": [V],
            "cublasLtMatmulPreferenceSetAttribute": [P, I, P, S],
            "cublasLtMatmulAlgoGetHeuristic": [P, P, P, P, P, P, P, I, ctypes.POINTER(_HeuristicResult),
                                               ctypes.POINTER(I)],
            "cublasLtMatmul": [P, P, P, P, P, P, P, P, P, P, P, P, P, P, S, P],
        }
        for fn, args in sigs.items():
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, I
        log.info("cuBLASLt epilogues from %s", name)
        return lib
    return None


def available() -> bool:
    """Whether the GELU epilogues can run here (CUDA and cuBLASLt found)."""
    return _lib() is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"cuBLASLt {what} returned status {status}")


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"set attribute {attr}")


@functools.cache
def _handle(device: int) -> ctypes.c_void_p:
    h = ctypes.c_void_p()
    with torch.cuda.device(device):
        _check(_lib().cublasLtCreate(ctypes.byref(h)), "create")
    return h


def _alignment(t: torch.Tensor) -> int:
    """Largest power of two up to 256 that divides the tensor's address."""
    ptr, a = t.data_ptr(), 256
    while ptr % a:
        a //= 2
    return a


@functools.lru_cache(maxsize=64)
def _plan(device: int, epilogue: int, dtype: int, transa: int, m: int, n: int, k: int, lda: int, ldb: int,
          align: tuple[int, int, int]):
    """Descriptor, layouts and the heuristic's algorithm for one matmul shape (cached: building
    them costs more host time than the matmul's launch)."""
    lib = _lib()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _CUBLAS_COMPUTE_32F, _CUDA_R_32F), "desc create")
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSA, ctypes.c_int32(transa))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_LD, ctypes.c_int64(m))
    layouts = []
    for rows, cols, ld in ((k, m, lda) if transa == _OP_T else (m, k, lda), (k, n, ldb), (m, n, m)):
        lay = ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, rows, cols, ld), "layout create")
        layouts.append(lay)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference create")
    _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
         ctypes.c_uint64(MAX_WORKSPACE_BYTES))
    for name, a in zip("ABD", align):
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MIN_ALIGNMENT[name], ctypes.c_uint32(a))
    _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MIN_ALIGNMENT["C"], ctypes.c_uint32(align[2]))
    result, count = _HeuristicResult(), ctypes.c_int(0)
    A, B, D = layouts
    _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle(device), desc, A, B, D, D, pref, 1, ctypes.byref(result),
                                              ctypes.byref(count)), "heuristic")
    if count.value < 1:
        raise CublasLtError(f"cuBLASLt has no algorithm for epilogue {epilogue} at m={m} n={n} k={k}")
    return desc, A, B, D, result


def _matmul(epilogue: int, a: torch.Tensor, transa: int, b_NK: torch.Tensor, out_NM: torch.Tensor,
            bias: torch.Tensor, aux_NM: torch.Tensor) -> None:
    """``out = epilogue(b_NK @ op(a))`` in row-major terms; ``a`` is ``(M, K)`` with ``transa``
    = T (a weight used as ``x W^T``) or ``(K, M)`` with N."""
    lib = _lib()
    n, k = b_NK.shape
    m = out_NM.shape[1]
    lda = a.shape[1]
    dev = out_NM.device.index if out_NM.device.index is not None else torch.cuda.current_device()
    desc, A, B, D, result = _plan(dev, epilogue, _DTYPES[out_NM.dtype], transa, m, n, k, lda, k,
                                  (_alignment(a), _alignment(b_NK), min(_alignment(out_NM), _alignment(aux_NM))))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux_NM.data_ptr()))
    ws = torch.empty(max(result.workspaceSize, 1), dtype=torch.uint8, device=out_NM.device)
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    stream = torch.cuda.current_stream(out_NM.device).cuda_stream
    _check(lib.cublasLtMatmul(_handle(dev), desc, ctypes.byref(alpha), a.data_ptr(), A, b_NK.data_ptr(), B,
                              ctypes.byref(beta), out_NM.data_ptr(), D, out_NM.data_ptr(), D,
                              ctypes.byref(result.algo), ws.data_ptr(), result.workspaceSize, stream), "matmul")


def linear_gelu_aux(x_NK: torch.Tensor, w_MK: torch.Tensor, b_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(h), h)`` with ``h = x W^T + b`` and the tanh GELU, from one matmul."""
    x_NK, w_MK, b_M = x_NK.contiguous(), w_MK.contiguous(), b_M.contiguous()
    g_NM = x_NK.new_empty(x_NK.shape[0], w_MK.shape[0])
    h_NM = torch.empty_like(g_NM)
    _matmul(EPILOGUE_GELU_AUX_BIAS, w_MK, _OP_T, x_NK, g_NM, b_M, h_NM)
    return g_NM, h_NM


def matmul_dgelu_bgrad(dy_NK: torch.Tensor, w_KM: torch.Tensor, h_NM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, db)`` with ``dh = (dy W) * gelu'(h)`` (tanh GELU) and ``db = sum over rows of dh``:
    the gradient into the pre-GELU activations ``h`` of a layer whose output ``gelu(h)`` went
    through the linear map ``W`` ``(K, M)``, from one matmul."""
    dy_NK, w_KM, h_NM = dy_NK.contiguous(), w_KM.contiguous(), h_NM.contiguous()
    dh_NM = torch.empty_like(h_NM)
    db_M = h_NM.new_empty(h_NM.shape[1])
    _matmul(EPILOGUE_DGELU_BGRAD, w_KM, _OP_N, dy_NK, dh_NM, db_M, h_NM)
    return dh_NM, db_M
