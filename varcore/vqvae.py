"""Multi-scale VQ-VAE: VQGAN-style CNN encoder/decoder around :class:`MultiScaleQuantizer`.

Images are ``(B, 3, H, W)`` in [-1, 1]. The encoder downsamples by ``2**(len(ch_mult)-1)``
(16x at paper scale, 4x for 32x32 CPU images) to ``Cvae`` channels; the quantiser's last
scale must equal that latent side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import check_patch_nums, require
from .quant import CodebookUsage, MultiScaleQuantizer


DOWNSAMPLE_PADS = ("symmetric", "bottom_right")


@dataclass(frozen=True)
class VQVAEConfig:
    image_size: int = 32
    in_channels: int = 3
    ch: int = 64                                   # base channel width
    ch_mult: tuple[int, ...] = (1, 2, 2)           # one entry per resolution; downsample = 2**(len-1)
    num_res_blocks: int = 1
    mid_attn: bool = True                          # self-attention in the bottleneck
    level_attn: bool = False                       # also after every res block of the lowest resolution
    downsample_pad: str = "symmetric"              # "symmetric": pad 1 all round; "bottom_right": pad
                                                   # (0, 1, 0, 1) then an unpadded conv (official VQ-VAE)
    dropout: float = 0.0
    Cvae: int = 32                                 # latent / codebook channels
    vocab_size: int = 512
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    num_phi: int | None = None                     # None: one phi per scale
    phi_ratio: float = 0.5
    beta: float = 0.25                             # commitment weight

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        check_patch_nums(self.patch_nums)
        require(len(self.ch_mult) >= 1, "ch_mult", "needs at least one entry")
        require(self.image_size % self.downsample == 0, "image_size",
                f"{self.image_size} is not divisible by the downsampling factor {self.downsample}")
        require(self.patch_nums[-1] == self.latent_size, "patch_nums",
                f"last scale must equal the latent size image_size/{self.downsample} = "
                f"{self.latent_size}, got {self.patch_nums[-1]}")
        require(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        require(self.Cvae >= 1, "Cvae", f"must be >= 1, got {self.Cvae}")
        require(self.num_res_blocks >= 1, "num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        require(self.downsample_pad in DOWNSAMPLE_PADS, "downsample_pad",
                f"must be one of {DOWNSAMPLE_PADS}, got {self.downsample_pad!r}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(32, c), num_channels=c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            _norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.skip(x) + self.net(x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (VQGAN bottleneck)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x_BChw):
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, h, w)
        return x_BChw + self.proj(o)


class Downsample(nn.Conv2d):
    """Stride-2 3x3 conv. ``bottom_right``: zero-pad one row and column at the bottom and right
    only, then convolve unpadded (the official VQ-VAE's downsampling); ``symmetric``: pad 1."""

    def __init__(self, c: int, pad: str):
        super().__init__(c, c, 3, stride=2, padding=0 if pad == "bottom_right" else 1)
        self.pad = pad

    def forward(self, x_BChw):
        if self.pad == "bottom_right":
            x_BChw = F.pad(x_BChw, (0, 1, 0, 1))
        return super().forward(x_BChw)


def _mid(c: int, attn: bool, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResBlock(c, c, dropout), AttnBlock(c) if attn else nn.Identity(),
                         ResBlock(c, c, dropout))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)]
        cin = chs[0]
        for i, c in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, c, cfg.dropout))
                cin = c
                if cfg.level_attn and i == len(chs) - 1:
                    layers.append(AttnBlock(c))
            if i < len(chs) - 1:
                layers.append(Downsample(c, cfg.downsample_pad))
        layers += [_mid(cin, cfg.mid_attn, cfg.dropout), _norm(cin), nn.SiLU(),
                   nn.Conv2d(cin, cfg.Cvae, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, img_B3HW):
        return self.net(img_B3HW)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult][::-1]
        cin = chs[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.Cvae, cin, 3, padding=1), _mid(cin, cfg.mid_attn, cfg.dropout)]
        for i, c in enumerate(chs):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(cin, c, cfg.dropout))
                cin = c
                if cfg.level_attn and i == 0:
                    layers.append(AttnBlock(c))
            if i < len(chs) - 1:
                layers.append(Upsample(c))
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f_BChw):
        return self.net(f_BChw)


@dataclass
class VQVAEOutput:
    img_hat: torch.Tensor          # (B, 3, H, W)
    f: torch.Tensor                # encoder latent (B, Cvae, h, w)
    f_hat: torch.Tensor            # straight-through quantised latent
    commit_loss: torch.Tensor      # scalar, eq. 5's ||f - f_hat|| term
    usage: CodebookUsage = field(repr=False)


class VQVAE(nn.Module):
    """Encoder -> multi-scale residual quantiser -> decoder."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, 3, padding=1)
        self.quantizer = MultiScaleQuantizer(cfg.vocab_size, cfg.Cvae, cfg.patch_nums,
                                             cfg.num_phi, cfg.phi_ratio, cfg.beta)
        self.post_quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, 3, padding=1)
        self.decoder = Decoder(cfg)

    def _check_image(self, img_B3HW: torch.Tensor) -> None:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if img_B3HW.dim() != 4 or tuple(img_B3HW.shape[1:]) != (c, s, s):
            raise ValueError(f"images must be (B, {c}, {s}, {s}) in [-1, 1], got {tuple(img_B3HW.shape)}")

    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        self._check_image(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW))

    def forward(self, img_B3HW: torch.Tensor) -> VQVAEOutput:
        f = self.encode(img_B3HW)
        f_hat, commit, usage = self.quantizer(f)
        return VQVAEOutput(self.f_hat_to_img(f_hat, clamp=False), f, f_hat, commit, usage)

    def f_hat_to_img(self, f_hat_BChw: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Decode a latent; clamping to [-1, 1] is for viewing, not for training (it kills gradients)."""
        img = self.decoder(self.post_quant_conv(f_hat_BChw))
        return img.clamp(-1, 1) if clamp else img

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Image -> K token maps ``(B, pn_k, pn_k)``."""
        return self.quantizer.f_to_idx(self.encode(img_B3HW))

    @torch.no_grad()
    def idx_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K token maps -> ``f_hat`` (Alg. 2) -> image."""
        return self.f_hat_to_img(self.quantizer.idx_to_f_hat(idx_list))
