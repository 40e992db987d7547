"""What the GPU's tensor cores sustain at its power limit: one large square bf16 matmul, in a short
burst after the GPU has idled and then back to back for some seconds, with the SM clock, power
and clock-lowering reasons sampled over the sustained part (``bench_utils.ClockSampler``).

A training step's matmuls cannot be expected to run faster inside the step than this matmul
sustains: it is the best shape for the tensor cores, and a step loads the board as long. On an
H200 (RESULTS.md round 23) the burst ran at 785 TFLOP/s and the sustained run at 672, with the
clock held at 1500 MHz by the 700 W power cap.

    PYTHONPATH=. python benchmarks/matmul_power.py --n 8192 --seconds 4

One JSON line (``bench: matmul_power``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import ClockSampler, emit, env  # noqa: E402


def tflops(n: int, calls: int, ms: float) -> float:
    """Dense TFLOP/s of ``calls`` ``n x n x n`` matmuls in ``ms`` milliseconds."""
    return 2 * n ** 3 * calls / (ms / 1e3) / 1e12


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192, help="the matmul's size (n x n times n x n)")
    ap.add_argument("--seconds", type=float, default=4.0, help="how long the sustained part runs")
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of idle before the burst")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    a, b = (torch.randn(args.n, args.n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    time.sleep(args.idle)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    burst = tflops(args.n, 10, start.elapsed_time(end))
    with ClockSampler(dev) as clocks:
        start.record()
        calls, t0 = 0, time.time()
        while time.time() - t0 < args.seconds:
            for _ in range(20):
                a @ b
            calls += 20
        end.record()
        torch.cuda.synchronize()
    emit({"bench": "matmul_power", "n": args.n, **env(), "burst_tflops_10_after_idle": round(burst, 1),
          "sustained_tflops": round(tflops(args.n, calls, start.elapsed_time(end)), 1), "sustained_matmuls": calls,
          "clocks": clocks.stats})


if __name__ == "__main__":
    main()
