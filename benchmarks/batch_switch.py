"""Sampling at one batch size, then at another, in one process: which fast path fails there.

Round 25 (RESULTS.md) found that on a GPU, sampling one image after a batch of 64 in the same
process failed with ``CUDA error: an illegal memory access``, while one image alone ran. The
error is asynchronous, so its traceback does not name the kernel. The cause, found by reading the
code and confirmed by this program in round 26 (``keep_workspace`` fails, every other variant
runs): every engine captures its CUDA graphs on torch's one default capture stream, so a second
engine's graphs used the cuBLAS workspace that torch had cached for that stream, which lived in
the first engine's graph memory, freed once the first engine was gone
(``varcore.fast.graphs.own_cublas_workspace`` now gives each engine its own).

This program runs the sequence once per variant, each in a process of its own, with one fast
path of the sampler switched off per variant (or round 25's workspace handling put back, or the
launches made synchronous). Per variant and batch it reports the phase reached (tokens, then
decode, each followed by a synchronisation) and the error with its traceback's tail: a variant
that fails where the others run names the path at fault.

    PYTHONPATH=. python benchmarks/batch_switch.py --depth 16 --batches 64,1
    PYTHONPATH=. python benchmarks/batch_switch.py --depth 16 --batches 64,1 --variant all --variant keep_workspace

One JSON line per (variant, batch), and a last one per variant with its exit status. ``--tiny``
runs a small model (a CPU check of this program: there the sampler takes the plain loop and an
eager decoder, so the switched paths do not run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import PAPER_VQ, emit, env, sync  # noqa: E402
from varcore import VAR, VARConfig, VQVAE, VQVAEConfig, SamplingConfig, sample_tokens  # noqa: E402
import varcore.sample as sample_mod  # noqa: E402
import varcore.fast.add_norm as add_norm  # noqa: E402
import varcore.fast.fused_mlp as fused_mlp  # noqa: E402
import varcore.fast.graphs as graphs  # noqa: E402
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
    """The static engine without its per-scale CUDA graphs (compiled blocks kept). Its key keeps
    the ``graphs`` asked for, so ``static_engine`` reuses it as it would the default engine."""

    def __init__(self, *args, graphs: bool, **kwargs):
        super().__init__(*args, graphs=False, **kwargs)
        self.key = (*self.key[:3], graphs, *self.key[4:])


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


def _keep_workspace():
    """Round 25's code: the engine's captures reuse whatever cuBLAS workspace torch has cached."""
    _replace(graphs, "fresh_cublas_workspaces", lambda: None)


class Variant(NamedTuple):
    what: str                      # what it switches off
    switch: Callable[[], None] | None = None
    engine: str = "auto"           # the sampling engine
    compiled_decode: bool = True
    env: dict[str, str] = {}       # added to the child's environment


VARIANTS = {
    "all": Variant("nothing: the default sampler"),
    "launch_blocking": Variant("nothing, with CUDA_LAUNCH_BLOCKING=1 (a fault inside a CUDA graph is reported at "
                               "the graph's launch)", env={"CUDA_LAUNCH_BLOCKING": "1"}),
    "keep_workspace": Variant("the engine's own cuBLAS workspace (round 25's capture; the old engine is still "
                              "freed first)", _keep_workspace),
    "keep_workspace_none": Variant("the engine's own cuBLAS workspace, and cuBLAS workspaces altogether "
                                   "(CUBLAS_WORKSPACE_CONFIG=:0:0)", _keep_workspace,
                                   env={"CUBLAS_WORKSPACE_CONFIG": ":0:0"}),
    "no_decode_graphs": Variant("the decoder's CUDA graphs for batches of 1-2 images", _no_decode_graphs),
    "eager_decode": Variant("the compiled decoder (eager decode)", compiled_decode=False),
    "no_kv_kernel": Variant("the KV-cache attention kernel (SDPA instead)", _no_kv_kernel),
    "no_add_norm_kernel": Variant("the add + LayerNorm + AdaLN kernel (inductor's composition)", _no_add_norm_kernel),
    "no_cublaslt": Variant("the cuBLASLt GELU epilogue (torch's matmul and GELU)", _no_cublaslt),
    "no_engine_graphs": Variant("the engine's per-scale CUDA graphs (compiled blocks kept)", _no_engine_graphs),
    "exact_engine": Variant("the compiled engine (static_exact: uncompiled blocks, graphs kept)",
                            engine="static_exact"),
}


def child(args) -> int:
    """One variant: each batch size in turn in this process; a line per batch, or the error."""
    what, switch, engine, compiled_decode, _ = VARIANTS[args.child]
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
                sync(device)
                phase = "decode"
                with amp:
                    img = sample_mod.decode_images(vqvae, f_hat, compiled=None if compiled_decode else False)
                sync(device)
            emit({**base, "batch": batch, "ok": True, "seconds": round(time.perf_counter() - t0, 1),
                  "image_shape": list(img.shape), "tokens_sum": int(sum(int(i.sum()) for i in idx_list))})
        except Exception as e:  # report where it failed; the CUDA context is unusable after it
            emit({**base, "batch": batch, "ok": False, "phase": phase, "error": f"{type(e).__name__}: {str(e)[:300]}",
                  "traceback": traceback.format_exc()[-2000:]})
            return 1
    return 0


def parent(args) -> None:
    """Every chosen variant in a process of its own, ``--jobs`` at a time (output to files, so a
    child never waits on a full pipe); their lines, then one line per variant with its exit
    status and the tail of its standard error."""
    names = args.variant or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variant: unknown {unknown}; choose from {sorted(VARIANTS)}")
    common = ["--depth", str(args.depth), "--batches", ",".join(map(str, args.batches)),
              "--repeats", str(args.repeats), "--device", args.device] + (["--tiny"] if args.tiny else [])
    pending, running = list(names), []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _run_all(args, common, pending, running, tmp)
        finally:   # interrupted: no child (nor its compile workers) outlives the parent
            for _, proc, *_ in running:
                _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    """The child and its process group (inductor's compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run_all(args, common: list[str], pending: list[str], running: list, tmp: str) -> None:
    """Start children up to ``--jobs``; wait for the oldest (killed past ``--timeout``), emit its
    lines and status; until none is left. A child stays in ``running`` until it is done."""
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            child_env = {**os.environ, **VARIANTS[name].env}
            out, err = (open(Path(tmp) / f"{name}.{k}", "w+") for k in ("out", "err"))
            proc = subprocess.Popen([sys.executable, __file__, "--child", name, *common], env=child_env,
                                    stdout=out, stderr=err, text=True, start_new_session=True)
            running.append((name, proc, time.perf_counter(), out, err))
        name, proc, t0, out, err = running[0]
        try:
            status = proc.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            _kill(proc)
            status = "timeout"
        running.pop(0)
        for f in (out, err):
            f.seek(0)
        for line in out.read().splitlines():
            try:
                emit(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a kill, or not ours
                continue
        emit({"bench": "batch_switch", "variant": name, "exit": status, "stderr_tail": err.read()[-1500:]})
        out.close()
        err.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[64, 1],
                    help="batch sizes in the order one process samples them")
    ap.add_argument("--repeats", type=int, default=4, help="batches drawn at each size (a stale workspace "
                    "faults from the third on: the decoder's graphs record on the second)")
    ap.add_argument("--variant", action="append", default=[], help=f"one of {sorted(VARIANTS)} (default: all)")
    ap.add_argument("--jobs", type=int, default=4, help="variants run side by side")
    ap.add_argument("--timeout", type=float, default=500.0, help="seconds per variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a small model and tokenizer (a CPU check)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.repeats < 1:
        ap.error(f"--jobs ({args.jobs}) and --repeats ({args.repeats}) must be at least 1")
    if args.child:
        raise SystemExit(child(args))
    parent(args)


if __name__ == "__main__":
    main()
