"""Data parallelism on two CPU processes (gloo): with FSDP2 (``pipeline.training.parallel.fully_sharded``)
and with DDP, the trainer's step over half batches trains like one process over the whole batch,
with clipping on, and the (gathered) full state dict is the one process's weights. What it compares and why the bounds hold:
the two runs compute the same float32 math except the order of the batch reductions (two
half-batch means averaged by the reduce-scatter instead of one mean) and of the clipping norm
(per-shard sums, then across shards), a few float32 roundings per step."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CFG = dict(depth=2, vocab_size=16, Cvae=4, patch_nums=(1, 2, 3), num_classes=5, cond_drop_rate=0.0,
           drop_path_rate=0.0)
STEPS, BATCH, LR = 4, 4, 1e-2


def _batches(cfg):
    """One fixed batch for every step (its loss must fall)."""
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, cfg.num_classes, (BATCH,), generator=g),
             torch.randn(BATCH, cfg.L - cfg.first_l, cfg.Cvae, generator=g),
             torch.randint(0, cfg.vocab_size, (BATCH, cfg.L), generator=g))
    return [batch] * STEPS


def _run(rank: int, world: int, parallel: str | None, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from varcore import VAR, VARConfig
    from varcore.step import TrainStep, data_parallel
    cfg = VARConfig(**CFG)
    torch.manual_seed(0)
    model = VAR(cfg)
    if parallel == "fsdp2":
        from pipeline.training.parallel import fully_sharded
        model = fully_sharded(model, torch.device("cpu"), None)
    elif parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    assert data_parallel(model) == (parallel is not None)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05, foreach=False)
    step = TrainStep(model, opt, grad_clip=0.5)
    half = BATCH // world
    losses, norms = [], []
    for label, x, target in _batches(cfg):
        sl = slice(rank * half, (rank + 1) * half)
        loss, norm = step(label[sl], x[sl], target[sl])
        if parallel:   # each rank's loss is its half's mean: the whole batch's is their mean
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
        norms.append(norm.item())
    sd = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
          if parallel else model.state_dict())
    if rank == 0:
        torch.save({"losses": losses, "norms": norms, "state": sd}, out)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for parallel in ("fsdp2", "ddp"):
            _run(rank, world, parallel, f"{out}-{parallel}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run, and the two-process FSDP2 and DDP runs (in the same two processes)."""
    tmp = tmp_path_factory.mktemp("dp")
    _run(0, 1, None, str(tmp / "one.pt"))
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp / "two")), nprocs=2, start_method="spawn")
    return {k: torch.load(tmp / f, weights_only=True) for k, f in
            (("one", "one.pt"), ("fsdp2", "two-fsdp2.pt"), ("ddp", "two-ddp.pt"))}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp2", "ddp"])
def test_two_workers_train_like_one(runs, parallel):
    a, b = runs["one"], runs[parallel]
    assert a["losses"][0] > a["losses"][-1]                      # it trains
    # losses and norms: the same sums in another order, ~1e-7 relative per rounding
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["norms"] == pytest.approx(b["norms"], rel=1e-5)
    assert a["state"].keys() == b["state"].keys()
    for k, w in a["state"].items():
        # AdamW moves every weight by at most ~LR per step whatever its gradient, so a last-bit
        # gradient difference in a near-zero second moment can move a weight by a fraction of LR:
        # bound the difference by the steps' total possible move, a thousandth of it
        assert torch.allclose(b["state"][k], w, rtol=0, atol=STEPS * LR * 1e-3), k
