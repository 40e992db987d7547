"""The execution plan: how a VAR computes, never what. Applied to a built model from outside.

:class:`ExecutionPlan` holds closed choices (``auto`` or a concrete value). :meth:`ExecutionPlan.resolve`
turns every ``auto`` into a concrete value once per run, from the device, whether the run
trains, the autocast dtype and the data-parallel layout; :func:`apply_plan` then changes a
finished model in place, the way torchtitan's ``parallelize`` applies compile and
checkpointing: it swaps the blocks' attention kernels and FFNs for equivalent ones, routes
blocks and head through ``torch.compile`` and recomputes the first blocks in backward.
Parameters and state-dict keys never change, so checkpoints and optimizers do not see a plan,
and a plan is not part of a checkpoint or of a run's identity.

``cuda_graph`` and ``master_weights`` are read by :class:`varcore.step.TrainStep`, not by the model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..errors import require
from ..var import VAR, VARConfig
from . import adaln, cublaslt, flex
from .attention import FlexBlockCausal, ScaleSplitAttention, check_backends, require_flash
from .compile import checkpoint_forward, compile_forward, restore_forward, use_forward
from .fused_mlp import FUSED_DTYPES, FusedFFN

log = logging.getLogger(__name__)
AttentionImpl = Literal["auto", "dense", "flex", "flex_flash", "per_scale"]
MLPImpl = Literal["auto", "plain", "fused"]
NormImpl = Literal["auto", "plain", "fused"]
Switch = Literal["auto", True, False]
ATTENTION_IMPLS = ("auto", "dense", "flex", "flex_flash", "per_scale")
MLP_IMPLS = ("auto", "plain", "fused")
NORM_IMPLS = ("auto", "plain", "fused")


@dataclass(frozen=True)
class ExecutionPlan:
    """Speed and memory choices; every combination computes the same function.

    ``attention``: the block-causal attention kernel (dense SDPA under the mask; ``flex``:
    FlexAttention skipping masked tiles; ``flex_flash``: the same through FlashAttention-4's
    kernels (flex's FLASH backend; CUDA, torch >= 2.10, flash-attn-4); ``per_scale``: one
    unmasked SDPA call per scale after ``attn_prefix_scales``, with ``attn_backends`` choosing
    SDPA kernels or ``("fa4",)``).
    ``mlp``: ``fused`` runs the FFN's GELU in cuBLASLt matmul epilogues in training.
    ``norm``: ``fused`` runs each block's LayerNorm + AdaLN modulation (with the residual add
    before the second one) and the head's, and the attention's q/k L2 normalisation, as Triton
    kernels, forward and backward (:mod:`varcore.fast.adaln`, :mod:`varcore.fast.qk_norm`; CUDA,
    the plain composition elsewhere).
    ``compile``: blocks, head and loss through ``torch.compile``. ``checkpointing``: recompute
    the first n blocks in backward (``True``: all). ``cuda_graph``, ``master_weights``: the
    training step replays as one CUDA graph / computes with bf16 weight copies (one GPU).
    ``auto`` picks the fast path where it applies (CUDA) and the plain eager path elsewhere.
    """

    attention: AttentionImpl = "auto"
    attn_prefix_scales: int = 1
    attn_backends: tuple[str, ...] = ()
    mlp: MLPImpl = "auto"
    norm: NormImpl = "auto"
    compile: Switch = "auto"
    checkpointing: int | bool = 0
    cuda_graph: Switch = "auto"
    master_weights: Switch = "auto"

    def __post_init__(self):
        object.__setattr__(self, "attn_backends", tuple(self.attn_backends))
        require(self.attention in ATTENTION_IMPLS, "attention",
                f"must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        require(self.mlp in MLP_IMPLS, "mlp", f"must be one of {MLP_IMPLS}, got {self.mlp!r}")
        require(self.norm in NORM_IMPLS, "norm", f"must be one of {NORM_IMPLS}, got {self.norm!r}")
        for key in ("compile", "cuda_graph", "master_weights"):
            value = getattr(self, key)
            require(value == "auto" or isinstance(value, bool), key, f"must be 'auto', true or false, got {value!r}")
        require(isinstance(self.attn_prefix_scales, int) and self.attn_prefix_scales >= 1, "attn_prefix_scales",
                f"must be an int >= 1, got {self.attn_prefix_scales}")
        check_backends(self.attn_backends)
        require(isinstance(self.checkpointing, int) and self.checkpointing >= 0, "checkpointing",
                f"must be a bool or an int >= 0, got {self.checkpointing}")

    @property
    def resolved(self) -> bool:
        return "auto" not in (self.attention, self.mlp, self.norm, self.compile, self.cuda_graph, self.master_weights)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve(self, cfg: VARConfig, device: torch.device | str, *, training: bool,
                amp: torch.dtype | None = None, world: int = 1, fsdp: bool = False) -> ExecutionPlan:
        """Every ``auto`` made concrete for one run; explicit choices that cannot apply raise
        :class:`varcore.ConfigError` naming the field."""
        device = torch.device(device)
        cuda, one_gpu = device.type == "cuda", device.type == "cuda" and world == 1 and not fsdp
        compile_on = cuda if self.compile == "auto" else bool(self.compile)
        attention = self.attention
        if attention == "auto" and cfg.token_order != "next_scale":
            attention = "dense"   # the raster baseline's token-causal SDPA (flash kernels on GPU)
        if attention == "auto":
            flex_ok = flex.flex_attention is not None and cfg.attn_drop_rate == 0 and compile_on
            attention = "dense" if not cuda else "flex" if flex_ok else "per_scale"
        if attention == "flex_flash":
            require(compile_on, "attention", "flex_flash runs under torch.compile: leave compile on")
            require_flash(cuda)
        mlp = self.mlp
        if mlp == "auto":
            mlp = "fused" if training and cuda and amp in FUSED_DTYPES and cublaslt.available() else "plain"
        norm = self.norm
        if norm == "auto":
            norm = "fused" if training and cuda and adaln.triton is not None else "plain"
        checkpointing = cfg.depth if self.checkpointing is True else int(self.checkpointing)
        graph = _switch(self.cuda_graph, training and one_gpu, "cuda_graph",
                        "needs a training run on one GPU (one worker, no FSDP)")
        master = _switch(self.master_weights, training and one_gpu and amp is not None, "master_weights",
                         "needs a bf16 training run on one GPU (one worker, no FSDP)")
        out = dataclasses.replace(self, attention=attention, mlp=mlp, norm=norm, compile=compile_on,
                                  checkpointing=checkpointing, cuda_graph=graph, master_weights=master)
        out.check(cfg)
        return out

    def check(self, cfg: VARConfig) -> None:
        """The choices that a model config rules out."""
        K = len(cfg.patch_nums)
        require(self.attention == "dense" or cfg.token_order == "next_scale", "attention",
                f"{self.attention} is a block-causal kernel; the {cfg.token_order} baseline runs dense "
                "(token-causal SDPA)")
        require(self.attn_prefix_scales <= K, "attn_prefix_scales",
                f"must be in [1, {K}] (number of scales), got {self.attn_prefix_scales}")
        require(not (self.attention in ("flex", "flex_flash") and cfg.attn_drop_rate > 0), "attention",
                f"{self.attention} has no attention dropout; use per_scale or dense with attn_drop_rate > 0")
        require(not (self.attn_backends == ("fa4",) and cfg.attn_drop_rate > 0), "attn_backends",
                "fa4 (FlashAttention-4) has no attention dropout")
        require(self.checkpointing is True or self.checkpointing <= cfg.depth, "checkpointing",
                f"must be a bool or an int in [0, depth={cfg.depth}], got {self.checkpointing}")


def _switch(value, applies: bool, key: str, why: str) -> bool:
    require(value is not True or applies, key, f"true {why}; 'auto' turns it on where it applies")
    return applies if value == "auto" else bool(value)


# ---- applying a plan -----------------------------------------------------------------------------
def reset_plan(model: VAR) -> VAR:
    """The plain path again: dense attention, plain FFNs, the classes' own eager forwards."""
    for block in model.blocks:
        if type(block.attn.core) is not type(model.dense_attention()):
            block.attn.core = model.dense_attention().to(model.pos_1LC.device)
        if isinstance(block.ffn, FusedFFN):
            block.ffn = block.ffn.plain()
        restore_forward(block)
    restore_forward(model.head)
    restore_forward(model)
    model.execution_plan = None
    return model


def _attention_core(plan: ExecutionPlan, model: VAR, device: torch.device) -> nn.Module:
    cfg = model.cfg
    if plan.attention in ("flex", "flex_flash"):
        return FlexBlockCausal(cfg.patch_nums, device, "flash" if plan.attention == "flex_flash" else "triton")
    if plan.attention == "per_scale":
        return ScaleSplitAttention(cfg.patch_nums, plan.attn_prefix_scales, plan.attn_backends).to(device)
    return model.dense_attention().to(device)


def _route(module: nn.Module, plan: ExecutionPlan, fn) -> None:
    """``module``'s forward under the plan: ``fn`` (an equivalent forward of its class) or the
    class's own, compiled where the plan compiles."""
    if plan.compile:
        compile_forward(module, dynamic=False, tuned=True, fn=fn)
    elif fn is not None:
        use_forward(module, fn)


def apply_plan(model: VAR, plan: ExecutionPlan) -> VAR:
    """Apply a resolved plan to ``model`` in place (after moving it to its device; any earlier
    plan is undone first) and return it. Blocks share one compiled graph; the first
    ``plan.checkpointing`` blocks recompute their forward (compiled or not) in backward."""
    require(plan.resolved, "plan", f"resolve the plan first (ExecutionPlan.resolve): {plan}")
    plan.check(model.cfg)
    reset_plan(model)
    device = model.pos_1LC.device
    core = _attention_core(plan, model, device)
    fused_norm = plan.norm == "fused"
    for i, block in enumerate(model.blocks):
        block.attn.core = core   # no parameters: one kernel module serves every block
        if plan.mlp == "fused":
            block.ffn = FusedFFN.of(block.ffn)
        _route(block, plan, adaln.block_forward if fused_norm else None)
        if i < plan.checkpointing:
            checkpoint_forward(block)
    _route(model.head, plan, adaln.head_forward if fused_norm else None)
    if fused_norm:
        use_forward(model, adaln.var_forward)   # the blocks hand their last add to the next kernel
    model.execution_plan = plan
    log.info("execution plan applied to a d%d VAR on %s: %s", model.cfg.depth, device, plan)
    return model
