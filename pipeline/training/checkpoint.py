"""The transformer file ``models/var-d{D}.pt``: VARConfig fields, weights, class names, metadata.

The raster AR baseline (:class:`varcore.ar.RasterAR`, the ablation's ``ablation/models/ar-d{D}.pt``)
is written the same way under its own format tag, so a file never loads as the other model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from varcore.ar import ARConfig, RasterAR, build
from varcore.var import VAR, VARConfig

from ..checkpoints import config_from, load_weights, read_checkpoint, write_checkpoint

VAR_FORMAT = "varscale.var.v1"
AR_FORMAT = "varscale.ar.v1"
CONFIGS = {VAR_FORMAT: VARConfig, AR_FORMAT: ARConfig}
# VARConfig fields that earlier versions saved and that never changed the model's function, so
# a checkpoint holding them still loads: qk_norm_impl chose the form of the q/k-norm's backward;
# the rest are the execution choices that now live in varcore.fast.plan.ExecutionPlan.
RETIRED_CONFIG_FIELDS = ("qk_norm_impl", "attn_impl", "attn_prefix_scales", "attn_backends", "mlp_impl",
                         "compile_blocks", "checkpointing")


def save_var(path: str | Path, model: VAR, class_names: list[str] | None = None,
             extra: dict[str, Any] | None = None) -> None:
    """Write atomically: ``config`` (VARConfig fields), ``state_dict``, ``num_classes``, ``class_names``."""
    fmt = AR_FORMAT if isinstance(model, RasterAR) else VAR_FORMAT
    write_checkpoint(path, fmt, model.cfg, model.state_dict(),
                     {"num_classes": model.cfg.num_classes, "class_names": list(class_names or []), **(extra or {})})


def load_var(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VAR, dict[str, Any]]:
    """The model (eval mode: a :class:`VAR`, or a :class:`RasterAR` for the baseline's files) and the
    checkpoint's metadata (everything but the weights)."""
    ckpt = read_checkpoint(path, tuple(CONFIGS), "VAR", "train_var", map_location)
    cls = CONFIGS[ckpt["format"]]
    model = build(config_from(path, cls, ckpt["config"], RETIRED_CONFIG_FIELDS))
    load_weights(path, model, ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta
