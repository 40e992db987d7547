"""Training of the multi-scale VQ-VAE with the paper's compound loss (eq. 5), resumable.

loss = ||im - im_hat|| (L1 or L2) + commitment ||f - f_hat|| + lambda_P LPIPS
       + lambda_G * w_adapt * GAN (PatchGAN, hinge, joins after ``disc_start_step`` steps)

Training state (models, optimisers, RNG, position in the epoch) is checkpointed every
``checkpoint_every`` steps and at each epoch end; a killed run resumes from there, batch for
batch, and ends with the weights an uninterrupted run would have had.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from varcore.disc import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from varcore.vqvae import VQVAE

from ..errors import InputError
from ..files import save_torch, sha256_bytes
from ..images import grid, to_float_images, to_uint8_images
from ..params import resolve_device
from .config import TokenizerParams

log = logging.getLogger(__name__)
STATE_FORMAT = "varscale.tokenizer-state.v1"


def psnr(img_hat: torch.Tensor, img: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(img_hat.clamp(-1, 1), img).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    epoch: int = 0          # current epoch
    batch: int = 0          # next batch index within the epoch
    step: int = 0           # optimiser steps taken
    images_seen: int = 0
    seconds: float = 0.0    # training wall time before this process


def _usage_from_counts(counts_KV: torch.Tensor) -> tuple[list[float], list[float]]:
    p = counts_KV / counts_KV.sum(1, keepdim=True).clamp_min(1)
    used = (counts_KV > 0).float().mean(1).tolist()
    ppl = torch.exp(-(p * p.clamp_min(1e-12).log()).sum(1)).tolist()
    return used, ppl


@torch.no_grad()
def evaluate(vq: VQVAE, images: torch.Tensor, batch_size: int = 256) -> dict[str, float | list[float]]:
    """Token round trip (image -> tokens -> image) on held-out images: PSNR, L1, per-scale usage."""
    vq.eval()
    K, V = vq.quantizer.num_scales, vq.cfg.vocab_size
    device = vq.quantizer.embedding.weight.device
    counts = torch.zeros(K, V, device=device)
    se, l1, n = 0.0, 0.0, 0
    for i in range(0, len(images), batch_size):
        x = to_float_images(images[i:i + batch_size]).to(device)
        idx = vq.img_to_idx(x)
        rec = vq.idx_to_img(idx)
        for k, r in enumerate(idx):
            counts[k] += torch.bincount(r.flatten(), minlength=V).float()
        se += F.mse_loss(rec, x, reduction="sum").item()
        l1 += F.l1_loss(rec, x, reduction="sum").item()
        n += x.numel()
    used, ppl = _usage_from_counts(counts.cpu())
    return {"psnr": 10 * math.log10(4.0 / max(se / n, 1e-12)), "l1": l1 / n,
            "codebook_used": used, "codebook_perplexity": ppl,
            "codebook_used_any_scale": float((counts.sum(0) > 0).float().mean())}


def recon_grid(vq: VQVAE, images: np.ndarray, n: int = 16) -> np.ndarray:
    """Originals (top row) over their token reconstructions (bottom row): uint8 ``(2S, nS, 3)``."""
    x = to_float_images(images[:n]).to(vq.quantizer.embedding.weight.device)
    with torch.no_grad():
        rec = vq.idx_to_img(vq.img_to_idx(x))
    return grid([to_uint8_images(x), to_uint8_images(rec)])


class Trainer:
    """Owns the models, optimisers and resumable state of one tokenizer training run."""

    def __init__(self, p: TokenizerParams, fingerprint: str, lpips_model: torch.nn.Module | None = None):
        self.p, self.tp, self.fingerprint = p, p.train, fingerprint
        self.device = resolve_device(self.tp.device)
        torch.manual_seed(self.tp.seed)
        self.vq = VQVAE(p.model).to(self.device)
        self.disc = (PatchDiscriminator(p.model.in_channels, self.tp.disc_ch).to(self.device)
                     if self.tp.lambda_g > 0 else None)
        self.lpips = lpips_model.to(self.device) if lpips_model is not None else None
        betas = (0.5, 0.9)  # VQGAN's GAN-friendly Adam betas
        self.opt = torch.optim.AdamW(self.vq.parameters(), lr=self.tp.lr, betas=betas,
                                     weight_decay=self.tp.weight_decay)
        self.opt_d = (torch.optim.AdamW(self.disc.parameters(), lr=self.tp.lr, betas=betas,
                                        weight_decay=self.tp.weight_decay) if self.disc else None)
        self.state = TrainState()

    # ---- checkpointing -------------------------------------------------------------------
    def save_state(self, path: Path, seconds: float) -> None:
        """Write the state atomically; the one before it stays beside it (``<name>.prev``) in case
        the new one is found corrupt."""
        blob = {"format": STATE_FORMAT, "fingerprint": self.fingerprint,
                "state": dataclasses.asdict(dataclasses.replace(self.state, seconds=seconds)),
                "vq": self.vq.state_dict(), "opt": self.opt.state_dict(),
                "disc": self.disc.state_dict() if self.disc else None,
                "opt_d": self.opt_d.state_dict() if self.opt_d else None,
                "rng": torch.get_rng_state()}
        if path.is_file():
            os.replace(path, previous(path))
        save_torch(path, blob)

    def try_resume(self, path: Path) -> bool:
        """Continue from the state at ``path``, or from the one before it when ``path`` is unreadable,
        if it is this run's (same fingerprint)."""
        for candidate in (path, previous(path)):
            blob = self._read_state(candidate)
            if blob is not None:
                self._load(blob)
                log.info("resuming tokenizer training from %s at epoch %d batch %d (step %d)", candidate,
                         self.state.epoch, self.state.batch, self.state.step)
                return True
        return False

    def _read_state(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            log.warning("skipping unreadable tokenizer state %s: %s", path, str(e).splitlines()[0])
            return None
        if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT or blob.get("fingerprint") != self.fingerprint:
            log.warning("ignoring tokenizer state %s: it belongs to other params or data", path)
            return None
        return blob

    def _load(self, blob: dict[str, Any]) -> None:
        self.vq.load_state_dict(blob["vq"])
        self.opt.load_state_dict(blob["opt"])
        if self.disc:
            self.disc.load_state_dict(blob["disc"])
            self.opt_d.load_state_dict(blob["opt_d"])
        torch.set_rng_state(blob["rng"].cpu())
        self.state = TrainState(**blob["state"])

    # ---- one optimisation step -----------------------------------------------------------
    def step(self, x: torch.Tensor, gan_on: bool) -> dict[str, float]:
        self.vq.train()
        x = x.to(self.device, non_blocking=True)
        out = self.vq(x)
        rec = F.l1_loss(out.img_hat, x) if self.tp.recon_loss == "l1" else F.mse_loss(out.img_hat, x)
        nll = rec
        m = {"rec": rec.item(), "commit": out.commit_loss.item()}
        if self.lpips is not None and self.tp.lambda_p > 0:
            p_loss = self.lpips(out.img_hat, x).mean()
            nll = nll + self.tp.lambda_p * p_loss
            m["lpips"] = p_loss.item()
        loss = nll + out.commit_loss
        if gan_on and self.disc is not None:
            self.disc.requires_grad_(False)
            g_loss = hinge_g_loss(self.disc(out.img_hat))
            w = adaptive_gan_weight(nll, g_loss, self.vq.decoder.net[-1].weight) * self.tp.lambda_g
            loss = loss + w * g_loss
            m.update(gan_g=g_loss.item(), gan_weight=w.item())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if gan_on and self.disc is not None:
            self.disc.requires_grad_(True)
            d_loss = hinge_d_loss(self.disc(x), self.disc(out.img_hat.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            m["gan_d"] = d_loss.item()
        m["loss"] = loss.item()
        m["psnr"] = psnr(out.img_hat.detach(), x)
        for k, (u, pp) in enumerate(zip(out.usage.used_fraction, out.usage.perplexity)):
            m[f"codebook_used_s{k}"], m[f"codebook_ppl_s{k}"] = u, pp
        return m

    # ---- the loop ------------------------------------------------------------------------
    def total_steps(self, num_images: int) -> int:
        tp = self.tp
        steps_per_epoch = num_images // tp.batch_size
        if steps_per_epoch == 0:
            raise InputError(f"tokenizer.train.batch_size {tp.batch_size} exceeds the {num_images} training images")
        full = tp.epochs * steps_per_epoch
        return full if tp.max_steps is None else min(tp.max_steps, full)

    def fit(self, train_images: np.ndarray, state_path: Path,
            on_log: Callable[[int, dict], None] | None = None,
            on_epoch: Callable[[int, "Trainer"], None] | None = None,
            on_step: Callable[[int], None] | None = None) -> None:
        """Train to the end from the current state; ``on_log`` every ``log_every`` steps,
        ``on_epoch`` after each epoch, ``on_step`` after every step."""
        tp, st = self.tp, self.state
        steps_per_epoch, total = len(train_images) // tp.batch_size, self.total_steps(len(train_images))
        clock = _Clock(st.seconds)
        bar = tqdm(total=total, initial=st.step, desc="tokenizer", unit="step", mininterval=2)
        while st.epoch < tp.epochs and st.step < total:
            order = epoch_order(len(train_images), tp.seed, st.epoch)
            while st.batch < steps_per_epoch and st.step < total:
                sel = order[st.batch * tp.batch_size:(st.batch + 1) * tp.batch_size].numpy()
                m = self.step(to_float_images(train_images[np.sort(sel)]), st.step >= tp.disc_start_step)
                st.batch, st.step, st.images_seen = st.batch + 1, st.step + 1, st.images_seen + len(sel)
                bar.update(1)
                if on_log and (st.step % tp.log_every == 0 or st.step == total):
                    on_log(st.step, m)
                if st.step % tp.checkpoint_every == 0:
                    self.save_state(state_path, clock.seconds())
                if on_step:
                    on_step(st.step)
            if st.batch >= steps_per_epoch:
                st.epoch, st.batch = st.epoch + 1, 0
                self.save_state(state_path, clock.seconds())
                if on_epoch:
                    on_epoch(st.epoch, self)
        bar.close()
        st.seconds = clock.seconds()


def previous(path: Path) -> Path:
    """Where the state before the latest one is kept."""
    return path.with_name(path.name + ".prev")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order depends only on (seed, epoch), so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


class _Clock:
    """Training seconds: those of earlier processes plus this one's."""

    def __init__(self, before: float):
        self.before, self.t0 = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0


def fingerprint(p: TokenizerParams, data_manifest: dict) -> str:
    """Identifies a run: params, the exact data and the training code; resume state of any
    other run is ignored rather than silently continued."""
    import varcore.disc
    import varcore.fast.bicubic
    import varcore.quant
    import varcore.vqvae
    code = b"".join(Path(m.__file__).read_bytes()
                    for m in (varcore.vqvae, varcore.quant, varcore.disc, varcore.fast.bicubic))
    code += Path(__file__).read_bytes()
    blob = repr((dataclasses.asdict(p), data_manifest["splits"]["train"]["sha256"])).encode() + code
    return sha256_bytes(blob)[:24]


