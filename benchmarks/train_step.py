"""Training-step speed of VAR at the paper configuration (random weights and data).

One JSON line per case: median ms per step (the trainer's step, ``varcore.step.TrainStep``:
forward, loss, backward, AdamW, on GPU replayed as one CUDA graph unless ``--eager`` and with
bf16 master weights unless ``--no-master``; no gradient clipping unless ``--grad-clip``, as the
official step, where the trainer clips at ``train.grad_clip``); the host
waits for the GPU after every step, and ``pipelined_*`` repeats it without those waits), tokens/s,
model FLOP utilisation against the H100's dense bf16 peak (FLOPs from
``varcore.flops.var_flops(cfg).train_per_token``, attention counted over the pairs the
block-causal mask allows), and peak allocated memory.

    PYTHONPATH=. python benchmarks/train_step.py --case 16:64 --case 30:32:30
    PYTHONPATH=. python benchmarks/train_step.py --case 16:64 --plain     # the plain plan: dense mask, eager, foreach AdamW
    PYTHONPATH=. python benchmarks/train_step.py --numerics               # bf16 fast path vs fp32 plain loss
    PYTHONPATH=. python benchmarks/train_step.py --numerics --numerics-amp none   # the fast path in fp32
    PYTHONPATH=. python benchmarks/train_step.py --numerics --norm-impl plain --no-compile   # eager bf16's drift
    PYTHONPATH=. python benchmarks/train_step.py --graph-check            # CUDA-graph replays vs eager steps
    PYTHONPATH=. python benchmarks/train_step.py --resume-check           # checkpoint + resume vs a straight run

A case is ``depth:batch[:checkpointed_blocks]``.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import (DEFAULT_VQ, H100_BF16_DENSE_FLOPS, clocks_during, emit, env, peak_gib,  # noqa: E402
                         reset_peak, summary, time_ms, gpu_gaps, top_kernels)
import varcore.fast.flex as flex_mod  # noqa: E402
from varcore import VAR, VARConfig, var_flops  # noqa: E402
from varcore.fast.plan import ATTENTION_IMPLS, ExecutionPlan, apply_plan  # noqa: E402
from varcore.step import TrainStep, adamw  # noqa: E402

# what the pipeline's train stage sees on the default tokens (docs/gpu.md): 32x32 images, V=512, 130 tokens
DEFAULT_SHAPES = dict(vocab_size=DEFAULT_VQ.vocab_size, Cvae=DEFAULT_VQ.Cvae, patch_nums=DEFAULT_VQ.patch_nums,
                      num_classes=10)
PLAIN = dict(attention="dense", mlp="plain", compile=False, cuda_graph=False, master_weights=False)


def plan_choices(args) -> dict:
    """The execution plan the flags ask for (the trainer's ``auto`` plan unless told otherwise)."""
    if getattr(args, "plain", False):
        return dict(PLAIN)
    out = {"attention": args.attn_impl}
    if args.mlp_impl is not None:
        out["mlp"] = args.mlp_impl
    if args.norm_impl is not None:
        out["norm"] = args.norm_impl
    if args.attn_prefix_scales is not None:
        out["attn_prefix_scales"] = args.attn_prefix_scales
    if args.attn_backends:
        out["attn_backends"] = tuple(args.attn_backends.split(","))
    if args.eager:
        out["cuda_graph"] = False
    if args.no_master:
        out["master_weights"] = False
    if args.no_compile:
        out["compile"] = False
    return out


def build(depth: int, batch: int, device: torch.device, choices: dict, checkpointing: int = 0,
          amp=torch.bfloat16, **cfg_kw) -> tuple[VAR, torch.optim.Optimizer, ExecutionPlan]:
    """The model under the resolved execution plan, as the trainer builds it, and the paper's AdamW."""
    cfg = VARConfig(depth=depth, **cfg_kw)
    plan = ExecutionPlan(**{**choices, "checkpointing": checkpointing}).resolve(cfg, device, training=True, amp=amp)
    model = apply_plan(VAR(cfg).to(device).train(), plan)
    fused = device.type == "cuda" and choices != PLAIN
    return model, paper_adamw(model, batch, device, fused=fused), plan


def paper_adamw(model: torch.nn.Module, batch: int, device: torch.device, fused: bool) -> torch.optim.AdamW:
    """The paper's AdamW (lr 1e-4 per 256 images, betas 0.9/0.95, weight decay 0.05)."""
    return adamw(model.parameters(), 1e-4 * batch / 256, (0.9, 0.95), 0.05, device, fused=fused)


def rates(cfg: VARConfig, batch: int, ms: float) -> tuple[float, float]:
    """Tokens/s and MFU (varcore's FLOP count against the H100's dense bf16 peak) of a ``ms`` step."""
    tokens_per_s = batch * cfg.L / (ms / 1e3)
    return tokens_per_s, tokens_per_s * var_flops(cfg).train_per_token / H100_BF16_DENSE_FLOPS


def batch_of(cfg: VARConfig, B: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    label_B = torch.randint(0, cfg.num_classes, (B,), generator=g)
    x_BlCvae = torch.randn(B, cfg.L - cfg.first_l, cfg.Cvae, generator=g)
    target_BL = torch.randint(0, cfg.vocab_size, (B, cfg.L), generator=g)
    return label_B.to(device), x_BlCvae.to(device), target_BL.to(device)


def make_step(model, opt, data, amp: torch.dtype | None, cuda_graph: bool = False, grad_clip: float = 0.0,
              master_weights: bool = False, compile_loss: bool = False):
    """The trainer's step (``varcore.step.TrainStep``) on a fixed batch, as a no-argument call."""
    train_step = TrainStep(model, opt, amp=amp, grad_clip=grad_clip, cuda_graph=cuda_graph,
                           master_weights=master_weights, compile_loss=compile_loss)
    step = lambda: train_step(*data)[0]  # noqa: E731
    step.train_step = train_step
    return step


def plan_step(model, opt, data, plan: ExecutionPlan, amp=torch.bfloat16, grad_clip: float = 0.0):
    """:func:`make_step` as the plan asks (CUDA graph, master weights, compiled loss)."""
    return make_step(model, opt, data, amp, plan.cuda_graph, grad_clip, plan.master_weights, plan.compile)


def cfg_kw(args) -> dict:
    """VARConfig overrides: the residual dtype, and the default profile's token shapes for ``--shapes default``."""
    out = {} if args.residual_dtype is None else {"residual_dtype": args.residual_dtype}
    if args.shapes == "default":
        out.update(DEFAULT_SHAPES)
    return out


def run_case(depth: int, batch: int, ckpt: int, args, device: torch.device) -> dict:
    reset_peak(device)
    rec = {"bench": "train_step", "depth": depth, "batch": batch, "plain": args.plain, **cfg_kw(args),
           "grad_clip": args.grad_clip, "inductor": args.inductor,
           "flex_options": flex_mod.FLEX_KERNEL_OPTIONS or "inductor default",
           "flex_mask_block": flex_mod.mask_block(),
           "max_autotune": os.environ.get("TORCHINDUCTOR_MAX_AUTOTUNE") == "1",
           **env()}
    try:
        model, opt, plan = build(depth, batch, device, plan_choices(args), ckpt, **cfg_kw(args))
        cfg = model.cfg
        step = plan_step(model, opt, batch_of(cfg, batch, device), plan, grad_clip=args.grad_clip)
        # graph: two eager calls, then the capture; timing starts after it
        times = time_ms(step, device, max(args.warmup, 3) if plan.cuda_graph else args.warmup, args.iters)
        with clocks_during(device, args.clocks, calls=args.iters + 1) as clocks:   # one warm-up, then iters
            pipelined = time_ms(step, device, 1, args.iters, host_sync=False) if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError as e:
        rec.update(oom=True, error=str(e).splitlines()[0], checkpointing=ckpt, peak_gib=peak_gib(device))
        return rec
    except Exception as e:  # a failed case must not hide the others' figures
        rec.update(error=f"{type(e).__name__}: {str(e)[:500]}", checkpointing=ckpt)
        return rec
    if args.profile:
        top = top_kernels(step, device, top=args.profile_top)
        emit({"bench": "train_profile", "depth": depth, "batch": batch, "kernel_ms_total": top.total_ms,
              "categories": top.categories, "top": list(top)})
    if args.gaps:
        emit({"bench": "train_gaps", "depth": depth, "batch": batch, **gpu_gaps(step, device)})
    s = summary(times)
    flops = var_flops(cfg)
    tokens_per_s, mfu = rates(cfg, batch, s["ms_median"])
    ts = step.train_step
    rec.update(plan=plan.as_dict(), cuda_graph=ts.graph is not None, master_weights=ts.master is not None,
               **({"capture_error": ts.capture_error[:300]} if ts.capture_error else {}))
    rec.update(residual_dtype=cfg.residual_dtype, fused_adamw=bool(opt.defaults.get("fused")), **s,
               tokens_per_s=round(tokens_per_s),
               tflops=round(tokens_per_s * flops.train_per_token / 1e12, 1),
               mfu=round(mfu, 4), peak_gib=peak_gib(device))
    if pipelined:   # no host synchronisation between steps (the trainer runs like this on GPU)
        p = summary(pipelined)["ms_median"]
        p_tokens_per_s, p_mfu = rates(cfg, batch, p)
        rec.update(pipelined_ms_median=p, pipelined_tokens_per_s=round(p_tokens_per_s), pipelined_mfu=round(p_mfu, 4))
    if clocks is not None:
        rec.update(pipelined_clocks=clocks.stats)
    return rec


def numerics(args, device: torch.device) -> dict:
    """Same init, same fixed batch: fp32 plain path vs the bf16 fast path, loss per step."""
    depth, B, steps = args.numerics_depth, args.numerics_batch, args.numerics_steps
    kw = dict(drop_path_rate=0.0, cond_drop_rate=0.0)   # no randomness, so the curves are comparable
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    amp = None if args.numerics_amp == "none" else torch.bfloat16
    ref, ref_opt, ref_plan = build(depth, B, device, PLAIN, amp=None, **kw)
    fast, fast_opt, plan = build(depth, B, device, plan_choices(args), amp=amp, **kw, **cfg_kw(args))
    fast.load_state_dict(ref.state_dict())
    for o in (ref_opt, fast_opt):
        o.param_groups[0]["lr"] = args.numerics_lr
    data = batch_of(ref.cfg, B, device, seed=1)
    ref_step = plan_step(ref, ref_opt, data, ref_plan, amp=None)
    fast_step = plan_step(fast, fast_opt, data, plan, amp=amp)
    l32 = [ref_step().item() for _ in range(steps)]
    l16 = [fast_step().item() for _ in range(steps)]
    diff = [abs(a - b) for a, b in zip(l32, l16)]
    return {"bench": "train_numerics", "depth": depth, "batch": B, "steps": steps, "lr": args.numerics_lr,
            "fast_amp": args.numerics_amp,
            "fast_plan": plan.as_dict(), "fast_residual_dtype": fast.cfg.residual_dtype,
            "loss_fp32": [round(x, 4) for x in l32], "loss_bf16": [round(x, 4) for x in l16],
            "max_abs_diff": round(max(diff), 6), "max_rel_diff": round(max(d / a for d, a in zip(diff, l32)), 7),
            "loss_drop_fp32": round(l32[0] - l32[-1], 4), **env()}


def check_steps(ts: TrainStep, cfg: VARConfig, B: int, device: torch.device, first: int, last: int
                ) -> list[tuple[float, float]]:
    """Steps ``first..last-1`` of the checks' schedule: batch, seed and learning rate (1e-4 per
    step so far) all follow the step index. (loss, gradient norm) per step."""
    out = []
    for s in range(first, last):
        torch.manual_seed(1000 + s)
        loss, norm = ts(*batch_of(cfg, B, device, seed=s), lr=1e-4 * (s + 1))
        out.append((loss.item(), norm.item()))
    return out


def graph_check(args, device: torch.device) -> dict:
    """The trainer's step three ways from the same weights through the same batches, learning
    rates and per-step seeds (class dropout, drop-path and gradient clipping on): eager with
    autocast casts (the reference), replayed as a CUDA graph (should agree exactly), and
    replayed with bf16 master weights (same function, AdamW's arithmetic in another kernel:
    should agree to float32 rounding)."""
    depth, B, steps = args.numerics_depth, args.numerics_batch, args.graph_check_steps
    torch.manual_seed(0)
    runs, init = {}, None
    for arm, graph, master in (("eager", False, False), ("graph", True, False), ("graph_master", True, True)):
        model, opt, plan = build(depth, B, device, {**plan_choices(args), "cuda_graph": graph,
                                                    "master_weights": master}, **cfg_kw(args))
        if init is None:
            init = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(init)
        ts = TrainStep.from_plan(model, opt, plan, amp=torch.bfloat16, grad_clip=2.0)
        runs[arm] = (model, check_steps(ts, model.cfg, B, device, 0, steps), ts.graph is not None)
    rec = {"bench": "train_graph_check", "depth": depth, "batch": B, "steps": steps,
           "loss_eager": [round(x[0], 5) for x in runs["eager"][1]]}
    m_ref, ref, _ = runs["eager"]
    for arm in ("graph", "graph_master"):
        model, out, captured = runs[arm]
        rec[arm] = {"captured": captured,
                    "max_loss_diff": max(abs(a[0] - b[0]) for a, b in zip(ref, out)),
                    "max_grad_norm_diff": max(abs(a[1] - b[1]) for a, b in zip(ref, out)),
                    "max_weight_diff": max((a - b).abs().max().item()
                                           for a, b in zip(m_ref.parameters(), model.parameters()))}
    return {**rec, **env()}


def resume_check(args, device: torch.device, steps: int = 6, cut: int = 3) -> dict:
    """The trainer's one-GPU step (CUDA graph, master weights, clipping) through ``steps`` steps
    straight, against ``cut`` steps, a checkpoint written and read by the trainer's code
    (``pipeline.training.state.save_state`` / ``load_state``) into a fresh model and optimizer, and
    the remaining steps: losses and final weights should agree exactly."""
    from pipeline.training.config import TrainParams
    from pipeline.training.state import TrainState, load_state, save_state
    from pipeline.training.worker import make_optimizer

    amp = torch.bfloat16 if device.type == "cuda" else None   # elsewhere: the eager float32 step (tests run it)
    tp = TrainParams(steps=steps, grad_clip=2.0)
    torch.manual_seed(0)
    cfg = VARConfig(depth=args.numerics_depth)
    init = VAR(cfg).state_dict()
    plan = ExecutionPlan().resolve(cfg, device, training=True, amp=amp)   # the trainer's plan on one device

    def fresh():
        model = apply_plan(VAR(cfg).to(device).train(), plan)
        model.load_state_dict(init)
        return model, make_optimizer(model, tp)

    def run(model, opt, first, last):
        ts = TrainStep.from_plan(model, opt, plan, amp=amp, grad_clip=tp.grad_clip)
        return [loss for loss, _ in check_steps(ts, cfg, args.numerics_batch, device, first, last)], ts.graph is not None

    straight, opt_straight = fresh()
    want, _ = run(straight, opt_straight, 0, steps)
    model, opt = fresh()
    got, captured_a = run(model, opt, 0, cut)
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp), model, opt, TrainState(step=cut))
        model, opt = fresh()
        load_state(Path(tmp), model, opt)
    rest, captured_b = run(model, opt, cut, steps)
    got += rest
    return {"bench": "train_resume_check", "depth": cfg.depth, "batch": args.numerics_batch, "steps": steps,
            "cut": cut, "captured": [captured_a, captured_b], "loss_straight": [round(x, 5) for x in want],
            "max_loss_diff": max(abs(a - b) for a, b in zip(want, got)),
            "max_weight_diff": max((a - b).abs().max().item()
                                   for a, b in zip(straight.parameters(), model.parameters())), **env()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], help="depth:batch[:checkpointed_blocks]")
    ap.add_argument("--plain", action="store_true", help="dense mask, no compile, foreach AdamW (baseline)")
    ap.add_argument("--shapes", choices=["paper", "default"], default="paper",
                    help="token shapes: the paper's (256x256, 680 tokens, V=4096) or the default profile's "
                         "(32x32, 130 tokens, V=512: the pipeline's GPU profile)")
    ap.add_argument("--attn-impl", default="auto", choices=list(ATTENTION_IMPLS))
    ap.add_argument("--attn-prefix-scales", type=int, default=None, help="per_scale: scales in the masked call")
    ap.add_argument("--attn-backends", default="", help="per_scale: SDPA kernels, e.g. cudnn,efficient,math")
    ap.add_argument("--mlp-impl", default=None, choices=["auto", "plain", "fused"],
                    help="FFN: GELU in the matmul epilogues (fused) or element-wise (plain); default: auto")
    ap.add_argument("--norm-impl", default=None, choices=["auto", "plain", "fused"],
                    help="LayerNorm + AdaLN modulation: Triton kernels (fused) or inductor's (plain)")
    ap.add_argument("--residual-dtype", default=None, choices=["autocast", "float32"],
                    help="VARConfig.residual_dtype (default: the config's, autocast)")
    ap.add_argument("--inductor", action="append", default=[], help="torch._inductor.config KEY=VALUE (Python literal)")
    ap.add_argument("--flex-options", type=json.loads, default=None,
                    help="JSON kernel_options for the flex kernels ('{}': inductor's defaults)")
    ap.add_argument("--flex-mask-block", type=int, default=None,
                    help="tokens per flex block-mask tile (default varcore.fast.flex.FLEX_MASK_BLOCK; 128: flex's own)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--clocks", action="store_true", help="sample the SM clock, power and clock-lowering "
                    "reasons (nvidia-smi) over the back-to-back steps")
    ap.add_argument("--profile", action="store_true", help="also print the top device kernels of a step")
    ap.add_argument("--profile-top", type=int, default=25, help="kernels listed by --profile")
    ap.add_argument("--eager", action="store_true",
                    help="launch the step's kernels one by one (default on GPU: one CUDA graph, as the trainer)")
    ap.add_argument("--no-master", action="store_true",
                    help="autocast casts float32 weights (default on GPU: bf16 working copies, as the trainer)")
    ap.add_argument("--no-compile", action="store_true",
                    help="blocks, head and loss eager, as the official code trains (attention auto: per_scale SDPA)")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (trainer: 2.0)")
    ap.add_argument("--graph-check", action="store_true",
                    help="also check that CUDA-graph replays give the eager step's losses and weights")
    ap.add_argument("--gaps", action="store_true", help="also print where the GPU idles in a step")
    ap.add_argument("--numerics", action="store_true")
    ap.add_argument("--numerics-depth", type=int, default=16)
    ap.add_argument("--numerics-batch", type=int, default=16)
    ap.add_argument("--numerics-steps", type=int, default=30)
    ap.add_argument("--numerics-lr", type=float, default=3e-4)
    ap.add_argument("--numerics-amp", choices=("bf16", "none"), default="bf16",
                    help="the fast path's autocast: none compares its kernels with the plain path, both float32")
    ap.add_argument("--graph-check-steps", type=int, default=6)
    ap.add_argument("--resume-check", action="store_true",
                    help="also check that a checkpointed and resumed one-GPU run equals a straight one")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    for kv in args.inductor:
        key, value = kv.split("=", 1)
        setattr(torch._inductor.config, key, ast.literal_eval(value))
    if args.flex_options is not None:
        flex_mod.FLEX_KERNEL_OPTIONS = args.flex_options
    if args.flex_mask_block is not None:
        flex_mod.FLEX_MASK_BLOCK = args.flex_mask_block
    for case in args.case:
        parts = [int(p) for p in case.split(":")]
        depth, batch, ckpt = parts[0], parts[1], parts[2] if len(parts) > 2 else 0
        emit(run_case(depth, batch, ckpt, args, device))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.numerics:
        emit(numerics(args, device))
    if args.graph_check:
        emit(graph_check(args, device))
    if args.resume_check:
        emit(resume_check(args, device))


if __name__ == "__main__":
    main()
