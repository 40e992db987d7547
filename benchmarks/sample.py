"""Sampling speed of VAR at the paper configuration (random weights), VQ-VAE decode included.

One JSON line per case: median ms per batch and per image of ``generate`` (K scales with
CFG, top-k, top-p, then the VQ-VAE decoder), the token and decode parts timed on their
own, images/s and peak memory. ``--check-tokens`` also draws one batch with the plain
and the static engine from the same generator seed and reports whether the tokens match.

    PYTHONPATH=. python benchmarks/sample.py --case 16:64 --case 16:1 --check-tokens
    PYTHONPATH=. python benchmarks/sample.py --case 16:64 --engine plain
    PYTHONPATH=. python benchmarks/sample.py --case 16:64 --model imported/var-d16.pt --tokenizer imported/tokenizer.pt

A case is ``depth:batch``; CFG 1.5, top-k 900, top-p 0.96 by default (the paper's).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import (PAPER_VQ, clocks_over, emit, env, gpu_gaps, peak_gib, reset_peak, summary,  # noqa: E402
                         time_ms, top_kernels)
from varcore import VAR, VARConfig, VQVAE, SamplingConfig, sample_tokens  # noqa: E402
import varcore.sample as sample_mod  # noqa: E402
from varcore.sample import decode_images  # noqa: E402
from varcore.fast.static_sampler import release_static_engine  # noqa: E402
from varcore.fast.subpixel import UPSAMPLE_FORMS  # noqa: E402
from pipeline.tokenizer.checkpoint import load_tokenizer  # noqa: E402
from pipeline.training.checkpoint import load_var  # noqa: E402


def closures(var: VAR, vqvae: VQVAE, batch: int, args, device: torch.device):
    """``(tokens, decode, generate, label_B, sampling)`` of one case: what is timed and profiled."""
    sampling = SamplingConfig(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, engine=args.engine)
    label_B = torch.arange(batch, device=device) % var.cfg.num_classes
    gen = torch.Generator(device=device).manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    f_hat = None

    def tokens():
        nonlocal f_hat
        with amp:
            _, f_hat = sample_tokens(var, vqvae.quantizer, label_B, sampling, gen)

    def decode():  # plain: eager decoder; otherwise compiled, channels-last, 16 images at a time
        with amp:
            decode_images(vqvae, f_hat, args.decode_chunk or (batch if args.engine == "plain" else 16),
                          compiled=None if args.engine != "plain" else False)

    def generate():  # what varcore.generate does, under bf16 autocast
        tokens()
        decode()

    return tokens, decode, generate, label_B, sampling


def run_case(var: VAR, vqvae: VQVAE, batch: int, args, device: torch.device) -> dict:
    tokens, decode, generate, label_B, sampling = closures(var, vqvae, batch, args, device)
    reset_peak(device)
    t_all = summary(time_ms(generate, device, args.warmup, args.iters))
    t_tok = summary(time_ms(tokens, device, 1, args.iters))
    t_dec = summary(time_ms(decode, device, 1, args.iters))
    rec = {"bench": "sample", "depth": var.cfg.depth, "batch": batch, "engine": args.engine, "cfg": args.cfg,
           "top_k": args.top_k, "top_p": args.top_p, "decode_chunk": args.decode_chunk or None,
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_autotune": sample_mod.CUDNN_AUTOTUNE,
           "upsample": sample_mod.DECODE_UPSAMPLE,
           **t_all, "ms_per_image": round(t_all["ms_median"] / batch, 3),
           "images_per_s": round(batch / (t_all["ms_median"] / 1e3), 1),
           "tokens_ms_median": t_tok["ms_median"], "decode_ms_median": t_dec["ms_median"],
           "peak_gib": peak_gib(device), **env()}
    if args.clocks:
        rec.update(clocks=clocks_over(generate, device, args.iters))
    if args.check_tokens:
        rec.update(same_tokens(var, vqvae, label_B, sampling, device))
    return rec


def profile_case(var: VAR, vqvae: VQVAE, batch: int, args, device: torch.device) -> None:
    """``--profile`` / ``--gaps`` lines of one case. Run after every case is timed: the profiler
    can leave CUPTI attached after it ends (pytorch/pytorch#144455), slowing later launches in
    the same process (round 12: d16 at batch 1 took 25.6 ms after a d30 profile in its process,
    14.0 ms in a process without one)."""
    generate = closures(var, vqvae, batch, args, device)[2]
    if args.profile:
        top = top_kernels(generate, device, 1, top=args.profile_top)
        emit({"bench": "sample_profile", "depth": var.cfg.depth, "batch": batch, "kernel_ms_total": top.total_ms,
              "categories": top.categories, "top": list(top)})
    if args.gaps:
        emit({"bench": "sample_gaps", "depth": var.cfg.depth, "batch": batch, **gpu_gaps(generate, device)})


def same_tokens(var, vqvae, label_B, sampling, device) -> dict:
    """Tokens of one seeded batch: the uncompiled static engine must match the plain loop
    exactly; the compiled one rounds differently, so report the fraction that match."""
    out = {}
    for engine in ("plain", "static_exact", "static"):
        s = SamplingConfig(sampling.cfg, sampling.top_k, sampling.top_p, engine=engine)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            idx, _ = sample_tokens(var, vqvae.quantizer, label_B, s, torch.Generator(device=device).manual_seed(7))
        out[engine] = torch.cat([i.flatten(1) for i in idx], 1)
    return {"tokens_equal_plain_vs_static_exact": torch.equal(out["plain"], out["static_exact"]),
            "tokens_match_plain_vs_static_compiled": round((out["plain"] == out["static"]).float().mean().item(), 4),
            "first_scales_match_compiled": bool((out["plain"][:, :14] == out["static"][:, :14]).all())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], help="depth:batch")
    ap.add_argument("--engine", default="auto", choices=["auto", "plain", "static", "static_exact"])
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--decode-chunk", type=int, default=0, help="decode this many images at a time (default: all for plain, 16 otherwise)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="also set cudnn.benchmark globally")
    ap.add_argument("--no-cudnn-autotune", action="store_true", help="varcore.sample.CUDNN_AUTOTUNE = False")
    ap.add_argument("--upsample", choices=sorted(UPSAMPLE_FORMS), help="varcore.sample.DECODE_UPSAMPLE "
                    "(how the compiled decoder upsamples; default: the library's)")
    ap.add_argument("--profile", action="store_true", help="also print the top device kernels of a batch (after all cases are timed)")
    ap.add_argument("--profile-top", type=int, default=25, help="kernels listed by --profile")
    ap.add_argument("--gaps", action="store_true", help="also print where the GPU idles in a batch")
    ap.add_argument("--check-tokens", action="store_true")
    ap.add_argument("--model", type=Path, help="time this VAR file (e.g. an imported official one) instead of "
                                               "random weights; its depth must be the case's")
    ap.add_argument("--tokenizer", type=Path, help="with --model: the tokenizer file to decode with")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--clocks", action="store_true", help="sample the SM clock, power and clock-lowering "
                    "reasons (nvidia-smi) over as many batches again")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    sample_mod.CUDNN_AUTOTUNE = not args.no_cudnn_autotune
    if args.upsample:
        sample_mod.DECODE_UPSAMPLE = args.upsample
    torch.manual_seed(0)
    vqvae = (load_tokenizer(args.tokenizer) if args.tokenizer else VQVAE(PAPER_VQ)).to(device).eval()
    for var, batch in cases(args, device):
        try:
            emit(run_case(var, vqvae, batch, args, device))
        except Exception as e:  # a failed case must not hide the others' figures
            emit({"bench": "sample", "depth": var.cfg.depth, "batch": batch, "engine": args.engine,
                  "error": f"{type(e).__name__}: {str(e)[:500]}"})
    if args.profile or args.gaps:   # after all timing (see profile_case)
        for var, batch in cases(args, device):
            profile_case(var, vqvae, batch, args, device)


def cases(args, device: torch.device):
    """``(model, batch)`` per ``--case``, one model per run of equal depths (the previous one's
    engine released first)."""
    var, depth = None, None
    for case in args.case:
        d, batch = (int(p) for p in case.split(":"))
        if d != depth:
            if var is not None:
                release_static_engine(var)
            var = depth = None
            gc.collect()
            var = load_var(args.model)[0] if args.model else VAR(VARConfig(depth=d))
            if var.cfg.depth != d:
                raise SystemExit(f"--model {args.model}: depth {var.cfg.depth}, the case asks for {d}")
            var, depth = var.to(device).eval(), d
        yield var, batch
    if var is not None:
        release_static_engine(var)


if __name__ == "__main__":
    main()
