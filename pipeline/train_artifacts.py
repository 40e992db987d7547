"""The trained-transformer checkpoint ``models/var-d{depth}.pt``: config, weights and class names."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from varcore import VAR, VARConfig

from .artifacts import ArtifactError, read_checkpoint
from .io import save_torch

VAR_FORMAT = "varscale.var.v1"
# VARConfig fields that earlier varcore versions saved and that never changed the model's
# function; a checkpoint holding them still loads. qk_norm_impl chose how the q/k-norm's
# backward was computed (removed 2026-11-25, benchmarks/RESULTS.md round 6).
RETIRED_CONFIG_FIELDS = ("qk_norm_impl",)


def save_var(path: str | Path, model: VAR, class_names: list[str] | None = None,
             extra: dict[str, Any] | None = None) -> None:
    """Write atomically: ``config`` (VARConfig fields), ``state_dict``, ``num_classes``, ``class_names``."""
    save_torch(path, {"format": VAR_FORMAT, "config": dataclasses.asdict(model.cfg),
                      "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "num_classes": model.cfg.num_classes, "class_names": list(class_names or []),
                      **(extra or {})})


def load_var(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VAR, dict[str, Any]]:
    """The model (eval mode) and the checkpoint's metadata (everything but the weights)."""
    ckpt = read_checkpoint(path, VAR_FORMAT, "VAR", "train", map_location)
    model = VAR(_var_config(path, ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta


def _var_config(path: str | Path, fields: dict[str, Any]) -> VARConfig:
    fields = {k: v for k, v in fields.items() if k not in RETIRED_CONFIG_FIELDS}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(VARConfig)})
    if unknown:
        raise ArtifactError(f"{path}: VAR checkpoint config has fields this varcore does not know: {unknown}")
    return VARConfig(**fields)
