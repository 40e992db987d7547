"""Stage `data`: a class-labelled image set -> ``data/images/{train,val}.npz`` + manifest.

Sources: the default Fashion-MNIST (Debian package ``dataset-fashion-mnist``, IDX files,
70k 28x28 grey images, 10 classes) or a user image folder ``root/<class>/*.png|jpg``.
Every image becomes RGB uint8 ``image_size x image_size``: grey and palette images are
converted, RGBA is composited on white, other sizes are centre-cropped and resized,
unreadable or truncated files are skipped; each case is counted in ``metrics/data.json``.
The train/val split is stratified per class and fixed by ``data.seed``.
"""

from __future__ import annotations

import argparse
import gzip
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .config import DataParams, ParamsError, load_data_params, read_params
from .io import atomic_path, sha256_bytes, sha256_file, write_json

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DataError(ValueError):
    """The data source is missing or unusable; the message names the path."""


@dataclass
class Collected:
    """Images of one source before the split: ids keep the split lists auditable."""

    images: list[np.ndarray] = field(default_factory=list)   # (S, S, 3) uint8 each
    labels: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)          # converted / skipped reasons


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


def collect_fashion_mnist(p: DataParams) -> Collected:
    root = Path(p.root)
    missing = [root / f for pair in FASHION_MNIST_FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: Fashion-MNIST file not found; install it with "
                        f"`apt-get install dataset-fashion-mnist` (or `bash install.sh --data`), "
                        f"or set data.root / data.source: image_folder in params.yaml")
    out = Collected(classes=list(FASHION_MNIST_CLASSES))
    per_class: Counter = Counter()
    for part, (img_file, lab_file) in FASHION_MNIST_FILES.items():
        images = _read_idx(root / img_file, 16).reshape(-1, 28, 28)
        labels = _read_idx(root / lab_file, 8)
        if len(images) != len(labels):
            raise DataError(f"{root / img_file}: {len(images)} images but {len(labels)} labels")
        for i in tqdm(range(len(images)), desc=f"fashion-mnist {part}", unit="img", mininterval=2):
            lab = int(labels[i])
            if p.max_per_class is not None and per_class[lab] >= p.max_per_class:
                continue
            per_class[lab] += 1
            out.images.append(to_rgb_square(Image.fromarray(images[i], mode="L"), p.image_size, out.counts))
            out.labels.append(lab)
            out.ids.append(f"{part}:{i}")
    return out


def collect_image_folder(p: DataParams) -> Collected:
    root = Path(p.root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (data.root in params.yaml)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/*.png|jpg")
    out = Collected()
    files_by_class = {d.name: sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
                      for d in class_dirs}
    total = sum(len(v) for v in files_by_class.values())
    bar = tqdm(total=total, desc="image folder", unit="img", mininterval=2)
    for name, files in files_by_class.items():
        images: list[np.ndarray] = []
        ids: list[str] = []
        for f in files:
            bar.update(1)
            if p.max_per_class is not None and len(images) >= p.max_per_class:
                break
            try:
                with Image.open(f) as im:
                    im.load()  # decode fully: truncated files fail here, not later
                    images.append(to_rgb_square(im, p.image_size, out.counts))
                    ids.append(str(f.relative_to(root)))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                out.counts["skipped_unreadable"] += 1
                log.warning("skipping unreadable image %s: %s", f, e)
        if not images:
            out.counts["skipped_empty_classes"] += 1
            log.warning("skipping class %r: no readable images in %s", name, root / name)
            continue
        lab = len(out.classes)
        out.classes.append(name)
        out.images += images
        out.ids += ids
        out.labels += [lab] * len(images)
    bar.close()
    if not out.classes:
        raise DataError(f"{root}: no readable images in any class folder")
    if len(out.classes) < 2:
        log.warning("%s: only one class (%s); class-conditional training degenerates", root, out.classes)
    return out


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


def write_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels.astype(np.int64))


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``images (N, S, S, 3)`` uint8 and ``labels (N,)`` of one split file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (run `dvc repro data`)")
    with np.load(path) as z:
        return z["images"], z["labels"]


def run(p: DataParams, out_dir: Path, metrics_path: Path) -> dict:
    collected = collect_fashion_mnist(p) if p.source == "fashion_mnist" else collect_image_folder(p)
    images = np.stack(collected.images)
    labels = np.asarray(collected.labels, dtype=np.int64)
    ids = np.asarray(collected.ids)
    tr, va = stratified_split(labels, p.val_fraction, p.seed)
    manifest = {"source": p.source, "root": str(p.root), "image_size": p.image_size, "seed": p.seed,
                "val_fraction": p.val_fraction, "classes": collected.classes, "splits": {}}
    for split, sel in (("train", tr), ("val", va)):
        path = out_dir / f"{split}.npz"
        write_split(path, images[sel], labels[sel])
        per_class = np.bincount(labels[sel], minlength=len(collected.classes))
        manifest["splits"][split] = {
            "file": path.name, "count": int(len(sel)), "sha256": sha256_file(path),
            "per_class": {c: int(n) for c, n in zip(collected.classes, per_class)},
            "ids_sha256": sha256_bytes("\n".join(ids[sel]).encode())}
    write_json(out_dir / "manifest.json", manifest)
    metrics = {"num_classes": len(collected.classes), "train_images": int(len(tr)), "val_images": int(len(va)),
               **{k: int(v) for k, v in sorted(collected.counts.items())}}
    for key in ("skipped_unreadable", "skipped_empty_classes", "converted_grey", "converted_alpha",
                "converted_mode", "resized"):
        metrics.setdefault(key, 0)
    write_json(metrics_path, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/images")
    ap.add_argument("--metrics", default="metrics/data.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        p = load_data_params(read_params(args.params), args.params)
        from .tracking import stage_run
        with stage_run("data", {"data": p.__dict__}) as _:
            import mlflow
            metrics = run(p, Path(args.out), Path(args.metrics))
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_artifact(str(Path(args.out) / "manifest.json"))
    except (ParamsError, DataError) as e:
        raise SystemExit(f"data: {e}") from None
    log.info("data: %s", metrics)


if __name__ == "__main__":
    main()
