"""A training block's normalisations, forward and backward, timed on their own.

Per ``--case depth:batch``, at the paper's 680 tokens and the block's width, under bf16 autocast.
``--part adaln``: the two LayerNorm + AdaLN modulations, with the bf16 residual stream the trainer
keeps and drop-path on (the paper's rate at that depth), the branch's bias (the output projection's,
which the trainer's kernels add) added with it:

    h1 = ln(x) (1 + scale1) + shift1;   x2 = x + drop_path((y + b) gamma1);   h2 = ln(x2) (1 + scale2) + shift2

then the backward from given gradients of ``h1``, ``h2`` and ``x2``. ``--part qk``: the attention's
projection to heads with the q/k L2 normalisation and temperature (``SelfAttention.qkv_heads``; the
projection's matmuls are in every arm, its ``categories`` split them out), then the backward from
given gradients of q, k and v. Arms: the Triton kernels of ``varcore.fast.adaln`` /
``varcore.fast.qk_norm`` (``kernels``), the plain composition compiled as the plan compiles
blocks (``inductor``), and eager. Each arm's device time per call is the sum of its kernels in
the profiler (so host launch time does not count); each arm's outputs and gradients are compared
with a float64 evaluation of the same math: the largest difference relative to the reference's
largest value, per output.

    PYTHONPATH=. python benchmarks/norm_parts.py --case 20:64 --case 24:32 --case 30:32
    PYTHONPATH=. python benchmarks/norm_parts.py --case 20:64 --sweep    # and each tile configuration
    PYTHONPATH=. python benchmarks/norm_parts.py --part qk --case 20:64 --sweep
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import emit, env, top_kernels  # noqa: E402
from varcore import VARConfig  # noqa: E402
from varcore.fast import adaln, qk_norm  # noqa: E402
from varcore.fast.compile import compile_region  # noqa: E402
from varcore.var import DropPath, SelfAttention, modulate  # noqa: E402


def eager_pair(x, y, bias, mod_B16C, drop_path, ln):
    """The block's two LayerNorm + modulations as :class:`varcore.var.AdaLNBlock` writes them
    (``y + bias``: the output projection's output)."""
    gamma1, _, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)
    h1 = modulate(ln(x), scale1, shift1)
    x2 = x + drop_path((y + bias) * gamma1)
    return h1, x2, modulate(ln(x2), scale2, shift2)


def kernel_pair(x, y, bias, mod_B16C, drop_path, ln):
    gamma1, _, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)
    h1 = adaln.ln_modulate(x, ln, scale1, shift1)
    x2, h2 = adaln.add_ln_modulate(x, y, gamma1, drop_path.keep_mask(y), drop_path.keep_p, ln, scale2, shift2,
                                   bias)
    return h1, x2, h2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference from the reference, relative to the reference's largest value."""
    return float((got.detach().double() - want).abs().max() / want.abs().max())


def time_tiles(bench: str, depth: int, B: int, parts: dict, args, device: torch.device) -> None:
    """One JSON line per tile configuration: ``parts`` maps a part ("forward", "backward") to its
    configurations and a function running that part's kernels under one of them."""
    for part, (configs, run) in parts.items():
        for tiles in configs:
            try:
                top = top_kernels(lambda tiles=tiles: run(tiles), device, steps=args.steps, top=4)
                rec = {"kernel_ms": top.total_ms}
            except Exception as e:   # e.g. out of registers or shared memory for a tile
                rec = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            emit({"bench": bench, "part": part, "depth": depth, "batch": B,
                  "config": dataclasses.asdict(tiles), **rec, **env()})


def run_case(depth: int, B: int, args, device: torch.device) -> None:
    cfg = VARConfig(depth=depth)
    C, L = cfg.C, cfg.L
    g = torch.Generator(device=device).manual_seed(0)
    ln = torch.nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
    drop_path = DropPath(cfg.dpr).to(device).train()
    x = (torch.randn(B, L, C, device=device, generator=g) * 2).bfloat16().requires_grad_()
    y = torch.randn(B, L, C, device=device, generator=g).bfloat16().requires_grad_()
    bias = (torch.randn(C, device=device, generator=g) * 0.1).bfloat16().requires_grad_()
    mod = (torch.randn(B, 1, 6, C, device=device, generator=g) * 0.3).bfloat16().requires_grad_()
    grads = [torch.randn(B, L, C, device=device, generator=g).bfloat16() for _ in range(3)]
    arms = {"kernels": kernel_pair, "inductor": compile_region(eager_pair, dynamic=False, tuned=True),
            "eager": eager_pair}

    def step(fn):
        def call():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outs = fn(x, y, bias, mod, drop_path, ln)
            torch.autograd.backward(outs, grads)
            return outs
        return call

    # the reference: the same draws of the drop-path mask, in float64
    ref_in = [t.detach().double().requires_grad_() for t in (x, y, bias, mod)]
    for name, fn in arms.items():
        for t in (x, y, bias, mod):
            t.grad = None
        torch.manual_seed(1)
        outs = step(fn)()
        torch.manual_seed(1)
        ref_outs = eager_pair(*ref_in, drop_path, ln.double())
        for t in ref_in:
            t.grad = None
        torch.autograd.backward(ref_outs, [gr.double() for gr in grads])
        err = {key: rel_err(a, b) for key, a, b in (
            ("h1", outs[0], ref_outs[0]), ("x2", outs[1], ref_outs[1]), ("h2", outs[2], ref_outs[2]),
            ("g_x", x.grad, ref_in[0].grad), ("g_y", y.grad, ref_in[1].grad), ("g_bias", bias.grad, ref_in[2].grad),
            ("g_mod", mod.grad, ref_in[3].grad))}
        top = top_kernels(step(fn), device, steps=args.steps, top=args.top)
        emit({"bench": "norm_parts", "arm": name, "depth": depth, "batch": B, "C": C, "L": L,
              "kernel_ms": top.total_ms, "rel_err_vs_fp64": {k: round(v, 6) for k, v in err.items()},
              "top": list(top), **env()})


def sweep_case(depth: int, B: int, args, device: torch.device) -> None:
    """Each tile configuration of the kernels alone (no autograd): the forward pair (``h1``; ``x2``
    and ``h2``) and the backward pair, device time per call, one JSON line per configuration."""
    forward, backward = adaln_kernels(depth, B, device)
    base = adaln.KERNEL_CONFIG
    fwd = [dataclasses.replace(base, fwd_rows=r, fwd_warps=w) for r, w in itertools.product((1, 2, 4, 8), (4, 8, 16))]
    bwd = [dataclasses.replace(base, bwd_rows=n, bwd_tile=t, bwd_warps=w, bwd_stages=1)
           for n, t, w in itertools.product((16, 32, 64), (1, 2, 4), (4, 8, 16))]
    bwd += [dataclasses.replace(base, bwd_rows=n, bwd_tile=t, bwd_warps=w, bwd_stages=s)   # the loop pipelined
            for n, t, w, s in itertools.product((16, 32), (1, 2), (4, 8), (2, 3, 4))]
    time_tiles("norm_sweep", depth, B, {"forward": (fwd, forward), "backward": (bwd, backward)}, args, device)


def adaln_kernels(depth: int, B: int, device: torch.device):
    """``forward(tiles)`` and ``backward(tiles)``: a block's pair of LayerNorm + AdaLN kernels
    alone (no autograd), forward and backward, under a tile configuration (default: the
    trainer's)."""
    cfg = VARConfig(depth=depth)
    C, L = cfg.C, cfg.L
    g = torch.Generator(device=device).manual_seed(0)
    x, y, g_h, g_res = (torch.randn(B, L, C, device=device, generator=g).bfloat16() for _ in range(4))
    bias = torch.randn(C, device=device, generator=g).bfloat16()
    gate, _, scale1, scale2, shift1, shift2 = (torch.randn(B, 1, 6, C, device=device, generator=g) * 0.3
                                               ).bfloat16().unbind(2)
    keep = (torch.rand(B, device=device, generator=g) > 0.1).float()
    keep_p = torch.tensor(0.9, device=device)
    _, _, mean, rstd = adaln.launch_forward(adaln.adaln_fwd_kernel, x, None, None, None, None, scale1, shift1,
                                            1e-6, torch.bfloat16)

    def forward(tiles=adaln.KERNEL_CONFIG):
        adaln.launch_forward(adaln.adaln_fwd_kernel, x, None, None, None, None, scale1, shift1, 1e-6,
                             torch.bfloat16, tiles)
        adaln.launch_forward(adaln.adaln_fwd_kernel, x, y, gate, keep, keep_p, scale2, shift2, 1e-6,
                             torch.bfloat16, tiles, bias_C=bias)

    def backward(tiles=adaln.KERNEL_CONFIG):
        adaln.launch_backward(adaln.adaln_bwd_kernel, g_h, None, x, None, None, None, None, scale1, mean, rstd, tiles)
        adaln.launch_backward(adaln.adaln_bwd_kernel, g_h, g_res, x, y, gate, keep, keep_p, scale2, mean, rstd,
                              tiles, bias_C=bias)
    return forward, backward


def plain_qkv(attn: SelfAttention, x):
    return attn.qkv_heads(x)


def qk_setup(depth: int, B: int, device: torch.device):
    """A block's attention with biases and temperatures (1 to 100) drawn, its input and the
    gradients of its heads."""
    cfg = VARConfig(depth=depth)
    torch.manual_seed(0)
    attn = SelfAttention(cfg).to(device)
    with torch.no_grad():
        attn.q_bias.normal_(0, 0.1)
        attn.v_bias.normal_(0, 0.1)
        attn.scale_mul_1H11.uniform_(0.0, 4.6)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, cfg.L, cfg.C, device=device, generator=g).bfloat16().requires_grad_()
    grads = [torch.randn(B, cfg.H, cfg.L, cfg.C // cfg.H, device=device, generator=g).bfloat16() for _ in range(3)]
    return cfg, attn, x, grads


def qk_case(depth: int, B: int, args, device: torch.device) -> None:
    cfg, attn, x, grads = qk_setup(depth, B, device)
    arms = {"kernels": qk_norm.qkv_heads, "inductor": compile_region(plain_qkv, dynamic=False, tuned=True),
            "eager": plain_qkv}
    ref_attn = copy.deepcopy(attn).double()
    ref_x = x.detach().double().requires_grad_()
    ref_outs = ref_attn.qkv_heads(ref_x)
    torch.autograd.backward(ref_outs, [gr.double() for gr in grads])
    params = ("qkv.weight", "q_bias", "v_bias", "scale_mul_1H11")
    ref_grads = dict(ref_attn.named_parameters())

    def step(fn):
        def call():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                outs = fn(attn, x)
            torch.autograd.backward(outs, grads)
            return outs
        return call

    for name, fn in arms.items():
        attn.zero_grad(set_to_none=True)
        x.grad = None
        outs = step(fn)()
        got = dict(attn.named_parameters())
        err = {key: rel_err(a, b) for key, a, b in (
            ("q", outs[0], ref_outs[0]), ("k", outs[1], ref_outs[1]), ("v", outs[2], ref_outs[2]),
            ("g_x", x.grad, ref_x.grad), *((f"g_{p}", got[p].grad, ref_grads[p].grad) for p in params))}
        top = top_kernels(step(fn), device, steps=args.steps, top=args.top)
        emit({"bench": "norm_parts", "part": "qk", "arm": name, "depth": depth, "batch": B, "C": cfg.C, "L": cfg.L,
              "kernel_ms": top.total_ms, "categories": top.categories,
              "rel_err_vs_fp64": {k: round(v, 6) for k, v in err.items()}, "top": list(top), **env()})


def qk_kernels(depth: int, B: int, device: torch.device):
    """``forward(tiles)`` and ``backward(tiles)``: the q/k kernels alone (no autograd, no
    matmul) on a block's projected rows, under a tile configuration (default: the trainer's)."""
    cfg, attn, _, grads = qk_setup(depth, B, device)
    g = torch.Generator(device=device).manual_seed(1)
    qkv = torch.randn(B, cfg.L, 3 * cfg.C, device=device, generator=g).bfloat16()
    temp = attn.temperature_H().detach()
    _, _, _, rnorm = qk_norm.launch_forward(qk_norm.qkv_norm_fwd_kernel, qkv, attn.q_bias, attn.v_bias, temp)
    g_q, g_k, g_v = (gr.transpose(1, 2) for gr in grads)

    def forward(tiles=qk_norm.KERNEL_CONFIG):
        qk_norm.launch_forward(qk_norm.qkv_norm_fwd_kernel, qkv, attn.q_bias, attn.v_bias, temp, config=tiles)

    def backward(tiles=qk_norm.KERNEL_CONFIG):
        qk_norm.launch_backward(qk_norm.qkv_norm_bwd_kernel, g_q, g_k, g_v, qkv, attn.q_bias, rnorm, temp,
                                config=tiles)
    return forward, backward


def qk_sweep_case(depth: int, B: int, args, device: torch.device) -> None:
    """Each tile configuration of the q/k kernels alone (no autograd, no matmul), device time per
    call, one JSON line per configuration."""
    forward, backward = qk_kernels(depth, B, device)
    base = qk_norm.KERNEL_CONFIG
    fwd = [dataclasses.replace(base, fwd_rows=r, fwd_warps=w)
           for r, w in itertools.product((1, 2, 4, 8, 16), (2, 4, 8))]
    bwd = [dataclasses.replace(base, bwd_rows=n, bwd_warps=w, bwd_stages=1)
           for n, w in itertools.product((8, 16, 32, 64), (2, 4, 8))]
    bwd += [dataclasses.replace(base, bwd_rows=n, bwd_warps=w, bwd_stages=s)   # the loop pipelined
            for n, w, s in itertools.product((16, 32), (4, 8), (2, 3, 4))]

    time_tiles("qk_norm_sweep", depth, B, {"forward": (fwd, forward), "backward": (bwd, backward)}, args, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", default=[], help="depth:batch (default 20:64)")
    ap.add_argument("--steps", type=int, default=5, help="profiled calls per arm")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per arm")
    ap.add_argument("--sweep", action="store_true", help="also time each tile configuration of the kernels")
    ap.add_argument("--part", choices=("adaln", "qk"), default="adaln",
                    help="the LayerNorm + AdaLN pair (default) or the q/k normalisation")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    # eager's random draws inside the compiled arm too, so that its drop-path mask is the reference's
    torch._inductor.config.fallback_random = True
    for case in args.case or ["20:64"]:
        depth, B = (int(v) for v in case.split(":"))
        if args.sweep:
            (qk_sweep_case if args.part == "qk" else sweep_case)(depth, B, args, device)
        (qk_case if args.part == "qk" else run_case)(depth, B, args, device)


if __name__ == "__main__":
    main()
