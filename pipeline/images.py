"""The image splits on disk (``data/images``), the ``data`` params that make them, and conversions
between their uint8 pixels, the models' float tensors and PNG files.

A split is ``<split>.npy`` (``(N, S, S, 3)`` uint8, memory-mapped) with ``<split>-labels.npy``
(``(N,)`` int64), described by ``manifest.json`` (count, per-class counts, sha256 of each file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from varcore.errors import require

from .errors import ArtifactError
from .files import atomic_path, read_manifest, sha256_file

IMAGES_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DataParams:
    source: Literal["fashion_mnist", "image_folder"] = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    image_size: int = 32
    val_fraction: float = 0.1
    max_per_class: int | None = None       # cap images per class (quick runs)
    seed: int = 0

    def __post_init__(self):
        require(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        require(self.max_per_class is None or self.max_per_class >= 2, "max_per_class",
              f"must be >= 2 or null, got {self.max_per_class}")


def read_images_manifest(data_dir: str | Path) -> dict[str, Any]:
    return read_manifest(Path(data_dir) / IMAGES_MANIFEST, "data")


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``images (N, S, S, 3)`` uint8 (memory-mapped) and ``labels (N,)`` of one split, checked against
    the manifest (sha256 of both files, count) before use: a truncated or changed file is named
    before any work is done on it."""
    data_dir = Path(data_dir)
    entry = read_images_manifest(data_dir).get("splits", {}).get(split)
    if not isinstance(entry, dict):
        raise ArtifactError(f"{data_dir / IMAGES_MANIFEST}: no split {split!r} (run `dvc repro data`)")
    images_path, labels_path = data_dir / f"{split}.npy", data_dir / f"{split}-labels.npy"
    for path, key in ((images_path, "sha256"), (labels_path, "labels_sha256")):
        if not path.is_file():
            raise ArtifactError(f"{path}: split file not found (run `dvc repro data`)")
        if key in entry and sha256_file(path) != entry[key]:
            raise ArtifactError(f"{path}: sha256 differs from {data_dir / IMAGES_MANIFEST} (corrupt or changed "
                                "since `dvc repro data` wrote it; rerun that stage)")
    try:
        images, labels = np.load(images_path, mmap_mode="r"), np.load(labels_path)
    except (OSError, ValueError) as e:   # truncated or not an array
        raise ArtifactError(f"{images_path}: cannot read the split: {e} (run `dvc repro data`)") from e
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ArtifactError(f"{images_path}: images {images.shape} {images.dtype} do not match labels {labels.shape}")
    if len(images) != entry.get("count", len(images)):
        raise ArtifactError(f"{images_path}: {len(images)} images, {data_dir / IMAGES_MANIFEST} says {entry['count']}")
    return images, labels


def to_float_images(images_NHWC: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1]."""
    x = images_NHWC if isinstance(images_NHWC, torch.Tensor) else torch.from_numpy(np.array(images_NHWC, np.uint8))
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8_images(img_B3HW: torch.Tensor) -> torch.Tensor:
    """float ``(B, 3, H, W)`` in [-1, 1] -> uint8 ``(B, 3, H, W)`` (the inverse of :func:`to_float_images`)."""
    return img_B3HW.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of uint8 ``(n, 3, S, S)`` images (same n) -> one uint8 ``(rows S, n S, 3)`` picture."""
    lines = [torch.cat(list(r), dim=2) for r in rows]          # (3, S, n S) each
    return torch.cat(lines, dim=1).permute(1, 2, 0).numpy()


def save_png(path: str | Path, array_HWC: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write an RGB picture atomically; ``text`` goes into the PNG's metadata."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic_path(path) as tmp:
        Image.fromarray(array_HWC).save(tmp, format="PNG", pnginfo=info)
