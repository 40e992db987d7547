"""Where a training step's energy goes at the board's power limit: each part of a paper-scale step
run back to back on its own, with its joules from NVML's energy counter, times its calls per step.

At the H200's 700 W limit a step takes about its energy over the limit (RESULTS.md rounds 23
and 24: our steps and the official code's both draw 690 W, and the ratio of their joules per
step is the ratio of their times), so a speed target there is an energy target: 2.2x the
official step needs our step's joules at most the official's over 2.2. This splits our step's
joules into what no kernel here can lower and what is left:

- ``matmuls``: the step's 15 matmul shapes (``gemm.step_matmuls``: per block the q/k/v and
  output projections and the FFN's two, forward, input and weight gradient, and the head's
  three) as the step runs them (torch's call, or cuBLASLt's pick for the two epilogue matmuls);
  the AdaLN projections of the class embedding, one ``(B, 6C)`` row block per block, are small
  and left out;
- ``attention``: the flex block-causal attention, forward and backward, compiled as in training
  (``attention.heads``), once per block;
- ``adaln``: the pair of LayerNorm + AdaLN modulation kernels, forward and backward, per block
  (``norm_parts.adaln_kernels``);
- ``qk_norm``: the q/k L2 normalisation kernels, forward and backward, per block
  (``norm_parts.qk_kernels``).

Everything else (AdamW, the bias-gradient sums, the head's loss, embeddings, copies, the graph's
idle time) is the step's joules, measured in the same call by ``train_step.py --clocks``, less
these. Each part runs ``--seconds`` after a settling run; a part alone is at the power limit,
where inside a step it shares the clock with lighter kernels, so these joules are the part's at
the limit, not a split of one step's clock. One JSON line per part and one total.

    PYTHONPATH=. python benchmarks/energy_parts.py --case 20:64 --seconds 1.0
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention import attend, heads  # noqa: E402
from bench_utils import Nvml, emit, env, sustained  # noqa: E402
from gemm import VIA_CUBLASLT, step_matmuls  # noqa: E402
from norm_parts import adaln_kernels, qk_kernels  # noqa: E402
from varcore.fast import cublaslt as L  # noqa: E402
from varcore.fast import flex as flex_mod  # noqa: E402
from varcore.fast.attention import FlexBlockCausal  # noqa: E402
from varcore.var import PAPER_PATCH_NUMS  # noqa: E402


def step_calls(depth: int, batch: int, dev: torch.device) -> list[tuple[str, str, int, object]]:
    """(part, name, calls per step, a call running it) for the measured parts of a step."""
    out = []
    for name, calls, _, torch_fn, lt_args in step_matmuls(depth, batch, dev)[1]:
        fn = functools.partial(L.gemm, *lt_args) if name in VIA_CUBLASLT else torch_fn   # gemm picks on its first call
        out.append(("matmuls", name, calls, fn))
    q, k, v, grad = heads(batch, depth, dev)
    mask = FlexBlockCausal(PAPER_PATCH_NUMS, dev)
    compiled = torch.compile(attend, dynamic=False, options=flex_mod.compile_options() or None)

    def attention():   # gradients returned, not accumulated into q.grad (the step's flow has no such add)
        torch.autograd.grad(compiled(q, k, v, mask, None), (q, k, v), grad)
    out.append(("attention", "flex_fwd_bwd", depth, attention))
    for part, (forward, backward) in (("adaln", adaln_kernels(depth, batch, dev)),
                                      ("qk_norm", qk_kernels(depth, batch, dev))):
        out.append((part, f"{part}_fwd", depth, forward))
        out.append((part, f"{part}_bwd", depth, backward))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], help="DEPTH:BATCH of a training step (default 20:64)")
    ap.add_argument("--seconds", type=float, default=1.0, help="how long each part runs back to back")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    meter = Nvml.open(dev)
    if meter is None:
        raise SystemExit("energy_parts.py needs NVML's energy counter (libnvidia-ml.so.1 and a GPU that has it)")
    for case in args.case or ["20:64"]:
        depth, batch = map(int, case.split(":"))
        base = {"bench": "energy_parts", "depth": depth, "batch": batch, "seconds": args.seconds, **env()}
        totals: dict[str, dict[str, float]] = {}
        for part, name, calls, fn in step_calls(depth, batch, dev):
            r = sustained(fn, args.seconds, meter=meter)
            if "joules_per_call" not in r:
                raise SystemExit(f"energy_parts.py: NVML's counter did not move twice while {name} ran "
                                 f"{args.seconds} s; give more --seconds")
            t = totals.setdefault(part, {"ms": 0.0, "joules": 0.0})
            t["ms"] += calls * r["ms_per_call"]
            t["joules"] += calls * r["joules_per_call"]
            emit({**base, "part": part, "name": name, "calls": calls, "ms_per_call": round(r["ms_per_call"], 4),
                  "burst_ms": round(r["burst_ms"], 4), "power_w": r.get("power_w"), "sm_mhz": r.get("sm_mhz_mean"),
                  "joules_per_call": round(r["joules_per_call"], 4)})
        emit({**base, "part": "total", **{f"{p}_{k}": round(v, 2) for p, t in totals.items() for k, v in t.items()},
              "ms": round(sum(t["ms"] for t in totals.values()), 2),
              "joules": round(sum(t["joules"] for t in totals.values()), 2)})


if __name__ == "__main__":
    main()
    sys.stdout.flush()
