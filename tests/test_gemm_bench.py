"""benchmarks/gemm.py: each surveyed matmul's torch call and cuBLASLt arguments compute the same
shape, and its FLOP count is the product of its dimensions (checked on the CPU: no cuBLASLt)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gemm  # noqa: E402
from varcore.fast import cublaslt as L  # noqa: E402


def _lt_dims(args) -> tuple[int, int, int]:
    """(m, n, k) of cuBLASLt's column-major ``D = op(A) op(B)`` for gemm's arguments."""
    _, a, ta, b, tb, d = args[:6]
    m, k = L._op_dims(tuple(a.shape), ta)
    k2, n = L._op_dims(tuple(b.shape), tb)
    assert k == k2 and tuple(d.shape) == (n, m)
    return m, n, k


def _check(matmuls):
    for name, calls, flop, torch_fn, args in matmuls:
        m, n, k = _lt_dims(args)
        out = torch_fn()
        assert tuple(out.shape) == tuple(args[5].shape), name      # torch's call and cuBLASLt's agree
        assert flop == 2 * m * n * k, name
        assert calls >= 1


def test_training_matmuls_shapes_and_flops():
    N, C, depth = 12, 8, 3
    mats = gemm.training_matmuls(gemm.Mats(N, C, torch.device("cpu")), N, C, depth)
    _check(mats)
    names = [n for n, *_ in mats]
    assert names == ["qkv_fwd", "qkv_dgrad", "qkv_wgrad", "proj_fwd", "proj_dgrad", "proj_wgrad",
                     "fc1_fwd_gelu_aux", "fc1_dgrad", "fc1_wgrad", "fc2_fwd", "fc2_dgrad_dgelu", "fc2_wgrad",
                     "head_fwd", "head_dgrad", "head_wgrad"]
    epilogues = {n: args[0] for n, _, _, _, args in mats}
    assert epilogues["fc1_fwd_gelu_aux"] == L.EPILOGUE_GELU_AUX_BIAS
    assert epilogues["fc2_dgrad_dgelu"] == L.EPILOGUE_DGELU
    assert epilogues["proj_fwd"] == L.EPILOGUE_BIAS and epilogues["qkv_fwd"] == L.EPILOGUE_DEFAULT
    # per block 3 x (qkv 3C^2 + proj C^2 + fc1 4C^2 + fc2 4C^2) x 2N, and the head's three
    per_block = sum(f for _, c, f, _, _ in mats if c == depth)
    assert per_block == 3 * 2 * N * C * C * (3 + 1 + 4 + 4)
    assert sum(f for _, c, f, _, _ in mats if c == 1) == 3 * 2 * N * C * gemm.VOCAB


def test_sampling_matmuls_shapes_and_flops():
    C, depth = 8, 2
    m = gemm.Mats(40, C, torch.device("cpu"))
    mats = gemm.sampling_matmuls(m, 18, C, depth, scale=2)
    _check(mats)
    assert [n for n, *_ in mats] == ["s2_qkv", "s2_proj", "s2_fc1_gelu", "s2_fc2", "s2_head"]
    assert sum(f * c for _, c, f, _, _ in mats) == 2 * 18 * C * (depth * 12 * C + gemm.VOCAB)
