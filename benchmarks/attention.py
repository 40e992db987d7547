"""Block-causal attention alone, forward + backward, at a paper-config layer's shapes.

Compares the block-causal attention kernels an execution plan can choose: the dense bool mask
(``varcore.var.BlockCausalAttention``: SDPA's own kernel choice, or cuDNN, which takes the mask
as an additive bias), the FlexAttention block mask (``varcore.fast.attention.FlexBlockCausal``)
and ``ScaleSplitAttention`` (the first n scales in one masked call, then one unmasked call per
scale) with each SDPA kernel for the unmasked calls, and flex through FlashAttention-4
(``flex_flash``, where flash-attn-4 imports). Everything runs compiled, as in
training. One JSON line per variant: median ms, TFLOP/s over the pairs the mask allows,
and the three device kernels that take the most time.

    PYTHONPATH=. python benchmarks/attention.py --depth 16 --batch 64
    PYTHONPATH=. python benchmarks/attention.py --depth 24 --batch 32 --only flex --only split7_cudnn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import emit, env, summary, time_ms, top_kernels  # noqa: E402
from varcore.fast import flex as flex_mod  # noqa: E402
from varcore.fast.attention import SDPA_BACKENDS, FlexBlockCausal, ScaleSplitAttention  # noqa: E402
from varcore.scales import PAPER_PATCH_NUMS, ScaleLayout  # noqa: E402
from varcore.var import BlockCausalAttention  # noqa: E402


def variants(pn: tuple[int, ...], dev: torch.device) -> dict:
    """name -> (attention kernel module, SDPA backends for the whole call or None)."""
    dense = BlockCausalAttention(pn).to(dev)
    flex128 = FlexBlockCausal(pn, dev)
    flex128.block_mask = flex_mod.flex_block_mask(pn, str(dev), 128)                  # flex's default tiles
    out = {"dense": (dense, None), "dense_cudnn": (dense, ["cudnn"]),
           "flex": (FlexBlockCausal(pn, dev), None), "flex128": (flex128, None)}      # flex: the plan's kernel
    if flex_mod.flash_available():                                                    # FlashAttention-4 via flex
        out["flex_flash"] = (FlexBlockCausal(pn, dev, "flash"), None)
    for prefix in (1, 7, 8, 9):
        for kernel in ("cudnn", "flash", "efficient"):
            out[f"split{prefix}_{kernel}"] = (ScaleSplitAttention(pn, prefix, (kernel, "efficient", "math")).to(dev),
                                              None)
        out[f"split{prefix}_fa4"] = (ScaleSplitAttention(pn, prefix, ("fa4",)).to(dev), None)   # flash-attn-4
    return out


def attend(q, k, v, core, backends):
    """One attention call through ``core`` (an attention kernel module), under SDPA ``backends``
    where given (None: the kernel's own choice)."""
    if backends is None:
        return core(q, k, v, 0.0, 1.0)
    with sdpa_kernel([SDPA_BACKENDS[b] for b in backends]):
        return core(q, k, v, 0.0, 1.0)


def heads(batch: int, depth: int, dev: torch.device):
    """Random bf16 q, k, v of a layer at ``depth`` (``depth`` heads of 64) over the paper's 680
    tokens, laid out as the model's qkv projection gives them (``(B, L, H, c)`` storage seen as
    ``(B, H, L, c)``), needing gradients, and a gradient of the output."""
    L = ScaleLayout(PAPER_PATCH_NUMS).L
    q, k, v = (torch.randn(batch, L, depth, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    return q, k, v, torch.randn_like(q)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", action="append", default=[], help="run only these variants")
    ap.add_argument("--flex-config", action="append", default=[],
                    help="NAME=JSON: also time flex with these kernel_options (variant flex_NAME)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    H, c, pn = args.depth, 64, PAPER_PATCH_NUMS
    q, k, v, grad = heads(args.batch, args.depth, dev)
    flops = 3 * 4 * c * ScaleLayout(pn).attention_pairs() * args.batch * H   # fwd + 2x bwd, QK^T and AV

    # float32 dense-mask reference: output and gradients
    qkv32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = BlockCausalAttention(pn).to(dev)(*qkv32, 0.0, 1.0)
    ref_grads = torch.autograd.grad(ref, qkv32, grad.float())
    ref = ref.detach()
    forms = variants(pn, dev)
    flex_options = {name: None for name in forms}
    for spec in args.flex_config:
        name, opts = spec.split("=", 1)
        flex_options[f"flex_{name}"] = json.loads(opts)
        forms[f"flex_{name}"] = (FlexBlockCausal(pn, dev), None)
        forms[f"flex_{name}"][0].kernel_options = flex_options[f"flex_{name}"]   # a core reads them at each call
    tuned = flex_mod.FLEX_KERNEL_OPTIONS
    for name, (mask, backends) in forms.items():
        if args.only and name not in args.only and flex_options[name] is None:   # --flex-config ones always run
            continue
        flex_mod.FLEX_KERNEL_OPTIONS = tuned if flex_options[name] is None else flex_options[name]
        torch._dynamo.reset()                       # a fresh graph per variant (no recompile limit)
        fn = torch.compile(attend, dynamic=False, options=flex_mod.compile_options() or None)

        def step(fn=fn, mask=mask, backends=backends):
            fn(q, k, v, mask, backends).backward(grad)
        try:
            with torch.no_grad():
                out = fn(q, k, v, mask, backends).float()
            err = ((out - ref).norm() / ref.norm()).item()
            grads = torch.autograd.grad(fn(q, k, v, mask, backends), (q, k, v), grad)
            grad_errs = {f"grad_rel_err_{n}": round(((g.float() - r).norm() / r.norm()).item(), 5)
                         for n, g, r in zip("qkv", grads, ref_grads)}
            s = summary(time_ms(step, dev, 3, args.iters))
            top = [r["kernel"][:60] for r in top_kernels(step, dev, steps=1, top=3)]
            emit({"bench": "attention", "variant": name, "depth": args.depth, "batch": args.batch, **s,
                  "tflops": round(flops / (s["ms_median"] / 1e3) / 1e12, 1), "rel_err_vs_fp32": round(err, 5), **grad_errs,
                  "mask_block": list(getattr(getattr(mask, "block_mask", None), "BLOCK_SIZE", ())) or None,
                  "top_kernels": top,
                  "flex_options": flex_options[name], **env()})
        except Exception as e:
            emit({"bench": "attention", "variant": name, "depth": args.depth,
                  "error": f"{type(e).__name__}: {str(e)[:600]}"})


if __name__ == "__main__":
    main()
