"""Sampling speed of the raster-scan AR baseline against VAR at equal parameters (random weights).

The AR model (``varcore.ar.RasterAR``) draws the 16x16 token map of the paper's 256x256 images one
token per transformer call (256 calls); VAR draws its 10 scales one scale per call (10 calls). Both
have the same blocks at the same depth (equal N), both use a KV cache, CFG 1.5 with the null-class
batch, top-k 900 and top-p 0.96, under bf16 autocast on CUDA. VAR is timed with the plain KV-cached
loop (the same loop shape as AR's) and with its default engine (``auto``: CUDA graphs per scale on
CUDA). Token generation is timed apart from the VQ-VAE decode, which both share (AR's decoder is
the same network over one scale). One JSON line per case, then one line of ratios per batch.

    PYTHONPATH=. python benchmarks/ar_vs_var.py --depth 16 --batch 1 --batch 64            # GPU, paper shapes
    PYTHONPATH=. python benchmarks/ar_vs_var.py --shapes default --depth 4 --batch 1 --batch 64 --iters 3  # CPU

``--shapes default`` uses the default profile's tokenizer (32x32 images, V=512, AR 8x8 = 64 calls
against VAR's 6 scales) so that the comparison also runs on a laptop CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import DEFAULT_VQ, PAPER_VQ, emit, env, peak_gib, reset_peak, summary, time_ms  # noqa: E402
from varcore import VAR, VARConfig, VQVAE, SamplingConfig, sample_tokens  # noqa: E402
from varcore import ar  # noqa: E402
from varcore.fast.static_sampler import release_static_engine  # noqa: E402
from varcore.sample import decode_images  # noqa: E402

def models(shapes: str, depth: int, device: torch.device):
    """(VAR, its VQ-VAE, AR, its single-scale VQ-VAE), random weights, eval mode."""
    vq_cfg = PAPER_VQ if shapes == "paper" else DEFAULT_VQ
    num_classes = 1000 if shapes == "paper" else 10
    side = vq_cfg.patch_nums[-1]
    ar_vq_cfg = dataclasses.replace(vq_cfg, patch_nums=(side,), num_phi=None)
    torch.manual_seed(0)
    var = VAR(VARConfig(depth=depth, vocab_size=vq_cfg.vocab_size, Cvae=vq_cfg.Cvae, patch_nums=vq_cfg.patch_nums,
                        num_classes=num_classes))
    arm = ar.RasterAR(ar.ARConfig(depth=depth, vocab_size=vq_cfg.vocab_size, Cvae=vq_cfg.Cvae, patch_nums=(side,),
                                  num_classes=num_classes))
    return (var.to(device).eval(), VQVAE(vq_cfg).to(device).eval(), arm.to(device).eval(),
            VQVAE(ar_vq_cfg).to(device).eval())


def case(kind: str, engine: str, model, vq, batch: int, args, device: torch.device) -> dict:
    sampling = SamplingConfig(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, engine=engine)
    label_B = torch.arange(batch, device=device) % model.cfg.num_classes
    gen = torch.Generator(device=device).manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    draw = ar.sample_tokens if kind == "ar" else sample_tokens
    f_hat = None

    def tokens():
        nonlocal f_hat
        with amp:
            _, f_hat = draw(model, vq.quantizer, label_B, sampling, gen)

    def decode():
        with amp:
            decode_images(vq, f_hat, compiled=None if engine != "plain" else False)

    reset_peak(device)
    t_tok = summary(time_ms(tokens, device, args.warmup, args.iters))
    t_dec = summary(time_ms(decode, device, 1, args.iters))
    ms = t_tok["ms_median"] + t_dec["ms_median"]
    return {"bench": "ar_vs_var", "model": kind, "engine": engine, "depth": model.cfg.depth, "batch": batch,
            "shapes": args.shapes, "sequential_calls": ar.sequential_calls(model.cfg), "tokens_per_image": model.cfg.L,
            "tokens_ms_median": t_tok["ms_median"], "tokens_ms_min": t_tok["ms_min"],
            "decode_ms_median": t_dec["ms_median"], "ms_per_image": round(ms / batch, 4),
            "tokens_ms_per_image": round(t_tok["ms_median"] / batch, 4), "peak_gib": peak_gib(device),
            "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "device": str(device), **env()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, action="append", default=[])
    ap.add_argument("--shapes", choices=["paper", "default"], default="paper")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    var, vq, arm, ar_vq = models(args.shapes, args.depth, device)
    var_engines = ("plain", "auto") if device.type == "cuda" else ("plain",)
    for batch in args.batch or [1, 64]:
        rows = {}
        for kind, engine, model, tok in [("ar", "plain", arm, ar_vq)] + [("var", e, var, vq) for e in var_engines]:
            try:
                rows[(kind, engine)] = rec = case(kind, engine, model, tok, batch, args, device)
                emit(rec)
            except Exception as e:   # a failed case must not hide the others' figures
                emit({"bench": "ar_vs_var", "model": kind, "engine": engine, "batch": batch,
                      "error": f"{type(e).__name__}: {str(e)[:500]}"})
        a = rows.get(("ar", "plain"))
        if a:
            emit({"bench": "ar_vs_var_ratio", "depth": args.depth, "batch": batch, "shapes": args.shapes,
                  **{f"ar_over_var_{e}": round(a["ms_per_image"] / r["ms_per_image"], 2)
                     for (k, e), r in rows.items() if k == "var"},
                  **{f"ar_over_var_{e}_tokens_only": round(a["tokens_ms_per_image"] / r["tokens_ms_per_image"], 2)
                     for (k, e), r in rows.items() if k == "var"}, **env()})
    release_static_engine(var)
    gc.collect()


if __name__ == "__main__":
    main()
