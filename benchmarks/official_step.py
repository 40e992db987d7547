"""Training-step and sampling speed and peak memory of the official VAR code, for same-machine ratios.

The issue's reference figures for the official code (FoundationVision/VAR) come from another
run; this program times the official model on the machine that times ours, with the same step
as ``train_step.py``: random weights and data at the paper configuration, bf16 autocast,
cross-entropy on float32 logits, backward, fused AdamW, median of CUDA-event times after
warm-up. One JSON line per case (``bench: official_train_step``); MFU uses varcore's FLOP
count, as ``train_step.py`` does.

    PYTHONPATH=. python benchmarks/official_step.py --official-root PATH/TO/VAR --case 16:64 --case 24:32
    PYTHONPATH=. python benchmarks/official_step.py --official-root PATH/TO/VAR --sample-case 16:64

``--sample-case depth:batch`` times the official sampler (``VAR.autoregressive_infer_cfg``: KV cache,
CFG 1.5, top-k 900, top-p 0.96, the official VQ-VAE's decoder included) under bf16 autocast, as
``sample.py`` times ours; it needs the checkout's own ``models.vqvae`` (random weights).

``--official-root`` is a checkout of the official repository (not shipped with varscale). The
model is built as the official ``build_vae_var`` builds it for depth d (width 64 d, d heads,
drop-path 0.1 d / 24, shared AdaLN off, q/k L2-norm on, flash and fused kernels if installed).
Its VQ-VAE is only used for sampling, so a stand-in with the vocabulary size and Cvae is
passed. Modules of the checkout that only serve other purposes are replaced by stand-ins
when they cannot be imported: ``huggingface_hub`` (the hub mixin of ``VARHF``), the
repository's ``dist`` (``get_device``) and ``models.vqvae`` (type hints).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import clocks_during, clocks_over, emit, env, peak_gib, reset_peak, summary, time_ms  # noqa: E402
from train_step import batch_of, make_step, paper_adamw, rates  # noqa: E402
from varcore import PAPER_PATCH_NUMS, VARConfig  # noqa: E402


def _stand_in(name: str, **attrs) -> None:
    """Put a module ``name`` with ``attrs`` in ``sys.modules`` unless the real one imports."""
    try:
        importlib.import_module(name)
    except ImportError:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod


def official_var_class(root: Path, device: torch.device):
    """The ``VAR`` class of the official checkout at ``root``."""
    if not (root / "models" / "var.py").is_file():
        raise SystemExit(f"--official-root {root}: no models/var.py there (expected a FoundationVision/VAR checkout)")
    sys.path.insert(0, str(root))
    _stand_in("huggingface_hub", PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {}))
    _stand_in("dist", get_device=lambda: device)
    _stand_in("models.vqvae", VQVAE=type("VQVAE", (), {}), VectorQuantizer2=type("VectorQuantizer2", (), {}))
    return importlib.import_module("models.var").VAR


def build(VAR, depth: int, batch: int, device: torch.device):
    """The official model at depth ``depth`` (``models.build_vae_var``'s settings) and its optimizer."""
    vae = types.SimpleNamespace(Cvae=32, vocab_size=4096, quantize=None)
    with contextlib.redirect_stdout(sys.stderr):   # the constructor prints its configuration
        model = VAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
                    mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24,
                    norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True,
                    patch_nums=PAPER_PATCH_NUMS, flash_if_available=True, fused_if_available=True)
        model.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    model = model.to(device).train()
    return model, paper_adamw(model, batch, device, fused=device.type == "cuda")


def run_case(VAR, depth: int, batch: int, args, device: torch.device) -> dict:
    reset_peak(device)
    rec = {"bench": "official_train_step", "depth": depth, "batch": batch, **env()}
    try:
        model, opt = build(VAR, depth, batch, device)
        cfg = VARConfig(depth=depth)
        step = make_step(model, opt, batch_of(cfg, batch, device), torch.bfloat16)
        times = time_ms(step, device, args.warmup, args.iters)
        with clocks_during(device, args.clocks, calls=args.iters + 1) as clocks:   # one warm-up, then iters
            pipelined = time_ms(step, device, 1, args.iters, host_sync=False) if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError as e:
        rec.update(oom=True, error=str(e).splitlines()[0], peak_gib=peak_gib(device))
        return rec
    attn = model.blocks[0].attn
    s = summary(times)
    tokens_per_s, mfu = rates(cfg, batch, s["ms_median"])
    rec.update(**s, tokens_per_s=round(tokens_per_s), mfu=round(mfu, 4), peak_gib=peak_gib(device),
               params=sum(p.numel() for p in model.parameters()),
               # flash_attn serves the official code only without a mask (sampling); xformers takes the mask
               flash_attn_installed=bool(getattr(attn, "using_flash", False)),
               xformers_used=bool(getattr(attn, "using_xform", False)))
    if pipelined:   # back to back without host waits, as train_step.py's pipelined_* figures
        p = summary(pipelined)["ms_median"]
        rec.update(pipelined_ms_median=p, pipelined_tokens_per_s=round(rates(cfg, batch, p)[0]))
    if clocks is not None:
        rec.update(pipelined_clocks=clocks.stats)
    return rec


def sample_case(VAR, depth: int, batch: int, args, device: torch.device) -> dict:
    """The official sampler at ``depth`` for ``batch`` images, decode included (ms per image)."""
    from models.vqvae import VQVAE   # the checkout's own: sampling decodes through it
    reset_peak(device)
    rec = {"bench": "official_sample", "depth": depth, "batch": batch, "cfg": 1.5, "top_k": 900, "top_p": 0.96,
           **env()}
    with contextlib.redirect_stdout(sys.stderr):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4,
                    v_patch_nums=PAPER_PATCH_NUMS).to(device).eval()
        var = VAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
                  mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
                  shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=PAPER_PATCH_NUMS,
                  flash_if_available=True, fused_if_available=True).to(device).eval()
        var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    label_B = torch.arange(batch, device=device) % 1000

    def generate():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            var.autoregressive_infer_cfg(batch, label_B, g_seed=0, cfg=1.5, top_k=900, top_p=0.96)
    s = summary(time_ms(generate, device, args.warmup, args.iters))
    rec.update(**s, ms_per_image=round(s["ms_median"] / batch, 3), peak_gib=peak_gib(device))
    if args.clocks:
        rec.update(clocks=clocks_over(generate, device, args.iters))
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-root", type=Path, required=True, help="checkout of FoundationVision/VAR")
    ap.add_argument("--case", action="append", default=[], help="depth:batch (training step)")
    ap.add_argument("--sample-case", action="append", default=[], help="depth:batch (sampling, decode included)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--clocks", action="store_true", help="sample the SM clock, power and clock-lowering "
                    "reasons (nvidia-smi) over the back-to-back steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    VAR = official_var_class(args.official_root.resolve(), device)
    for case in args.case:
        depth, batch = (int(p) for p in case.split(":"))
        emit(run_case(VAR, depth, batch, args, device))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for case in args.sample_case:
        depth, batch = (int(p) for p in case.split(":"))
        try:
            emit(sample_case(VAR, depth, batch, args, device))
        except Exception as e:  # a failed case must not hide the others' figures
            emit({"bench": "official_sample", "depth": depth, "batch": batch, "error": f"{type(e).__name__}: {e}"[:500]})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
