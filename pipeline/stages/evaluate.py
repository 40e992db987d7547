"""Stage ``evaluate@D``: FID, IS, KID, precision and recall of depth D's samples against the val split.

Every depth is sampled with the same class-balanced labels (``samples_per_class`` of each class),
the same seeds and the same sampling settings (CFG, top-k, top-p: section ``evaluate.sampling``),
once per seed, so the report can show how far the numbers move between seeds. Every number is
stored beside the settings that made it and the feature network that scored it (its file's
sha256, and for the classifier its val accuracy). Writes the metrics and a picture of samples,
one row per class.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from varcore.ar import sequential_calls

from ..evaluation.config import EvaluateParams
from ..evaluation.fidelity import FeatureNetwork, UInt8Images, check_images, feature_network, score
from ..evaluation.samples import balanced_labels, class_grid, sample_images
from ..files import sha256_file, write_json
from ..images import load_split, save_png
from ..params import load, resolve_device
from ..stage import stage_main
from ..tokenizer.checkpoint import load_tokenizer
from ..tracking import log_artifact, log_metrics
from ..training.checkpoint import check_fits, load_var

log = logging.getLogger(__name__)
SUMMARY = ("fid", "is_mean", "kid_mean", "precision", "recall")   # the numbers metrics/eval/dD.json holds


@dataclass(frozen=True)
class Paths:
    depth: int
    model: Path          # models/var-dD.pt
    tokenizer: Path      # models/tokenizer.pt
    classifier: Path     # models/classifier.pt (the default feature network)
    images: Path         # data/images (the val split is the reference)
    metrics: Path        # metrics/eval/dD.json: FID, IS, KID, precision, recall (means over the seeds)
    record: Path         # runs/eval/dD.json: per seed, settings, seeds, feature network, hashes
    grid: Path           # metrics/eval/samples-dD.png


def load_config(params: dict[str, Any], file: str, paths: Paths) -> EvaluateParams:
    return load(EvaluateParams, params, "evaluate", file)


def reference_set(p: EvaluateParams, images_dir: Path) -> UInt8Images:
    """The val split (its first ``reference_images`` images, or all of it)."""
    images, _ = load_split(images_dir, "val")
    n = len(images) if p.reference_images is None else min(p.reference_images, len(images))
    return UInt8Images(images[:n])


def summarize_seeds(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of every metric, and the spread (max - min) and standard deviation of FID."""
    out = {k: statistics.fmean(r[k] for r in per_seed) for k in per_seed[0] if k != "seed"}
    fids = [r["fid"] for r in per_seed]
    out["fid_spread"] = max(fids) - min(fids)
    out["fid_std"] = statistics.stdev(fids) if len(fids) > 1 else 0.0
    return out


def score_seeds(p: EvaluateParams, var, vq, net: FeatureNetwork, reference, device, depth: int
                ) -> tuple[list[dict[str, float]], torch.Tensor, torch.Tensor]:
    labels = balanced_labels(var.cfg.num_classes, p.samples_per_class)
    per_seed, first = [], None
    for seed in p.seeds:
        t0 = time.perf_counter()
        images = sample_images(var, vq, labels, p.sampling, seed, p.batch_size, desc=f"d{depth} seed {seed}")
        seconds = time.perf_counter() - t0
        check_images(images, len(labels), vq.cfg.image_size, f"samples of d{depth}, seed {seed}")
        per_seed.append({"seed": seed, **score(UInt8Images(images), reference, net, device, p.kid_subset_size,
                                               p.feature_batch_size)})
        # a timing, not a result: to MLflow only, so that reruns leave identical records
        log_metrics({"sample_ms_per_image": 1000.0 * seconds / len(labels)}, step=seed)
        log.info("d%d seed %d: FID %.3f IS %.3f precision %.3f recall %.3f", depth, seed, per_seed[-1]["fid"],
                 per_seed[-1]["is_mean"], per_seed[-1]["precision"], per_seed[-1]["recall"])
        first = images if first is None else first
    return per_seed, first, labels


def run(p: EvaluateParams, paths: Paths) -> dict:
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    device = resolve_device(p.device)
    var, meta = load_var(paths.model)
    vq = load_tokenizer(paths.tokenizer)
    check_fits(var, meta, vq, paths.model, paths.tokenizer, paths.depth)
    net = feature_network(p.feature_network, paths.classifier, p.inception_weights)
    reference = reference_set(p, paths.images)
    per_seed, first, labels = score_seeds(p, var.to(device), vq.to(device), net, reference, device, paths.depth)
    save_png(paths.grid, class_grid(first, labels, p.grid_columns),
             {"varscale.depth": str(paths.depth), "varscale.seed": str(p.seeds[0]),
              "varscale.sampling": str(dataclasses.asdict(p.sampling))})
    means = summarize_seeds(per_seed)
    metrics = {"depth": paths.depth, **{k: means[k] for k in SUMMARY + ("fid_spread",)}}
    record = {**{k: v for k, v in means.items() if k not in metrics}, "per_seed": per_seed,
              "samples_per_seed": len(labels), "reference_images": len(reference),
              "sampling": dataclasses.asdict(p.sampling), "seeds": list(p.seeds), "feature_network": net.describe(),
              "token_order": var.cfg.token_order, "sequential_calls": sequential_calls(var.cfg),
              "model_sha256": sha256_file(paths.model), "tokenizer_sha256": sha256_file(paths.tokenizer),
              "class_names": meta.get("class_names", []),
              **{k: meta[k] for k in ("imported_from", "source_sha256") if k in meta}}   # a released model
    write_json(paths.metrics, metrics)
    write_json(paths.record, record)
    for s in per_seed:
        log_metrics({k: v for k, v in s.items() if k != "seed"}, step=s["seed"], prefix="seed/")
    log_artifact(paths.grid, "samples")
    log_artifact(paths.record)
    return metrics


main = stage_main("evaluate", Paths, load_config, run, summary_keys=("fid", "fid_spread", "is_mean", "precision",
                                                                     "recall"),
                  run_name=lambda paths: f"evaluate-d{paths.depth}",
                  tags=lambda paths: {"varscale.depth": str(paths.depth)}, doc=__doc__)

if __name__ == "__main__":
    main()
