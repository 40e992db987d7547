"""The per-worker training function that Ray Train runs on every worker (CPU or GPU, DDP or FSDP).

Determinism is by construction, so that N workers follow the trajectory of one worker with
the same global batch and a resumed run the trajectory of an uninterrupted one:

- the global batch of step ``s`` is a fixed slice of a permutation seeded by (seed, epoch);
  worker ``r`` of ``W`` takes rows ``[r B/W, (r+1) B/W)`` of it, and DDP averages the
  gradients, which equals the gradient of the global-batch mean loss;
- the random state (class dropout, drop-path) is re-seeded every step from (seed, step,
  rank), so nothing random has to be checkpointed and ranks draw independent masks;
- a checkpoint holds the model, the optimizer, the step and the curves so far.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm import tqdm

from varcore import VAR, VARConfig
from varcore.quant import MultiScaleQuantizer
from varcore.step import TrainStep, adamw
from varcore.var import AdaLNBlock, scale_ids

from .metrics import TokenStats, eval_steps, lr_at, summarize, token_stats, train_compute
from .train_config import TrainParams

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class RunSpec:
    """Everything one training run (one depth) needs besides the data and the quantiser."""

    var_cfg: VARConfig
    train: TrainParams
    total_steps: int
    fail_once_at_step: int | None = None   # fault injection (tests): raise once after this step...
    fail_marker: str | None = None         # ...unless this file exists (created when raising)


@dataclass
class TrainState:
    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)         # validation points
    train_curve: list[dict[str, float]] = field(default_factory=list)   # train-loss points
    loss_sum: float = 0.0          # local train-loss sum since the last train-curve point
    loss_count: int = 0
    train_seconds: float = 0.0     # time in the training loop, summed over resumed runs


# ---- batches and randomness ------------------------------------------------------------------
def global_batch_indices(num_train: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of the global batch of ``step``: epoch ``e`` walks a permutation seeded by (seed, e)."""
    steps_per_epoch = num_train // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_train)
    return perm[i * batch_size:(i + 1) * batch_size]


def rank_slice(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    b = len(indices) // world
    return indices[rank * b:(rank + 1) * b]


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def teacher_forcing(quant: MultiScaleQuantizer, tokens_BL: torch.Tensor) -> torch.Tensor:
    """Transformer input for scales 2..K from the ground-truth tokens (no gradient)."""
    with torch.no_grad():
        return quant.idx_to_var_input(quant.split_tokens(tokens_BL))


# ---- model, optimizer, checkpoint --------------------------------------------------------------
def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); weight decay only on the weight matrices of linear layers (not
    on biases, embeddings, positions, AdaLN offsets or attention temperatures)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decay_ids], "weight_decay": tp.weight_decay},
              {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]
    return adamw(groups, tp.peak_lr, tuple(tp.betas), tp.weight_decay, params[0].device)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_state(directory: Path, model: nn.Module, optim: torch.optim.Optimizer, state: TrainState) -> None:
    """Full (unsharded) state; every rank must call this (FSDP gathers), only rank 0 gets data."""
    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for g in osd.get("param_groups", []):   # a CUDA-graph step's settings; the resumed step sets its own
        if torch.is_tensor(g.get("lr")):
            g["lr"] = float(g["lr"])
        g["capturable"] = False
    if msd:
        torch.save({"model": msd, "optim": osd, "state": state.__dict__}, directory / STATE_FILE)


def load_state(directory: Path, model: nn.Module, optim: torch.optim.Optimizer) -> TrainState:
    ckpt = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    set_state_dict(model, optim, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optim"],
                   options=StateDictOptions(full_state_dict=True))
    return TrainState(**ckpt["state"])


def read_state_file(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's payload on the driver: ``model`` (state dict), ``state`` (step, curves)."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


# ---- distributed helpers -----------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not _distributed():
        return t
    buf = t.to(device)
    dist.all_reduce(buf)
    return buf.to(t.device)


# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, quant: MultiScaleQuantizer, tokens_NL: np.ndarray, labels_N: np.ndarray,
             cfg: VARConfig, batch_size: int, rank: int, world: int, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
    """Test loss and token error over ``tokens_NL`` (class-conditional, no class dropout).

    Rows are split in equal contiguous chunks over the ranks (a remainder of fewer than
    ``world`` rows is dropped so that every rank runs the same number of forwards, which
    FSDP needs); per-scale sums are all-reduced, so the result does not depend on ``world``.
    """
    n = len(tokens_NL) - len(tokens_NL) % world if world > 1 else len(tokens_NL)
    chunk = n // world
    lo = rank * chunk
    K, scale_L = len(cfg.patch_nums), scale_ids(cfg.patch_nums)
    was_training = model.training
    model.eval()
    stats = TokenStats.zeros(K)
    for i in range(lo, lo + chunk, batch_size):
        j = min(i + batch_size, lo + chunk)
        tok = torch.from_numpy(tokens_NL[i:j].astype(np.int64)).to(device)
        lab = torch.from_numpy(labels_N[i:j].astype(np.int64)).to(device)
        with autocast or contextlib.nullcontext():
            logits = model(lab, teacher_forcing(quant, tok))
        stats = stats + token_stats(logits, tok, scale_L, K)
    model.train(was_training)
    return summarize(TokenStats.from_tensor(all_reduce_sum(stats.as_tensor(), device)))


# ---- the worker function -----------------------------------------------------------------------
def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def _autocast(device: torch.device, amp: torch.dtype | None):
    return contextlib.nullcontext() if amp is None else torch.autocast(device_type=device.type, dtype=amp)


def _fsdp_kwargs() -> dict[str, Any]:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    return {"auto_wrap_policy": ModuleWrapPolicy({AdaLNBlock}), "use_orig_params": True}


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``; on CUDA through pinned memory without waiting for the copy,
    so the host can queue the step while the GPU finishes the previous one."""
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of ``TorchTrainer(train_loop_per_worker=...)``.

    ``config``: ``spec`` (:class:`RunSpec`), ``quantizer`` (the tokenizer's quantiser, for
    teacher forcing), ``train``/``val``: object refs (or tuples) of ``(tokens uint16 (N, L),
    labels (N,))``.
    """
    import ray
    import ray.train
    import ray.train.torch

    spec: RunSpec = config["spec"]
    tp, cfg = spec.train, spec.var_cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tp.num_threads:
        torch.set_num_threads(tp.num_threads)
    device = ray.train.torch.get_device()
    train_tok, train_lab = _resolve(ray, config["train"])
    val_tok, val_lab = _resolve(ray, config["val"])
    if tp.val_max_samples is not None:
        val_tok, val_lab = val_tok[:tp.val_max_samples], val_lab[:tp.val_max_samples]
    quant = config["quantizer"].to(device).eval()

    torch.manual_seed(tp.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    fsdp = tp.use_fsdp(cfg.depth)
    model = ray.train.torch.prepare_model(VAR(cfg), parallel_strategy="fsdp" if fsdp else "ddp",
                                          parallel_strategy_kwargs=_fsdp_kwargs() if fsdp else None)
    optim = make_optimizer(model, tp)
    state = TrainState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(Path(d), model, optim)
        log.info("rank %d: resumed from %s at step %d", rank, ckpt.path, state.step)

    total, B, L = spec.total_steps, tp.batch_size, cfg.L
    evals = set(eval_steps(total, tp.num_evals, tp.eval_spacing))
    amp = _amp_dtype(device, tp.precision)
    autocast = _autocast(device, amp)
    train_step = TrainStep(model, optim, amp=amp, grad_clip=tp.grad_clip,   # after load_state: copies the weights
                           cuda_graph=tp.use_cuda_graph(device.type, world, fsdp),
                           master_weights=tp.use_master_weights(device.type, world, fsdp, amp is not None))
    flops_tok = train_compute(cfg, 1)
    model.train()
    bar = tqdm(total=total, initial=state.step, desc=f"train d{cfg.depth}", unit="step",
               disable=rank != 0, mininterval=10)
    t0 = mark = time.perf_counter()
    # state.loss_sum kept on the device (same float64 additions in the same order), read back
    # only at log and checkpoint points
    loss_acc = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)
    while state.step < total:
        step = state.step
        rows = rank_slice(global_batch_indices(len(train_tok), B, tp.seed, step), rank, world)
        tok = _to_device(train_tok[rows].astype(np.int64), device)
        lab = _to_device(train_lab[rows].astype(np.int64), device)
        x = teacher_forcing(quant, tok)
        lr = lr_at(step, total, tp.peak_lr, tp.warmup_frac, tp.decay, tp.min_lr_frac)
        torch.manual_seed(step_seed(tp.seed, step, rank))
        loss, grad_norm = train_step(lab, x, tok, lr)
        state.step = step = step + 1
        loss_acc += loss               # read at the next log or checkpoint: no host wait per step
        state.loss_count += 1
        bar.update(1)
        tokens = step * B * L
        metrics: dict[str, Any] = {"step": step, "tokens": tokens, "compute": flops_tok * tokens}

        log_now = step % tp.log_every == 0 or step in evals
        checkpoint_now = step in evals or step % tp.checkpoint_every == 0 or step == total
        if log_now or checkpoint_now:
            state.loss_sum = float(loss_acc)
        if log_now:
            s = all_reduce_sum(torch.tensor([state.loss_sum, state.loss_count], dtype=torch.float64), device)
            train_loss = float(s[0] / s[1])
            state.train_curve.append({**metrics, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm)})
            state.loss_sum, state.loss_count = 0.0, 0
            loss_acc.zero_()
            bar.set_postfix(loss=f"{train_loss:.3f}")
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train loss is {train_loss} at step {step}")
        if step in evals:
            ev = evaluate(model, quant, val_tok, val_lab, cfg, tp.eval_batch_size, rank, world, device, autocast)
            row = {**metrics, **{k: ev[k] for k in ("L_last", "L_mean", "Err_last", "Err_mean")}}
            state.curve.append(row)
            metrics.update(row, L_per_scale=ev["L_per_scale"], Err_per_scale=ev["Err_per_scale"])
            if rank == 0:
                log.info("d%d step %d/%d: L_mean %.4f L_last %.4f Err_mean %.4f (%.1f s)", cfg.depth, step,
                         total, ev["L_mean"], ev["L_last"], ev["Err_mean"], time.perf_counter() - t0)
        if checkpoint_now:
            if state.train_curve:
                metrics["train_loss"] = state.train_curve[-1]["train_loss"]
            now = time.perf_counter()
            state.train_seconds, mark = state.train_seconds + now - mark, now
            _report(ray, metrics, model, optim, state, rank)
        if spec.fail_once_at_step == step and spec.fail_marker and not os.path.exists(spec.fail_marker):
            Path(spec.fail_marker).touch()
            raise RuntimeError(f"injected failure after step {step}")
    bar.close()


def _report(ray, metrics: dict[str, Any], model: nn.Module, optim: torch.optim.Optimizer,
            state: TrainState, rank: int) -> None:
    """``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp), model, optim, state)
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step-{state.step:09d}")


def _resolve(ray, ref_or_value):
    return ray.get(ref_or_value) if isinstance(ref_or_value, ray.ObjectRef) else ref_or_value
