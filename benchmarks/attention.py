"""Block-causal attention alone, forward + backward, at a paper-config layer's shapes.

Compares the forms ``varcore.var.attend`` accepts (dense bool mask, FlexAttention block
mask compiled, one SDPA call per scale) and, for the per-scale form, each SDPA backend.
One JSON line per variant: median ms, and TFLOP/s over the pairs the mask allows.

    PYTHONPATH=. python benchmarks/attention.py --depth 16 --batch 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import emit, env, summary, time_ms  # noqa: E402
from varcore import PAPER_PATCH_NUMS  # noqa: E402
from varcore.flops import attention_pairs  # noqa: E402
from varcore.var import attend, block_causal_mask, flex_block_mask, scale_ends  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    H, c, pn = args.depth, 64, PAPER_PATCH_NUMS
    L = sum(p * p for p in pn)
    q, k, v = (torch.randn(args.batch, H, L, c, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    flops = 3 * 4 * c * attention_pairs(pn) * args.batch * H   # fwd + 2x bwd, QK^T and AV
    compiled_attend = torch.compile(attend, dynamic=False)
    variants = {
        "dense_mask": (attend, block_causal_mask(pn).to(dev), None),
        "flex": (compiled_attend, flex_block_mask(pn, str(dev)), None),
        "per_scale": (attend, scale_ends(pn), None),
        "per_scale_compiled": (compiled_attend, scale_ends(pn), None),
    }
    for name, backend in (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"),
                          ("efficient", "EFFICIENT_ATTENTION")):
        if hasattr(SDPBackend, backend):
            variants[f"per_scale_{name}"] = (attend, scale_ends(pn), getattr(SDPBackend, backend))
    for name, (fn, mask, backend) in variants.items():
        def step():
            with sdpa_kernel([backend]) if backend is not None else torch.enable_grad():
                out = fn(q, k, v, mask, 0.0, 1.0)
            out.backward(grad)
        try:
            s = summary(time_ms(step, dev, 3, args.iters))
            emit({"bench": "attention", "variant": name, "depth": args.depth, "batch": args.batch, **s,
                  "tflops": round(flops / (s["ms_median"] / 1e3) / 1e12, 1), **env()})
        except Exception as e:
            emit({"bench": "attention", "variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})


if __name__ == "__main__":
    main()
