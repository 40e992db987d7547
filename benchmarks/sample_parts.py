"""The parts of a sampling batch timed on their own, with the variants worth comparing.

``--add-norm``: a block's residual add + LayerNorm + AdaLN modulation at every scale of a
CFG batch (2B rows per token), at the width of each ``--depth``: the Triton kernel
(``varcore.fast.add_norm``), the same composition compiled as the sampling engine compiles it
(one region, dynamic token count, scales in sampling order), and eager; the kernel's ``x`` must
equal eager's bit for bit, its bf16 ``h`` be eager's or one rounding step away.
``--filter``: drawing the tokens of all K scales from float logits at the paper's shapes
(B images, CFG halves mixed, top-k then top-p, one draw per token): the sampler's
``sample_logits`` against the draw it replaced (a sort of all V, ``torch.multinomial``). ``--decode``: the VQ-VAE decoder on B latents, by chunk
size and compile, and compiled in chunks of 16 with each form of its upsampling + convolution
(``varcore.fast.subpixel.UPSAMPLE_FORMS``). ``--kv-attention``: each scale's queries over the KV
cache of every block (the cache layout of the compiled engine, 2B rows), per ``--depth``: the
Triton kernel (``varcore.fast.kv_attention``, its tiles by scale; ``--kv-sweep``: also fixed tiles),
SDPA with each backend, and (``--kv-flex``) compiled FlexAttention; with each arm's largest
difference from float64 at the last scale. One JSON line per arm: median ms per batch.

    PYTHONPATH=. python benchmarks/sample_parts.py --filter --decode --add-norm --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import PAPER_VQ, emit, env, summary, time_ms  # noqa: E402
from varcore import PAPER_PATCH_NUMS, VQVAE  # noqa: E402
import varcore.sample as sample_mod  # noqa: E402
from varcore.fast.add_norm import add_ln_modulate  # noqa: E402
from varcore.fast.compile import compile_region  # noqa: E402
from varcore.fast.graphs import own_cublas_workspace  # noqa: E402
from varcore.fast import kv_attention as kva  # noqa: E402
from varcore.fast.subpixel import UPSAMPLE_FORMS  # noqa: E402
from varcore.var import modulate  # noqa: E402
from varcore.sample import decode_images, filter_logits, guidance, sample_logits  # noqa: E402


def filter_multinomial(logits_BlV: torch.Tensor, top_k: int, top_p: float, generator) -> torch.Tensor:
    """The draw before round 10: filter_logits over all V (one sort), softmax, torch.multinomial."""
    B, l, V = logits_BlV.shape
    probs = filter_logits(logits_BlV.float().reshape(-1, V), top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(B, l)


def filter_arms(args, device) -> None:
    V, B, K = args.vocab, args.batch, len(PAPER_PATCH_NUMS)
    gen = torch.Generator(device=device).manual_seed(0)
    # bf16-rounded logits, as the head computes them under autocast (ties at the k-th value occur)
    logits = [(torch.randn(2 * B, p * p, V, device=device) * 3).bfloat16().float() for p in PAPER_PATCH_NUMS]

    def run(draw):
        def f():
            for k, lg in enumerate(logits):
                t = guidance(k, K, 1.5)
                draw((1 + t) * lg[:B] - t * lg[B:], args.top_k, args.top_p, gen)
        return f

    arms = {"sample_logits": sample_logits, "filter_multinomial": filter_multinomial,
            "cfg_mix_only": lambda x, *a: x}
    for name, draw in arms.items():
        s = summary(time_ms(run(draw), device, 2, args.iters))
        emit({"bench": "sample_filter", "arm": name, "batch": B, "vocab": V, "top_k": args.top_k,
              "top_p": args.top_p, **s, **env()})


def decode_arms(args, device) -> None:
    """Each arm's time, and its difference from the eager decoder on the same latents (for batches
    of up to ``varcore.sample.DECODE_GRAPH_MAX_IMAGES`` the compiled decoder replays CUDA graphs
    whose output buffer the next replay reuses: an image overwritten before it was copied out
    would show here as a large mean difference)."""
    vqvae = VQVAE(PAPER_VQ).to(device).eval()
    f_hat = torch.randn(args.batch, PAPER_VQ.Cvae, 16, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ref = decode_images(vqvae, f_hat, args.batch, compiled=False).float()
    default = sample_mod.DECODE_UPSAMPLE
    arms = [(min(c, args.batch), comp, default) for c, comp in ((16, True), (32, True), (64, True), (16, False), (64, False))]
    arms += [(min(16, args.batch), True, form) for form in UPSAMPLE_FORMS if form != default]
    for chunk, compiled, form in dict.fromkeys(arms):
        out = {}
        sample_mod.DECODE_UPSAMPLE = form

        def f():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out["img"] = decode_images(vqvae, f_hat, chunk, compiled=compiled)
        try:
            s = summary(time_ms(f, device, 2, args.iters))
            diff = (out["img"].float() - ref).abs()   # bf16 rounding: mean ~0.007; another image: ~0.27
            s.update(max_abs_diff_vs_eager=diff.max().item(), mean_abs_diff_vs_eager=diff.mean().item())
        except Exception as e:   # an arm that fails must not hide the others
            s = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        emit({"bench": "sample_decode", "chunk": chunk, "compiled": compiled, "batch": args.batch,
              **({"upsample": form} if compiled else {}), **s, **env()})
    sample_mod.DECODE_UPSAMPLE = default


def _eager_add_norm(x, y, gate, ln, scale, shift):
    x = x + y.mul(gate)
    return x, modulate(ln(x), scale, shift)


def _ordered(h: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers that count representable values (negative ones mirrored)."""
    b = h.to(torch.bfloat16).view(torch.int16).int()
    return torch.where(b < 0, -(b & 0x7FFF), b)


def _graphed(fn, device, warmup: int = 2):
    """``fn`` replayed as one CUDA graph on a GPU (after ``warmup`` eager calls), else itself."""
    if device.type != "cuda":
        return fn
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with own_cublas_workspace(), torch.cuda.graph(graph):   # a workspace of its own (varcore.fast.graphs)
        fn()
    return graph.replay


def add_norm_arms(args, device) -> None:
    """Per arm: one call at each of the K scales, replayed as one CUDA graph (on a GPU; kernel
    time, not launch time), and that times the ``2 depth`` calls a batch makes per scale (two per
    block). The check compares the kernel with eager at every scale: ``x`` bit for bit, ``h`` as
    the fraction of equal bf16 values and of values within one rounding step."""
    compiled = compile_region(_eager_add_norm, dynamic=None)
    for depth in args.depth:
        C, rows_B = 64 * depth, 2 * args.batch
        ln = torch.nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        mod = (torch.randn(rows_B, 6 * C, device=device) * 0.3).bfloat16().view(-1, 1, 6, C).unbind(2)
        gate, scale, shift = mod[0], mod[2], mod[4]
        data = [(torch.randn(rows_B, p * p, C, device=device) * 3,
                 torch.randn(rows_B, p * p, C, device=device).bfloat16()) for p in PAPER_PATCH_NUMS]
        arms = {"kernel": lambda x, y: add_ln_modulate(x, y, gate, ln, scale, shift, torch.bfloat16),
                "compiled": lambda x, y: compiled(x, y, gate, ln, scale, shift),
                "eager": lambda x, y: _eager_add_norm(x, y, gate, ln, scale, shift)}
        check = {"x_equal": True, "h_equal_frac": 1.0, "h_within_1_step_frac": 1.0, "h_max_abs_diff": 0.0}
        for x, y in data:   # correctness first, every scale
            with torch.autocast(device.type, dtype=torch.bfloat16):
                kx, kh = arms["kernel"](x, y)
                ex, eh = arms["eager"](x, y)
            steps = (_ordered(kh) - _ordered(eh)).abs()
            check["x_equal"] &= torch.equal(kx, ex)
            check["h_equal_frac"] = min(check["h_equal_frac"], (steps == 0).float().mean().item())
            check["h_within_1_step_frac"] = min(check["h_within_1_step_frac"], (steps <= 1).float().mean().item())
            check["h_max_abs_diff"] = max(check["h_max_abs_diff"], (kh.bfloat16().float() - eh.bfloat16().float()).abs().max().item())
        for name, fn in arms.items():
            def all_scales(fn=fn):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    for x, y in data:
                        fn(x, y)
            ms = summary(time_ms(_graphed(all_scales, device, warmup=3), device, 3, args.iters))["ms_median"]
            emit({"bench": "sample_add_norm", "arm": name, "depth": depth, "batch": args.batch,
                  "graph": device.type == "cuda", "ms_all_scales": ms, "ms_per_batch": round(ms * 2 * depth, 3),
                  **check, **env()})


def _kv_arms(args):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    arms = {"kernel": lambda q, k, v: kva.launch(kva.kv_attention_kernel, q, k, v, 1.0)}   # config_for(l)
    if args.kv_sweep:   # the fastest of round 16's full grid (BLOCK_M 64/128, BLOCK_N 32/64/128, 4/8 warps, 2-4 stages)
        for bm, bn, warps, stages in ((64, 32, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3),
                                      (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            arms["kernel_m%d_n%d_w%d_s%d" % (bm, bn, warps, stages)] = (
                lambda q, k, v, cfg=cfg: kva.launch(kva.kv_attention_kernel, q, k, v, 1.0, cfg))
    for name, backend in (("sdpa", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(q, k, v, backend=backend):
            with (sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
        arms[name] = run
    if args.kv_flex:
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.config.recompile_limit = 64   # one graph per scale and depth
        flex = torch.compile(flex_attention, dynamic=False)
        arms["flex"] = lambda q, k, v: flex(q, k, v, scale=1.0)
    return arms


def kv_attention_arms(args, device) -> None:
    """Per depth and arm: each scale's attention in every block, replayed as one CUDA graph per
    scale over per-block caches and queries laid out as the compiled engine makes them
    (``(2B, L, H, 64)`` caches, ``(2B, l, H, 64)`` queries, unit L2 norm times a temperature of 4).
    Error: the largest difference from float64 over the last scale of block 1."""
    L = sum(p * p for p in PAPER_PATCH_NUMS)
    for depth in args.depth:
        H, rows_B = depth, 2 * args.batch
        caches = [tuple(torch.nn.functional.normalize(torch.randn(rows_B, L, H, 64, device=device), dim=-1).bfloat16()
                        for _ in range(2)) for _ in range(depth)]
        for k_, v_ in caches:
            v_.mul_(3)
        ends = list(itertools.accumulate(p * p for p in PAPER_PATCH_NUMS))
        queries = [[(torch.nn.functional.normalize(torch.randn(rows_B, p * p, H, 64, device=device), dim=-1) * 4)
                    .bfloat16().transpose(1, 2) for p in PAPER_PATCH_NUMS] for _ in range(depth)]
        q0, k0, v0 = queries[0][-1], caches[0][0].transpose(1, 2), caches[0][1].transpose(1, 2)
        ref = torch.softmax(q0.double() @ k0.double().transpose(-1, -2), -1) @ v0.double()
        for name, fn in _kv_arms(args).items():
            try:
                err = (fn(q0, k0, v0).double() - ref).abs().max().item()
                per_scale = []
                for s, end in enumerate(ends):
                    def one_scale(s=s, end=end):
                        for blk in range(depth):
                            kc, vc = caches[blk]
                            fn(queries[blk][s], kc[:, :end].transpose(1, 2), vc[:, :end].transpose(1, 2))
                    per_scale.append(summary(time_ms(_graphed(one_scale, device), device, 2, args.iters))["ms_median"])
            except Exception as e:   # a backend that refuses a shape (cuDNN: key length 1)
                emit({"bench": "sample_kv_attention", "arm": name, "depth": depth, "error": repr(e)[:300], **env()})
                continue
            emit({"bench": "sample_kv_attention", "arm": name, "depth": depth, "batch": args.batch,
                  "ms_per_batch": round(sum(per_scale), 3), "ms_per_scale": [round(t, 3) for t in per_scale],
                  "max_abs_err_last_scale": err, **env()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--add-norm", action="store_true")
    ap.add_argument("--kv-attention", action="store_true")
    ap.add_argument("--kv-sweep", action="store_true", help="--kv-attention: also a grid of the kernel's tiles")
    ap.add_argument("--kv-flex", action="store_true", help="--kv-attention: also compiled FlexAttention")
    ap.add_argument("--depth", type=int, action="append", help="--add-norm / --kv-attention widths (64 x depth; default 24 and 30)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.filter:
        filter_arms(args, device)
    if args.decode:
        decode_arms(args, device)
    if args.add_norm:
        args.depth = args.depth or [24, 30]
        add_norm_arms(args, device)
    if args.kv_attention:
        args.depth = args.depth or [24, 30]
        kv_attention_arms(args, device)


if __name__ == "__main__":
    main()
