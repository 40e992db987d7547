"""One FFN (fc1, tanh GELU, fc2) at the paper shapes: the GELU in the matmul epilogues
(``varcore.fast.fused_mlp``) against the plain modules, forward + backward, compiled, bf16
autocast over float32 weights as in training. Also checks the fused ops' outputs and
gradients against the plain path and against float32.

    PYTHONPATH=. python benchmarks/mlp.py --depth 24 --batch 32

One JSON line per arm (ms median, error against float32) and one with the raw ops' errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import emit, env, event_ms, summary, time_ms  # noqa: E402
from varcore.fast import cublaslt, fused_mlp  # noqa: E402
from varcore.var import FFN, PAPER_PATCH_NUMS  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def op_errors(N: int, C: int, dev) -> dict:
    """The cuBLASLt ops against the same math in plain bf16 torch ops and in float32."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, C, device=dev, generator=g).bfloat16()
    w1 = (torch.randn(4 * C, C, device=dev, generator=g) / C ** 0.5).bfloat16()
    b1 = torch.randn(4 * C, device=dev, generator=g).bfloat16() * 0.1
    w2 = (torch.randn(C, 4 * C, device=dev, generator=g) / (4 * C) ** 0.5).bfloat16()
    dy = torch.randn(N, C, device=dev, generator=g).bfloat16()
    gl, hl = cublaslt.linear_gelu_aux(x, w1, b1)
    h32 = F.linear(x.float(), w1.float(), b1.float())
    dhl = cublaslt.matmul_dgelu(dy, w2, hl)
    dh32 = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), hl.float(), approximate="tanh")
    hb = F.linear(x, w1, b1)
    dhb = torch.ops.aten.gelu_backward(dy @ w2, hl, approximate="tanh")
    # weight gradient in float32 with the bias gradient from the same matmul (BGRADB)
    dw, db = torch.empty(4 * C, C, device=dev), torch.empty(4 * C, device=dev)
    cublaslt.gemm(cublaslt.EPILOGUE_BGRADB, x, cublaslt.OP_N, dhb, cublaslt.OP_T, dw, bias=db)
    return {"h_rel_err": rel(hl, h32), "h_rel_err_torch_bf16": rel(hb, h32),
            "g_rel_err": rel(gl, F.gelu(h32, approximate="tanh")),
            "g_rel_err_torch_bf16": rel(F.gelu(hb, approximate="tanh"), F.gelu(h32, approximate="tanh")),
            "dh_rel_err": rel(dhl, dh32), "dh_rel_err_torch_bf16": rel(dhb, dh32),
            "wgrad_fp32_rel_err": rel(dw, dhb.float().t() @ x.float()),
            "bgradb_rel_err": rel(db, dhb.float().sum(0))}


def sweep(N: int, C: int, dev, base: dict) -> None:
    """Every algorithm cuBLASLt's heuristic offers for each epilogue, against torch's own ops."""
    x, dy = torch.randn(N, C, device=dev).bfloat16(), torch.randn(N, C, device=dev).bfloat16()
    w1, b1 = torch.randn(4 * C, C, device=dev).bfloat16() / C ** 0.5, torch.zeros(4 * C, device=dev).bfloat16()
    w2 = torch.randn(C, 4 * C, device=dev).bfloat16() / (4 * C) ** 0.5
    h, g, db = torch.empty(N, 4 * C, device=dev).bfloat16(), torch.empty(N, 4 * C, device=dev).bfloat16(), b1.clone()
    hb = F.linear(x, w1, b1)
    torch_ops = {"torch_linear_bias": lambda: F.linear(x, w1, b1), "torch_gelu": lambda: F.gelu(hb, approximate="tanh"),
                 "torch_dy_w2": lambda: dy @ w2,
                 "torch_gelu_backward": lambda: torch.ops.aten.gelu_backward(hb, hb, approximate="tanh"),
                 "torch_colsum": lambda: hb.sum(0)}
    for name, fn in torch_ops.items():
        emit({**base, "arm": "sweep", "op": name, "ms": round(event_ms(fn), 4)})
    dw_b, dw_f = torch.empty(4 * C, C, device=dev).bfloat16(), torch.empty(4 * C, C, device=dev)
    db_f = torch.empty(4 * C, device=dev)
    emit({**base, "arm": "sweep", "op": "torch_wgrad_bf16", "ms": round(event_ms(lambda: hb.t() @ x), 4)})
    emit({**base, "arm": "sweep", "op": "torch_wgrad_bf16_to_fp32",
          "ms": round(event_ms(lambda: (hb.t() @ x).float()), 4)})
    L = cublaslt
    cases = {"lt_bias": (L.EPILOGUE_BIAS, w1, L.OP_T, x, L.OP_N, g, b1, None),
             "lt_gelu_aux_bias": (L.EPILOGUE_GELU_AUX_BIAS, w1, L.OP_T, x, L.OP_N, g, b1, h),
             "lt_default_dgrad": (L.EPILOGUE_DEFAULT, w2, L.OP_N, dy, L.OP_N, g, None, None),
             "lt_dgelu": (L.EPILOGUE_DGELU, w2, L.OP_N, dy, L.OP_N, g, None, hb),
             "lt_dgelu_bgrad": (L.EPILOGUE_DGELU_BGRAD, w2, L.OP_N, dy, L.OP_N, g, db, hb),
             "lt_wgrad_bf16": (L.EPILOGUE_DEFAULT, x, L.OP_N, hb, L.OP_T, dw_b, None, None),
             "lt_wgrad_fp32": (L.EPILOGUE_DEFAULT, x, L.OP_N, hb, L.OP_T, dw_f, None, None),
             "lt_wgrad_fp32_bgradb": (L.EPILOGUE_BGRADB, x, L.OP_N, hb, L.OP_T, dw_f, db_f, None),
             "lt_wgrad_bf16_bgradb": (L.EPILOGUE_BGRADB, x, L.OP_N, hb, L.OP_T, dw_b, db, None)}
    for name, args in cases.items():
        try:
            n = cublaslt.gemm(*args, algo=0)
            for i in range(n):
                emit({**base, "arm": "sweep", "op": name, "algo": i,
                      "ms": round(event_ms(lambda: cublaslt.gemm(*args, algo=i)), 4)})
            cublaslt.gemm(*args)   # times the algorithms and keeps the fastest
            emit({**base, "arm": "sweep", "op": name, "algo": "tuned",
                  "ms": round(event_ms(lambda: cublaslt.gemm(*args)), 4)})
        except Exception as e:   # an epilogue this cuBLASLt lacks must not hide the others
            emit({**base, "arm": "sweep", "op": name, "error": f"{type(e).__name__}: {e}"})


def bias_column(N: int, C: int, dev, base: dict, iters: int, pad: int = 8) -> None:
    """fc1's bias gradient from its weight gradient's matmul: with a column of ones after the
    FFN input's ``C`` columns (and ``pad - 1`` zeros, keeping rows 16-byte aligned), ``dh^T [x, 1]``
    has the bias gradient (``dh`` summed over tokens) as its column ``C``. Times what that costs
    the three matmuls that read or write rows of that width against what the separate sum costs,
    and checks the column against the sum in float32."""
    g = torch.Generator(device=dev).manual_seed(0)
    x_wide = torch.randn(N, C + pad, device=dev, generator=g).bfloat16()
    x_wide[:, C], x_wide[:, C + 1:] = 1, 0
    x, x_view = x_wide[:, :C].contiguous(), x_wide[:, :C]
    dh = torch.randn(N, 4 * C, device=dev, generator=g).bfloat16()
    w1 = (torch.randn(4 * C, C, device=dev, generator=g) / C ** 0.5).bfloat16()
    b1 = torch.zeros(4 * C, device=dev).bfloat16()
    w1_wide = torch.zeros(4 * C, C + pad, device=dev).bfloat16()
    w1_wide[:, :C] = w1
    dx_wide = torch.empty(N, C + pad, device=dev).bfloat16()

    def fc1_wide_rows():   # the GELU epilogue matmul reading x as the first C columns of the wide rows
        g_NM, h_NM = torch.empty(N, 4 * C, device=dev).bfloat16(), torch.empty(N, 4 * C, device=dev).bfloat16()
        cublaslt.gemm(cublaslt.EPILOGUE_GELU_AUX_BIAS, w1, cublaslt.OP_T, x_view, cublaslt.OP_N, g_NM, b1, h_NM)
        return g_NM, h_NM
    arms = {"wgrad": lambda: dh.t() @ x, "bias_sum": lambda: dh.sum(0),
            "wgrad_ones_column": lambda: dh.t() @ x_wide,
            "fc1_fwd": lambda: cublaslt.linear_gelu_aux(x, w1, b1),
            "fc1_fwd_wide_rows": fc1_wide_rows,
            "dx": lambda: dh @ w1, "dx_into_wide_rows": lambda: torch.mm(dh, w1, out=dx_wide[:, :C]),
            "dx_zero_padded_weight": lambda: dh @ w1_wide}
    ref = dh.float().sum(0)
    err = ((dh.t() @ x_wide)[:, C].float() - ref).abs().max().item() / ref.abs().max().item()
    same = {"fc1_fwd_wide_rows_equal": all(torch.equal(a, b) for a, b in zip(fc1_wide_rows(),
                                                                              cublaslt.linear_gelu_aux(x, w1, b1))),
            "dx_into_wide_rows_equal": bool(torch.equal(arms["dx_into_wide_rows"]()[:, :C], dh @ w1))}
    ms = {arm: summary(time_ms(fn, dev, 3, iters))["ms_median"] for arm, fn in arms.items()}
    emit({**base, "arm": "bias_column", "pad": pad, "ms": ms, "bias_err_rel_max": err, **same,
          "wgrad_saved_ms": round(ms["wgrad"] + ms["bias_sum"] - ms["wgrad_ones_column"], 4),
          "net_ms": round(ms["wgrad"] + ms["bias_sum"] - ms["wgrad_ones_column"] - ms["fc1_fwd_wide_rows"]
                          + ms["fc1_fwd"] - ms["dx_into_wide_rows"] + ms["dx"], 4)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time every cuBLASLt algorithm per epilogue")
    ap.add_argument("--bias-column", action="store_true",
                    help="only time fc1's bias gradient from its weight gradient's matmul (a column of ones)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    C, N = 64 * args.depth, args.batch * sum(p * p for p in PAPER_PATCH_NUMS)
    base = {"bench": "mlp", "depth": args.depth, "batch": args.batch, "tokens": N, **env()}
    if args.bias_column:
        if not cublaslt.available():
            raise SystemExit("--bias-column times cuBLASLt's epilogue matmul, and cuBLASLt could not be loaded")
        return bias_column(N, C, dev, base, args.iters)
    emit({**base, "arm": "ops", "cublaslt": cublaslt.available(), **op_errors(N, C, dev)})
    if args.sweep:
        sweep(N, C, dev, base)
    torch.manual_seed(0)
    ffn = FFN(C, 4 * C, 0.0).to(dev)
    x = torch.randn(args.batch, N // args.batch, C, device=dev).bfloat16().requires_grad_()
    dy = torch.randn_like(x)
    params = [x, *ffn.parameters()]
    ref_y = ffn.double()(x.double())
    ref = torch.autograd.grad(ref_y, [x, *ffn.parameters()], dy.double())
    ffn.float()
    for arm, fused in (("plain", False), ("fused", True)):
        fn = torch.compile(fused_mlp.FusedFFN.of(ffn) if fused else ffn)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(x)
            return torch.autograd.grad(y, params, dy)
        grads = step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        errs = {f"grad_rel_err_{n}": round(rel(a, b), 5)
                for n, a, b in zip(["x", "w1", "b1", "w2", "b2"], grads, ref)}
        s = summary(time_ms(step, dev, 3, args.iters))
        emit({**base, "arm": arm, **s, "y_rel_err": round(rel(y, ref_y), 5), **errs})


if __name__ == "__main__":
    main()
