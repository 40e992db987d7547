"""Stage ``train_classifier``: the default profile's feature network for FID/IS (a small CNN).

Trained on the real train split only and scored on the val split; the checkpoint records its
val accuracy and the data it saw, and every FID/IS/KID/precision/recall number of the evaluation
names it by its file's sha256. On the paper profile the feature network is Inception-v3 from a
local file instead (``evaluate.feature_network: inception``); this stage is then not needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..evaluation.classifier import accuracy, save_classifier, train_classifier
from ..evaluation.config import ClassifierParams
from ..files import sha256_bytes, sha256_file, write_json
from ..images import IMAGES_MANIFEST, load_split, read_images_manifest
from ..params import load, resolve_device
from ..stage import stage_main

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    images: Path      # data/images
    out: Path         # models/classifier.pt
    metrics: Path     # metrics/classifier.json


def load_config(params: dict[str, Any], file: str, paths: Paths) -> ClassifierParams:
    return load(ClassifierParams, params, "classifier", file)


def run(p: ClassifierParams, paths: Paths) -> dict:
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    manifest = read_images_manifest(paths.images)
    train_images, train_labels = load_split(paths.images, "train")
    val_images, val_labels = load_split(paths.images, "val")
    device = resolve_device(p.device)
    model = train_classifier(p, train_images, train_labels, len(manifest["classes"]), device)
    metrics = {"val_accuracy": accuracy(model, val_images, val_labels),
               "train_accuracy_first_5k": accuracy(model, train_images[:5000], train_labels[:5000]),
               "feature_dim": model.cfg.feature_dim, "train_images": len(train_images)}
    save_classifier(paths.out, model.cpu(), {
        "val_accuracy": metrics["val_accuracy"], "class_names": list(manifest["classes"]),
        "data_manifest_sha256": sha256_bytes((paths.images / IMAGES_MANIFEST).read_bytes())})
    metrics["sha256"] = sha256_file(paths.out)
    write_json(paths.metrics, metrics)
    return metrics


main = stage_main("train_classifier", Paths, load_config, run, summary_keys=("val_accuracy", "feature_dim"),
                  doc=__doc__)

if __name__ == "__main__":
    main()
