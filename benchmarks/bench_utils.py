"""Shared helpers of the benchmark programs: device facts, timing, JSON lines."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from varcore import PAPER_PATCH_NUMS, VQVAEConfig

H100_BF16_DENSE_FLOPS = 989.4e12   # H100 SXM dense bf16 tensor-core peak (datasheet), MFU denominator

PAPER_VQ = VQVAEConfig(image_size=256, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, Cvae=32,
                       vocab_size=4096, patch_nums=PAPER_PATCH_NUMS)


def env() -> dict:
    info = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if os.environ.get("BENCH_TAG"):   # which arm of a before/after comparison (device_round.sh)
        info["tag"] = os.environ["BENCH_TAG"]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def emit(record: dict) -> None:
    """One JSON line on stdout, flushed (the device tool returns the tail of the output)."""
    print(json.dumps(record), flush=True)
    sys.stdout.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int, host_sync: bool = True) -> list[float]:
    """Per-call times in ms after ``warmup`` calls: CUDA events on GPU, a synchronised clock elsewhere.

    ``host_sync=False`` (GPU): the calls run back to back with an event pair each and one
    synchronisation at the end, as in a training loop that never waits for the GPU; the
    host's launch work then overlaps the previous call's kernels."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda" and not host_sync:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    return {"ms_median": round(statistics.median(times), 3), "ms_min": round(min(times), 3),
            "ms_max": round(max(times), 3), "iters": len(times)}


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def top_kernels(fn, device: torch.device, steps: int = 2, top: int = 25) -> list[dict]:
    """The ``top`` device kernels of ``steps`` calls of ``fn`` by total time (ms per call)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0 and e.count > 0:
            rows.append({"kernel": e.key[:90], "ms": round(t / 1e3 / steps, 3), "calls": e.count // steps})
    rows.sort(key=lambda r: -r["ms"])
    return KernelList(rows[:top], total_ms=round(sum(r["ms"] for r in rows), 3))


class KernelList(list):
    """Top kernels, with ``total_ms``: the device time of all kernels per call (idle time excluded)."""

    def __init__(self, rows, total_ms: float):
        super().__init__(rows)
        self.total_ms = total_ms
