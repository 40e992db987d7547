"""The FFN with GELU in the matmul epilogues (varcore.fast.fused_mlp) is the plain FFN's function.

The CPU has no cuBLASLt, so the custom ops run their torch fallbacks here; what the tests
pin down is (1) the written-out backward (gradients equal autograd's of fc2(gelu(fc1 x)),
gradcheck in float64), (2) the wiring in the model (the plan's mlp="fused", compiled blocks,
checkpointing), and (3) the cuBLASLt argument choices: ``varcore.cublaslt`` is driven
through a stand-in of its ``gemm`` that computes the column-major epilogue semantics the
cuBLASLt documentation gives, so a wrong transpose or epilogue in the wrappers fails here.
"""

import pytest
import torch
import torch.nn.functional as F

import copy

from varcore import ConfigError, VAR, VARConfig
from varcore.fast import cublaslt
from varcore.fast.fused_mlp import FusedFFN, _GeluMLP, fused_usable
from varcore.fast.plan import ExecutionPlan, apply_plan
from varcore.var import FFN
from tests.conftest import randomize_


def _ffn_grads(ffn: FFN, x: torch.Tensor, dy: torch.Tensor, fused: bool):
    """Output and gradients of the FFN, or of the fused FFN over the same layers."""
    m = FusedFFN.of(ffn) if fused else ffn
    y = m(x)
    return (y, *torch.autograd.grad(y, [x, *m.parameters()], dy))


def test_fused_ffn_equals_plain_float64():
    torch.manual_seed(0)
    ffn = FFN(16, 64, 0.0).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 7, 16, dtype=torch.float64)
    for a, b in zip(_ffn_grads(ffn, x, dy, False), _ffn_grads(ffn, x, dy, True)):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_fused_mlp_gradcheck():
    torch.manual_seed(1)
    args = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True),      # x (N, C)
            torch.randn(12, 6, dtype=torch.float64, requires_grad=True),     # w1 (H, C)
            torch.randn(12, dtype=torch.float64, requires_grad=True),        # b1
            torch.randn(6, 12, dtype=torch.float64, requires_grad=True),     # w2 (C, H)
            torch.randn(6, dtype=torch.float64, requires_grad=True)]         # b2
    assert torch.autograd.gradcheck(_GeluMLP.apply, args)


def test_fused_ffn_under_bf16_autocast_casts_like_autocast():
    """Custom ops are outside autocast, so gelu_mlp casts as autocast would: bf16 output,
    float32 parameter gradients, close to the plain FFN under the same autocast."""
    torch.manual_seed(2)
    ffn = FFN(32, 128, 0.0)
    x = torch.randn(3, 5, 32, requires_grad=True)
    dy = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _ffn_grads(ffn, x, dy, False)
        fused = _ffn_grads(ffn, x, dy, True)
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    assert [g.dtype for g in fused[1:]] == [torch.float32] * 5
    for a, b in zip(plain, fused):
        assert (a.float() - b.float()).norm() <= 2e-2 * a.float().norm()


def test_mlp_plan_and_auto():
    with pytest.raises(ConfigError) as e:
        ExecutionPlan(mlp="cublas")
    assert e.value.field == "mlp"
    x = torch.randn(2, 3, 8)
    assert not fused_usable(x)                                 # CPU: no cuBLASLt epilogues
    cfg = VARConfig(depth=1, num_classes=3, vocab_size=8, patch_nums=(1, 2))
    assert ExecutionPlan().resolve(cfg, "cpu", training=True, amp=torch.bfloat16).mlp == "plain"
    fused_on_cuda = ExecutionPlan().resolve(cfg, "cuda", training=True, amp=torch.bfloat16).mlp == "fused"
    assert fused_on_cuda == cublaslt.available()               # auto: where the epilogues run
    assert ExecutionPlan().resolve(cfg, "cuda", training=False, amp=torch.bfloat16).mlp == "plain"  # sampling
    assert not cublaslt.available() or torch.cuda.is_available()
    m = apply_plan(VAR(cfg), ExecutionPlan(mlp="fused").resolve(cfg, "cpu", training=True))
    assert isinstance(m.blocks[0].ffn, FusedFFN) and m.blocks[0].ffn.fc1 is m.blocks[0].ffn.fc1


@pytest.mark.parametrize("compiled", [False, True])
def test_model_with_fused_mlp_same_loss_and_gradients(tiny_vq_cfg, compiled, aot_eager):
    """The whole model under a plan with mlp="fused" (blocks compiled or not, two of three
    recomputed) gives the plain model's logits and gradients."""
    cfg = VARConfig(depth=3, vocab_size=tiny_vq_cfg.vocab_size, Cvae=tiny_vq_cfg.Cvae,
                    patch_nums=tiny_vq_cfg.patch_nums, num_classes=5, cond_drop_rate=0.0, drop_path_rate=0.0)
    plain = randomize_(VAR(cfg)).train()
    fused = apply_plan(copy.deepcopy(plain), ExecutionPlan(attention="dense", mlp="fused", compile=compiled,
                                                           checkpointing=2).resolve(cfg, "cpu", training=True))
    label, x = torch.tensor([0, 4, 5]), torch.randn(3, cfg.L - cfg.first_l, cfg.Cvae)
    outs = []
    for m in (plain, fused):
        logits = m(label, x)
        logits.square().mean().backward()
        outs.append((logits.detach(), [p.grad for p in m.parameters()]))
    (l0, g0), (l1, g1) = outs
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def _gemm_semantics(epilogue, a, transa, b, transb, d, bias=None, aux=None, algo=None):
    """cuBLASLt's column-major ``D = epilogue(op(A) op(B))`` on the column-major matrices that
    the row-major tensors are (a row-major ``(r, c)`` tensor is the ``c x r`` matrix ``t.T``)."""
    A, B = a.T, b.T
    opA = A.T if transa == cublaslt.OP_T else A
    opB = B.T if transb == cublaslt.OP_T else B
    assert opA.shape[1] == opB.shape[0] and d.shape == (opB.shape[1], opA.shape[0])
    D = opA @ opB                                               # (m, n)
    if epilogue in (cublaslt.EPILOGUE_BIAS, cublaslt.EPILOGUE_GELU_BIAS, cublaslt.EPILOGUE_GELU_AUX_BIAS):
        D = D + bias[:, None]                                   # bias: one per row of D
    if epilogue == cublaslt.EPILOGUE_GELU_AUX_BIAS:
        aux.copy_(D.T)                                          # GELU input, laid out like D
    if epilogue in (cublaslt.EPILOGUE_GELU_BIAS, cublaslt.EPILOGUE_GELU_AUX_BIAS):
        assert (aux is None) == (epilogue == cublaslt.EPILOGUE_GELU_BIAS)
        D = F.gelu(D, approximate="tanh")
    if epilogue == cublaslt.EPILOGUE_DGELU:
        D = torch.ops.aten.gelu_backward(D, aux.T, approximate="tanh")
    if epilogue == cublaslt.EPILOGUE_BGRADB:
        bias.copy_(opB.sum(0))                                  # one per column of D, summed over k
    d.copy_(D.T)
    return 1


def test_cublaslt_wrappers_compute_the_ffn_math(monkeypatch):
    monkeypatch.setattr(cublaslt, "gemm", _gemm_semantics)
    torch.manual_seed(3)
    N, C, H = 9, 4, 16
    x, w1, b1 = torch.randn(N, C), torch.randn(H, C), torch.randn(H)
    w2, dy = torch.randn(C, H), torch.randn(N, C)
    g, h = cublaslt.linear_gelu_aux(x, w1, b1)
    h_ref = F.linear(x, w1, b1)
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(g, F.gelu(h_ref, approximate="tanh"), atol=1e-5)
    dh = cublaslt.matmul_dgelu(dy, w2, h)
    assert torch.allclose(dh, torch.ops.aten.gelu_backward(dy @ w2, h, approximate="tanh"), atol=1e-5)
    assert torch.allclose(cublaslt.linear_gelu(x, w1, b1), g, atol=1e-5)   # inference: no GELU input kept


def test_cublaslt_gemm_rejects_mismatched_shapes(monkeypatch):
    monkeypatch.setattr(cublaslt, "_lib", lambda: object())
    with pytest.raises(ValueError, match="shapes do not match"):
        cublaslt.gemm(cublaslt.EPILOGUE_DEFAULT, torch.empty(6, 4), cublaslt.OP_T, torch.empty(5, 3),
                      cublaslt.OP_N, torch.empty(5, 6))


def test_cublaslt_gemm_reads_views_into_wider_rows(monkeypatch):
    """A view of the first columns of wider rows is the column-major matrix with the row stride
    as its leading dimension (no copy); a transposed or unaligned view is refused, not misread."""
    wide = torch.empty(6, 24)
    assert cublaslt.row_major(wide[:, :20]) and cublaslt._ld(wide[:, :20]) == 24
    assert cublaslt.row_major(torch.empty(5, 3)) and cublaslt._ld(torch.empty(5, 3)) == 3   # contiguous: any width
    assert cublaslt._ld(torch.empty(1, 24)[:, :20]) == 20   # one row: contiguous, its width
    assert not cublaslt.row_major(torch.empty(6, 21)[:, :20])     # row stride not a multiple of 8
    assert not cublaslt.row_major(torch.empty(20, 6).T)           # column-major
    monkeypatch.setattr(cublaslt, "_lib", lambda: object())
    with pytest.raises(ValueError, match="row-major operands"):
        cublaslt.gemm(cublaslt.EPILOGUE_DEFAULT, torch.empty(6, 4), cublaslt.OP_T, torch.empty(4, 5).T,
                      cublaslt.OP_N, torch.empty(5, 6))


def test_cublaslt_failure_falls_back_to_torch_ops(monkeypatch, caplog):
    """A cuBLASLt error (say, no algorithm for a shape) costs speed, not the run: the op
    computes the same values with torch ops and warns once."""
    import varcore.fast.fused_mlp as fm

    def fail(*args):
        raise cublaslt.CublasLtError("cuBLASLt heuristic returned status 15")
    monkeypatch.setattr(fm, "_use_cublaslt", lambda t: True)
    monkeypatch.setattr(cublaslt, "linear_gelu_aux", fail)
    monkeypatch.setattr(cublaslt, "matmul_dgelu", fail)
    fm._warn_fallback.cache_clear()
    x, w1, b1, w2 = torch.randn(5, 4), torch.randn(8, 4), torch.randn(8), torch.randn(4, 8)
    with caplog.at_level("WARNING", logger="varcore.fused_mlp"):
        g, h = fm.linear_gelu_aux(x, w1, b1)
        fm.linear_gelu_aux(x, w1, b1)
        dh = fm.matmul_dgelu(x, w2, h)
    assert torch.allclose(h, F.linear(x, w1, b1)) and torch.allclose(g, F.gelu(h, approximate="tanh"))
    assert torch.allclose(dh, torch.ops.aten.gelu_backward(x @ w2, h, approximate="tanh"))
    assert sum("linear_gelu_aux failed" in r.message for r in caplog.records) == 1
    assert any("matmul_dgelu failed" in r.message for r in caplog.records)


def test_fused_ffn_without_gradients_is_the_plain_ffn(monkeypatch):
    """Without gradients (evaluation, sampling) the fused FFN runs one epilogue matmul that keeps
    no GELU input. Driven through the op's torch fallback (the CPU's), it computes exactly the
    plain FFN's ops (fc1, tanh GELU, fc2), so the outputs are equal, not close; under bf16
    autocast it casts as autocast does. Where the epilogue cannot run, the plain FFN runs."""
    import varcore.fast.fused_mlp as fm
    torch.manual_seed(4)
    ffn = FFN(16, 64, 0.0).eval()
    fused = FusedFFN.of(ffn).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(fused(x), ffn(x))                   # CPU: not usable, the plain FFN
        monkeypatch.setattr(fm, "fused_usable", lambda t: True)
        monkeypatch.setattr(fm, "_use_cublaslt", lambda t: False)   # the op's torch fallback
        assert torch.equal(fused(x), ffn(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = fused(x), ffn(x)
        assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
        compiled = torch.compile(fused, backend="aot_eager", dynamic=True)   # the fake op's shapes
        for L in (3, 7):
            xl = torch.randn(2, L, 16)
            assert torch.equal(compiled(xl), ffn(xl))


def test_fused_ffn_leaves_fc2_bias_out_when_asked(monkeypatch):
    """``fc2_bias=False`` (the norm kernels add fc2's bias with the residual add): the FFN before
    the bias, with and without gradients, through the op's torch fallback, bit for bit the plain
    layers' ``fc2.weight`` product; the weights' and the input's gradients are the plain FFN's
    (the bias does not enter them) and fc2's bias gets none from the FFN."""
    import varcore.fast.fused_mlp as fm
    torch.manual_seed(5)
    ffn = FFN(16, 64, 0.0)
    fused = FusedFFN.of(ffn)
    x = torch.randn(2, 5, 16, requires_grad=True)
    dy = torch.randn(2, 5, 16)
    want = F.linear(ffn.hidden(x), ffn.fc2.weight)
    y = fused(x, fc2_bias=False)
    assert torch.equal(y, want)
    others = [x, ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight]
    got = torch.autograd.grad(y, others, dy, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, torch.autograd.grad(ffn(x), others, dy)))
    y.backward(dy)
    assert ffn.fc2.bias.grad is None and ffn.fc2.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(fused(x, fc2_bias=False), want)              # CPU: not usable, the plain layers
        monkeypatch.setattr(fm, "fused_usable", lambda t: True)
        monkeypatch.setattr(fm, "_use_cublaslt", lambda t: False)   # the op's torch fallback
        assert torch.equal(fused(x, fc2_bias=False), want)
