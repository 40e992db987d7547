"""Every matmul of a training step (or of a sampling batch) at the paper shapes, alone: torch's
own call as the step makes it against each algorithm cuBLASLt's heuristic offers for it.

The matmuls are most of a step (two thirds at d20 on the H200) and run below the tensor
cores' sustained rate; torch takes cuBLAS's first choice per shape. This prints, per matmul,
torch's time, cuBLASLt's first and fastest algorithm (of ``--algos`` requested) and the
TFLOP/s of each, then a line that weighs them by how often a step (or a batch) calls them:
what choosing the fastest algorithm per shape could save, before building anything for it.

    PYTHONPATH=. python benchmarks/gemm.py --case 20:64 --case 24:32 --algos 32
    PYTHONPATH=. python benchmarks/gemm.py --sample-case 30:64 --algos 32
    PYTHONPATH=. python benchmarks/gemm.py --case 20:64 --sustained 0.4   # each at the power limit

Training: per block the q/k/v and output projections and the FFN's two matmuls, each forward,
input gradient (dgrad) and weight gradient (wgrad), in the layouts the step's autograd uses
(the FFN's first forward with the GELU in its epilogue and its second dgrad with the GELU
derivative, as ``varcore.fast.fused_mlp`` runs them); the head's three once per step.
Sampling: the forwards per scale on the CFG-doubled rows (``2 B n_k^2``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import Nvml, emit, env, event_ms, sustained  # noqa: E402
from varcore.fast import cublaslt as L  # noqa: E402
from varcore.var import PAPER_PATCH_NUMS  # noqa: E402

VOCAB = 4096
# the training step's matmuls that run through cuBLASLt (its pick of the heuristic's algorithms), not
# torch (the sampler's FFN is the plain one: its GELU is a separate kernel)
VIA_CUBLASLT = ("fc1_fwd_gelu_aux", "fc2_dgrad_dgelu")


class Mats:
    """Random bf16 operands for one width, reused across matmuls (their values do not change a
    matmul's time)."""

    def __init__(self, rows: int, C: int, dev):
        g = torch.Generator(device=dev).manual_seed(0)
        self.dev = dev

        def r(*shape):
            return torch.randn(*shape, device=dev, generator=g).bfloat16()
        self.x_NC, self.dy_NC = r(rows, C), r(rows, C)
        self.dy_N3C, self.h_NH, self.dh_NH = r(rows, 3 * C), r(rows, 4 * C), r(rows, 4 * C)
        self.dlog_NV = r(rows, VOCAB)
        self.w_qkv, self.w_proj, self.w1, self.w2, self.w_head = (r(3 * C, C), r(C, C), r(4 * C, C), r(C, 4 * C),
                                                                  r(VOCAB, C))
        self.b_C, self.b_H, self.b_V = r(C), r(4 * C), r(VOCAB)

    def out(self, *shape):
        return torch.empty(*shape, device=self.dev, dtype=torch.bfloat16)


def linear_matmuls(m: Mats, name: str, x_NK: torch.Tensor, w_MK: torch.Tensor, b_M: torch.Tensor | None,
                   dy_NM: torch.Tensor) -> list[tuple]:
    """(name, flop, torch callable, cuBLASLt gemm args) of one linear layer's forward (bias in the
    epilogue where it has one), input gradient and weight gradient."""
    (N, K), M = x_NK.shape, w_MK.shape[0]
    flop = 2 * N * K * M
    fwd = (L.EPILOGUE_DEFAULT if b_M is None else L.EPILOGUE_BIAS, w_MK, L.OP_T, x_NK, L.OP_N, m.out(N, M), b_M)
    return [(f"{name}_fwd", flop, lambda: F.linear(x_NK, w_MK, b_M), fwd),
            (f"{name}_dgrad", flop, lambda: dy_NM @ w_MK, (L.EPILOGUE_DEFAULT, w_MK, L.OP_N, dy_NM, L.OP_N,
                                                             m.out(N, K))),
            (f"{name}_wgrad", flop, lambda: dy_NM.t() @ x_NK, (L.EPILOGUE_DEFAULT, x_NK, L.OP_N, dy_NM, L.OP_T,
                                                                 m.out(M, K)))]


def training_matmuls(m: Mats, N: int, C: int, depth: int) -> list[tuple]:
    """(name, calls per step, flop, torch callable, cuBLASLt gemm args) for one step. The FFN's first
    forward keeps the GELU input and its second dgrad applies the GELU derivative, both in the
    epilogue (torch's call for them is the plain matmul)."""
    H = 4 * C
    fc1 = linear_matmuls(m, "fc1", m.x_NC, m.w1, m.b_H, m.dh_NH)
    fc2 = linear_matmuls(m, "fc2", m.h_NH, m.w2, m.b_C, m.dy_NC)
    fc1[0] = ("fc1_fwd_gelu_aux", *fc1[0][1:3],
              (L.EPILOGUE_GELU_AUX_BIAS, m.w1, L.OP_T, m.x_NC, L.OP_N, m.out(N, H), m.b_H, m.out(N, H)))
    fc2[1] = ("fc2_dgrad_dgelu", *fc2[1][1:3],
              (L.EPILOGUE_DGELU, m.w2, L.OP_N, m.dy_NC, L.OP_N, m.out(N, H), None, m.h_NH))
    per_block = [*linear_matmuls(m, "qkv", m.x_NC, m.w_qkv, None, m.dy_N3C),
                 *linear_matmuls(m, "proj", m.x_NC, m.w_proj, m.b_C, m.dy_NC), *fc1, *fc2]
    head = linear_matmuls(m, "head", m.x_NC, m.w_head, m.b_V, m.dlog_NV)
    return [(n, depth, f, t, a) for n, f, t, a in per_block] + [(n, 1, f, t, a) for n, f, t, a in head]


def step_matmuls(depth: int, batch: int, dev) -> tuple[int, list[tuple]]:
    """The token rows and :func:`training_matmuls` of a paper-config training step at ``depth`` and
    ``batch`` (width 64 depth, the paper's 680 tokens an image), on random operands."""
    C, N = 64 * depth, batch * sum(p * p for p in PAPER_PATCH_NUMS)
    return N, training_matmuls(Mats(N, C, dev), N, C, depth)


def sampling_matmuls(m: Mats, rows: int, C: int, depth: int, scale: int) -> list[tuple]:
    """The forwards of one scale's ``rows`` tokens (CFG-doubled), all blocks and the head."""
    H, V, o = 4 * C, VOCAB, m.out
    x, h = m.x_NC[:rows], m.h_NH[:rows]
    return [
        (f"s{scale}_qkv", depth, 2 * rows * C * 3 * C, lambda: F.linear(x, m.w_qkv),
         (L.EPILOGUE_DEFAULT, m.w_qkv, L.OP_T, x, L.OP_N, o(rows, 3 * C))),
        (f"s{scale}_proj", depth, 2 * rows * C * C, lambda: F.linear(x, m.w_proj, m.b_C),
         (L.EPILOGUE_BIAS, m.w_proj, L.OP_T, x, L.OP_N, o(rows, C), m.b_C)),
        (f"s{scale}_fc1_gelu", depth, 2 * rows * C * H, lambda: F.linear(x, m.w1, m.b_H),
         (L.EPILOGUE_GELU_BIAS, m.w1, L.OP_T, x, L.OP_N, o(rows, H), m.b_H)),
        (f"s{scale}_fc2", depth, 2 * rows * C * H, lambda: F.linear(h, m.w2, m.b_C),
         (L.EPILOGUE_BIAS, m.w2, L.OP_T, h, L.OP_N, o(rows, C), m.b_C)),
        (f"s{scale}_head", 1, 2 * rows * C * V, lambda: F.linear(x, m.w_head, m.b_V),
         (L.EPILOGUE_BIAS, m.w_head, L.OP_T, x, L.OP_N, o(rows, V), m.b_V)),
    ]


def survey(matmuls: list[tuple], base: dict, algos: int, iters: int) -> None:
    """One line per matmul and one weighted total."""
    tot = dict.fromkeys(("torch_ms", "torch_lt_ms", "lt_first_ms", "lt_best_ms", "lt_best8_ms", "lt_picked_ms",
                         "now_ms", "best_of_ms"), 0.0)
    flop_total = 0.0
    for name, calls, flop, torch_fn, lt_args in matmuls:
        ms = {"torch_ms": event_ms(torch_fn, iters)}
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            ms["torch_lt_ms"] = event_ms(torch_fn, iters)
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        n = L.gemm(*lt_args, algo=0, requested=algos)
        per_algo = [event_ms(lambda: L.gemm(*lt_args, algo=i, requested=algos), iters) for i in range(n)]
        best = min(range(n), key=per_algo.__getitem__)
        L.gemm(*lt_args)   # the step's own choice of the first 8, timed on this first call
        ms.update(lt_first_ms=per_algo[0], lt_best_ms=per_algo[best], lt_best8_ms=min(per_algo[:L.MAX_ALGOS]),
                  lt_picked_ms=event_ms(lambda: L.gemm(*lt_args), iters))
        # what the step runs: torch's call, or cuBLASLt's pick for the epilogue matmuls
        ms["now_ms"] = ms["lt_picked_ms"] if name in VIA_CUBLASLT else ms["torch_ms"]
        ms["best_of_ms"] = min(ms["now_ms"], ms["lt_best_ms"])
        for k in tot:
            tot[k] += calls * ms[k]
        flop_total += calls * flop
        emit({**base, "matmul": name, "calls": calls, "gflop": round(flop / 1e9, 2), "algos": n, "best_algo": best,
              **{k: round(v, 4) for k, v in ms.items()},
              **{k.replace("_ms", "_tflops"): round(flop / v / 1e9, 1) for k, v in ms.items()},
              "algo_ms": [round(t, 4) for t in per_algo]})
    emit({**base, "matmul": "total", "tflop": round(flop_total / 1e12, 3),
          **{k: round(v, 2) for k, v in tot.items()},
          **{k.replace("_ms", "_tflops"): round(flop_total / v / 1e9, 1) for k, v in tot.items()},
          "saving_ms": round(tot["now_ms"] - tot["best_of_ms"], 2)})


def sustained_survey(matmuls: list[tuple], base: dict, algos: int, seconds: float, meter) -> None:
    """Each matmul's candidates (torch's call and every cuBLASLt algorithm) run back to back for
    ``seconds`` each (``bench_utils.sustained``), so at the board's power limit as inside a step,
    with their joules per call where NVML counts energy; one line per matmul and a weighted total
    of what the step runs now (torch's call, or for the epilogue matmuls ``cublaslt.gemm``'s own
    pick, timed on its first call) against the least sustained time. Joules are None where the
    counter gave none (no NVML, or too short a run for two of its moves)."""
    tot = dict.fromkeys(("now_ms", "best_ms", "now_j", "best_j"), 0.0)
    flop_total = 0.0
    for name, calls, flop, torch_fn, lt_args in matmuls:
        n = L.gemm(*lt_args, algo=0, requested=algos)
        fns = [torch_fn] + [functools.partial(L.gemm, *lt_args, algo=i, requested=algos) for i in range(n)]
        names = ["torch"] + [f"lt{i}" for i in range(n)]
        # the epilogue matmuls' torch call is the plain matmul (not the same work): cuBLASLt's only, and
        # what the step runs is gemm's own pick (of its MAX_ALGOS, made on this first call)
        lt_only = name in VIA_CUBLASLT
        if lt_only:
            fns.append(functools.partial(L.gemm, *lt_args))
            names.append("step_pick")
        runs = [sustained(f, seconds, meter=meter) for f in fns]
        burst = [r["burst_ms"] for r in runs]   # sustained's own synchronised calls before its runs
        ms = [r["ms_per_call"] for r in runs]
        joules = [r.get("joules_per_call") for r in runs]
        now = len(fns) - 1 if lt_only else 0
        best = min(range(int(lt_only), len(fns)), key=ms.__getitem__)
        for key, i in (("now", now), ("best", best)):
            tot[f"{key}_ms"] += calls * ms[i]
            j = tot[f"{key}_j"]
            tot[f"{key}_j"] = None if j is None or joules[i] is None else j + calls * joules[i]
        flop_total += calls * flop
        emit({**base, "matmul": name, "calls": calls, "gflop": round(flop / 1e9, 2), "sustained_s": seconds,
              "candidates": names, "now": now, "best": best,
              "burst_ms": [round(t, 4) for t in burst], "sustained_ms": [round(t, 4) for t in ms],
              "joules_per_call": [None if j is None else round(j, 5) for j in joules],
              "sm_mhz": [r.get("sm_mhz_mean") for r in runs], "power_w": [r.get("power_w") for r in runs],
              "now_tflops": round(flop / ms[now] / 1e9, 1), "best_tflops": round(flop / ms[best] / 1e9, 1)})
    emit({**base, "matmul": "total", "tflop": round(flop_total / 1e12, 3), "sustained_s": seconds,
          **{k: None if v is None else round(v, 3) for k, v in tot.items()},
          "now_tflops": round(flop_total / tot["now_ms"] / 1e9, 1),
          "best_tflops": round(flop_total / tot["best_ms"] / 1e9, 1),
          "saving_ms": round(tot["now_ms"] - tot["best_ms"], 2)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", default=[], help="DEPTH:BATCH of a training step")
    ap.add_argument("--sample-case", action="append", default=[], help="DEPTH:BATCH of a CFG sampling batch")
    ap.add_argument("--algos", type=int, default=32, help="algorithms to request from cuBLASLt's heuristic")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sustained", type=float, default=0.0, metavar="SECONDS",
                    help="time each candidate back to back for this long, at the power limit (training cases)")
    args = ap.parse_args(argv)
    if not L.available():
        raise SystemExit("gemm.py needs CUDA and cuBLASLt")
    dev = torch.device("cuda")
    for case in args.case:
        depth, batch = map(int, case.split(":"))
        N, mats = step_matmuls(depth, batch, dev)
        base = {"bench": "gemm", "mode": "train", "depth": depth, "batch": batch, "tokens": N, **env()}
        if args.sustained:
            sustained_survey(mats, {**base, "mode": "train_sustained"}, args.algos, args.sustained, Nvml.open(dev))
        else:
            survey(mats, base, args.algos, args.iters)
    for case in args.sample_case:
        depth, batch = map(int, case.split(":"))
        C = 64 * depth
        m = Mats(2 * batch * PAPER_PATCH_NUMS[-1] ** 2, C, dev)
        mats = [mm for k, p in enumerate(PAPER_PATCH_NUMS)
                for mm in sampling_matmuls(m, 2 * batch * p * p, C, depth, k)]
        survey(mats, {"bench": "gemm", "mode": "sample", "depth": depth, "batch": batch, **env()}, args.algos,
               args.iters)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
