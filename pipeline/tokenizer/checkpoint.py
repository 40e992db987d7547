"""The tokenizer file ``models/tokenizer.pt``: VQVAEConfig fields, weights and metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from varcore.vqvae import VQVAE, VQVAEConfig

from ..checkpoints import config_from, load_weights, read_checkpoint
from ..files import save_torch

TOKENIZER_FORMAT = "varscale.tokenizer.v1"


def save_tokenizer(path: str | Path, vqvae: VQVAE, extra: dict[str, Any] | None = None) -> None:
    save_torch(path, {"format": TOKENIZER_FORMAT, "config": dataclasses.asdict(vqvae.cfg),
                      "state_dict": vqvae.state_dict(), **(extra or {})})


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
    ckpt = read_checkpoint(path, TOKENIZER_FORMAT, "tokenizer", "train_tokenizer", map_location)
    vqvae = VQVAE(config_from(path, VQVAEConfig, ckpt["config"]))
    load_weights(path, vqvae, ckpt["state_dict"])
    return vqvae.eval()
