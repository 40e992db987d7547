"""Stage ``train_tokenizer``: train the multi-scale VQ-VAE (paper eq. 5) and score its token round trip.

Writes the tokenizer checkpoint, its validation metrics (PSNR of image -> tokens -> image over
the whole val split, codebook use and perplexity per scale) and a picture of originals over
reconstructions. LPIPS needs ImageNet VGG16 weights from a local path
(``tokenizer.train.lpips_weights``); without one it is off with a warning. Training state goes
to ``--state`` (outside DVC's outputs); a killed run resumes from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..tokenizer.checkpoint import save_tokenizer
from ..errors import ParamsError
from ..files import sha256_bytes, write_json
from ..images import IMAGES_MANIFEST, load_split, read_images_manifest, save_png
from ..stage import stage_main
from ..tokenizer.config import TokenizerParams, load_tokenizer_params
from ..tokenizer.perceptual import load_lpips
from ..tokenizer.training import Trainer, evaluate, fingerprint, previous, recon_grid
from ..tracking import log_artifact, log_metrics, set_tags

log = logging.getLogger(__name__)
VAL_DURING_TRAINING = 2048   # val images scored at each epoch end (the final score uses all)


@dataclass(frozen=True)
class Paths:
    images: Path      # data/images
    out: Path         # models/tokenizer.pt
    metrics: Path     # metrics/tokenizer.json
    recon: Path       # metrics/tokenizer-recon.png
    state: Path       # checkpoints/tokenizer/state.pt (resume state, not a DVC output)


def load_config(params: dict[str, Any], file: str, paths: Paths) -> TokenizerParams:
    return load_tokenizer_params(params, file)


def _lpips(p: TokenizerParams) -> torch.nn.Module | None:
    if p.train.lpips_weights and p.train.lambda_p > 0:
        return load_lpips(p.train.lpips_weights)
    log.warning("LPIPS is off: tokenizer.train.lpips_weights is not set (no pretrained VGG16 here)")
    return None


def _on_epoch(val_images, recon: Path):
    def on_epoch(epoch: int, tr: Trainer) -> None:
        ev = evaluate(tr.vq, val_images[:VAL_DURING_TRAINING])
        log_metrics({"psnr": ev["psnr"], "l1": ev["l1"],
                     **{f"codebook_used_s{k}": u for k, u in enumerate(ev["codebook_used"])},
                     **{f"codebook_ppl_s{k}": u for k, u in enumerate(ev["codebook_perplexity"])}},
                    step=tr.state.step, prefix="val/")
        grid_path = recon.with_name(f"tokenizer-recon-epoch{epoch:03d}.png")
        save_png(grid_path, recon_grid(tr.vq, val_images))
        log_artifact(grid_path, "reconstructions")
        grid_path.unlink()
        log.info("epoch %d: val PSNR %.2f dB, codebook used (any scale) %.1f%%", epoch, ev["psnr"],
                 100 * ev["codebook_used_any_scale"])
    return on_epoch


def run(p: TokenizerParams, paths: Paths) -> dict:
    manifest = read_images_manifest(paths.images)
    if manifest["image_size"] != p.model.image_size:
        raise ParamsError(f"tokenizer.model.image_size is {p.model.image_size} but "
                          f"{paths.images / IMAGES_MANIFEST} has images of {manifest['image_size']}")
    train_images, _ = load_split(paths.images, "train")
    val_images, _ = load_split(paths.images, "val")
    if p.train.num_threads:
        torch.set_num_threads(p.train.num_threads)
    lpips_model = _lpips(p)
    set_tags({"lpips": f"vgg16 {p.train.lpips_weights}" if lpips_model else "off"})
    trainer = Trainer(p, fingerprint(p, manifest), lpips_model)
    trainer.try_resume(paths.state)
    trainer.fit(train_images, paths.state, on_log=lambda step, m: log_metrics(m, step=step, prefix="train/"),
                on_epoch=_on_epoch(val_images, paths.recon))
    ev = evaluate(trainer.vq, val_images)
    metrics = {"val_psnr": ev["psnr"], "val_l1": ev["l1"], "codebook_used": ev["codebook_used"],
               "codebook_perplexity": ev["codebook_perplexity"],
               "codebook_used_any_scale": ev["codebook_used_any_scale"],
               "steps": trainer.state.step, "images_seen": trainer.state.images_seen,
               "train_seconds": round(trainer.state.seconds, 1), "lpips": lpips_model is not None}
    save_tokenizer(paths.out, trainer.vq,
                   {"data_manifest_sha256": sha256_bytes((paths.images / IMAGES_MANIFEST).read_bytes())})
    save_png(paths.recon, recon_grid(trainer.vq, val_images))
    write_json(paths.metrics, metrics)
    log_artifact(paths.recon)
    log_artifact(paths.out, "model")
    for spent in (paths.state, previous(paths.state)):
        spent.unlink(missing_ok=True)  # crash-recovery state is spent; DVC's cache keeps the result
    return metrics


main = stage_main("train_tokenizer", Paths, load_config, run, summary_keys=("val_psnr", "codebook_used_any_scale",
                                                                              "steps", "train_seconds"), doc=__doc__)

if __name__ == "__main__":
    main()
