"""One VAR optimisation step (forward, loss, backward, gradient clipping, AdamW), the same
for the trainer (the ``train_var`` stage) and the speed benchmark (``benchmarks/train_step.py``),
so that the benchmark times exactly what training runs.

On one CUDA device the step can be captured as one CUDA graph and replayed: the ~2000
kernels of a paper-scale step then launch as one graph, without the few microseconds of
launch gap between each pair. The first ``eager_steps`` calls run eagerly (they compile,
autotune and create the optimizer state), the next call captures, and every call from then
on copies its batch into the captured input buffers and replays. A replay computes what
the eager step computes, random draws included: the CUDA generator hands a graph its seed
and offset at each replay, so ``torch.manual_seed`` before a call gives the draws an eager
call would make.

A graph needs a fixed batch shape, a capturable optimizer with a tensor learning rate
(set here) and no data-parallel communication in the step; callers use it on one device.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast.compile import compile_region
from .fast.graphs import own_cublas_workspace
from .fast.master_weights import MasterWeights

log = logging.getLogger(__name__)


def var_loss(logits_BLV: torch.Tensor, target_BL: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over all scales, in float32 (paper Sec. 3.2)."""
    return F.cross_entropy(logits_BLV.float().flatten(0, 1), target_BL.flatten())


def adamw(params, lr: float, betas: tuple[float, float], weight_decay: float, device: torch.device,
          **kw) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per parameter group on CUDA (``torch.optim.AdamW(fused=True)``),
    torch's default implementation elsewhere. ``params``: parameters or parameter groups."""
    if device.type == "cuda":
        kw.setdefault("fused", True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=1e-8, **kw)


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:   # a torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def data_parallel(model: nn.Module) -> bool:
    """Whether ``model`` communicates its gradients (DDP, FSDP1, FSDP2's ``fully_shard``): its step
    cannot be one CUDA graph (the communication is not captured) nor use master weights."""
    return (isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "clip_grad_norm_")
            or _is_fsdp2(model))


class TrainStep:
    """``step(label_B, x_BlCvae, target_BL, lr)`` runs one optimisation step of ``model`` and
    returns ``(loss, grad_norm)`` as device tensors (``grad_norm`` is NaN without clipping);
    the host does not wait for the GPU.

    ``amp``: autocast dtype (None: no autocast). ``grad_clip``: max global gradient norm
    (0: off). ``cuda_graph``: capture after ``eager_steps`` eager calls (CUDA only).
    ``master_weights``: the large linear weights compute as ``amp`` copies that AdamW keeps in
    step with their float32 parameters (:mod:`varcore.fast.master_weights`; one device, needs
    ``amp`` and a ``torch.optim.AdamW``). ``compile_loss``: the loss through ``torch.compile``
    (where the model's blocks are). :meth:`from_plan` takes the three from an execution plan.
    Build the step after loading a checkpoint into the model.
    """

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer, *, amp: torch.dtype | None = None,
                 grad_clip: float = 0.0, cuda_graph: bool = False, eager_steps: int = 2,
                 master_weights: bool = False, compile_loss: bool = False):
        device = next(model.parameters()).device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device, it is on {device}")
        if cuda_graph and eager_steps < 1:
            raise ValueError(f"eager_steps must be >= 1 before a CUDA graph capture, got {eager_steps}")
        wrapped = data_parallel(model)
        if cuda_graph and wrapped:
            raise ValueError("cuda_graph needs a model on one device (not DDP/FSDP: their communication is not captured)")
        if master_weights and (amp is None or wrapped or not isinstance(optim, torch.optim.AdamW)):
            raise ValueError("master_weights needs autocast (amp), a model on one device (not DDP/FSDP) "
                             "and torch.optim.AdamW")
        self.model, self.optim, self.device = model, optim, device
        self.fsdp2 = _is_fsdp2(model)   # checked once: its clip needs the global norm of DTensor gradients
        self.amp, self.grad_clip, self.cuda_graph, self.eager_steps = amp, grad_clip, cuda_graph, eager_steps
        self.master = MasterWeights(model, optim, amp) if master_weights else None
        self.loss_fn: Callable = compile_region(var_loss, tuned=True) if compile_loss else var_loss
        self.calls = 0
        self.capture_error: str | None = None   # why a requested capture failed (the step then stays eager)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static_in: tuple[torch.Tensor, ...] = ()
        self._static_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lr_tensors: list[torch.Tensor] = []
        self._master_versions: list[int] = []
        if cuda_graph:
            for g in optim.param_groups:
                g["capturable"] = True

    @classmethod
    def from_plan(cls, model: nn.Module, optim: torch.optim.Optimizer, plan, *, amp: torch.dtype | None = None,
                  grad_clip: float = 0.0) -> "TrainStep":
        """The step a resolved :class:`varcore.fast.ExecutionPlan` asks for (graph, master weights, compiled loss)."""
        return cls(model, optim, amp=amp, grad_clip=grad_clip, cuda_graph=plan.cuda_graph,
                   master_weights=plan.master_weights, compile_loss=plan.compile)

    # ---- the step itself ------------------------------------------------------------------
    def _body(self, label_B: torch.Tensor, x_BlCvae: torch.Tensor, target_BL: torch.Tensor):
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                    else contextlib.nullcontext())
        with self.master.swapped() if self.master else contextlib.nullcontext():
            with autocast:
                logits_BLV = self.model(label_B, x_BlCvae)
            loss = self.loss_fn(logits_BLV, target_BL)
            loss.backward()
        grad_norm, coef = self._clip()
        self.optim.step()
        if self.master:
            self.master.step(coef)
        return loss.detach(), grad_norm

    def _clip(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip to ``grad_clip``: the norm before clipping (NaN when off) and, with master
        weights, the factor their kernel applies to the bf16 gradients in float32."""
        if self.grad_clip <= 0:
            return torch.full((), float("nan"), device=self.device), None
        if hasattr(self.model, "clip_grad_norm_"):   # FSDP1: the norm over all shards
            return self.model.clip_grad_norm_(self.grad_clip), None
        if self.fsdp2:   # sharded (DTensor) gradients: the global norm, then the same clip
            params = [p for p in self.model.parameters() if p.grad is not None]
            total = torch.nn.utils.get_total_norm([p.grad for p in params])
            total = total.full_tensor() if hasattr(total, "full_tensor") else total
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total)
            return total, None
        if self.master is None:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip), None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = list(torch._foreach_norm(grads, 2)) + list(torch._foreach_norm(self.master.grads(), 2,
                                                                                dtype=torch.float32))
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = torch.clamp(self.grad_clip / (total + 1e-6), max=1.0)   # as clip_grad_norm_
        torch._foreach_mul_(grads, coef)
        return total, coef

    def _zero_grad(self) -> None:
        self.optim.zero_grad(set_to_none=True)
        if self.master:
            self.master.zero_grad()

    def _set_lr(self, lr: float | None) -> None:
        if lr is None:
            return
        for g in self.optim.param_groups:
            if not self.cuda_graph:
                g["lr"] = lr
                continue
            cur = g["lr"]
            if self.graph is None and not (isinstance(cur, torch.Tensor) and cur.device == self.device):
                g["lr"] = torch.tensor(float(cur), dtype=torch.float32, device=self.device)
            g["lr"].fill_(lr)

    def __call__(self, label_B: torch.Tensor, x_BlCvae: torch.Tensor, target_BL: torch.Tensor,
                 lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; the returned tensors of a replayed step are the graph's, overwritten by the next."""
        self._set_lr(lr)
        self.calls += 1
        if self.master and self._master_versions != [p._version for p in self.master.masters]:
            self.master.refresh()   # weights loaded into the model since the last step
        out = self._step(label_B, x_BlCvae, target_BL)
        self._mark_updated()
        return out

    def _mark_updated(self) -> None:
        """Bump the version counters of the weights that a replay or the master-weight kernel
        rewrote behind autograd's back, so that readers that watch them (the static sampler's
        weight copy) see the change."""
        params = list(self.model.parameters()) if self.graph is not None else \
            (self.master.masters if self.master else [])
        for p in params:
            torch.autograd.graph.increment_version(p)
        if self.master:
            self._master_versions = [p._version for p in self.master.masters]

    def _step(self, label_B: torch.Tensor, x_BlCvae: torch.Tensor, target_BL: torch.Tensor):
        if not self.cuda_graph:
            self._zero_grad()
            return self._body(label_B, x_BlCvae, target_BL)
        if self.graph is None and self.calls <= self.eager_steps:
            return self._eager_on_side_stream(label_B, x_BlCvae, target_BL)
        if self.graph is None:
            try:
                self._capture(label_B, x_BlCvae, target_BL)
            except Exception as e:   # e.g. an op that cannot be captured: train on, eagerly
                log.warning("CUDA graph capture of the training step failed (%s: %s); continuing without it",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.graph, self.cuda_graph, self.capture_error = None, False, f"{type(e).__name__}: {e}"
                torch.cuda.synchronize(self.device)
                self._zero_grad()
                return self._body(label_B, x_BlCvae, target_BL)
        self._check_captured_state()
        for name, buf, x in zip(("label_B", "x_BlCvae", "target_BL"), self._static_in, (label_B, x_BlCvae, target_BL)):
            if x.shape != buf.shape or x.dtype != buf.dtype:
                raise ValueError(f"the CUDA-graph step was captured with {name} {tuple(buf.shape)} {buf.dtype}, "
                                 f"got {tuple(x.shape)} {x.dtype}: the batch shape must stay fixed")
            buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self._static_out

    # ---- CUDA graph -----------------------------------------------------------------------
    def _eager_on_side_stream(self, *batch: torch.Tensor):
        """An eager step on a side stream, as capture wants its warm-up (lazy handles and
        workspaces are then not created on the stream being captured)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._zero_grad()
            out = self._body(*batch)
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(side)
        for t in out:   # read on the main stream: not to be reused by the side stream before then
            t.record_stream(main)
        return out

    def _capture(self, *batch: torch.Tensor) -> None:
        torch.cuda.synchronize(self.device)
        self._zero_grad()   # backward in the graph writes (not adds) the grads
        torch.cuda.empty_cache()   # the eager steps' cached blocks; the graph has its own pool
        self._static_in = tuple(x.clone() for x in batch)
        had_state = {p for p, st in self.optim.state.items() if st}
        self.graph = torch.cuda.CUDAGraph()
        with own_cublas_workspace(), torch.cuda.graph(self.graph):   # a cuBLAS workspace of the graph's own
            self._static_out = self._body(*self._static_in)
        new = [p for p, st in self.optim.state.items() if st and p not in had_state]
        if new:   # made inside the capture: never initialised, and a replay would reset it every step
            for p in new:
                del self.optim.state[p]
            raise RuntimeError(f"{len(new)} parameters got their first gradient during the capture, not in the "
                               f"{self.eager_steps} eager steps before it")
        self._lr_tensors = [g["lr"] for g in self.optim.param_groups]
        log.info("captured the training step as one CUDA graph after %d eager steps", self.calls - 1)

    def _check_captured_state(self) -> None:
        """The graph reads the learning rates and optimizer state it saw at capture; loading a
        state dict afterwards would replace those tensors, and the graph would ignore it."""
        if any(g["lr"] is not t for g, t in zip(self.optim.param_groups, self._lr_tensors)):
            raise RuntimeError("the optimizer's learning-rate tensors changed after the CUDA graph capture "
                               "(a state dict loaded after the first steps?); load state before training")
