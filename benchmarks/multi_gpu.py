"""Data-parallel scaling of the trainer's step through Ray Train on 1, 2, 4 and 8 GPUs of one host.

For each case (``depth:batch`` per GPU) and each worker count N, one Ray Train run of N workers
(``TorchTrainer``: NCCL on GPU, gloo on CPU) builds the model as the train stage does (the
execution plan resolved for a world of N; FSDP2 per block from ``--fsdp-min-depth``, DDP below),
times the trainer's ``TrainStep`` on a fixed batch per worker (CUDA events, synchronised after
every step, median over ``--iters`` after warm-up) and reports from every rank. One JSON line per
case and N: ms per step, tokens/s, tokens/s per GPU, scaling efficiency (tokens/s per GPU over
the one-GPU run's, when N=1 is among the counts) and the largest peak memory of any worker.
``--official-root`` adds the official code's DDP step (``official_step.build``, wrapped by Ray's
``prepare_model``) as a reference row for every N.

    PYTHONPATH=. python benchmarks/multi_gpu.py --case 16:64 --case 24:32 --case 30:32 --gpus 1 2 4 8 \\
        --fsdp-min-depth 24 --official-root .official
    PYTHONPATH=. python benchmarks/multi_gpu.py --device cpu --shapes default --case 2:8 --gpus 1 2 --iters 3

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` unless set). Needs ``ray[train]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import emit, env, peak_gib, reset_peak, summary, time_ms  # noqa: E402
from train_step import DEFAULT_SHAPES, batch_of, paper_adamw, rates  # noqa: E402
from varcore import VAR, VARConfig  # noqa: E402
from varcore.fast.plan import ExecutionPlan, apply_plan  # noqa: E402
from varcore.step import TrainStep  # noqa: E402


def _model(config: dict, device: torch.device, world: int):
    """The trainer's model and optimizer on this worker, and its step; or the official model's."""
    import ray.train.torch
    depth, batch, amp = config["depth"], config["batch"], torch.bfloat16 if device.type == "cuda" else None
    cfg = VARConfig(depth=depth, **config["cfg_kw"])
    torch.manual_seed(0)
    if config["official"]:
        from official_step import build as official_build, official_var_class
        model, _ = official_build(official_var_class(Path(config["official"]), device), depth, batch, device)
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        opt = paper_adamw(model, batch * world, device, fused=device.type == "cuda")
        return cfg, TrainStep(model, opt, amp=torch.bfloat16), {"parallel": "ddp"}
    fsdp = config["fsdp_min_depth"] is not None and depth >= config["fsdp_min_depth"]
    plan = ExecutionPlan(checkpointing=config["checkpointing"]).resolve(cfg, device, training=True, amp=amp,
                                                                        world=world, fsdp=fsdp)
    model = apply_plan(VAR(cfg).to(device).train(), plan)
    if fsdp:
        from pipeline.training.parallel import fully_sharded
        model = fully_sharded(model, device, amp)
    else:
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    opt = paper_adamw(model, batch * world, device, fused=device.type == "cuda")
    return cfg, TrainStep.from_plan(model, opt, plan, amp=amp), {"parallel": "fsdp2" if fsdp else "ddp",
                                                                 "plan": plan.as_dict()}


def bench_worker(config: dict) -> None:
    """One worker: build, time the step; rank 0 writes the figures to ``config["out"]`` (Ray Train
    keeps reported metrics only with a checkpoint)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    reset_peak(device)
    cfg, step, info = _model(config, device, world)
    data = batch_of(cfg, config["batch"], device, seed=rank)
    times = time_ms(lambda: step(*data), device, config["warmup"], config["iters"])
    peak = None
    if device.type == "cuda":   # the largest of the workers' peaks
        peak_t = torch.tensor([peak_gib(device)], device=device)
        if dist.is_initialized():
            dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
        peak = round(peak_t.item(), 2)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({**summary(times), **info, "peak_gib_max": peak}))


def run(depth: int, batch: int, workers: int, args, official: str | None) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer
    cuda = args.device == "cuda"
    cfg_kw = DEFAULT_SHAPES if args.shapes == "default" else {}
    name = f"bench-d{depth}-b{batch}-n{workers}{'-official' if official else ''}"
    out = Path(args.storage) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    config = {"depth": depth, "batch": batch, "official": official, "fsdp_min_depth": args.fsdp_min_depth,
              "checkpointing": args.checkpointing, "cfg_kw": cfg_kw, "warmup": args.warmup, "iters": args.iters,
              "out": str(out)}
    trainer = TorchTrainer(
        bench_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cuda,
                                               resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=args.storage))
    rec = {"bench": "multi_gpu_official" if official else "multi_gpu", "depth": depth, "batch_per_gpu": batch,
           "workers": workers, "device": args.device, "shapes": args.shapes, **env()}
    try:
        trainer.fit()
        m = json.loads(out.read_text())
    except Exception as e:   # an OOM or a failed case must not hide the others
        return {**rec, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    cfg = VARConfig(depth=depth, **cfg_kw)
    tokens_per_s, mfu = rates(cfg, batch * workers, m["ms_median"])
    rec.update({k: m[k] for k in ("ms_median", "ms_min", "ms_max", "iters", "parallel", "peak_gib_max") if k in m},
               tokens_per_s=round(tokens_per_s), tokens_per_s_per_gpu=round(tokens_per_s / workers),
               mfu=round(mfu / workers, 4), **({"plan": m["plan"]} if "plan" in m else {}))
    return rec


def with_efficiency(records: list[dict]) -> list[dict]:
    """``scaling_efficiency``: tokens/s per GPU over the one-GPU run's of the same bench and case."""
    one = {(r["bench"], r["depth"], r["batch_per_gpu"]): r["tokens_per_s_per_gpu"]
           for r in records if r["workers"] == 1 and "error" not in r}
    for r in records:
        base = one.get((r["bench"], r["depth"], r["batch_per_gpu"]))
        if base and "error" not in r:
            r["scaling_efficiency"] = round(r["tokens_per_s_per_gpu"] / base, 3)
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], help="depth:batch per GPU (default 16:64 24:32 30:32)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="worker counts")
    ap.add_argument("--fsdp-min-depth", type=int, default=24, help="FSDP2 from this depth (paper profile); 0: never")
    ap.add_argument("--checkpointing", type=int, default=0, help="blocks recomputed in backward")
    ap.add_argument("--official-root", type=Path, help="also time the official code's DDP step (a checkout)")
    ap.add_argument("--shapes", choices=["paper", "default"], default="paper")
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--storage", default=str(Path(tempfile.gettempdir()) / "varscale-multi-gpu"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.fsdp_min_depth == 0:
        args.fsdp_min_depth = None
    import ray
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"],
                                           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                          str(Path(__file__).resolve().parent)])}})
    records = []
    for case in args.case or ["16:64", "24:32", "30:32"]:
        depth, batch = (int(p) for p in case.split(":"))
        for official in ([None, str(args.official_root.resolve())] if args.official_root else [None]):
            for n in args.gpus:
                records.append(run(depth, batch, n, args, official))
        for r in with_efficiency([r for r in records if r["depth"] == depth and r["batch_per_gpu"] == batch]):
            emit(r)


if __name__ == "__main__":
    main()
