"""benchmarks/bench_utils: idle device time in a profiler trace, the clock sampler, the ratios."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_utils import (ClockSampler, Nvml, clock_stats, clocks_during, clocks_over, counter_power,  # noqa: E402
                         trace_gaps)


def _kernel(name, ts, dur, corr):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, dur, corr, cat="cuda_runtime"):
    return {"cat": cat, "name": "launch", "ts": ts, "dur": dur, "tid": 1, "args": {"correlation": corr}}


def test_gaps_overlap_and_late_launches():
    events = [
        _kernel("a", 0, 100, 1), _launch(-5, 2, 1),
        _kernel("b", 50, 100, 2), _launch(-3, 2, 2),              # overlaps a (another stream); ends at 150
        _kernel("c", 200, 10, 3), _launch(0, 2, 3),               # launched early: a 50 us gap, not late
        _kernel("d", 300, 20, 4), _launch(260, 5, 4, "cuda_driver"),   # launched after c ended: late
        {"cat": "cpu_op", "name": "aten::mm", "ts": 250, "dur": 30, "tid": 1},
        _kernel("e", 325, 5, 5),                                  # a 5 us gap: under min_us
    ]
    out = trace_gaps(events, top=5, min_us=10)
    assert out["kernels"] == 5 and out["span_ms"] == 0.33
    assert out["busy_ms"] == 0.185                               # 150 (a and b joined) + 10 + 20 + 5
    assert out["idle_ms"] == round(0.33 - 0.185, 3)
    assert out["gaps_over_10us_ms"] == 0.14 and out["late_launch_ms"] == 0.09
    top = out["top"]
    assert [(g["us"], g["late"], g["prev"], g["next"]) for g in top] == [(90, True, "c", "d"), (50, False, "b", "c")]
    assert top[0]["host_op"] == "aten::mm"


def test_no_kernels():
    out = trace_gaps([{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1, "tid": 1}])
    assert out["kernels"] == 0 and out["span_ms"] == 0.0 and out["top"] == []


def test_ratios_pair_official_and_ours_by_case():
    from ratios import ratios
    lines = [
        {"bench": "official_train_step", "depth": 16, "batch": 64, "ms_median": 300.0, "pipelined_ms_median": 290.0,
         "pipelined_clocks": {"joules_per_call": 200.0}},
        {"bench": "train_step", "depth": 16, "batch": 64, "ms_median": 120.0, "pipelined_ms_median": 125.0,
         "pipelined_clocks": {"joules_per_call": 80.0}},
        {"bench": "train_step", "depth": 24, "batch": 32, "ms_median": 200.0},            # no official row
        {"bench": "official_sample", "depth": 16, "batch": 64, "ms_per_image": 8.0,
         "clocks": {"sm_mhz_median": 1965.0, "power_w_median": 659.3, "joules_per_call": 500.0}},
        {"bench": "sample", "depth": 16, "batch": 64, "ms_per_image": 3.0,
         "clocks": {"sm_mhz_median": 1590.0, "power_w_median": 689.5, "joules_per_call": 200.0}},
        {"bench": "official_sample", "depth": 24, "batch": 64, "error": "OOM"},
        {"bench": "sample", "depth": 24, "batch": 64, "ms_per_image": 6.0},
    ]
    rows = ratios(lines)
    assert rows == [
        {"ratio": "train_speedup", "depth": 16, "batch": 64, "tag": None, "official_ms": 300.0, "ours_ms": 120.0,
         "speedup_synced": 2.5, "speedup_back_to_back": 2.32,   # joules oriented as each time ratio
         "official_joules": 200.0, "ours_joules": 80.0, "joules_ratio": 2.5},
        {"ratio": "sample_time", "depth": 16, "batch": 64, "tag": None, "official_ms_per_image": 8.0,
         "ours_ms_per_image": 3.0, "ours_over_official": 0.375, "official_sm_mhz": 1965.0, "ours_sm_mhz": 1590.0,
         "official_power_w": 659.3, "ours_power_w": 689.5, "official_joules": 500.0, "ours_joules": 200.0,
         "joules_ratio": 0.4},
    ]


def test_kernel_categories_split_the_device_time():
    """Names as the profiler reports them on Hopper: cuDNN's SDPA says "fprop" but is attention,
    an implicit-GEMM convolution is a convolution, cuBLAS's nvjet kernels are matmuls; whatever
    matches nothing (inductor's fused kernels) is element-wise work, and nothing is lost."""
    from bench_utils import kernel_categories
    rows = [{"kernel": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "ms": 2.0},
            {"kernel": "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc", "ms": 3.0},
            {"kernel": "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "ms": 5.0},
            {"kernel": "triton_tem_fused_flex_attention_backward_transpose_view_9", "ms": 1.0},
            {"kernel": "void at::native::radixSortKVInPlace<2, -1, 128, 32, float, long>", "ms": 0.5},
            {"kernel": "void at::native::sampleMultinomialOnce<float, 4>", "ms": 0.25},
            {"kernel": "triton_poi_fused_gelu_view_1", "ms": 0.75},
            {"kernel": "triton_red_fused__to_copy__unsafe_index_add_arange_upsample_nearest2d", "ms": 0.125},
            {"kernel": "_adamw_kernel", "ms": 1.5}]
    cats = kernel_categories(rows)
    assert cats == {"matmul": 5.0, "attention": 3.0, "convolution": 3.0, "optimizer": 1.5,
                    "elementwise_other": 0.875, "sort_topk": 0.5, "sampling": 0.25}
    assert list(cats)[0] == "matmul" and sum(cats.values()) == sum(r["ms"] for r in rows)


def test_multi_gpu_scaling_efficiency_is_per_gpu_rate_over_one_gpu():
    """tokens/s per GPU over the one-GPU run's of the same bench and case; a failed run gets none,
    and the official code's rows are measured against the official one-GPU row."""
    from multi_gpu import with_efficiency
    rows = [{"bench": "multi_gpu", "depth": 16, "batch_per_gpu": 64, "workers": n, "tokens_per_s_per_gpu": v}
            for n, v in ((1, 300_000), (2, 285_000), (8, 270_000))]
    rows += [{"bench": "multi_gpu", "depth": 16, "batch_per_gpu": 64, "workers": 4, "error": "OOM"},
             {"bench": "multi_gpu_official", "depth": 16, "batch_per_gpu": 64, "workers": 1,
              "tokens_per_s_per_gpu": 140_000},
             {"bench": "multi_gpu_official", "depth": 16, "batch_per_gpu": 64, "workers": 2,
              "tokens_per_s_per_gpu": 133_000}]
    out = with_efficiency(rows)
    assert [r.get("scaling_efficiency") for r in out] == [1.0, 0.95, 0.9, None, 1.0, 0.95]


def test_grad_error_splits_a_shrunk_gradient_from_noise():
    """``along`` is the error's component on the true gradient: a gradient shrunk by 1% reads -0.01
    (and rel_err 0.01); noise orthogonal to it reads 0 with its own size as rel_err. Groups drop
    the block index, and "all" pools every parameter."""
    import torch
    from grad_error import compare, group_of
    assert group_of("blocks.12.attn.proj.weight") == "blocks.attn.proj.weight"
    assert group_of("blocks.3.ada_lin.1.bias") == "blocks.ada_lin.1.bias" and group_of("head.weight") == "head.weight"
    want = {"blocks.0.w": torch.tensor([3.0, 4.0], dtype=torch.float64),
            "blocks.1.w": torch.tensor([0.0, 5.0], dtype=torch.float64),
            "head.w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    got = {"blocks.0.w": want["blocks.0.w"] * 0.99, "blocks.1.w": want["blocks.1.w"] * 0.99,
           "head.w": torch.tensor([1.0, 0.02], dtype=torch.float64)}      # orthogonal, 2% of its norm
    out = compare(got, want)
    assert out["blocks.w"] == {"rel_err": 0.01, "along": -0.01, "norm": round(50 ** 0.5, 2)}
    assert out["head.w"] == {"rel_err": 0.02, "along": 0.0, "norm": 1.0}
    assert out["block.1"] == {"rel_err": 0.01, "along": -0.01, "norm": 5.0} and "block.head" not in out
    # pooled: squared errors 0.01^2 * 50 + 0.02^2 over squared norm 51; along -0.01 * 50 / 51
    assert out["all"]["rel_err"] == float(f"{(0.0054 / 51) ** 0.5:.3g}")
    assert out["all"]["along"] == float(f"{-0.5 / 51:.3g}")


def test_grad_error_tells_float32_from_bf16():
    """End to end on the CPU (a one-block model): float32's gradients are far inside bf16's
    rounding (unit roundoff 2^-9) and bf16 autocast's are not; the same weights and batch reach
    both arms (their losses equal float64's to each dtype's rounding)."""
    import json
    import contextlib
    import io
    from grad_error import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["--depth", "1", "--batch", "2", "--after", "1", "--arm", "f32:plain:fp32", "--arm", "b16:plain:bf16",
              "--device", "cpu"])
    rows = {(r["arm"], r["step"]): r for r in map(json.loads, buf.getvalue().splitlines())}
    assert set(rows) == {("f32", 0), ("f32", 1), ("b16", 0), ("b16", 1)}
    bf16_u = 2.0 ** -9
    for step in (0, 1):
        f32, b16 = rows["f32", step], rows["b16", step]
        assert f32["groups"]["all"]["rel_err"] < bf16_u / 100 < b16["groups"]["all"]["rel_err"] < 10 * bf16_u
        assert abs(f32["loss"] - f32["loss_float64"]) < 1e-5 * f32["loss_float64"]
        assert abs(b16["loss"] - b16["loss_float64"]) < 10 * bf16_u * b16["loss_float64"]
    assert rows["f32", 0]["loss_float64"] != rows["f32", 1]["loss_float64"]   # the second point is after a step


def test_grad_error_arms_take_plan_fields():
    """An arm is tag:norm:amp, with plan fields after a fourth colon (booleans spelled true/false);
    the arms never replay a CUDA graph nor keep bf16 weight copies, so every arm's gradients are
    of the float64 reference's weights as given."""
    import pytest
    from grad_error import parse_arm
    assert parse_arm("fused:fused:bf16") == ("fused", {"norm": "fused", "cuda_graph": False,
                                                       "master_weights": False}, "bf16")
    tag, choices, amp = parse_arm("eager:plain:fp32:compile=false,attention=dense")
    assert (tag, amp) == ("eager", "fp32")
    assert choices == {"norm": "plain", "cuda_graph": False, "master_weights": False, "compile": False,
                       "attention": "dense"}
    for bad in ("a:plain", "a:plain:fp16", "a:plain:bf16:compile", "a:plain:bf16:=x", "a:b:bf16:x=1:y"):
        with pytest.raises(ValueError, match="--arm"):
            parse_arm(bad)


def test_clock_stats_medians_and_reasons():
    """nvidia-smi's CSV samples: medians and extremes; each clock-lowering reason as the share of
    samples it was active in (0x4 power cap in 2 of 4, 0x20 thermal in 1; 0x1 idle is not one);
    lines that are not samples are skipped."""
    lines = ["1980, 350.5, 40, 0x0000000000000000", "1755, 699.8, 52, 0x0000000000000004",
             "1710, 701.2, 55, 0x0000000000000024", "1980, 90.0, 38, 0x0000000000000001",
             "[N/A], [N/A], 38, 0x0", "1980, 70"]
    out = clock_stats(lines)
    assert out["clock_samples"] == 4
    assert out["sm_mhz_median"] == (1755 + 1980) / 2 and out["sm_mhz_min"] == 1710
    assert out["power_w_max"] == 701.2 and out["power_w_median"] == round((350.5 + 699.8) / 2, 1)
    assert out["temp_c_max"] == 55
    assert out["clock_reasons"] == {"sw_power_cap": 0.5, "sw_thermal": 0.25}
    assert clock_stats(["clocks.sm [MHz], power.draw [W]"]) == {"clock_samples": 0}


def test_clock_stats_keeps_readings_without_reasons():
    """A driver that reports no reasons ("[N/A]") still gives the clock and power; the reasons'
    shares are over the samples that have them."""
    out = clock_stats(["1600, 690.0, 50, [N/A]", "1500, 695.0, 51, 0x4"])
    assert out["clock_samples"] == 2 and out["sm_mhz_median"] == 1550 and out["clock_reasons"] == {"sw_power_cap": 1.0}


def test_clock_sampler_reads_what_the_sampler_wrote_and_stops_it():
    """The samples written while the block runs are read back at its end, and the sampler (here a
    stand-in that writes two samples and would then sleep) is stopped, not waited for; a sampler
    that writes only an error gives that error and no samples."""
    import time
    script = "printf '1600, 690.0, 50, 0x4\\n1500, 695.0, 52, 0x4\\n'; exec sleep 60"
    t0 = time.monotonic()
    with ClockSampler(torch.device("cpu"), command=["sh", "-c", script]) as clocks:
        time.sleep(0.5)
    assert time.monotonic() - t0 < 10
    assert clocks.stats["clock_samples"] == 2 and clocks.stats["sm_mhz_min"] == 1500
    with ClockSampler(torch.device("cpu"), command=["sh", "-c", "echo 'Field x is not a valid field'"]) as bad:
        time.sleep(0.3)
    assert bad.stats["clock_samples"] == 0 and "not a valid field" in bad.stats["error"]
    with ClockSampler(torch.device("cpu")) as none:   # no command and no CUDA device: nothing sampled
        pass
    assert none.stats == {}
    calls = []
    assert clocks_over(lambda: calls.append(1), torch.device("cpu"), 3) == {} and len(calls) == 3
    with clocks_during(torch.device("cpu"), False) as off:
        assert off is None
    with clocks_during(torch.device("cpu"), True) as on:
        assert isinstance(on, ClockSampler)


class FakeNvml:
    """Stands in for libnvidia-ml: writes its readings through the ctypes references it is given
    and returns NVML's status codes (0 success, 3 not supported)."""

    def __init__(self, energies_mj, counter=True):
        self.energies, self.counter, self.uuid = iter(energies_mj), counter, None

    def nvmlInit_v2(self):
        return 0

    def nvmlDeviceGetHandleByUUID(self, uuid, ref):
        self.uuid = uuid
        ref._obj.value = 7
        return 0

    def nvmlDeviceGetTotalEnergyConsumption(self, handle, ref):
        if not self.counter:
            return 3
        ref._obj.value = next(self.energies)
        return 0

    def nvmlDeviceGetClockInfo(self, handle, kind, ref):
        ref._obj.value = 1605 if kind == 1 else 0   # only the SM clock (NVML_CLOCK_SM = 1) is asked for
        return 0


def test_nvml_energy_per_call_over_a_sampled_block():
    """NVML's counter is in mJ: 1,000,000 -> 1,012,500 mJ over a block of 5 calls is 12.5 J, 2.5 J
    a call; the clock is the SM clock's; a driver without the counter gives no meter."""
    lib = FakeNvml([1_000_000, 1_000_000, 1_012_500])   # open's check, the block's start and end
    meter = Nvml.open(torch.device("cpu"), lib=lib)
    assert meter is not None and lib.uuid == b"GPU-test" and meter.sm_mhz() == 1605
    script = "printf '1600, 690.0, 50, 0x4\\n'; exec sleep 60"
    with ClockSampler(torch.device("cpu"), command=["sh", "-c", script], calls=5, meter=meter) as clocks:
        pass
    assert clocks.stats["energy_j"] == 12.5 and clocks.stats["joules_per_call"] == 2.5
    assert Nvml.open(torch.device("cpu"), lib=FakeNvml([], counter=False)) is None
    assert Nvml.open(torch.device("cpu")) is None   # no CUDA device: no NVML asked


def test_counter_power_spans_the_counter_moves_only():
    """A counter that moves by 70 J every 100 ms (700 W), read every 30 ms: a move is seen up to
    one read late, so between the first and the last move seen the power is off by at most
    700 W x 0.03 s over the span; the plain first-to-last difference over the same reads is
    further off than that. Fewer than two moves give none."""
    reads = [(0.03 * i, 70.0 * int(0.03 * i / 0.1 + 1e-9) + 1000.0) for i in range(34)]
    moves = [t for (t, e), (_, b) in zip(reads[1:], reads) if e != b]
    bound = 700.0 * 0.03 / (moves[-1] - moves[0])
    assert abs(counter_power(reads) - 700.0) <= bound
    (t0, e0), (t1, e1) = reads[0], reads[-1]
    assert abs((e1 - e0) / (t1 - t0) - 700.0) > bound
    assert counter_power([(0.0, 5.0), (0.05, 5.0), (0.09, None), (0.12, 12.0)]) is None
    # a failed read between two equal ones is not a move: 10 W from 0.06 s to 0.26 s
    reads = [(0, 5.0), (0.02, None), (0.04, 5.0), (0.06, 6.0), (0.16, 7.0), (0.26, 8.0)]
    assert abs(counter_power(reads) - 10.0) < 1e-9


def test_matmul_power_counts_dense_flops():
    """2 n^3 multiply-adds per n x n x n matmul: 100 of 1024^3 in 1 ms is 214.7 TFLOP/s."""
    from matmul_power import tflops
    assert abs(tflops(1024, 100, 1.0) - 2 * 1024 ** 3 * 100 / 1e-3 / 1e12) < 1e-9
    assert round(tflops(1024, 100, 1.0), 1) == 214.7
