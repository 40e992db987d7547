"""Reading the model files the stages hand on (``models/tokenizer.pt``, ``models/var-d{D}.pt``).

Each is a dict with a ``format`` tag, the model's config fields, its ``state_dict``, the sha256 of
the weights' bytes and metadata, written atomically with bytes that depend only on the content
(``pipeline.files.save_torch``). Loading uses ``torch.load(weights_only=True)``: a file from
elsewhere is read as data and never runs code. Missing, truncated, bit-flipped (the weights no
longer match their sha256) or foreign files raise :class:`ArtifactError` naming the path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError
from .files import save_torch


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and raw bytes of the tensors (in name order)."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_checkpoint(path: str | Path, fmt: str, config: Any, state_dict: dict[str, torch.Tensor],
                     extra: dict[str, Any] | None = None) -> None:
    """``{format, config (dataclass fields), state_dict (on CPU), weights_sha256, **extra}``, atomically."""
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    save_torch(path, {"format": fmt, "config": dataclasses.asdict(config), "state_dict": sd,
                      "weights_sha256": weights_sha256(sd), **(extra or {})})


def read_checkpoint(path: str | Path, fmt: str | tuple[str, ...], what: str, stage: str,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict of format ``fmt`` (or one of several; data only: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} checkpoint not found (run `dvc repro {stage}`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated, corrupt or code-carrying files
        raise ArtifactError(f"{path}: cannot read {what} checkpoint: {str(e).splitlines()[0]}") from e
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if not isinstance(ckpt, dict) or ckpt.get("format") not in formats:
        raise ArtifactError(f"{path}: not a varscale {what} checkpoint (format {' or '.join(formats)})")
    digest = ckpt.get("weights_sha256")    # absent in files written before it was recorded
    if digest is not None and weights_sha256(ckpt.get("state_dict", {})) != digest:
        raise ArtifactError(f"{path}: the weights do not match their recorded sha256 (corrupt file; "
                            f"rerun `dvc repro {stage}`)")
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
