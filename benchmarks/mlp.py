"""One FFN (fc1, tanh GELU, fc2) at the paper shapes: the GELU in the matmul epilogues
(``varcore.fused_mlp``) against the plain modules, forward + backward, compiled, bf16
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
from bench_utils import emit, env, summary, time_ms  # noqa: E402
from varcore import cublaslt, fused_mlp  # noqa: E402
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
    dhl, dbl = cublaslt.matmul_dgelu_bgrad(dy, w2, hl)
    dh32 = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), hl.float(), approximate="tanh")
    hb = F.linear(x, w1, b1)
    dhb = torch.ops.aten.gelu_backward(dy @ w2, hl, approximate="tanh")
    return {"h_rel_err": rel(hl, h32), "h_rel_err_torch_bf16": rel(hb, h32),
            "g_rel_err": rel(gl, F.gelu(h32, approximate="tanh")),
            "g_rel_err_torch_bf16": rel(F.gelu(hb, approximate="tanh"), F.gelu(h32, approximate="tanh")),
            "dh_rel_err": rel(dhl, dh32), "dh_rel_err_torch_bf16": rel(dhb, dh32),
            "db_rel_err": rel(dbl, dh32.sum(0)), "db_rel_err_of_dh_sum": rel(dhl.float().sum(0), dh32.sum(0))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    C, N = 64 * args.depth, args.batch * sum(p * p for p in PAPER_PATCH_NUMS)
    base = {"bench": "mlp", "depth": args.depth, "batch": args.batch, "tokens": N, **env()}
    emit({**base, "arm": "ops", "cublaslt": cublaslt.available(), **op_errors(N, C, dev)})
    torch.manual_seed(0)
    ffn = FFN(C, 4 * C, 0.0).to(dev)
    x = torch.randn(args.batch, N // args.batch, C, device=dev).bfloat16().requires_grad_()
    dy = torch.randn_like(x)
    params = [x, *ffn.parameters()]
    ref_y = ffn.double()(x.double())
    ref = torch.autograd.grad(ref_y, [x, *ffn.parameters()], dy.double())
    ffn.float()
    for arm, fused in (("plain", False), ("fused", True)):
        fn = torch.compile(lambda x, fused=fused: ffn(x, fused))

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
