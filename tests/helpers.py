"""Small synthetic inputs for pipeline tests (real data is not needed to test the code paths)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 16, seed: int = 0) -> Path:
    """RGB PNGs ``root/class{c}/img{i}.png`` whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.uint8)
            base[..., c % 3] = 200
            img = np.clip(base + rng.integers(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"img{i}.png")
    return root


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())
