"""Reading the model files the stages hand on (``models/tokenizer.pt``, ``models/var-d{D}.pt``).

Each is a dict with a ``format`` tag, the model's config fields, its ``state_dict`` and metadata,
written atomically with bytes that depend only on the content (``pipeline.files.save_torch``).
Loading uses ``torch.load(weights_only=True)``: a file from elsewhere is read as data and never
runs code. Missing, corrupt or foreign files raise :class:`ArtifactError` naming the path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError


def read_checkpoint(path: str | Path, fmt: str, what: str, stage: str,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict of format ``fmt`` (data only: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} checkpoint not found (run `dvc repro {stage}`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated, corrupt or code-carrying files
        raise ArtifactError(f"{path}: cannot read {what} checkpoint: {str(e).splitlines()[0]}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ArtifactError(f"{path}: not a varscale {what} checkpoint (format {fmt})")
    return ckpt


def config_from(path: str | Path, cls: type, fields: dict[str, Any], retired: tuple[str, ...] = ()):
    """The checkpoint's config dataclass; ``retired`` fields (saved by earlier versions) are dropped."""
    fields = {k: v for k, v in fields.items() if k not in retired}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ArtifactError(f"{path}: {cls.__name__} checkpoint config has fields this varcore does not know: "
                            f"{unknown}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: invalid {cls.__name__} in the checkpoint: {e}") from e


def load_weights(path: str | Path, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:   # missing/unexpected keys or shapes that do not fit the config
        raise ArtifactError(f"{path}: weights do not fit the checkpoint's config: {' '.join(str(e).split())[:400]}"
                            ) from e
