"""The VAR transformer: GPT-2 style decoder over next-scale token maps (paper Sec. 3.2, 4).

Input ``[s], r_1 .. r_{K-1}`` (class start token, then each scale's teacher-forcing
embedding), output logits for ``r_1 .. r_K``. Training uses a block-wise causal mask
(a token of scale k sees every token of scales <= k); inference runs one scale at a
time with a KV cache and no mask. Blocks use AdaLN conditioned on the class embedding,
and L2-normalised queries and keys with a learned per-head temperature.

Shape rule (paper Sec. 4): width ``w = 64 d``, heads ``h = d``, drop-path ``0.1 d / 24``.

Speed paths (all compute the same function as the dense-mask path): the block-causal
mask can be applied as a FlexAttention block mask (tiles a scale never sees are skipped)
or as one unmasked attention call per scale (queries of scale k against the keys of
scales <= k, which the flash kernels run); blocks can be compiled with ``torch.compile``
(one graph shared by all blocks) and recomputed in backward (activation checkpointing).
``attn_impl="auto"`` and ``compile_blocks=None`` pick the fast path on CUDA and the
plain dense-mask eager path elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError, check_patch_nums, require
from .fa4 import fa4_attention
from .fused_mlp import fused_usable, gelu_mlp

from . import flex
from .flex import flex_block_mask, scale_ends, scale_ids

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - older torch
    flex_attention = None

PAPER_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
ATTN_IMPLS = ("auto", "dense", "flex", "per_scale")
MLP_IMPLS = ("auto", "plain", "fused")
RESIDUAL_DTYPES = ("autocast", "float32")
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
@dataclass(frozen=True)
class VARConfig:
    """Transformer hyper-parameters; width, heads and drop-path follow the depth unless set."""

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
    # execution only (same function, different speed and memory):
    attn_impl: str = "auto"               # dense | flex | per_scale; auto: flex on CUDA, dense elsewhere
    attn_prefix_scales: int = 1           # per_scale: the first n scales attend in one masked call
    attn_backends: tuple[str, ...] = ()   # per_scale: SDPA kernels for the unmasked calls, in order; (): SDPA's
                                          # choice; ("fa4",): FlashAttention-4 (optional package)
    mlp_impl: str = "auto"                # plain | fused (GELU in the matmul epilogues, varcore.fused_mlp);
                                          # auto: fused when training on CUDA in bf16/fp16 where cuBLASLt loads
    compile_blocks: bool | None = None    # torch.compile the blocks and head; None: on CUDA
    checkpointing: int = 0                # recompute the first n blocks in backward; True: all

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        if isinstance(self.checkpointing, bool):
            object.__setattr__(self, "checkpointing", self.depth if self.checkpointing else 0)
        require(isinstance(self.depth, int) and self.depth >= 1, "depth", f"must be an int >= 1, got {self.depth}")
        check_patch_nums(self.patch_nums)
        require(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        require(self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        require(self.Cvae >= 1, "Cvae", f"must be >= 1, got {self.Cvae}")
        require(self.C % self.H == 0, "width", f"width {self.C} is not divisible by num_heads {self.H}")
        require(0.0 <= self.cond_drop_rate < 1.0, "cond_drop_rate", f"must be in [0, 1), got {self.cond_drop_rate}")
        require(self.attn_impl in ATTN_IMPLS, "attn_impl", f"must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        require(not (self.attn_impl == "flex" and self.attn_drop_rate > 0), "attn_impl",
                "flex has no attention dropout; use per_scale or dense with attn_drop_rate > 0")
        object.__setattr__(self, "attn_backends", tuple(self.attn_backends))
        require(1 <= self.attn_prefix_scales <= len(self.patch_nums), "attn_prefix_scales",
                f"must be in [1, {len(self.patch_nums)}] (number of scales), got {self.attn_prefix_scales}")
        bad = [b for b in self.attn_backends if b not in SDPA_BACKENDS and b != "fa4"]
        require(not bad, "attn_backends", f"unknown SDPA backends {bad}; choose from {sorted(SDPA_BACKENDS)} or fa4")
        require("fa4" not in self.attn_backends or (self.attn_backends == ("fa4",) and self.attn_drop_rate == 0),
                "attn_backends", "fa4 (FlashAttention-4) must be the only entry and needs attn_drop_rate 0")
        require(self.mlp_impl in MLP_IMPLS, "mlp_impl", f"must be one of {MLP_IMPLS}, got {self.mlp_impl!r}")
        require(self.residual_dtype in RESIDUAL_DTYPES, "residual_dtype",
                f"must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}")
        require(isinstance(self.checkpointing, int) and 0 <= self.checkpointing <= self.depth, "checkpointing",
                f"must be a bool or an int in [0, depth={self.depth}], got {self.checkpointing}")

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
    def L(self) -> int:
        """Tokens in one image: sum of pn^2 (680 at paper scale)."""
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    def with_depth(self, depth: int) -> "VARConfig":
        return replace(self, depth=depth)

    def check_tokenizer(self, vocab_size: int, Cvae: int, patch_nums: tuple[int, ...]) -> None:
        """Raise :class:`ConfigError` naming the field where the tokenizer does not fit."""
        if vocab_size != self.vocab_size:
            raise ConfigError("vocab_size", f"transformer has {self.vocab_size}, tokenizer has {vocab_size}")
        if Cvae != self.Cvae:
            raise ConfigError("Cvae", f"transformer has {self.Cvae}, tokenizer has {Cvae}")
        if tuple(patch_nums) != self.patch_nums:
            raise ConfigError("patch_nums", f"transformer has {list(self.patch_nums)}, tokenizer has {list(patch_nums)}")


def block_causal_mask(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """Bool ``(L, L)``; entry ``[i, j]`` is True where token i may attend to token j (scale_j <= scale_i)."""
    s = scale_ids(patch_nums)
    return s[None, :] <= s[:, None]


@dataclass(frozen=True, eq=False)
class ScaleSplit:
    """The block-causal mask as unmasked attention calls. The queries of each scale after the
    prefix see every key of the scales up to theirs, so each such scale is one SDPA call
    without a mask (which the flash and cuDNN kernels run); the first ``prefix`` tokens (the
    small scales, where a call per scale costs more in launches than it saves) attend in one
    call under ``prefix_mask``. ``backends``: SDPA kernels tried for the unmasked calls, in order."""

    prefix_mask_PP: torch.Tensor                  # bool (P, P): the block-causal mask of the prefix
    ends: tuple[int, ...]                         # end of every scale after the prefix
    backends: tuple[SDPBackend, ...] = ()         # (): SDPA's own choice
    fa4: bool = False                             # unmasked calls through FlashAttention-4 instead of SDPA

    @classmethod
    def build(cls, patch_nums: tuple[int, ...], prefix_scales: int, device, backends=(),
              fa4: bool = False) -> ScaleSplit:
        ends = scale_ends(patch_nums)
        require(1 <= prefix_scales <= len(ends), "attn_prefix_scales",
                f"must be in [1, {len(ends)}] for {len(ends)} scales, got {prefix_scales}")
        P = ends[prefix_scales - 1]
        return cls(block_causal_mask(patch_nums)[:P, :P].to(device), ends[prefix_scales:], tuple(backends), fa4)


@functools.lru_cache(maxsize=16)
def scale_split(patch_nums: tuple[int, ...], prefix_scales: int, device: str,
                backends: tuple[str, ...] = ()) -> ScaleSplit:
    """The model's :class:`ScaleSplit`, built once per device (backends by name, see ``SDPA_BACKENDS``)."""
    if backends == ("fa4",):
        return ScaleSplit.build(patch_nums, prefix_scales, device, fa4=True)
    return ScaleSplit.build(patch_nums, prefix_scales, device, tuple(SDPA_BACKENDS[b] for b in backends))


def attend(q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, attn, dropout_p: float,
           scale: float | None) -> torch.Tensor:
    """Attention under one of three equivalent forms of the mask ``attn``: ``None`` or a bool
    ``(L, L)`` tensor (dense SDPA), a ``BlockMask`` (FlexAttention), or a :class:`ScaleSplit`
    (one unmasked SDPA call per scale: queries of scale k see keys ``[0, end_k)``)."""
    if attn is None or isinstance(attn, torch.Tensor):
        return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn, dropout_p=dropout_p,
                                              scale=scale)
    if isinstance(attn, ScaleSplit):
        P = start = attn.prefix_mask_PP.shape[0]
        outs = [F.scaled_dot_product_attention(q_BHLc[:, :, :P], k_BHLc[:, :, :P], v_BHLc[:, :, :P],
                                               attn_mask=attn.prefix_mask_PP, dropout_p=dropout_p, scale=scale)]
        with sdpa_kernel(list(attn.backends), set_priority=True) if attn.backends else contextlib.nullcontext():
            for end in attn.ends:
                q_BHlc, k_BHec, v_BHec = q_BHLc[:, :, start:end], k_BHLc[:, :, :end], v_BHLc[:, :, :end]
                if attn.fa4:
                    outs.append(fa4_attention(q_BHlc, k_BHec, v_BHec, scale))
                else:
                    outs.append(F.scaled_dot_product_attention(q_BHlc, k_BHec, v_BHec, dropout_p=dropout_p,
                                                               scale=scale))
                start = end
        # joined along L in (B, L, H, hd) order, so the output projection reads it without a copy
        return torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)
    return flex_attention(q_BHLc, k_BHLc, v_BHLc, block_mask=attn, scale=scale,
                          kernel_options=flex.FLEX_KERNEL_OPTIONS if q_BHLc.is_cuda else None)


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
            self.k_BLHc = k_BHlc.new_empty(B, self.L, H, c)
            self.v_BLHc = v_BHlc.new_empty(B, self.L, H, c)
        end = self.len + k_BHlc.shape[2]
        if end > self.L:
            raise ValueError(f"KV cache holds {self.L} tokens, appending would reach {end}")
        self.k_BLHc[:, self.len:end] = k_BHlc.transpose(1, 2)
        self.v_BLHc[:, self.len:end] = v_BHlc.transpose(1, 2)
        self.len = end
        return self.k_BLHc[:, :end].transpose(1, 2), self.v_BLHc[:, :end].transpose(1, 2)

    def reset(self) -> None:
        """Start a new image; the storage is kept and overwritten."""
        self.len = 0


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p``.

    ``forward`` reads the rate from a tensor and ``active`` is the same for every block of a
    model (a block with ``p = 0`` keeps all samples), so that ``torch.compile`` traces one
    graph for all blocks instead of specialising on each block's rate.
    """

    def __init__(self, p: float, active: bool | None = None):
        super().__init__()
        self.p, self.active = p, p > 0 if active is None else active
        self.register_buffer("keep_p", torch.tensor(1.0 - p), persistent=False)

    def forward(self, x):
        if not self.active or not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) < self.keep_p
        return x * keep / self.keep_p


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k and a learned per-head scale."""

    def __init__(self, C: int, H: int, attn_drop: float, proj_drop: float, l2_norm: bool):
        super().__init__()
        self.H, self.hd, self.l2_norm = H, C // H, l2_norm
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        if l2_norm:  # cosine attention: temperature starts at 4, capped at 100
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(C, C)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def qkv_heads(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = x_BLC.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        # Normalise in the (B, L, H, hd) layout the projection writes and return (B, H, L, hd)
        # views of it: the attention kernels take these strides as they are, so the compiled
        # block does no transposing copies of q, k, v or of their gradients.
        q, k, v = F.linear(x_BLC, self.qkv.weight, bias).view(B, L, 3, self.H, self.hd).unbind(2)
        if self.l2_norm:
            scale_11H1 = self.scale_mul_1H11.clamp(max=math.log(100.0)).exp().view(1, 1, self.H, 1)
            q = F.normalize(q, dim=-1).mul(scale_11H1).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, H, L, hd)

    def attend(self, q, k, v, attn_mask, kv_cache: KVCache | None = None) -> torch.Tensor:
        """``attn_mask``: None, the bool block-causal mask, or an equivalent form (see :func:`attend`)."""
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        return attend(q, k, v, attn_mask, self.attn_drop if self.training else 0.0, 1.0 if self.l2_norm else None)

    def out(self, o_BHLc: torch.Tensor) -> torch.Tensor:
        B, H, L, c = o_BHLc.shape
        return self.proj_drop(self.proj(o_BHLc.transpose(1, 2).reshape(B, L, H * c)))

    def forward(self, x_BLC: torch.Tensor, attn_mask, kv_cache: KVCache | None = None) -> torch.Tensor:
        return self.out(self.attend(*self.qkv_heads(x_BLC), attn_mask, kv_cache))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int, drop: float):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(C, hidden), nn.Linear(hidden, C), nn.Dropout(drop)

    def forward(self, x, fused: bool = False):
        """``fused``: the GELU inside the matmuls' epilogues (:mod:`varcore.fused_mlp`), same function."""
        if fused:
            return self.drop(gelu_mlp(x, self.fc1, self.fc2))
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class AdaLNBlock(nn.Module):
    """Transformer block whose LayerNorm scale/shift and residual gates come from the class."""

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        C = cfg.C
        self.C = C
        self.attn = SelfAttention(C, cfg.H, cfg.attn_drop_rate, cfg.drop_rate, cfg.attn_l2_norm)
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

    def modulation(self, cond_BC_or_B6C: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.ada_lin is None:
            mod_B16C = cond_BC_or_B6C.view(-1, 1, 6, self.C) + self.ada_offset_116C
        else:
            mod_B16C = self.ada_lin(cond_BC_or_B6C).view(-1, 1, 6, self.C)
        return mod_B16C.unbind(2)

    def forward(self, x_BLC: torch.Tensor, cond: torch.Tensor, attn_mask, kv_cache: KVCache | None = None,
                region=None, fused_mlp: bool = False) -> torch.Tensor:
        """``region`` (inference) wraps the parts around attention, e.g. in ``torch.compile``;
        attention and the cache writes stay outside it. ``fused_mlp``: see :meth:`FFN.forward`."""
        mod = self.modulation(cond)
        run = region or _call
        q, k, v = run(_block_qkv, self, x_BLC, mod)
        o_BHLc = self.attn.attend(q, k, v, attn_mask, kv_cache)
        return run(_block_out, self, x_BLC, o_BHLc, mod, fused_mlp)


def _call(fn, *args):
    return fn(*args)


def _block_qkv(block: AdaLNBlock, x_BLC: torch.Tensor, mod: tuple[torch.Tensor, ...]):
    """AdaLN before attention, then q, k, v heads."""
    _, _, scale1, _, shift1, _ = mod
    return block.attn.qkv_heads(block.ln(x_BLC).mul(scale1.add(1)).add_(shift1))


def _block_out(block: AdaLNBlock, x_BLC: torch.Tensor, o_BHLc: torch.Tensor, mod: tuple[torch.Tensor, ...],
               fused_mlp: bool = False):
    """Gated attention residual, AdaLN, gated FFN residual."""
    gamma1, gamma2, _, scale2, _, shift2 = mod
    x_BLC = x_BLC + block.drop_path(block.attn.out(o_BHLc).mul_(gamma1))
    h = block.ln(x_BLC).mul(scale2.add(1)).add_(shift2)
    return x_BLC + block.drop_path(block.ffn(h, fused_mlp).mul_(gamma2))


class AdaLNHead(nn.Module):
    """Final AdaLN then the linear head to V logits."""

    def __init__(self, C: int, V: int, eps: float):
        super().__init__()
        self.ln = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, V)

    def forward(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BC).view(-1, 1, 2, x_BLC.shape[-1]).unbind(2)
        return self.head(self.ln(x_BLC).mul(scale.add(1)).add_(shift))


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
        self.register_buffer("lvl_L", scale_ids(cfg.patch_nums), persistent=False)
        self.register_buffer("attn_mask_LL", block_causal_mask(cfg.patch_nums), persistent=False)
        self.init_weights()

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

    # ---- training: all scales at once under the block-causal mask ----------------------------
    def forward(self, label_B: torch.Tensor, x_BlCvae: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, L, V)`` from labels and ``(B, L - first_l, Cvae)`` inputs."""
        cfg = self.cfg
        if x_BlCvae.shape[1:] != (cfg.L - cfg.first_l, cfg.Cvae):
            raise ValueError(f"teacher-forcing input must be (B, {cfg.L - cfg.first_l}, {cfg.Cvae}), "
                             f"got {tuple(x_BlCvae.shape)}")
        cond_BC = self.cond(self.drop_class(label_B))
        x_BLC = torch.cat([self.sos(cond_BC), self.word_embed(x_BlCvae.to(self.word_embed.weight.dtype))], dim=1)
        x_BLC = self.residual(x_BLC + self.scale_pos(0, cfg.L))
        bc = self.block_cond(cond_BC)
        attn = self.attention_mask(x_BLC.device)
        compiled = self.compiled(x_BLC.device)
        fused = self.mlp_fused(x_BLC)
        run_block = compile_region(_run_block, tuned=True) if compiled else _run_block
        recompute = cfg.checkpointing if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if i < recompute:
                x_BLC = checkpoint(run_block, block, x_BLC, bc, attn, fused, use_reentrant=False)
            else:
                x_BLC = run_block(block, x_BLC, bc, attn, fused)
        return (compile_region(_run_head, tuned=True) if compiled else _run_head)(self.head, x_BLC, cond_BC)

    def residual(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """The residual stream's dtype for the blocks (``cfg.residual_dtype``): under autocast
        with "autocast", the autocast dtype, as the official code trains (its blocks then add
        bf16 branches to a bf16 stream); float32 otherwise."""
        dev = x_BLC.device.type
        if self.cfg.residual_dtype == "autocast" and torch.is_autocast_enabled(dev):
            return x_BLC.to(torch.get_autocast_dtype(dev))
        return x_BLC

    def attn_impl(self, device: torch.device) -> str:
        """The attention form ``forward`` uses on ``device`` (``cfg.attn_impl`` with auto resolved)."""
        impl = self.cfg.attn_impl
        if impl != "auto":
            return impl
        if device.type != "cuda":
            return "dense"
        if flex_attention is not None and self.cfg.attn_drop_rate == 0 and self.compiled(device):
            return "flex"
        return "per_scale"

    def mlp_fused(self, x_BLC: torch.Tensor) -> bool:
        """Whether ``forward`` runs the FFNs with GELU in the matmul epilogues (``cfg.mlp_impl``;
        auto: when gradients are on and the fused matmuls run for ``x_BLC``, i.e. on CUDA in
        bf16/fp16 with cuBLASLt). Sampling keeps the plain FFN: it needs no GELU input."""
        impl = self.cfg.mlp_impl
        if impl != "auto":
            return impl == "fused"
        return torch.is_grad_enabled() and fused_usable(x_BLC)

    def attention_mask(self, device: torch.device):
        """The block-causal mask in the form :func:`attend` takes for this model's ``attn_impl``."""
        impl = self.attn_impl(device)
        if impl == "flex":
            return flex_block_mask(self.cfg.patch_nums, str(device), flex.mask_block())
        if impl == "per_scale":
            return scale_split(self.cfg.patch_nums, self.cfg.attn_prefix_scales, str(device), self.cfg.attn_backends)
        return self.attn_mask_LL

    def compiled(self, device: torch.device) -> bool:
        """Whether blocks and head run through ``torch.compile`` (not when already being compiled)."""
        on = self.cfg.compile_blocks if self.cfg.compile_blocks is not None else device.type == "cuda"
        return on and not torch.compiler.is_compiling()

    # ---- inference: one scale at a time with a KV cache ----------------------------------------
    def new_kv_caches(self) -> list[KVCache]:
        return [KVCache(self.cfg.L) for _ in self.blocks]

    def forward_scale(self, x_BlC: torch.Tensor, cond_BC: torch.Tensor, start: int,
                      kv_caches: list[KVCache], compiled: bool = False) -> torch.Tensor:
        """Logits of one scale's tokens ``[start, start + l)``; ``x_BlC`` is already embedded
        (``sos`` for scale 1, ``word_embed`` of the previous f_hat otherwise). No mask: the
        cache holds exactly the earlier scales, all visible to the current one.

        ``compiled`` runs the parts of each block around attention and the head through
        ``torch.compile`` with a dynamic token count (one graph serves scales 2..K)."""
        x_BlC = x_BlC + self.scale_pos(start, start + x_BlC.shape[1])
        bc = self.block_cond(cond_BC)
        region = _dynamic_region if compiled else None
        for block, cache in zip(self.blocks, kv_caches):
            x_BlC = block(x_BlC, bc, None, cache, region)
        return (region or _call)(_run_head, self.head, x_BlC, cond_BC)


# ---- compiled regions --------------------------------------------------------------------
# One compiled function serves every block: the blocks have the same structure and their
# parameters are graph inputs, so dynamo traces once per shape. dynamic=False keeps the
# kernels specialised to the paper's fixed shapes (one recompile per batch size).
def _run_block(block: AdaLNBlock, x_BLC: torch.Tensor, cond: torch.Tensor, attn, fused_mlp: bool = False
               ) -> torch.Tensor:
    return block(x_BLC, cond, attn, fused_mlp=fused_mlp)


def _run_head(head: AdaLNHead, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
    return head(x_BLC, cond_BC)


COMPILE_BACKEND = "inductor"   # tests switch to "aot_eager" (same graphs, no code generation)
# inductor options of the tuned regions (training blocks and head): coordinate-descent
# tuning times block sizes of the generated element-wise and reduction kernels at compile
# time; at d24 it took 1.6% off a training step (benchmarks/RESULTS.md, round 3).
TUNED_OPTIONS = {"coordinate_descent_tuning": True}


# Graphs one region may hold. Dynamo keys compiled code by the function's code object, so
# every model width, batch size and mode (training, sampling, eval) that goes through a
# region counts against one limit; torch's default of 8 is reached by sampling three
# depths at two batch sizes in one process, after which the region silently runs eagerly.
REGION_RECOMPILE_LIMIT = 64


@functools.cache
def compile_region(fn, dynamic: bool | None = False, tuned: bool = False):
    """``fn`` through ``torch.compile``, once per (fn, dynamic, tuned); ``tuned`` adds
    :data:`TUNED_OPTIONS` (longer compile, faster kernels) under inductor, and every region
    gets :func:`varcore.flex.compile_options` (flex's backward tiles for the block mask). Calls run with
    dynamo's recompile limit raised to :data:`REGION_RECOMPILE_LIMIT` (scoped to the call)."""
    options = None
    if COMPILE_BACKEND == "inductor":
        options = {**flex.compile_options(), **(TUNED_OPTIONS if tuned else {})} or None
    compiled = torch.compile(fn, dynamic=dynamic, backend=COMPILE_BACKEND, options=options)

    @functools.wraps(fn)
    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=REGION_RECOMPILE_LIMIT):
            return compiled(*args)
    return run


def _dynamic_region(fn, *args):
    # dynamic=None: the first scale (one token) compiles static, the next marks the token
    # count dynamic, and that graph serves all later scales
    return compile_region(fn, None)(*args)
