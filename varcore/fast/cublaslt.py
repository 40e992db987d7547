"""cuBLASLt matmuls with epilogues, for the FFN's GELU in training (``varcore.fused_mlp``).

cuBLASLt can apply the tanh-approximated GELU (and keep its input) in the epilogue of the
first FFN matmul, and the GELU's derivative in the epilogue of the matmul that
back-propagates into it. Torch runs these as separate element-wise passes over the
``(tokens, 4C)`` activations (a few per cent of a paper-scale step) and
does not expose the epilogues that keep the GELU input (``torch._addmm_activation`` has
GELU but returns only its output). This module calls the library torch already loaded
through ``ctypes``; :func:`available` says whether it could.

:func:`gemm` takes row-major torch tensors as the column-major matrices they are (a
row-major ``(r, c)`` tensor is the column-major ``c x r`` matrix, its transpose). So
``Y = X W^T`` (``X`` ``(N, K)``, ``W`` ``(M, K)``) is cuBLAS's ``D = op(A) B`` with A the
``K x M`` matrix that ``W`` is and op = transpose, B the ``K x N`` matrix that ``X`` is, and
D the ``M x N`` matrix that ``Y`` is: m = M, n = N tokens, k = K.

Per shape, the descriptors, the heuristic's algorithms and the index of the fastest (timed
on the first call) are cached for the process, as cuBLAS caches its own heuristics.
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
OP_N, OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = {"A": 5, "B": 6, "C": 7, "D": 8}
EPILOGUE_DEFAULT, EPILOGUE_BIAS = 1, 4
EPILOGUE_GELU_BIAS = 36        # D = gelu(AB + bias)
EPILOGUE_GELU_AUX_BIAS = 164   # D = gelu(AB + bias), aux = AB + bias
EPILOGUE_DGELU = 192           # D = AB * gelu'(aux)
EPILOGUE_DGELU_BGRAD = 208     # D = AB * gelu'(aux), bias = sum of D over n
EPILOGUE_BGRADB = 512          # D = AB, bias = sum of op(B) over k
MAX_ALGOS = 8
_DTYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F, torch.float32: _CUDA_R_32F}
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


class _Plan:
    """Descriptor, layouts and the heuristic's algorithms for one matmul shape, and the index
    of the fastest algorithm once timed (building these costs more host time than a launch)."""

    def __init__(self, device: int, epilogue: int, in_dtype: int, out_dtype: int, transa: int, transb: int,
                 a_shape: tuple[int, int], b_shape: tuple[int, int], m: int, n: int, align: tuple[int, int, int],
                 requested: int, lds: tuple[int, int]):
        lib = _lib()
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _CUBLAS_COMPUTE_32F, _CUDA_R_32F), "desc create")
        for attr, value in ((_DESC_TRANSA, ctypes.c_int32(transa)), (_DESC_TRANSB, ctypes.c_int32(transb)),
                            (_DESC_EPILOGUE, ctypes.c_uint32(epilogue)), (_DESC_AUX_LD, ctypes.c_int64(m))):
            _set(lib.cublasLtMatmulDescSetAttribute, self.desc, attr, value)
        # a row-major (r, c) tensor is the column-major (c x r) matrix with leading dimension c (or
        # its row stride, for a row-major view into wider rows: ``lds``, see _ld)
        lda, ldb = lds
        self.layouts = []
        for dtype, (r, c), ld in ((in_dtype, a_shape, lda), (in_dtype, b_shape, ldb), (out_dtype, (n, m), m)):
            lay = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, c, r, ld), "layout create")
            self.layouts.append(lay)
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference create")
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
             ctypes.c_uint64(MAX_WORKSPACE_BYTES))
        for name, a in zip("ABCD", (*align, align[2])):
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MIN_ALIGNMENT[name], ctypes.c_uint32(a))
        results, count = (_HeuristicResult * requested)(), ctypes.c_int(0)
        A, B, D = self.layouts
        _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle(device), self.desc, A, B, D, D, pref, requested, results,
                                                  ctypes.byref(count)), "heuristic")
        if count.value < 1:
            raise CublasLtError(f"cuBLASLt has no algorithm for epilogue {epilogue} at m={m} n={n}")
        self.algos = list(results)[:count.value]
        self.best: int | None = None if count.value > 1 else 0


@functools.lru_cache(maxsize=256)
def _plan(*key) -> _Plan:
    return _Plan(*key)


def _op_dims(shape: tuple[int, int], trans: int) -> tuple[int, int]:
    """(rows, cols) of op(X) for the column-major X that a row-major ``shape`` tensor is."""
    r, c = shape
    return (r, c) if trans == OP_T else (c, r)


def gemm(epilogue: int, a: torch.Tensor, transa: int, b: torch.Tensor, transb: int, d: torch.Tensor,
         bias: torch.Tensor | None = None, aux: torch.Tensor | None = None, algo: int | None = None,
         requested: int = MAX_ALGOS) -> int:
    """Column-major ``D = epilogue(op(A) op(B))`` where A, B, D are the column-major matrices
    that the row-major tensors ``a``, ``b``, ``d`` are (``d`` contiguous ``(n, m)``; ``a`` and
    ``b`` :func:`row_major`: contiguous, or views into wider rows).
    ``algo``: index into the heuristic's algorithms (at most ``requested`` of them); None: the
    fastest, timed on the first call of each shape (outside CUDA graph capture). Returns the
    number of algorithms."""
    lib = _lib()
    m, k = _op_dims(tuple(a.shape), transa)
    k2, n = _op_dims(tuple(b.shape), transb)
    if k != k2 or tuple(d.shape) != (n, m):
        raise ValueError(f"gemm shapes do not match: op(A) {m}x{k}, op(B) {k2}x{n}, D {tuple(d.shape)[::-1]}")
    if not (row_major(a) and row_major(b) and d.is_contiguous()):
        raise ValueError(f"gemm needs row-major operands: strides {a.stride()}, {b.stride()}, {d.stride()}")
    dev = d.device.index if d.device.index is not None else torch.cuda.current_device()
    out_align = _alignment(d) if aux is None else min(_alignment(d), _alignment(aux))
    plan = _plan(dev, epilogue, _DTYPES[a.dtype], _DTYPES[d.dtype], transa, transb, tuple(a.shape), tuple(b.shape),
                 m, n, (_alignment(a), _alignment(b), out_align), requested, (_ld(a), _ld(b)))
    if bias is not None:
        _set(lib.cublasLtMatmulDescSetAttribute, plan.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    if aux is not None:
        _set(lib.cublasLtMatmulDescSetAttribute, plan.desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
    stream = torch.cuda.current_stream(d.device)

    def launch(i: int) -> None:
        result = plan.algos[i]
        ws = torch.empty(max(result.workspaceSize, 1), dtype=torch.uint8, device=d.device)
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        A, B, D = plan.layouts
        _check(lib.cublasLtMatmul(_handle(dev), plan.desc, ctypes.byref(alpha), a.data_ptr(), A, b.data_ptr(), B,
                                  ctypes.byref(beta), d.data_ptr(), D, d.data_ptr(), D, ctypes.byref(result.algo),
                                  ws.data_ptr(), result.workspaceSize, stream.cuda_stream), "matmul")

    if algo is None and plan.best is None and not torch.cuda.is_current_stream_capturing():
        plan.best = _fastest(launch, len(plan.algos), stream)
    launch(algo if algo is not None else plan.best or 0)
    return len(plan.algos)


def row_major(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 2-D row-major matrix cuBLASLt reads as it is: contiguous, or the first
    columns of wider rows (unit column stride, a row stride of at least its width and a multiple
    of 8 elements: 16 bytes in bf16, which the Hopper kernels' tensor-memory loads need)."""
    if t.dim() != 2:
        return False
    return t.is_contiguous() or (t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.stride(0) % 8 == 0)


def _ld(t: torch.Tensor) -> int:
    """The leading dimension of the column-major matrix a :func:`row_major` tensor is."""
    return t.shape[1] if t.is_contiguous() else t.stride(0)


def _fastest(launch, count: int, stream, reps: int = 3) -> int:
    """Index of the algorithm with the least median time over ``reps`` launches (each call
    overwrites the same outputs, so timing on the caller's tensors is harmless)."""
    times = []
    for i in range(count):
        launch(i)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        for j in range(reps):
            events[j].record(stream)
            launch(i)
        events[reps].record(stream)
        events[reps].synchronize()
        times.append(sorted(events[j].elapsed_time(events[j + 1]) for j in range(reps))[reps // 2])
    log.debug("cuBLASLt algorithm times (ms): %s", times)
    return min(range(count), key=times.__getitem__)


def linear_gelu_aux(x_NK: torch.Tensor, w_MK: torch.Tensor, b_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(h), h)`` with ``h = x W^T + b`` and the tanh GELU, from one matmul. ``x`` is made
    contiguous: read as the first columns of wider rows, cuBLASLt's choice for this matmul took
    0.22-0.56 ms longer than for contiguous rows at d20, d24 and d30 on an H200 (RESULTS.md round
    23); copying the input is one pass over ``(tokens, C)``, about 0.05 ms at d20 at the H200's
    bandwidth (estimated, not timed)."""
    x_NK, w_MK, b_M = x_NK.contiguous(), w_MK.contiguous(), b_M.contiguous()
    g_NM = x_NK.new_empty(x_NK.shape[0], w_MK.shape[0])
    h_NM = torch.empty_like(g_NM)
    gemm(EPILOGUE_GELU_AUX_BIAS, w_MK, OP_T, x_NK, OP_N, g_NM, b_M, h_NM)
    return g_NM, h_NM


def linear_gelu(x_NK: torch.Tensor, w_MK: torch.Tensor, b_M: torch.Tensor) -> torch.Tensor:
    """``gelu(x W^T + b)`` (tanh GELU) from one matmul, without keeping the GELU input
    (inference: nothing needs it)."""
    x_NK, w_MK, b_M = x_NK.contiguous(), w_MK.contiguous(), b_M.contiguous()
    g_NM = x_NK.new_empty(x_NK.shape[0], w_MK.shape[0])
    gemm(EPILOGUE_GELU_BIAS, w_MK, OP_T, x_NK, OP_N, g_NM, b_M)
    return g_NM


def matmul_dgelu(dy_NK: torch.Tensor, w_KM: torch.Tensor, h_NM: torch.Tensor) -> torch.Tensor:
    """``dh = (dy W) * gelu'(h)`` (tanh GELU): the gradient into the pre-GELU activations ``h``
    of a layer whose output ``gelu(h)`` went through the linear map ``W`` ``(K, M)``, from one
    matmul. (cuBLASLt's variant that also sums the bias gradient runs that sum as a separate,
    slower kernel on Hopper, so the bias gradient is summed by torch.)"""
    dy_NK, w_KM, h_NM = dy_NK.contiguous(), w_KM.contiguous(), h_NM.contiguous()
    dh_NM = torch.empty_like(h_NM)
    gemm(EPILOGUE_DGELU, w_KM, OP_N, dy_NK, OP_N, dh_NM, aux=h_NM)
    return dh_NM
