"""Typed params of the tokenizer: sections ``tokenizer`` (model + training) and ``encode_tokens``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from varcore.errors import require
from varcore.vqvae import VQVAEConfig

from ..params import PARAMS_FILE, check_device, load


@dataclass(frozen=True)
class TokenizerTrainParams:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    recon_loss: Literal["l1", "l2"] = "l1"
    lambda_p: float = 1.0                  # LPIPS weight (active only with lpips_weights)
    lambda_g: float = 0.1                  # GAN weight (times the adaptive weight)
    disc_start_step: int = 1000            # discriminator joins after this many steps
    disc_ch: int = 32
    lpips_weights: str | None = None       # local path to VGG16 weights (torchvision state dict)
    log_every: int = 50
    max_steps: int | None = None           # stop early
    seed: int = 0
    num_threads: int = 0                   # torch threads; 0 = torch default
    device: str = "auto"                   # auto (cuda if available) | cpu | cuda | cuda:N
    checkpoint_every: int = 200            # resumable state every this many steps (and at epoch ends)

    def __post_init__(self):
        check_device(self.device)
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.lambda_p >= 0, "lambda_p", f"must be >= 0, got {self.lambda_p}")
        require(self.lambda_g >= 0, "lambda_g", f"must be >= 0, got {self.lambda_g}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps",
                f"must be >= 1 or null, got {self.max_steps}")


@dataclass(frozen=True)
class TokenizerParams:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TokenizerTrainParams = field(default_factory=TokenizerTrainParams)


@dataclass(frozen=True)
class EncodeParams:
    """Section ``encode_tokens``: how the images are encoded into token shards."""

    batch_size: int = 256
    shard_size: int = 8192
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")


def load_tokenizer_params(params: dict[str, Any], file: str | Path = PARAMS_FILE) -> TokenizerParams:
    return load(TokenizerParams, params, "tokenizer", file)


def load_tokenizer_model(params: dict[str, Any], file: str | Path = PARAMS_FILE) -> VQVAEConfig:
    return load(VQVAEConfig, params, "tokenizer.model", file)
