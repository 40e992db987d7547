"""The VAR transformer: GPT-2 style decoder over next-scale token maps (paper Sec. 3.2, 4).

Input ``[s], r_1 .. r_{K-1}`` (class start token, then each scale's teacher-forcing
embedding), output logits for ``r_1 .. r_K``. Training uses a block-wise causal mask
(a token of scale k sees every token of scales <= k); inference runs one scale at a
time with a KV cache and no mask. Blocks use AdaLN conditioned on the class embedding,
and L2-normalised queries and keys with a learned per-head temperature.

Shape rule (paper Sec. 4): width ``w = 64 d``, heads ``h = d``, drop-path ``0.1 d / 24``.

This file is the math only. How it runs fast (other attention kernels, fused FFN,
``torch.compile``, activation checkpointing) is an execution plan applied to a built
model from outside: :func:`varcore.fast.apply_plan`. Every plan computes this function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, require
from .scales import PAPER_PATCH_NUMS, ScaleLayout

__all__ = ["PAPER_PATCH_NUMS", "VARConfig", "VAR", "KVCache", "AdaLNBlock", "SelfAttention", "FFN"]
RESIDUAL_DTYPES = ("autocast", "float32")


@dataclass(frozen=True)
class VARConfig:
    """Transformer architecture; width, heads and drop-path follow the depth unless set."""

    depth: int = 16
    vocab_size: int = 4096
    Cvae: int = 32
    patch_nums: tuple[int, ...] = PAPER_PATCH_NUMS
    num_classes: int = 1000
    width: int | None = None              # None: 64 * depth
    num_heads: int | None = None          # None: depth
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None   # None: 0.1 * depth / 24
    shared_aln: bool = False              # one AdaLN projection shared by all blocks
    cond_drop_rate: float = 0.1           # class dropout for classifier-free guidance
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    # the residual stream between blocks in training under autocast: "autocast" keeps it in the
    # autocast dtype (bf16), as the official code trains; "float32" keeps it in float32 (more
    # precise, more memory traffic). Without autocast it is float32 either way; sampling keeps
    # float32, as the official code samples.
    residual_dtype: str = "autocast"
    # the order tokens are predicted in: scale by scale here; "raster" is the next-token baseline
    # (varcore.ar.ARConfig), whose blocks are these but whose attention is token-causal
    token_order: ClassVar[str] = "next_scale"

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        require(isinstance(self.depth, int) and self.depth >= 1, "depth", f"must be an int >= 1, got {self.depth}")
        ScaleLayout(self.patch_nums)   # validates the schedule
        require(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        require(self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        require(self.Cvae >= 1, "Cvae", f"must be >= 1, got {self.Cvae}")
        require(self.C % self.H == 0, "width", f"width {self.C} is not divisible by num_heads {self.H}")
        require(0.0 <= self.cond_drop_rate < 1.0, "cond_drop_rate", f"must be in [0, 1), got {self.cond_drop_rate}")
        require(self.residual_dtype in RESIDUAL_DTYPES, "residual_dtype",
                f"must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}")

    @property
    def C(self) -> int:
        return 64 * self.depth if self.width is None else self.width

    @property
    def H(self) -> int:
        return self.depth if self.num_heads is None else self.num_heads

    @property
    def dpr(self) -> float:
        return 0.1 * self.depth / 24 if self.drop_path_rate is None else self.drop_path_rate

    @property
    def layout(self) -> ScaleLayout:
        return ScaleLayout(self.patch_nums)

    @property
    def L(self) -> int:
        """Tokens in one image: sum of pn^2 (680 at paper scale)."""
        return self.layout.L

    @property
    def first_l(self) -> int:
        """Positions fed by the class start token: the first scale's tokens."""
        return self.layout.first_l

    def attention_pairs(self) -> int:
        """Query-key pairs the attention mask allows (block-causal: sum_k n_k S_k)."""
        return self.layout.attention_pairs()

    def check_tokenizer(self, vocab_size: int, Cvae: int, patch_nums: tuple[int, ...]) -> None:
        """Raise :class:`ConfigError` naming the field where the tokenizer does not fit."""
        if vocab_size != self.vocab_size:
            raise ConfigError("vocab_size", f"transformer has {self.vocab_size}, tokenizer has {vocab_size}")
        if Cvae != self.Cvae:
            raise ConfigError("Cvae", f"transformer has {self.Cvae}, tokenizer has {Cvae}")
        if tuple(patch_nums) != self.patch_nums:
            raise ConfigError("patch_nums", f"transformer has {list(self.patch_nums)}, tokenizer has {list(patch_nums)}")


def modulate(x_BLC: torch.Tensor, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x * (1 + scale) + shift``."""
    return x_BLC.mul(scale_B1C.add(1)).add_(shift_B1C)


# ---- attention ---------------------------------------------------------------------------------
class BlockCausalAttention(nn.Module):
    """``softmax(q k^T scale) v`` over the whole sequence under the block-causal mask (dense SDPA).
    The execution plan may swap it for a kernel that computes the same thing faster."""

    def __init__(self, patch_nums: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mask_LL", ScaleLayout(patch_nums).block_causal_mask(), persistent=False)

    def forward(self, q_BHLc, k_BHLc, v_BHLc, dropout_p: float, scale: float | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=self.mask_LL, dropout_p=dropout_p,
                                              scale=scale)


class KVCache:
    """Keys/values of one attention layer, filled scale by scale at inference.

    Storage for all ``L`` tokens is allocated at the first append, in the dtype and device
    of the keys (bf16 under autocast), so later appends copy in place. It is laid out
    ``(B, L, H, hd)`` like the projection that makes the keys, so an append copies whole
    rows and attention reads ``(B, H, L, hd)`` views of it.
    """

    def __init__(self, L: int):
        self.L, self.len = L, 0
        self.k_BLHc: torch.Tensor | None = None
        self.v_BLHc: torch.Tensor | None = None

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one scale's keys/values; return all keys/values so far as ``(B, H, len, hd)`` views."""
        if self.k_BLHc is None:
            B, H, _, c = k_BHlc.shape
            self.allocate(B, H, c, k_BHlc.dtype, k_BHlc.device)
        end = self.len + k_BHlc.shape[2]
        if end > self.L:
            raise ValueError(f"KV cache holds {self.L} tokens, appending would reach {end}")
        self.write(self.k_BLHc[:, self.len:end], k_BHlc.transpose(1, 2))
        self.write(self.v_BLHc[:, self.len:end], v_BHlc.transpose(1, 2))
        self.len = end
        return self.k_BLHc[:, :end].transpose(1, 2), self.v_BLHc[:, :end].transpose(1, 2)

    def allocate(self, B: int, H: int, c: int, dtype: torch.dtype, device: torch.device) -> None:
        """Storage for all ``L`` tokens, ``(B, L, H, c)`` keys and values (the first append calls it)."""
        self.k_BLHc = torch.empty(B, self.L, H, c, dtype=dtype, device=device)
        self.v_BLHc = torch.empty_like(self.k_BLHc)

    @staticmethod
    def write(dst_BlHc: torch.Tensor, src_BlHc: torch.Tensor) -> None:
        """Copy one scale's keys or values into their slots (a fast path may move them otherwise)."""
        dst_BlHc.copy_(src_BlHc)

    def attend(self, q_BHlc, k_BHlc, v_BHlc, scale: float | None) -> torch.Tensor:
        """Append this scale's keys/values, then attend over every cached token: no mask, since
        the cache holds exactly the earlier scales and this one, all visible to it."""
        k_BHLc, v_BHLc = self.append(k_BHlc, v_BHlc)
        return F.scaled_dot_product_attention(q_BHlc, k_BHLc, v_BHLc, scale=scale)

    def reset(self) -> None:
        """Start a new image; the storage is kept and overwritten."""
        self.len = 0


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k and a learned per-head temperature."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, H = cfg.C, cfg.H
        self.H, self.hd, self.l2_norm = H, C // H, cfg.attn_l2_norm
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        if self.l2_norm:  # cosine attention: temperature starts at 4, capped at 100
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
        self.scale = 1.0 if self.l2_norm else None   # None: SDPA's 1/sqrt(hd)
        self.core = BlockCausalAttention(cfg.patch_nums)
        self.proj = nn.Linear(C, C)
        self.attn_drop, self.proj_drop = cfg.attn_drop_rate, nn.Dropout(cfg.drop_rate)

    def temperature_H(self) -> torch.Tensor:
        """The per-head temperature of the normalised queries, ``exp(scale_mul)`` capped at 100."""
        return self.scale_mul_1H11.clamp(max=math.log(100.0)).exp().view(self.H)

    def qkv_heads(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = x_BLC.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        # Normalise in the (B, L, H, hd) layout the projection writes and return (B, H, L, hd)
        # views of it: the attention kernels take these strides as they are, so no transposing
        # copies of q, k, v or of their gradients are made.
        q, k, v = F.linear(x_BLC, self.qkv.weight, bias).view(B, L, 3, self.H, self.hd).unbind(2)
        if self.l2_norm:
            scale_11H1 = self.temperature_H().view(1, 1, self.H, 1)
            q = F.normalize(q, dim=-1).mul(scale_11H1).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, H, L, hd)

    @staticmethod
    def merge_heads(o_BHLc: torch.Tensor) -> torch.Tensor:
        """The heads side by side, ``(B, L, H * c)``: the output projection's input."""
        B, H, L, c = o_BHLc.shape
        return o_BHLc.transpose(1, 2).reshape(B, L, H * c)

    def out(self, o_BHLc: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.merge_heads(o_BHLc)))

    def heads(self, q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor,
              kv_cache: KVCache | None = None) -> torch.Tensor:
        """Attention over :meth:`qkv_heads`' heads, before the output projection: the whole
        sequence under the block-causal mask, or (``kv_cache``) one scale at inference."""
        if kv_cache is None:
            return self.core(q_BHLc, k_BHLc, v_BHLc, self.attn_drop if self.training else 0.0, self.scale)
        return kv_cache.attend(q_BHLc, k_BHLc, v_BHLc, self.scale)

    def attend(self, q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor,
               kv_cache: KVCache | None = None) -> torch.Tensor:
        """:meth:`heads` and the output projection."""
        return self.out(self.heads(q_BHLc, k_BHLc, v_BHLc, kv_cache))

    def forward(self, x_BLC: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Whole sequence under the block-causal mask, or (``kv_cache``) one scale at inference."""
        return self.attend(*self.qkv_heads(x_BLC), kv_cache)


class FFN(nn.Module):
    """``fc2(gelu(fc1 x))`` with the tanh GELU."""

    def __init__(self, C: int, hidden: int, drop: float):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(C, hidden), nn.Linear(hidden, C), nn.Dropout(drop)

    def hidden(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """``gelu(fc1 x)``: the hidden activations, ``(B, L, hidden)``."""
        return F.gelu(self.fc1(x_BLC), approximate="tanh")

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.hidden(x_BLC)))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p``.

    ``forward`` reads the rate from a tensor and ``active`` is the same for every block of a
    model (a block with ``p = 0`` keeps all samples), so that one compiled graph serves every
    block instead of one specialised on each block's rate.
    """

    def __init__(self, p: float, active: bool | None = None):
        super().__init__()
        self.p, self.active = p, p > 0 if active is None else active
        self.register_buffer("keep_p", torch.tensor(1.0 - p), persistent=False)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which samples keep their branch, ``(B, 1, ..)`` bool; ``None`` when all do (inactive, eval)."""
        if not self.active or not self.training:
            return None
        return torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) < self.keep_p

    @staticmethod
    def apply_mask(x: torch.Tensor, keep: torch.Tensor | None, keep_p: torch.Tensor) -> torch.Tensor:
        """Zero the dropped samples and rescale the kept ones by ``1 / keep_p`` (``keep``: a
        :meth:`keep_mask`; ``None`` keeps ``x`` as it is)."""
        return x if keep is None else x * keep / keep_p

    def forward(self, x):
        return self.apply_mask(x, self.keep_mask(x), self.keep_p)


# ---- blocks ------------------------------------------------------------------------------------
class AdaLNBlock(nn.Module):
    """Transformer block whose LayerNorm scale/shift and residual gates come from the class."""

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        C = self.C = cfg.C
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio), cfg.drop_rate)
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path, active=cfg.dpr > 0)
        # per-block AdaLN: cond (B, C) -> 6 modulation vectors. With shared_aln the model
        # projects once for all blocks and each block adds its own learned offset.
        if cfg.shared_aln:
            self.ada_lin = None
            self.ada_offset_116C = nn.Parameter(torch.randn(1, 1, 6, C) / math.sqrt(C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six ``(B, 1, C)`` vectors: gamma1, gamma2, scale1, scale2, shift1, shift2
        (``cond_BD``: the class embedding ``(B, C)``, or the shared projection ``(B, 6C)``)."""
        if self.ada_lin is None:
            mod_B16C = cond_BD.view(-1, 1, 6, self.C) + self.ada_offset_116C
        else:
            mod_B16C = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        return mod_B16C.unbind(2)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BD)
        x_BLC = x_BLC + self.drop_path(self.attn(modulate(self.ln(x_BLC), scale1, shift1), kv_cache).mul_(gamma1))
        x_BLC = x_BLC + self.drop_path(self.ffn(modulate(self.ln(x_BLC), scale2, shift2)).mul_(gamma2))
        return x_BLC


class AdaLNHead(nn.Module):
    """Final AdaLN then the linear head to V logits."""

    def __init__(self, C: int, V: int, eps: float):
        super().__init__()
        self.ln = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, V)

    def forward(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BC).view(-1, 1, 2, x_BLC.shape[-1]).unbind(2)
        return self.head(modulate(self.ln(x_BLC), scale, shift))


# ---- the model ---------------------------------------------------------------------------------
class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, K = cfg.C, len(cfg.patch_nums)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class of CFG
        self.pos_start = nn.Parameter(torch.empty(1, cfg.first_l, C))
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.pos_1LC = nn.Parameter(torch.empty(1, cfg.L, C))
        self.lvl_embed = nn.Embedding(K, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if cfg.shared_aln else None
        self.blocks = nn.ModuleList(
            AdaLNBlock(cfg, cfg.dpr * i / max(cfg.depth - 1, 1)) for i in range(cfg.depth))  # linear in depth
        self.head = AdaLNHead(C, cfg.vocab_size, cfg.norm_eps)
        self.register_buffer("lvl_L", cfg.layout.scale_ids(), persistent=False)
        self.init_weights()

    def dense_attention(self) -> nn.Module:
        """The plain attention core of this model's mask (what an execution plan falls back to)."""
        return BlockCausalAttention(self.cfg.patch_nums)

    @staticmethod
    def teacher_inputs(quantizer, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input ``(B, L - first_l, Cvae)`` from ground-truth tokens ``(B, L)``:
        each scale's input is the partial ``f_hat`` of the scales before it (``quantizer``: the
        tokenizer's :class:`varcore.quant.MultiScaleQuantizer`)."""
        with torch.no_grad():
            return quantizer.idx_to_var_input(quantizer.split_tokens(tokens_BL))

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02):
        """Truncated-normal init with std sqrt(1/(3C)); output projections scaled by 1/sqrt(2 depth)
        (GPT-2); AdaLN gates start near zero so every block starts close to the identity."""
        C, std = self.cfg.C, math.sqrt(1 / self.cfg.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.head.weight.mul_(init_head)
        self.head.ada_lin[-1].weight.mul_(init_adaln)
        ada_lins = [self.shared_ada_lin] if self.shared_ada_lin is not None else [b.ada_lin for b in self.blocks]
        for ada in ada_lins:
            w = ada[-1].weight  # rows: gamma1, gamma2, scale1, scale2, shift1, shift2
            w[:2 * C].mul_(init_adaln_gamma)
            w[2 * C:].mul_(init_adaln)
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * self.cfg.depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * self.cfg.depth))

    # ---- shared pieces of training and inference -------------------------------------------
    def cond(self, label_B: torch.Tensor) -> torch.Tensor:
        """Class embedding ``(B, C)``; label ``num_classes`` is the unconditional (null) class."""
        return self.class_emb(label_B)

    def block_cond(self, cond_BC: torch.Tensor) -> torch.Tensor:
        """What the blocks' AdaLN reads: the class embedding, or its shared projection ``(B, 6C)``."""
        return cond_BC if self.shared_ada_lin is None else self.shared_ada_lin(cond_BC)

    def sos(self, cond_BC: torch.Tensor) -> torch.Tensor:
        """Start tokens of scale 1: class embedding + start position, ``(B, first_l, C)``."""
        B, fl = cond_BC.shape[0], self.cfg.first_l
        return cond_BC.unsqueeze(1).expand(B, fl, -1) + self.pos_start.expand(B, fl, -1)

    def scale_pos(self, start: int, end: int) -> torch.Tensor:
        """Learned absolute position + level embedding of tokens ``[start, end)``: ``(1, l, C)``."""
        return self.pos_1LC[:, start:end] + self.lvl_embed(self.lvl_L[start:end]).unsqueeze(0)

    def drop_class(self, label_B: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability ``cond_drop_rate`` (training only)."""
        if not self.training or self.cfg.cond_drop_rate == 0:
            return label_B
        drop = torch.rand(label_B.shape, device=label_B.device) < self.cfg.cond_drop_rate
        return torch.where(drop, torch.full_like(label_B, self.cfg.num_classes), label_B)

    def residual(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """The residual stream's dtype for the blocks (``cfg.residual_dtype``): under autocast
        with "autocast", the autocast dtype, as the official code trains (its blocks then add
        bf16 branches to a bf16 stream); float32 otherwise."""
        dev = x_BLC.device.type
        if self.cfg.residual_dtype == "autocast" and torch.is_autocast_enabled(dev):
            return x_BLC.to(torch.get_autocast_dtype(dev))
        return x_BLC

    # ---- training: all scales at once under the block-causal mask ----------------------------
    def forward(self, label_B: torch.Tensor, x_BlCvae: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, L, V)`` from labels and ``(B, L - first_l, Cvae)`` inputs."""
        x_BLC, cond_BC, cond_BD = self.embed(label_B, x_BlCvae)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond_BD)
        return self.head(x_BLC, cond_BC)

    def embed(self, label_B: torch.Tensor, x_BlCvae: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The blocks' input stream ``(B, L, C)``, the class embedding ``(B, C)`` (class dropout
        applied in training) and what the blocks' AdaLN reads, from the training inputs."""
        cfg = self.cfg
        if x_BlCvae.shape[1:] != (cfg.L - cfg.first_l, cfg.Cvae):
            raise ValueError(f"teacher-forcing input must be (B, {cfg.L - cfg.first_l}, {cfg.Cvae}), "
                             f"got {tuple(x_BlCvae.shape)}")
        cond_BC = self.cond(self.drop_class(label_B))
        x_BLC = torch.cat([self.sos(cond_BC), self.word_embed(x_BlCvae.to(self.word_embed.weight.dtype))], dim=1)
        return self.residual(x_BLC + self.scale_pos(0, cfg.L)), cond_BC, self.block_cond(cond_BC)

    # ---- inference: one scale at a time with a KV cache ----------------------------------------
    def new_kv_caches(self) -> list[KVCache]:
        return [KVCache(self.cfg.L) for _ in self.blocks]

    def forward_scale(self, x_BlC: torch.Tensor, cond_BC: torch.Tensor, start: int,
                      kv_caches: list[KVCache]) -> torch.Tensor:
        """Logits of one scale's tokens ``[start, start + l)``; ``x_BlC`` is already embedded
        (``sos`` for scale 1, ``word_embed`` of the previous f_hat otherwise)."""
        x_BlC = x_BlC + self.scale_pos(start, start + x_BlC.shape[1])
        cond_BD = self.block_cond(cond_BC)
        for block, cache in zip(self.blocks, kv_caches):
            x_BlC = block(x_BlC, cond_BD, cache)
        return self.head(x_BlC, cond_BC)
