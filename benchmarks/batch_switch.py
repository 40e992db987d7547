"""Sampling at one batch size, then at another, in one process: which fast path fails there.

Round 25 (RESULTS.md) found that on a GPU, sampling one image after a batch of 64 in the same
process fails with ``CUDA error: an illegal memory access``, while one image alone runs. The
error is asynchronous, so its traceback does not name the kernel. This program runs the same
sequence once per variant, each in a process of its own (run side by side: they only compile
and draw a few batches), with one fast path of the sampler switched off per variant, or the
launches made synchronous. Per variant and batch it reports the phase reached (tokens, then
decode, each followed by a synchronisation) and the error, with its traceback's tail: the
variant that no longer fails names the path at fault.

    PYTHONPATH=. python benchmarks/batch_switch.py --depth 16 --batches 64,1
    PYTHONPATH=. python benchmarks/batch_switch.py --depth 16 --batches 64,1 --variant all --variant no_kv_kernel

One JSON line per (variant, batch), and a last one per variant with its exit status. ``--tiny``
runs a small model (a CPU check of this program).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import PAPER_VQ, emit, env  # noqa: E402
from varcore import VAR, VARConfig, VQVAE, VQVAEConfig, SamplingConfig, sample_tokens  # noqa: E402
import varcore.sample as sample_mod  # noqa: E402
import varcore.fast.add_norm as add_norm  # noqa: E402
import varcore.fast.fused_mlp as fused_mlp  # noqa: E402
import varcore.fast.kv_attention as kv_attention  # noqa: E402
import varcore.fast.static_sampler as static_sampler  # noqa: E402

TINY_VQ = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, Cvae=8, vocab_size=64,
                      patch_nums=(1, 2, 3, 4))


def _replace(module, name: str, value) -> None:
    """``module.name = value``, refusing a name the module does not have (a renamed path must not
    turn a variant into the baseline unnoticed)."""
    if not hasattr(module, name):
        raise AttributeError(f"{module.__name__} has no {name}: batch_switch's variants need updating")
    setattr(module, name, value)


class _NoGraphScales(static_sampler.StaticScales):
    """The static engine without its per-scale CUDA graphs (compiled blocks kept)."""

    def __init__(self, *args, graphs: bool, **kwargs):
        super().__init__(*args, graphs=False, **kwargs)


def _no_decode_graphs():
    _replace(sample_mod, "DECODE_GRAPH_MAX_IMAGES", 0)


def _no_kv_kernel():
    _replace(kv_attention, "kernel_available", lambda *a: False)


def _no_add_norm_kernel():
    _replace(add_norm, "fused_available", lambda *a: False)


def _no_cublaslt():
    _replace(fused_mlp, "fused_usable", lambda x: False)


def _no_engine_graphs():
    _replace(static_sampler, "StaticScales", _NoGraphScales)


# name -> (what it switches off, the switch, the sampling engine, whether the decoder is compiled)
VARIANTS = {
    "all": ("nothing: the default sampler", None, "auto", True),
    "launch_blocking": ("nothing, with CUDA_LAUNCH_BLOCKING=1 (the traceback names the failing launch)", None,
                        "auto", True),
    "no_decode_graphs": ("the decoder's CUDA graphs for batches of 1-2 images", _no_decode_graphs, "auto", True),
    "eager_decode": ("the compiled decoder (eager decode)", None, "auto", False),
    "no_kv_kernel": ("the KV-cache attention kernel (SDPA instead)", _no_kv_kernel, "auto", True),
    "no_add_norm_kernel": ("the add + LayerNorm + AdaLN kernel (inductor's composition)", _no_add_norm_kernel,
                           "auto", True),
    "no_cublaslt": ("the cuBLASLt GELU epilogue (torch's matmul and GELU)", _no_cublaslt, "auto", True),
    "no_engine_graphs": ("the engine's per-scale CUDA graphs (compiled blocks kept)", _no_engine_graphs, "auto",
                         True),
    "exact_engine": ("the compiled engine (static_exact: uncompiled blocks, graphs kept)", None, "static_exact",
                     True),
}


def child(args) -> int:
    """One variant: each batch size in turn in this process; a line per batch, or the error."""
    what, switch, engine, compiled_decode = VARIANTS[args.child]
    if switch is not None:
        switch()
    device = torch.device(args.device)
    torch.manual_seed(0)
    vq_cfg = TINY_VQ if args.tiny else PAPER_VQ
    var = VAR(VARConfig(depth=2 if args.tiny else args.depth, vocab_size=vq_cfg.vocab_size, Cvae=vq_cfg.Cvae,
                        patch_nums=vq_cfg.patch_nums, num_classes=5 if args.tiny else 1000)).to(device).eval()
    vqvae = VQVAE(vq_cfg).to(device).eval()
    sampling = SamplingConfig(cfg=1.5, top_k=min(900, vq_cfg.vocab_size), top_p=0.96, engine=engine)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    base = {"bench": "batch_switch", "variant": args.child, "switched_off": what, "depth": var.cfg.depth, **env()}
    for batch in args.batches:
        phase, t0 = "tokens", time.perf_counter()
        try:
            label_B = torch.arange(batch, device=device) % var.cfg.num_classes
            gen = torch.Generator(device=device).manual_seed(0)
            for _ in range(args.repeats):
                phase = "tokens"
                with amp:
                    idx_list, f_hat = sample_tokens(var, vqvae.quantizer, label_B, sampling, gen)
                _sync(device)
                phase = "decode"
                with amp:
                    img = sample_mod.decode_images(vqvae, f_hat, compiled=None if compiled_decode else False)
                _sync(device)
            emit({**base, "batch": batch, "ok": True, "seconds": round(time.perf_counter() - t0, 1),
                  "image_shape": list(img.shape), "tokens_sum": int(sum(int(i.sum()) for i in idx_list))})
        except Exception as e:  # report where it failed; the CUDA context is unusable after it
            emit({**base, "batch": batch, "ok": False, "phase": phase, "error": f"{type(e).__name__}: {str(e)[:300]}",
                  "traceback": traceback.format_exc()[-2000:]})
            return 1
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parent(args) -> None:
    """Every chosen variant in a process of its own, ``--jobs`` at a time; their lines, then one
    line per variant with its exit status and the tail of its standard error."""
    names = args.variant or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variant: unknown {unknown}; choose from {sorted(VARIANTS)}")
    common = ["--depth", str(args.depth), "--batches", ",".join(map(str, args.batches)),
              "--repeats", str(args.repeats), "--device", args.device] + (["--tiny"] if args.tiny else [])
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            child_env = {**os.environ, **({"CUDA_LAUNCH_BLOCKING": "1"} if name == "launch_blocking" else {})}
            proc = subprocess.Popen([sys.executable, __file__, "--child", name, *common], env=child_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((name, proc, time.perf_counter()))
        name, proc, t0 = running.pop(0)
        try:
            out, err = proc.communicate(timeout=max(1.0, args.timeout - (time.perf_counter() - t0)))
            status = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            status = "timeout"
        for line in out.splitlines():
            if line.startswith("{"):
                emit(json.loads(line))
        emit({"bench": "batch_switch", "variant": name, "exit": status, "stderr_tail": err[-1500:]})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[64, 1],
                    help="batch sizes in the order one process samples them")
    ap.add_argument("--repeats", type=int, default=2, help="batches drawn at each size")
    ap.add_argument("--variant", action="append", default=[], help=f"one of {sorted(VARIANTS)} (default: all)")
    ap.add_argument("--jobs", type=int, default=len(VARIANTS), help="variants run side by side")
    ap.add_argument("--timeout", type=float, default=500.0, help="seconds per variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a small model and tokenizer (a CPU check)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        raise SystemExit(child(args))
    parent(args)


if __name__ == "__main__":
    main()
