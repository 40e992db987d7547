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

# the official VQ-VAE's layout (profiles/paper.yaml): attention after every res block of the 16x16
# level, bottom-right padded downsampling, 4 phi shared over the 10 scales
PAPER_VQ = VQVAEConfig(image_size=256, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, Cvae=32,
                       vocab_size=4096, patch_nums=PAPER_PATCH_NUMS, level_attn=True,
                       downsample_pad="bottom_right", num_phi=4)
# the default profile's tokenizer (params.yaml): 32x32 images, 8x8 latent, V=512, 130 tokens
DEFAULT_VQ = VQVAEConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attn=False, Cvae=16,
                         vocab_size=512, patch_nums=(1, 2, 3, 4, 6, 8))



def env() -> dict:
    info = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if os.environ.get("BENCH_TAG"):   # which arm of a before/after comparison (e.g. old and new code in one call)
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


def event_ms(fn, iters: int = 20) -> float:
    """Median ms of ``fn`` on the GPU over ``iters`` synchronised calls after 3 warm-up calls."""
    return sorted(time_ms(fn, torch.device("cuda"), 3, iters))[iters // 2]


def summary(times: list[float]) -> dict:
    return {"ms_median": round(statistics.median(times), 3), "ms_min": round(min(times), 3),
            "ms_max": round(max(times), 3), "iters": len(times)}


# nvidia-smi's clock event (throttle) reason bits, the ones that lower the SM clock under load
CLOCK_REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                 0x80: "hw_power_brake"}
# (drivers from 535 also name the last field clocks_event_reasons.active; both names are accepted there)
CLOCK_QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def clock_stats(lines: list[str]) -> dict:
    """SM clock, board power and temperature over ``nvidia-smi --query-gpu=CLOCK_QUERY
    --format=csv,noheader,nounits`` samples: medians and extremes, and the share of samples in
    which each clock-lowering reason was active (over the samples that report reasons: a driver
    may say "[N/A]" there and still report the clock). ``power.draw`` is the driver's own
    average (about a second on Hopper), so ``power_w_max`` is a smoothed maximum."""
    rows, bits = [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            rows.append((float(parts[0]), float(parts[1]), float(parts[2])))
        except (ValueError, IndexError):   # a header, a "[N/A]" reading or a cut-off last line
            continue
        try:
            bits.append(int(parts[3], 16))
        except (ValueError, IndexError):
            pass
    if not rows:
        return {"clock_samples": 0}
    mhz, watts, temp = zip(*rows)
    return {"clock_samples": len(rows), "sm_mhz_median": statistics.median(mhz), "sm_mhz_min": min(mhz),
            "power_w_median": round(statistics.median(watts), 1), "power_w_max": round(max(watts), 1),
            "temp_c_max": max(temp),
            "clock_reasons": {name: round(sum(b & bit != 0 for b in bits) / len(bits), 2)
                              for bit, name in CLOCK_REASONS.items() if any(b & bit for b in bits)}}


class Nvml:
    """The GPU's cumulative energy counter (mJ since the driver loaded) and SM clock, read
    through NVML (``libnvidia-ml``, which the NVIDIA driver installs) by ctypes: per-kernel-run
    energy that nvidia-smi's one-second power average cannot give. At the board's power limit a
    run's time follows its energy (RESULTS.md round 23), so joules per call compare two ways of
    doing the same work there. :meth:`open` gives None where NVML or the counter is missing;
    ``lib`` is the loaded library (tests pass a stand-in)."""

    _SM_CLOCK = 1   # nvmlClockType_t NVML_CLOCK_SM

    def __init__(self, lib, handle):
        self.lib, self.handle = lib, handle

    @classmethod
    def open(cls, device: torch.device, lib=None) -> "Nvml | None":
        import ctypes
        if lib is None:
            if device.type != "cuda":
                return None
            try:
                lib = ctypes.CDLL("libnvidia-ml.so.1")
            except OSError:
                return None
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}" if device.type == "cuda" else "GPU-test"
        handle = ctypes.c_void_p()
        if lib.nvmlInit_v2() != 0 or lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
            return None
        meter = cls(lib, handle)
        return meter if meter.energy_j() is not None else None

    def _read(self, fn, value, *args):
        import ctypes
        return value.value if fn(self.handle, *args, ctypes.byref(value)) == 0 else None

    def energy_j(self) -> float | None:
        import ctypes
        mj = self._read(self.lib.nvmlDeviceGetTotalEnergyConsumption, ctypes.c_ulonglong())
        return None if mj is None else mj / 1e3

    def sm_mhz(self) -> int | None:
        import ctypes
        return self._read(self.lib.nvmlDeviceGetClockInfo, ctypes.c_uint(), self._SM_CLOCK)


def counter_power(reads: list[tuple[float, float | None]]) -> float | None:
    """Mean power in W from ``(host seconds, counter joules)`` reads of NVML's energy counter,
    taken between the first and the last read at which the counter had moved. The counter moves
    only every 100 ms on an H200 (RESULTS.md round 24), so the difference of two reads at
    arbitrary times is off by up to one update, about 25% over 0.4 s; between moves it is off by
    at most one read interval (a move is seen up to one read late). None without two moves."""
    moves, last = [], None
    for t, e in reads:
        if e is None:   # a failed read: the next good one is compared with the last good one
            continue
        if last is not None and e != last:
            moves.append((t, e))
        last = e
    if len(moves) < 2:
        return None
    (t0, e0), (t1, e1) = moves[0], moves[-1]
    return (e1 - e0) / (t1 - t0)


def sustained(fn, seconds: float, settle: float = 0.3, meter: Nvml | None = None, chunk_ms: float = 20.0) -> dict:
    """``fn`` (GPU work) back to back for ``settle`` seconds, then for ``seconds`` more, timed:
    ms per call and, with an NVML ``meter`` read after each chunk of about ``chunk_ms``, the mean
    SM clock, the mean power (:func:`counter_power`) and joules per call (power times ms per
    call). Long enough runs meet the board's power limit, as a step's matmuls do (short
    synchronised calls after idle run at the full clock, RESULTS.md round 23). The host keeps at
    most two chunks queued ahead, so its reads fall in the GPU's window, and a read (some ms of
    host time) does not leave the GPU idle. Give a second or more for joules within a few per cent."""
    one = event_ms(fn, 5)
    chunk = max(1, round(chunk_ms / max(one, 1e-3)))

    def run(secs: float, reads: list | None):
        calls, ends, t0 = 0, [], time.perf_counter()
        while not ends or time.perf_counter() - t0 < secs:   # at least one chunk
            for _ in range(chunk):
                fn()
            calls += chunk
            ends.append(torch.cuda.Event(enable_timing=True))
            ends[-1].record()
            if len(ends) > 2:
                ends[-3].synchronize()
                if reads is not None and meter is not None:
                    reads.append((time.perf_counter(), meter.energy_j(), meter.sm_mhz()))
        ends[-1].synchronize()
        return calls

    run(settle, None)
    start, end, reads = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
    start.record()
    calls = run(seconds, reads)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / calls
    out = {"ms_per_call": ms, "calls": calls, "burst_ms": one}
    clocks = [c for _, _, c in reads if c is not None]
    if clocks:
        out["sm_mhz_mean"] = round(statistics.fmean(clocks))
    power = counter_power([(t, e) for t, e, _ in reads])
    if power is not None:
        out.update(power_w=round(power, 1), joules_per_call=power * ms / 1e3)
    return out


class ClockSampler:
    """``nvidia-smi`` sampling the GPU's SM clock, power and clock-lowering reasons every
    ``period_ms`` while the ``with`` block runs (:func:`clock_stats` of the samples in
    ``stats``): whether a run holds the maximum clock or the board's power limit lowers it under
    sustained load (RESULTS.md round 23). The samples go to a temporary file (a pipe read only at
    the end would fill and stall nvidia-smi on long runs). Empty ``stats`` where there is no
    nvidia-smi or no CUDA device; an ``error`` in them where nvidia-smi gave no samples.
    With NVML's energy counter (:class:`Nvml`) the stats also hold the block's ``energy_j``
    and, given the number of ``calls`` the block runs, ``joules_per_call``: the difference of two
    reads, so within one counter update (100 ms of the board's power, about 70 J at 700 W) of
    the block's energy; run blocks of several seconds.
    ``command`` and ``meter`` replace the nvidia-smi call and NVML (tests)."""

    def __init__(self, device: torch.device, period_ms: int = 50, command: list[str] | None = None,
                 calls: int | None = None, meter: Nvml | None = None):
        self.device, self.period_ms, self.command, self.calls = device, period_ms, command, calls
        self.meter = meter if meter is not None or command is not None else Nvml.open(device)
        self.proc, self.out, self.stats, self.energy0 = None, None, {}, None

    def __enter__(self) -> "ClockSampler":
        import shutil
        import subprocess
        import tempfile
        command = self.command
        if command is None and self.device.type == "cuda" and shutil.which("nvidia-smi"):
            uuid = torch.cuda.get_device_properties(self.device).uuid
            command = ["nvidia-smi", f"--id=GPU-{uuid}", f"--query-gpu={CLOCK_QUERY}",
                       "--format=csv,noheader,nounits", f"-lms={self.period_ms}"]
        if command is not None:
            self.out = tempfile.TemporaryFile(mode="w+")
            self.proc = subprocess.Popen(command, stdout=self.out, stderr=subprocess.STDOUT, text=True)
        self.energy0 = self.meter.energy_j() if self.meter else None   # after the sampler's start: not its idle
        return self

    def __exit__(self, *exc) -> None:
        energy = self.meter.energy_j() if self.meter and self.energy0 is not None else None
        self._read_samples()
        if energy is not None:
            self.stats["energy_j"] = round(energy - self.energy0, 3)
            if self.calls:
                self.stats["joules_per_call"] = round((energy - self.energy0) / self.calls, 3)

    def _read_samples(self) -> None:
        """Stops the sampler and parses what it wrote into ``stats``."""
        import subprocess
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.seek(0)
        lines = self.out.read().splitlines()
        self.out.close()
        self.stats = clock_stats(lines)
        if not self.stats["clock_samples"] and lines:   # say why (e.g. a field this driver lacks)
            self.stats["error"] = lines[0][:200]


def clocks_during(device: torch.device, on: bool, calls: int | None = None):
    """A :class:`ClockSampler` over a ``with`` block (of ``calls`` calls) where ``on``, else a
    context that yields ``None``."""
    import contextlib
    return ClockSampler(device, calls=calls) if on else contextlib.nullcontext()


def clocks_over(fn, device: torch.device, iters: int) -> dict:
    """The :class:`ClockSampler` stats over ``iters`` more calls of ``fn`` (run after the timed
    ones, so the timing does not include the sampler's start)."""
    with ClockSampler(device, calls=iters) as clocks:
        time_ms(fn, device, 0, iters)
    return clocks.stats


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
    return KernelList(rows[:top], total_ms=round(sum(r["ms"] for r in rows), 3), categories=kernel_categories(rows))


class KernelList(list):
    """Top kernels, with ``total_ms``: the device time of all kernels per call (idle time excluded),
    and ``categories``: that time split by what the kernels do (:func:`kernel_categories`)."""

    def __init__(self, rows, total_ms: float, categories: dict | None = None):
        super().__init__(rows)
        self.total_ms, self.categories = total_ms, categories or {}


# Kernel name patterns per category, tried in order (a convolution's implicit GEMM is a convolution,
# flex attention's Triton template is attention, not element-wise work, and so is cuDNN's SDPA).
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "flex", "sdpa", "tem_fused")),   # cuDNN's SDPA says "fprop" too
    ("convolution", ("fprop", "dgrad", "wgrad", "convolution", "conv2d", "implicit_gemm", "implicit_convolve")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "cublas", "matmul", "splitk")),
    ("optimizer", ("adam", "master_weight")),
    ("sort_topk", ("sort", "radix", "topk", "bitonic")),
    ("sampling", ("multinomial", "scan", "cumsum", "exponential", "distribution")),
    ("memcpy_memset", ("memcpy", "memset", "copy_kernel")),
)


def kernel_categories(rows: list[dict]) -> dict:
    """Device ms per category (:data:`KERNEL_CATEGORIES`; the rest is ``elementwise_other``: fused
    Triton kernels, norms, reductions, casts), from :func:`top_kernels`' rows, largest first."""
    out: dict[str, float] = {}
    for r in rows:
        name = r["kernel"].lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "elementwise_other")
        out[cat] = out.get(cat, 0.0) + r["ms"]
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def gpu_gaps(fn, device: torch.device, top: int = 15, min_us: float = 10.0) -> dict:
    """Where the GPU sits idle during one call of ``fn`` (see :func:`trace_gaps`), from a
    profiler trace. The profiler records every host op, which slows the host: gaps where the
    host is the bottleneck come out larger than they are without it (round 5: a 221 ms step
    spanned 271 ms)."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            return trace_gaps(json.load(trace)["traceEvents"], top, min_us)


def trace_gaps(events: list[dict], top: int = 15, min_us: float = 10.0) -> dict:
    """Idle device time in a Chrome trace (``events``, times in us): the span from the first
    device kernel's start to the last one's end, the time some kernel runs (``busy_ms``, the
    union over streams), the gaps of at least ``min_us``, how much of them waits on a late
    launch (the host launched the next kernel after every earlier one had finished), and the
    ``top`` largest gaps with the kernels around them and the host op that launched the next."""
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e),
                 key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") in ("cpu_op", "python_function") and "dur" in e]

    def host_op(launch):   # the innermost host op around a launch, on the launching thread
        inner = [o for o in ops if o["tid"] == launch["tid"] and o["ts"] <= launch["ts"] <= o["ts"] + o["dur"]]
        return min(inner, key=lambda o: o["dur"])["name"][:60] if inner else "?"

    gaps, total, late_total, busy = [], 0.0, 0.0, 0.0
    prev, end = None, None   # the kernel that ends last so far (kernels of several streams may overlap)
    for nxt in gpu:
        nxt_end = nxt["ts"] + nxt["dur"]
        if end is not None and nxt["ts"] - end >= min_us:
            gap = nxt["ts"] - end
            launch = launches.get(nxt.get("args", {}).get("correlation"))
            late = launch is not None and launch["ts"] + launch.get("dur", 0) > end
            total += gap
            late_total += gap if late else 0.0
            gaps.append((gap, late, prev, nxt, launch))
        busy += nxt["dur"] if end is None else max(0.0, nxt_end - max(nxt["ts"], end))
        if end is None or nxt_end > end:
            prev, end = nxt, nxt_end
    gaps.sort(key=lambda g: -g[0])
    span = end - gpu[0]["ts"] if gpu else 0.0
    return {"span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3), "kernels": len(gpu),
            f"gaps_over_{min_us:g}us_ms": round(total / 1e3, 3), "late_launch_ms": round(late_total / 1e3, 3),
            "idle_ms": round((span - busy) / 1e3, 3),
            "top": [{"us": round(g), "late": late, "prev": p["name"][:50], "next": n["name"][:50],
                     "host_op": host_op(lz) if lz else "?"} for g, late, p, n, lz in gaps[:top]]}
