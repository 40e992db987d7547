"""Stage ``zeroshot``: in-painting of held-out val images by the largest depth's VAR, measured.

The last ``zeroshot.images`` val images get one hole each (``zeroshot.holes``, cycled); VAR's
zero-shot in-painting, an unconditional sample pasted into the hole and a class sample pasted
into the hole are scored inside the hole (MSE, LPIPS with local VGG16 weights) and by FID, KID,
precision and recall against the other val images (:mod:`pipeline.evaluation.inpainting`).
Sampling settings are ``evaluate.sampling``. Writes the numbers, a record of how they were made,
and a picture: original, masked, in-painted, both baselines, out-painted and edited images.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..evaluation.config import EvaluateParams, ZeroShotParams
from ..evaluation.fidelity import UInt8Images, feature_network, score
from ..evaluation.inpainting import METHODS, fill_holes, hole_masks, hole_mse, mean_lpips, picture, summary
from ..files import sha256_file, write_json
from ..images import load_split, save_png
from ..params import load, resolve_device
from ..stage import stage_main
from ..tokenizer.checkpoint import load_tokenizer
from ..tracking import log_artifact
from ..training.checkpoint import check_fits, load_var

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroShotConfig:
    zeroshot: ZeroShotParams
    evaluate: EvaluateParams     # sampling settings, feature network, KID subset, feature batch


@dataclass(frozen=True)
class Paths:
    model: Path          # models/var-dD.pt (the largest depth)
    tokenizer: Path      # models/tokenizer.pt
    classifier: Path     # models/classifier.pt (the default feature network)
    images: Path         # data/images (the val split: held-out images and FID's reference)
    metrics: Path        # metrics/zeroshot.json: <method>/<metric>
    record: Path         # runs/zeroshot.json: per method, settings, hashes
    grid: Path           # metrics/zeroshot.png


def load_config(params: dict[str, Any], file: str, paths: Paths) -> ZeroShotConfig:
    return ZeroShotConfig(load(ZeroShotParams, params, "zeroshot", file), load(EvaluateParams, params, "evaluate", file))


def _lpips(weights: str | None, device: torch.device):
    if weights is None:
        return None
    from ..tokenizer.perceptual import load_lpips
    return load_lpips(weights).to(device)


def run(cfg: ZeroShotConfig, paths: Paths) -> dict:
    z, ev = cfg.zeroshot, cfg.evaluate
    if z.num_threads:
        torch.set_num_threads(z.num_threads)
    device = resolve_device(z.device)
    lpips_net = _lpips(z.lpips_weights, device)   # before any sampling: a bad weights path fails at once
    var, meta = load_var(paths.model)
    vq = load_tokenizer(paths.tokenizer)
    check_fits(var, meta, vq, paths.model, paths.tokenizer)
    var, vq = var.to(device), vq.to(device)
    images, labels = load_split(paths.images, "val")
    if z.images >= len(images) - 1:
        raise ArtifactError(f"{paths.images}: {len(images)} val images, too few for zeroshot.images={z.images} "
                            f"plus a reference set")
    held, held_lab, reference = images[-z.images:], labels[-z.images:], UInt8Images(images[:-z.images])
    holes = hole_masks(len(held), images.shape[1], z.holes)
    filled = fill_holes(var, vq, held, held_lab, holes, ev.sampling, z.seed, z.batch_size)
    net = feature_network(ev.feature_network, paths.classifier, ev.inception_weights)
    original = filled["original"]
    scores: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        s = {"mse_hole": hole_mse(filled[m], original, holes)}
        if lpips_net is not None:
            s["lpips"] = mean_lpips(lpips_net, filled[m], original, device)
        s.update(score(UInt8Images(filled[m]), reference, net, device, ev.kid_subset_size, ev.feature_batch_size))
        scores[m] = s
        log.info("%s: MSE in the hole %.5f, FID %.3f", m, s["mse_hole"], s["fid"])
    k = min(z.grid_images, len(held))
    pic, rows = picture(var, vq, held[:k], held_lab[:k], holes[:k], {m: v[:k] for m, v in filled.items()},
                        z.outpaint_keep, z.edit_box, ev.sampling, z.seed)
    save_png(paths.grid, pic, {"varscale.rows": " | ".join(rows), "varscale.depth": str(var.cfg.depth),
                               "varscale.sampling": str(dataclasses.asdict(ev.sampling))})
    metrics = {"depth": var.cfg.depth, **summary(scores)}
    write_json(paths.metrics, metrics)
    write_json(paths.record, {
        "methods": scores, "depth": var.cfg.depth, "images": len(held), "reference_images": len(reference),
        "holes": [list(h) for h in z.holes], "hole_fraction": float(holes.float().mean()), "rows": rows,
        "sampling": dataclasses.asdict(ev.sampling), "seed": z.seed, "lpips": lpips_net is not None,
        "feature_network": net.describe(), "model_sha256": sha256_file(paths.model),
        "tokenizer_sha256": sha256_file(paths.tokenizer)})
    log_artifact(paths.grid, "zeroshot")
    log_artifact(paths.record)
    return metrics


main = stage_main("zeroshot", Paths, load_config, run,
                  summary_keys=("var_inpaint/mse_hole", "var_inpaint/fid", "uncond_fill/fid", "class_fill/fid",
                                "original/fid"), doc=__doc__)

if __name__ == "__main__":
    main()
