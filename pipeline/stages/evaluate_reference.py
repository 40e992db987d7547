"""Stage ``evaluate_reference``: the rows every depth is read against, with the same feature network.

- real vs real: a class-balanced subset of the train split (as many images as one seed's sample
  set) against the val split: the floor no generator can beat by more than chance;
- the tokenizer (rFID): the val split's token round trip image -> tokens -> image against the
  val split itself: the ceiling the tokenizer puts on every transformer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..evaluation.config import EvaluateParams
from ..evaluation.fidelity import UInt8Images, check_images, feature_network, score
from ..evaluation.samples import balanced_subset, reconstruct
from ..files import sha256_file, write_json
from ..images import load_split, read_images_manifest
from ..params import load, resolve_device
from ..stage import stage_main
from ..tokenizer.checkpoint import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    tokenizer: Path      # models/tokenizer.pt
    classifier: Path     # models/classifier.pt (the default feature network)
    images: Path         # data/images
    metrics: Path        # metrics/reference.json: FID, IS, precision, recall of both rows
    record: Path         # runs/reference.json: every number, counts, the feature network


def load_config(params: dict[str, Any], file: str, paths: Paths) -> EvaluateParams:
    return load(EvaluateParams, params, "evaluate", file)


def run(p: EvaluateParams, paths: Paths) -> dict:
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    device = resolve_device(p.device)
    net = feature_network(p.feature_network, paths.classifier, p.inception_weights)
    val, _ = load_split(paths.images, "val")
    n_ref = len(val) if p.reference_images is None else min(p.reference_images, len(val))
    reference = UInt8Images(val[:n_ref])
    train, train_labels = load_split(paths.images, "train")
    n_classes = len(read_images_manifest(paths.images)["classes"])
    subset = balanced_subset(train_labels, p.samples_per_class, seed=p.seeds[0])
    real = score(UInt8Images(train[subset]), reference, net, device, p.kid_subset_size, p.feature_batch_size)
    vq = load_tokenizer(paths.tokenizer).to(device)
    recon = reconstruct(vq, val[:n_ref])
    check_images(recon, n_ref, vq.cfg.image_size, "tokenizer reconstructions of the val split")
    tok = score(UInt8Images(recon), reference, net, device, p.kid_subset_size, p.feature_batch_size)
    metrics = {"real_vs_real": {**real, "images": len(subset), "per_class": p.samples_per_class,
                                "classes": n_classes},
               "tokenizer": {**tok, "images": n_ref}, "reference_images": n_ref,
               "feature_network": net.describe(), "tokenizer_sha256": sha256_file(paths.tokenizer)}
    write_json(paths.record, metrics)
    log.info("real vs real: FID %.3f IS %.3f; tokenizer rFID %.3f", real["fid"], real["is_mean"], tok["fid"])
    compact = {f"{prefix}_{k}": m[k] for prefix, m in (("real", real), ("recon", tok))
               for k in ("fid", "is_mean", "precision", "recall")}
    write_json(paths.metrics, compact)
    return compact


main = stage_main("evaluate_reference", Paths, load_config, run, summary_keys=("real_fid", "recon_fid", "real_is_mean"),
                  doc=__doc__)

if __name__ == "__main__":
    main()
