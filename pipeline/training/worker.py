"""The function Ray Train runs on every worker (CPU or GPU, DDP or FSDP): one depth's training.

:func:`train_worker` sets a run up (:class:`WorkerRun`: data, model with its execution plan,
optimizer, resume from Ray's latest checkpoint) and runs the step loop; each step is
:class:`varcore.step.TrainStep`, followed by the periodic actions that are due (log the train
loss, evaluate on the val split, report a checkpoint). Batches, seeds and learning rates are
pure functions of the step (:mod:`pipeline.training.schedule`), so a resumed run and a run on
W workers follow the trajectory of an uninterrupted one-worker run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from varcore.fast.plan import ExecutionPlan, apply_plan
from varcore.quant import MultiScaleQuantizer
from varcore.step import TrainStep, adamw
from varcore.ar import build, model_class
from varcore.var import VARConfig

from .config import TrainParams
from .metrics import TokenStats, summarize, token_stats, train_compute
from .parallel import fully_sharded
from .schedule import eval_steps, global_batch_indices, lr_at, rank_slice, step_seed
from .state import TrainState, check_space, directory_bytes, resume, save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything one training run (one depth) needs besides the data and the quantiser."""

    var_cfg: VARConfig
    train: TrainParams
    execution: ExecutionPlan      # resolved on the worker, for its device
    total_steps: int


# ---- model, optimizer, checkpoint --------------------------------------------------------------
def teacher_forcing(cfg: VARConfig, quant: MultiScaleQuantizer, tokens_BL: torch.Tensor) -> torch.Tensor:
    """The transformer's input from the ground-truth tokens (no gradient): scales 2..K for VAR,
    tokens 0..L-2 for the raster baseline."""
    return model_class(cfg).teacher_inputs(quant, tokens_BL)


def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); weight decay only on the weight matrices of linear layers (not
    on biases, embeddings, positions, AdaLN offsets or attention temperatures)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decay_ids], "weight_decay": tp.weight_decay},
              {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]
    return adamw(groups, tp.peak_lr, tuple(tp.betas), tp.weight_decay, params[0].device)


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
    K, scale_L = len(cfg.patch_nums), cfg.layout.scale_ids()
    was_training = model.training
    model.eval()
    stats = TokenStats.zeros(K)
    for i in range(lo, lo + chunk, batch_size):
        j = min(i + batch_size, lo + chunk)
        tok = torch.from_numpy(tokens_NL[i:j].astype(np.int64)).to(device)
        lab = torch.from_numpy(labels_N[i:j].astype(np.int64)).to(device)
        with autocast or contextlib.nullcontext():
            logits = model(lab, teacher_forcing(cfg, quant, tok))
        stats = stats + token_stats(logits, tok, scale_L, K)
    model.train(was_training)
    return summarize(TokenStats.from_tensor(all_reduce_sum(stats.as_tensor(), device)))


# ---- one worker's run ----------------------------------------------------------------------------
def _autocast(device: torch.device, amp: torch.dtype | None):
    return contextlib.nullcontext() if amp is None else torch.autocast(device_type=device.type, dtype=amp)


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``; on CUDA through pinned memory without waiting for the copy,
    so the host can queue the step while the GPU finishes the previous one."""
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _resolve(ray, ref_or_value):
    return ray.get(ref_or_value) if isinstance(ref_or_value, ray.ObjectRef) else ref_or_value


class WorkerRun:
    """One worker's part of a training run: set up once, then :meth:`loop` to the last step."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        spec: RunSpec = config["spec"]
        self.spec, self.tp, self.cfg = spec, spec.train, spec.var_cfg
        self.storage = Path(config["storage"]) if config.get("storage") else None   # the run's folder
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.tp.num_threads:
            torch.set_num_threads(self.tp.num_threads)
        self.device = ray.train.torch.get_device()
        self._load_data(config)
        self.amp = self.tp.amp_dtype(self.device.type)
        self.autocast = _autocast(self.device, self.amp)
        self.model, self.optim, self.plan = self._build_model()
        self.state = self._resume()
        self.state.plan = self.plan.as_dict()
        self.train_step = TrainStep.from_plan(self.model, self.optim, self.plan, amp=self.amp,  # after the resume:
                                              grad_clip=self.tp.grad_clip)                    # copies the weights
        self.evals = set(eval_steps(spec.total_steps, self.tp.num_evals, self.tp.eval_spacing))
        self.flops_per_token = train_compute(self.cfg, 1)

    def _load_data(self, config: dict[str, Any]) -> None:
        import ray
        self.train_tok, self.train_lab = _resolve(ray, config["train"])
        self.val_tok, self.val_lab = _resolve(ray, config["val"])
        if self.tp.val_max_samples is not None:
            self.val_tok, self.val_lab = self.val_tok[:self.tp.val_max_samples], self.val_lab[:self.tp.val_max_samples]
        self.quant = config["quantizer"].to(self.device).eval()

    def _build_model(self) -> tuple[nn.Module, torch.optim.Optimizer, ExecutionPlan]:
        import ray.train.torch
        fsdp = self.tp.use_fsdp(self.cfg.depth)
        plan = self.spec.execution.resolve(self.cfg, self.device, training=True, amp=self.amp, world=self.world,
                                           fsdp=fsdp)
        torch.manual_seed(self.tp.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        model = apply_plan(build(self.cfg).to(self.device), plan)
        if fsdp:   # FSDP2, one unit per block (pipeline.training.parallel)
            model = fully_sharded(model, self.device, self.amp)
        else:
            model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        return model, make_optimizer(model, self.tp), plan

    def _resume(self) -> TrainState:
        import ray.train
        state, self.dir_suffix = resume(ray.train.get_checkpoint(), self.model, self.optim, self.rank)
        return state

    # ---- the loop ----------------------------------------------------------------------------
    def loop(self, after_step: tuple[Callable[[int], None], ...] = ()) -> None:
        """Steps to the end; ``after_step`` callbacks get each finished step (tests inject faults here)."""
        tp, st = self.tp, self.state
        bar = tqdm(total=self.spec.total_steps, initial=st.step, desc=f"train d{self.cfg.depth}", unit="step",
                   disable=self.rank != 0, mininterval=10)
        self._mark = time.perf_counter()
        self._window = (self._mark, st.step)   # start of the current throughput window (time, step)
        # the train-loss sum stays on the device (the same float64 additions in the same order as
        # a host sum) and is read back only when a log point or checkpoint is due
        self.loss_acc = torch.tensor(st.loss_sum, dtype=torch.float64, device=self.device)
        while st.step < self.spec.total_steps:
            self._step(st.step)
            bar.update(1)
            step, point = st.step, self._point(st.step)
            if step % tp.log_every == 0 or step in self.evals:
                bar.set_postfix(loss=f"{self._log_train_loss(point):.3f}")
            if step in self.evals:
                self._evaluate(point)
            if step in self.evals or step % tp.checkpoint_every == 0 or step == self.spec.total_steps:
                self._checkpoint(point)
                self._window = (time.perf_counter(), step)   # throughput windows hold steps only
            for hook in after_step:
                hook(step)
        bar.close()

    def _step(self, step: int) -> None:
        tp = self.tp
        rows = rank_slice(global_batch_indices(len(self.train_tok), tp.batch_size, tp.seed, step), self.rank,
                          self.world)
        tok = _to_device(self.train_tok[rows].astype(np.int64), self.device)
        lab = _to_device(self.train_lab[rows].astype(np.int64), self.device)
        x = teacher_forcing(self.cfg, self.quant, tok)
        self.lr = lr_at(step, self.spec.total_steps, tp.peak_lr, tp.warmup_frac, tp.decay, tp.min_lr_frac)
        torch.manual_seed(step_seed(tp.seed, step, self.rank))
        loss, self.grad_norm = self.train_step(lab, x, tok, self.lr)
        self.loss_acc += loss               # read at the next log or checkpoint: no host wait per step
        self.state.step, self.state.loss_count = step + 1, self.state.loss_count + 1

    def _point(self, step: int) -> dict[str, Any]:
        tokens = step * self.tp.batch_size * self.cfg.L
        return {"step": step, "tokens": tokens, "compute": self.flops_per_token * tokens}

    def _log_train_loss(self, point: dict[str, Any]) -> float:
        """Mean train loss since the last log point, over all ranks; appended to the train curve with
        the steps' throughput since the window began (the last log point, evaluation or checkpoint:
        training steps only; the first window holds the compilation and graph capture)."""
        st = self.state
        st.loss_sum = float(self.loss_acc)        # waits for the device: the window's time is the steps'
        now, (t0, step0) = time.perf_counter(), self._window
        steps = point["step"] - step0
        rate = {"tokens_per_s": steps * self.tp.batch_size * self.cfg.L / (now - t0)} if steps > 0 else {}
        self._window = (now, point["step"])
        s = all_reduce_sum(torch.tensor([st.loss_sum, st.loss_count], dtype=torch.float64), self.device)
        train_loss = float(s[0] / s[1])
        st.train_curve.append({**point, "train_loss": train_loss, "lr": self.lr, "grad_norm": float(self.grad_norm),
                               **rate})
        st.loss_sum, st.loss_count = 0.0, 0
        self.loss_acc.zero_()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"train loss is {train_loss} at step {point['step']}")
        return train_loss

    def _evaluate(self, point: dict[str, Any]) -> None:
        ev = evaluate(self.model, self.quant, self.val_tok, self.val_lab, self.cfg, self.tp.eval_batch_size,
                      self.rank, self.world, self.device, self.autocast)
        row = {**point, **{k: ev[k] for k in ("L_last", "L_mean", "Err_last", "Err_mean")}}
        self.state.curve.append(row)
        point.update(row, L_per_scale=ev["L_per_scale"], Err_per_scale=ev["Err_per_scale"])
        if self.rank == 0:
            log.info("d%d step %d/%d: L_mean %.4f L_last %.4f Err_mean %.4f", self.cfg.depth, point["step"],
                     self.spec.total_steps, ev["L_mean"], ev["L_last"], ev["Err_mean"])

    def _checkpoint(self, point: dict[str, Any]) -> None:
        """``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the checkpoint."""
        import ray.train
        st = self.state
        st.loss_sum = float(self.loss_acc)
        if st.train_curve:
            point["train_loss"] = st.train_curve[-1]["train_loss"]
        now = time.perf_counter()
        st.train_seconds, self._mark = st.train_seconds + now - self._mark, now
        with tempfile.TemporaryDirectory() as tmp:
            save_state(Path(tmp), self.model, self.optim, st)
            name = f"step-{st.step:09d}{self.dir_suffix}"
            if self.rank == 0 and self.storage is not None:
                check_space(self.storage, directory_bytes(Path(tmp)), f"checkpoint {name}")
            ckpt = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
            ray.train.report(point, checkpoint=ckpt, checkpoint_dir_name=name)


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of ``TorchTrainer(train_loop_per_worker=...)``. ``config``: ``spec``
    (:class:`RunSpec`), ``quantizer`` (the tokenizer's quantiser, for teacher forcing), ``storage``
    (the run's checkpoint folder, checked for space before each checkpoint),
    ``train``/``val``: object refs (or tuples) of ``(tokens uint16 (N, L), labels (N,))``, and
    optionally ``after_step``: callables run after every step."""
    WorkerRun(config).loop(tuple(config.get("after_step", ())))
