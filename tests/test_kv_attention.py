"""The KV-cache attention kernel of the compiled sampling engine computes softmax(q k^T scale) v.

The Triton kernel runs here in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported, so in a child process), on the layouts the engine hands it: queries as ``(B, l, H, hd)``
projections and keys/values as the first ``S`` slots of ``(B, L, H, hd)`` caches, each seen as
``(B, H, ., hd)``. Shapes cover one query and one key (scale 1), a partial last tile of queries
and of keys, and several key tiles, with tiles of 16 (the interpreter is slow) and the kernel's
own configuration. Each result is compared with float64 under a bound derived from the roundings
the kernel makes (:func:`_bound`); every (image, head) has its own keys, so reading another's
fails it.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from varcore.fast.kv_attention import KERNEL_CONFIGS, KernelKVCache, config_for, kernel_available, kv_attention
from varcore.var import KVCache

ROOT = Path(__file__).resolve().parents[1]
B, H, L, HD = 2, 3, 256, 64
# (queries, keys, tiles): one query and key; partial tiles of both; several key tiles; whole key
# tiles only; then the kernel's own configuration for each of its ranges of l (config_for)
CASES = [(1, 1, 16), (9, 14, 16), (20, 45, 16), (36, 100, 16), (17, 32, 16), (25, 91, None), (130, 200, None),
         (200, 256, None)]

# Triton's interpreter (3.x) multiplies bf16 operands of tl.dot as their uint16 bit patterns; the
# child widens them to float32 first (exact, as the tensor cores' products are) and keeps the rest.
_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter
from varcore.fast import kv_attention as kva

def widened(x):
    if x.dtype != tl.bfloat16:
        return x
    return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

dot = interpreter.InterpreterBuilder.create_dot
interpreter.InterpreterBuilder.create_dot = lambda self, a, b, *rest: dot(self, widened(a), widened(b), *rest)
args = torch.load(sys.argv[1], weights_only=True)
out = {}
for i, (q, k, v, scale, tiles) in enumerate(args):
    cfg = None if tiles is None else {"BLOCK_M": tiles, "BLOCK_N": tiles, "num_warps": 1, "num_stages": 1}
    out[i] = kva.launch(kva.kv_attention_kernel, q, k, v, scale, cfg)
torch.save(out, sys.argv[2])
"""


def _inputs(dtype: torch.dtype, scale: float | None) -> list:
    """Per case: queries (unit rows times a temperature of 4, as the engine's) and cache views."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for l, S, tiles in CASES:
        q = (F.normalize(torch.randn(B, l, H, HD, generator=g), dim=-1) * 4).to(dtype).transpose(1, 2)
        k_cache, v_cache = (torch.randn(B, L, H, HD, generator=g).to(dtype) for _ in range(2))
        cases.append((q, k_cache[:, :S].transpose(1, 2), v_cache[:, :S].transpose(1, 2), scale, tiles))
    return cases


def _run_interpreter(cases: list, tmp_path: Path) -> dict:
    torch.save(cases, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=600)
    return torch.load(tmp_path / "out.pt", weights_only=True)


def _reference64(q, k, v, scale) -> torch.Tensor:
    s = (q.double() @ k.double().transpose(-1, -2)) * (HD ** -0.5 if scale is None else scale)
    return s.softmax(-1) @ v.double()


def _bound(q, k, v, scale, u_round: float) -> torch.Tensor:
    """Per query row. A score is a float32 sum of ``hd`` products, then scaled by ``scale log2(e)``
    (error <= ``(hd + 4) u |q| |k| scale``, u = 2^-24), so each softmax weight is off by a factor of
    at most ``exp(2 ds)``; the running sums over ``S`` keys and their rescalings add ``3 (S + hd) u``
    relative. A weight rounded to a ``u_round`` format before the second product (the values'
    dtype) moves the output by at most ``u_round max|v|``, and the output's own rounding by
    ``u_round |o|``, with ``|o| <= max|v|``."""
    u, S = 2.0 ** -24, k.shape[2]
    qk = q.double().norm(dim=-1, keepdim=True) * k.double().norm(dim=-1).amax(-1, keepdim=True)[..., None]
    ds = (HD + 4) * u * qk * (HD ** -0.5 if scale is None else scale)
    vmax = v.double().abs().amax(dim=(-1, -2), keepdim=True)
    return ((2 * ds).expm1() + 3 * (S + HD) * u + 2 * u_round) * vmax


def _check(out: dict, cases: list, u_round: float) -> None:
    for i, (q, k, v, scale, _) in enumerate(cases):
        o = out[i]
        Bq, Hq, l, c = q.shape
        assert o.shape == (Bq, Hq, l, c) and o.dtype == q.dtype
        assert o.stride() == (l * Hq * c, c, Hq * c, 1)   # (B, l, H, hd) memory: what the projection reads
        err = (o.double() - _reference64(q, k, v, scale)).abs()
        assert (err <= _bound(q, k, v, scale, u_round)).all(), (CASES[i], err.max().item())


def test_kernel_in_triton_interpreter_float32(tmp_path):
    """float32 inputs: no rounding but float32's, so the bound is a few ulps of max|v|."""
    cases = _inputs(torch.float32, 1.0)
    _check(_run_interpreter(cases, tmp_path), cases, 0.0)


def test_kernel_in_triton_interpreter_bf16_default_scale(tmp_path):
    """bf16 inputs and SDPA's default scale: the weights and the output are rounded to bf16
    (the interpreter truncates: one unit in the last place, 2^-7, where the GPU rounds to
    nearest, 2^-8)."""
    cases = _inputs(torch.bfloat16, None)
    _check(_run_interpreter(cases, tmp_path), cases, 2.0 ** -7)


def test_bound_is_tight_enough_to_catch_a_wrong_scale():
    """The check above has teeth: attention with the scale off by 1% (or another head's keys)
    already lands outside the float32 bound."""
    q, k, v, scale, _ = _inputs(torch.float32, 1.0)[3]
    ref = _reference64(q, k, v, scale)
    bound = _bound(q, k, v, scale, 0.0)
    assert ((_reference64(q, k, v, 1.01) - ref).abs() > bound).any()
    assert ((_reference64(q, k.flip(1), v.flip(1), scale) - ref).abs() > bound).any()


def test_cpu_runs_sdpa_and_the_cache_attends_as_the_plain_one():
    cases = _inputs(torch.float32, 1.0)
    q, k, v, scale, _ = cases[2]
    assert not kernel_available(q, k, v)
    assert torch.equal(kv_attention(q, k, v, scale), F.scaled_dot_product_attention(q, k, v, scale=scale))
    plain, kernel = KVCache(L), KernelKVCache(L)
    for l in (1, 4, 9):   # three scales' appends, then attention over all of them
        qs, ks, vs = (torch.randn(B, H, l, HD) for _ in range(3))
        assert torch.equal(kernel.attend(qs, ks, vs, 1.0), plain.attend(qs, ks, vs, 1.0))
    assert kernel.len == plain.len == 14 and torch.equal(kernel.k_BLHc[:, :14], plain.k_BLHc[:, :14])


def test_configs_cover_every_scale_with_kernel_tiles():
    """Every query count gets a configuration (the table ends with a catch-all) whose tiles
    ``tl.dot`` takes (powers of two, at least 16) and whose ranges come in increasing order."""
    bounds = [max_l for max_l, _ in KERNEL_CONFIGS]
    assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
    for l in (1, 4, 64, 65, 169, 256, 4096):
        cfg = config_for(l)
        assert all(cfg[k] >= 16 and cfg[k] & (cfg[k] - 1) == 0 for k in ("BLOCK_M", "BLOCK_N"))
    assert config_for(64) is KERNEL_CONFIGS[0][1] and config_for(65) is KERNEL_CONFIGS[1][1]
