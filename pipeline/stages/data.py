"""Stage ``data``: a class-labelled image set -> ``data/images/{train,val}.npy`` + manifest.

Sources: the default Fashion-MNIST (Debian package ``dataset-fashion-mnist``, IDX files,
70k 28x28 grey images, 10 classes) or a user image folder ``root/<class>/*.png|jpg``.
Images are listed first, split, then decoded one by one into memory-mapped
``data/images/<split>.npy`` (``(N, S, S, 3)`` uint8) with ``<split>-labels.npy``, so memory
stays bounded from Fashion-MNIST to ImageNet. Every image becomes RGB ``S x S``: grey and palette images are
converted, RGBA is composited on white, other sizes are centre-cropped and resized,
unreadable or truncated files are skipped; each case is counted in ``metrics/data.json``.
The train/val split is stratified per class and fixed by ``data.seed``.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from ..files import atomic_path, sha256_bytes, sha256_file, write_json
from ..images import IMAGES_MANIFEST, DataParams
from ..params import load
from ..stage import stage_main
from ..tracking import log_artifact

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@dataclass
class Listing:
    """The images of a source before decoding: one id and label per image, plus a decoder."""

    ids: list[str]
    labels: np.ndarray                                   # (N,) int64
    classes: list[str]
    decode: Callable[[int], Image.Image]                 # item index -> PIL image (may raise OSError)
    counts: Counter = field(default_factory=Counter)     # reasons for skipping, at listing time


# ---- image normalisation -------------------------------------------------------------------
def to_rgb_square(img: Image.Image, size: int, counts: Counter) -> np.ndarray:
    """Any PIL image -> RGB ``(size, size, 3)`` uint8, counting what had to be changed."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        counts["converted_alpha"] += 1
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif img.mode != "RGB":
        counts["converted_grey" if img.mode in ("L", "1", "I", "I;16", "F") else "converted_mode"] += 1
        img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        counts["resized"] += 1
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


# ---- sources -------------------------------------------------------------------------------
def _read_idx(path: Path, header: int) -> np.ndarray:
    try:
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=header)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file: {e}") from e


def list_fashion_mnist(p: DataParams) -> Listing:
    root = Path(p.root)
    missing = [root / f for pair in FASHION_MNIST_FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: Fashion-MNIST file not found; install it with "
                        f"`apt-get install dataset-fashion-mnist` (or `bash install.sh --data`), "
                        f"or set data.root / data.source: image_folder in params.yaml")
    pixels, ids, labels = [], [], []
    for part, (img_file, lab_file) in FASHION_MNIST_FILES.items():
        images = _read_idx(root / img_file, 16).reshape(-1, 28, 28)
        labs = _read_idx(root / lab_file, 8)
        if len(images) != len(labs):
            raise DataError(f"{root / img_file}: {len(images)} images but {len(labs)} labels")
        pixels.append(images)
        labels.append(labs.astype(np.int64))
        ids += [f"{part}:{i}" for i in range(len(images))]
    all_pixels = np.concatenate(pixels)
    return Listing(ids, np.concatenate(labels), list(FASHION_MNIST_CLASSES),
                   lambda i: Image.fromarray(all_pixels[i], mode="L"))


def _readable(path: Path) -> bool:
    """Cheap header check at listing time; truncated bodies are caught when decoding."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def list_image_folder(p: DataParams) -> Listing:
    root = Path(p.root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (data.root in params.yaml)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/*.png|jpg")
    counts: Counter = Counter()
    classes, paths, labels = [], [], []
    for d in tqdm(class_dirs, desc="list classes", unit="class", mininterval=2):
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        good = [f for f in files if _readable(f)]
        counts["skipped_unreadable"] += len(files) - len(good)
        if not good:
            counts["skipped_empty_classes"] += 1
            log.warning("skipping class %r: no readable images in %s", d.name, d)
            continue
        labels += [len(classes)] * len(good)
        classes.append(d.name)
        paths += good
    if not classes:
        raise DataError(f"{root}: no readable images in any class folder")
    if len(classes) < 2:
        log.warning("%s: only one class (%s); class-conditional training degenerates", root, classes)

    def decode(i: int) -> Image.Image:
        with Image.open(paths[i]) as im:
            im.load()  # decode fully: a truncated body fails here
            return im.copy()

    return Listing([str(f.relative_to(root)) for f in paths], np.asarray(labels, dtype=np.int64), classes,
                   decode, counts)


def cap_per_class(listing: Listing, max_per_class: int | None) -> np.ndarray:
    """Indices kept when at most ``max_per_class`` images (the first, in listing order) per class."""
    if max_per_class is None:
        return np.arange(len(listing.labels))
    keep, seen = [], Counter()
    for i, lab in enumerate(listing.labels.tolist()):
        if seen[lab] < max_per_class:
            seen[lab] += 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


# ---- split and write -----------------------------------------------------------------------
def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded permutation; the first round(n * val_fraction) go to val (>= 1 if n >= 2)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1) if len(idx) >= 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def write_split(listing: Listing, sel: np.ndarray, size: int, out_dir: Path, split: str,
                counts: Counter) -> tuple[np.ndarray, list[str]]:
    """Decode the selected images straight into a memory-mapped ``<split>.npy`` (bounded memory at
    any data size); returns the labels and ids of the images that decoded."""
    images_path = out_dir / f"{split}.npy"
    labels, ids = [], []
    with atomic_path(images_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(sel), size, size, 3))
        n = 0
        for i in tqdm(sel.tolist(), desc=f"decode {split}", unit="img", mininterval=2):
            try:
                arr[n] = to_rgb_square(listing.decode(i), size, counts)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                counts["skipped_unreadable"] += 1
                log.warning("skipping unreadable image %s: %s", listing.ids[i], e)
                continue
            labels.append(int(listing.labels[i]))
            ids.append(listing.ids[i])
            n += 1
        arr.flush()
        del arr
        if n < len(sel):  # shrink to the images that decoded
            full = np.load(tmp, mmap_mode="r")
            np.save(tmp.with_suffix(".part.npy"), full[:n])
            del full
            tmp.with_suffix(".part.npy").replace(tmp)
    labels_arr = np.asarray(labels, dtype=np.int64)
    with atomic_path(out_dir / f"{split}-labels.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, labels_arr)
    return labels_arr, ids


@dataclass(frozen=True)
class Paths:
    out: Path          # data/images
    metrics: Path      # metrics/data.json


def load_config(params: dict[str, Any], file: str, paths: Paths) -> DataParams:
    return load(DataParams, params, "data", file)


def run(p: DataParams, paths: Paths) -> dict:
    listing = list_fashion_mnist(p) if p.source == "fashion_mnist" else list_image_folder(p)
    kept = cap_per_class(listing, p.max_per_class)
    tr, va = stratified_split(listing.labels[kept], p.val_fraction, p.seed)
    counts = Counter(listing.counts)
    manifest = {"source": p.source, "root": str(p.root), "image_size": p.image_size, "seed": p.seed,
                "val_fraction": p.val_fraction, "classes": listing.classes, "splits": {}}
    for split, sel in (("train", kept[tr]), ("val", kept[va])):
        labels, ids = write_split(listing, sel, p.image_size, paths.out, split, counts)
        per_class = np.bincount(labels, minlength=len(listing.classes))
        manifest["splits"][split] = {
            "file": f"{split}.npy", "count": int(len(labels)), "sha256": sha256_file(paths.out / f"{split}.npy"),
            "labels_sha256": sha256_file(paths.out / f"{split}-labels.npy"),
            "per_class": {c: int(n) for c, n in zip(listing.classes, per_class)},
            "ids_sha256": sha256_bytes("\n".join(ids).encode())}
    write_json(paths.out / IMAGES_MANIFEST, manifest)
    metrics = {"num_classes": len(listing.classes), "train_images": manifest["splits"]["train"]["count"],
               "val_images": manifest["splits"]["val"]["count"], **{k: int(v) for k, v in sorted(counts.items())}}
    for key in ("skipped_unreadable", "skipped_empty_classes", "converted_grey", "converted_alpha",
                "converted_mode", "resized"):
        metrics.setdefault(key, 0)
    write_json(paths.metrics, metrics)
    log_artifact(paths.out / IMAGES_MANIFEST)
    return metrics


main = stage_main("data", Paths, load_config, run, summary_keys=("train_images", "val_images", "num_classes"),
                  doc=__doc__)

if __name__ == "__main__":
    main()
