"""Typed params of the ``train_var`` stage and the sweep, parsed once into :class:`TrainVarConfig`.

Sections: ``var.model`` holds overrides of :class:`varcore.var.VARConfig` shared by every depth
(the depth, V, Cvae, scales and class count are not overridable: the depth list and the
tokenizer fix them); ``train`` is the optimisation recipe (paper Sec. 4: AdamW 0.9/0.95, wd 0.05,
lr 1e-4 per 256 images scaled linearly with the global batch), the evaluation schedule and the
Ray Train resources; ``execution`` is the :class:`varcore.fast.plan.ExecutionPlan` (how the model
computes, not what: it is not part of a run's identity); ``tokenizer.model`` gives V, Cvae and
the scales. Errors name ``file:section.key``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from varcore.ar import ARConfig
from varcore.errors import require
from varcore.fast.plan import ExecutionPlan
from varcore.var import VARConfig
from varcore.vqvae import VQVAEConfig

from ..errors import ParamsError
from ..params import PARAMS_FILE, load, load_section
from ..tokenizer.config import load_tokenizer_model

ORDERS = ("next_scale", "raster")
FIXED_VAR_KEYS = ("depth", "vocab_size", "Cvae", "patch_nums", "num_classes")
LR_REFERENCE_BATCH = 256  # the paper quotes lr per 256 images


@dataclass(frozen=True)
class VarParams:
    model: dict[str, Any] = field(default_factory=dict)   # VARConfig overrides, e.g. shared_aln
    # next_scale: VAR; raster: the next-token baseline over a single-scale tokenizer's one token
    # map (varcore.ar, the ablation pipeline in ablation/), with the same blocks and recipe
    order: Literal["next_scale", "raster"] = "next_scale"

    def __post_init__(self):
        fixed = sorted(set(self.model) & set(FIXED_VAR_KEYS))
        require(not fixed, "model", f"{fixed} are set by train.depths and the tokenizer, not here")
        require(self.order in ORDERS, "order", f"must be one of {list(ORDERS)}, got {self.order!r}")


@dataclass(frozen=True)
class RayParams:
    """Ray Train resources of ONE training run (one depth)."""

    address: str | None = None             # ray.init address; null: a running cluster if any, else local
    num_workers: int = 1                   # data-parallel workers (DDP over gloo on CPU, NCCL on GPU)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, Any] = field(default_factory=dict)   # e.g. {"accelerator_type:H100": 0.01}
    max_failures: int = 2                  # worker restarts from the last checkpoint before the run fails
    storage_path: str = "models/ray"       # Ray Train run dirs + checkpoints (resume reads them)
    num_to_keep: int = 2                   # checkpoints kept per run

    def __post_init__(self):
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        require(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        require(self.num_to_keep >= 1, "num_to_keep", f"must be >= 1, got {self.num_to_keep}")
        require(bool(self.storage_path), "storage_path", "must be a non-empty path")
        gpu = self.resources_per_worker.get("GPU")
        require(gpu is None or (self.use_gpu and 0 < gpu <= 1), "resources_per_worker",
                f"GPU {gpu} needs use_gpu: true and 0 < GPU <= 1 (a fraction lets several depths share one GPU)")


@dataclass(frozen=True)
class TrainParams:
    depths: tuple[int, ...] = (1, 2, 3, 4)
    batch_size: int = 64                   # GLOBAL batch (images), split evenly over the workers
    lr: float = 1e-4                       # peak lr per 256 images; actual = lr * batch_size / 256
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 2.0                 # max global grad norm; 0 turns clipping off
    warmup_frac: float = 0.05              # linear warm-up over this fraction of the steps
    decay: Literal["linear", "cosine"] = "linear"   # from the peak to min_lr_frac * peak
    min_lr_frac: float = 0.01
    steps: int | None = 200                # optimizer steps; null: derived from epochs
    epochs: float | None = None            # passes over the train split (used when steps is null)
    num_evals: int = 8                     # validation points along the run
    eval_spacing: Literal["log", "linear"] = "log"  # log: each at twice the compute of the previous
    val_max_samples: int | None = None     # cap on val images per evaluation (null: all)
    eval_batch_size: int = 256
    checkpoint_every: int = 100            # extra Ray checkpoints between evaluations (steps)
    log_every: int = 10                    # train-loss points in the curve (steps)
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    fsdp_min_depth: int | None = None      # depths >= this use FSDP2 (fully_shard per block) instead of DDP
    num_threads: int = 1                   # torch intra-op threads per CPU worker (0: torch default)
    seed: int = 0
    ray: RayParams = field(default_factory=RayParams)

    def __post_init__(self):
        require(len(self.depths) >= 1 and all(d >= 1 for d in self.depths), "depths",
                f"must be a non-empty list of ints >= 1, got {list(self.depths)}")
        require(len(set(self.depths)) == len(self.depths), "depths", f"has duplicates: {list(self.depths)}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.batch_size % self.ray.num_workers == 0, "batch_size",
                f"{self.batch_size} is not divisible by ray.num_workers={self.ray.num_workers}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"must be two numbers in [0, 1), got {list(self.betas)}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        require(0 <= self.warmup_frac < 1, "warmup_frac", f"must be in [0, 1), got {self.warmup_frac}")
        require(0 <= self.min_lr_frac <= 1, "min_lr_frac", f"must be in [0, 1], got {self.min_lr_frac}")
        require((self.steps is None) != (self.epochs is None), "steps",
                "set exactly one of steps and epochs (the other null)")
        require(self.steps is None or self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        require(self.num_evals >= 1, "num_evals", f"must be >= 1, got {self.num_evals}")
        require(self.val_max_samples is None or self.val_max_samples >= 1, "val_max_samples",
                f"must be >= 1 or null, got {self.val_max_samples}")
        require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        require(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.fsdp_min_depth is None or self.fsdp_min_depth >= 1, "fsdp_min_depth",
                f"must be >= 1 or null, got {self.fsdp_min_depth}")
        require(self.num_threads >= 0, "num_threads", f"must be >= 0, got {self.num_threads}")

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / LR_REFERENCE_BATCH

    def total_steps(self, num_train: int) -> int:
        if self.steps is not None:
            return self.steps
        steps_per_epoch = num_train // self.batch_size
        if steps_per_epoch < 1:
            raise ParamsError(f"train.batch_size {self.batch_size} exceeds the {num_train} training images")
        return max(1, round(self.epochs * steps_per_epoch))

    def use_fsdp(self, depth: int) -> bool:
        return self.fsdp_min_depth is not None and depth >= self.fsdp_min_depth

    def amp_dtype(self, device_type: str):
        """The autocast dtype of this recipe on a device (None: float32)."""
        import torch
        use_bf16 = self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")
        return torch.bfloat16 if use_bf16 else None


@dataclass(frozen=True)
class TrainVarConfig:
    """Everything the ``train_var`` stage reads from params, for one depth."""

    depth: int
    var: VarParams
    train: TrainParams
    execution: ExecutionPlan
    tokenizer: VQVAEConfig
    file: str = PARAMS_FILE

    def var_config(self, num_classes: int) -> VARConfig:
        """The transformer of this depth: the tokenizer fixes V, Cvae and the scales, the data the
        classes, ``var.order`` the kind (an :class:`varcore.ar.ARConfig` for ``raster``)."""
        tok = self.tokenizer
        fields = dict(self.var.model, depth=self.depth, vocab_size=tok.vocab_size, Cvae=tok.Cvae,
                      patch_nums=list(tok.patch_nums), num_classes=num_classes)
        cls = ARConfig if self.var.order == "raster" else VARConfig
        return load_section(cls, fields, f"{self.file}:var.model")

    def recipe(self) -> "TrainVarConfig":
        """What identifies one depth's run: without the depth list, the cluster address and the
        execution plan (none of them changes what this depth computes)."""
        train = dataclasses.replace(self.train, depths=(self.depth,),
                                    ray=dataclasses.replace(self.train.ray, address=None))
        return dataclasses.replace(self, train=train, execution=ExecutionPlan(), file=PARAMS_FILE)


def load_train_var_config(params: dict[str, Any], file: str | Path, depth: int) -> TrainVarConfig:
    """Parse and check every section the stage uses, before any work (the model config is built
    again with the data's class count; a stand-in count checks the overrides here)."""
    if depth < 1:
        raise ParamsError(f"--depth must be >= 1, got {depth}")
    cfg = TrainVarConfig(depth, load(VarParams, params, "var", file), load(TrainParams, params, "train", file),
                         load(ExecutionPlan, params, "execution", file), load_tokenizer_model(params, file), str(file))
    cfg.var_config(num_classes=1)
    return cfg


def config_hash(*objs: Any) -> str:
    """Stable short hash of dataclasses/dicts: names a Ray run so a changed recipe never resumes
    another recipe's checkpoint."""
    def plain(o):
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o
    blob = json.dumps([plain(o) for o in objs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
