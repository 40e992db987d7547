"""Parameter and FLOP accounting for the scaling-law fit (paper eq. 8) and MFU.

``N(d) = 18 d w^2 = 73728 d^3`` counts the weight matrices of the blocks: attention
(qkv + proj, 4 w^2), FFN (8 w^2 at mlp ratio 4) and AdaLN (6 w^2). Embeddings, the head,
biases and the learned attention temperatures are left out, as in the paper.

Training compute counts a multiply-add as 2 FLOPs and the backward pass as twice the
forward (``C = 3 x forward``). Attention is counted for the pairs the block-causal mask
allows (token at scale k attends to the S_k tokens of scales <= k): that is the work a
kernel aware of the mask must do, and what MFU is quoted against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .scales import ScaleLayout
from .var import VAR, VARConfig


def paper_N(depth: int) -> int:
    """Eq. 8: main parameter count 73728 d^3 for the w = 64 d rule."""
    return 73728 * depth ** 3


def main_N(cfg: VARConfig) -> int:
    """18 d w^2 for a config (general in width and mlp ratio; shared AdaLN counted once)."""
    w, d = cfg.C, cfg.depth
    per_block = 4 * w * w + 2 * round(w * cfg.mlp_ratio) * w
    ada = 6 * w * w * (1 if cfg.shared_aln else d)
    return d * per_block + ada


def count_main_params(model: VAR) -> int:
    """Count, in a built model, the weight matrices that eq. 8 counts."""
    n = 0
    for b in model.blocks:
        n += b.attn.qkv.weight.numel() + b.attn.proj.weight.numel()
        n += b.ffn.fc1.weight.numel() + b.ffn.fc2.weight.numel()
        if b.ada_lin is not None:
            n += b.ada_lin[-1].weight.numel()
    if model.shared_ada_lin is not None:
        n += model.shared_ada_lin[-1].weight.numel()
    return n


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_pairs(patch_nums: tuple[int, ...]) -> int:
    """Query-key pairs the block-causal mask allows: sum_k n_k S_k."""
    return ScaleLayout(patch_nums).attention_pairs()


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one image (sequence of L tokens), by part."""

    linear: float      # qkv, proj, FFN: per token
    attention: float   # QK^T and AV over allowed pairs
    adaln: float       # per image: block and head AdaLN projections
    embed_head: float  # word embedding and the V-way head
    L: int

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.adaln + self.embed_head

    @property
    def train_per_image(self) -> float:
        return 3.0 * self.forward

    @property
    def train_per_token(self) -> float:
        return self.train_per_image / self.L


def var_flops(cfg: VARConfig, dense_attention: bool = False) -> FlopCount:
    """Forward FLOPs of one image. ``dense_attention`` counts all L^2 pairs instead (what a
    dense masked kernel computes, for comparison)."""
    w, d, L, V = cfg.C, cfg.depth, cfg.L, cfg.vocab_size
    hidden = round(w * cfg.mlp_ratio)
    linear = 2.0 * L * d * (4 * w * w + 2 * hidden * w)
    pairs = L * L if dense_attention else cfg.attention_pairs()
    attention = 2.0 * 2.0 * w * pairs * d           # QK^T and AV, each 2 w per pair
    ada_blocks = 6 * w * w * (1 if cfg.shared_aln else d)
    adaln = 2.0 * (ada_blocks + 2 * w * w)
    embed_head = 2.0 * ((L - cfg.first_l) * cfg.Cvae * w + L * w * V)
    return FlopCount(linear, attention, adaln, embed_head, L)
