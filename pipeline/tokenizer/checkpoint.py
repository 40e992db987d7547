"""The tokenizer file ``models/tokenizer.pt``: VQVAEConfig fields, weights and metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from varcore.vqvae import VQVAE, VQVAEConfig

from ..checkpoints import config_from, load_weights, read_checkpoint, write_checkpoint

TOKENIZER_FORMAT = "varscale.tokenizer.v1"


def save_tokenizer(path: str | Path, vqvae: VQVAE, extra: dict[str, Any] | None = None) -> None:
    write_checkpoint(path, TOKENIZER_FORMAT, vqvae.cfg, vqvae.state_dict(), extra)


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
    ckpt = read_checkpoint(path, TOKENIZER_FORMAT, "tokenizer", "train_tokenizer", map_location)
    vqvae = VQVAE(config_from(path, VQVAEConfig, ckpt["config"]))
    load_weights(path, vqvae, ckpt["state_dict"])
    return vqvae.eval()
