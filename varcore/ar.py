"""The raster-scan next-token baseline (paper Table 3, rows 1-2: VQGAN-style AR), built from VAR's parts.

Its tokenizer is a single-scale VQ-VAE: the same :class:`varcore.vqvae.VQVAE` with one entry in
``patch_nums`` (one ``h x h`` token map, the plain VQ-VAE of VQGAN). Its transformer is VAR's:
the same AdaLN blocks, width rule ``w = 64 d``, class conditioning, head and initialisation. It
differs only where the order differs:

- the sequence is the ``L = h^2`` tokens of the one map in raster order; the input at position
  ``t`` is the codebook vector of token ``t - 1`` through the same ``word_embed`` (position 0:
  the class start token), where VAR's input at scale k is the partial ``f_hat`` of scales < k;
- attention is token-causal (a token sees itself and the tokens before it), not block-causal;
- sampling draws ONE token per transformer call with a KV cache: ``L`` sequential calls per
  image (256 at the paper's 16x16 grid) where VAR makes ``K`` (10).

Classifier-free guidance uses VAR's mixing ``(1 + s) l_cond - s l_uncond`` at the full strength
``s = cfg`` for every token (the usual choice for raster AR, e.g. LlamaGen): VAR's ramp over scales
has no counterpart in raster order. Top-k and top-p are VAR's :func:`varcore.sample.filter_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, require
from .quant import MultiScaleQuantizer
from .sample import SamplingConfig, cudnn_autotune, decode_images, sample_logits
from .var import VAR, VARConfig
from .vqvae import VQVAE

__all__ = ["ARConfig", "RasterAR", "TokenCausalAttention", "sample_tokens", "generate"]


@dataclass(frozen=True)
class ARConfig(VARConfig):
    """A :class:`VARConfig` of one scale: ``patch_nums = (h,)`` is the token map's side."""

    patch_nums: tuple[int, ...] = (16,)
    token_order: ClassVar[str] = "raster"

    def __post_init__(self):
        super().__post_init__()
        require(len(self.patch_nums) == 1, "patch_nums",
                f"the raster AR baseline reads one token map (one scale), got {list(self.patch_nums)}")

    @property
    def first_l(self) -> int:
        """One class start token: it predicts token 0, token t predicts token t + 1."""
        return 1

    def attention_pairs(self) -> int:
        """Token-causal pairs: ``L (L + 1) / 2``."""
        return self.L * (self.L + 1) // 2


class TokenCausalAttention(nn.Module):
    """``softmax(q k^T scale) v`` under the token-causal mask (SDPA ``is_causal``: flash kernels on GPU)."""

    def forward(self, q_BHLc, k_BHLc, v_BHLc, dropout_p: float, scale: float | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, dropout_p=dropout_p, is_causal=True,
                                              scale=scale)


class RasterAR(VAR):
    """Class-conditional next-token transformer over one token map in raster order.

    ``forward(label_B, x_BlCvae)`` is VAR's: ``x_BlCvae`` is :meth:`teacher_inputs` of the tokens,
    ``(B, L - 1, Cvae)``, and the logits ``(B, L, V)`` predict tokens ``0 .. L-1``.
    """

    def __init__(self, cfg: ARConfig):
        if not isinstance(cfg, ARConfig):
            raise ConfigError("token_order", f"RasterAR needs an ARConfig, got {type(cfg).__name__}")
        super().__init__(cfg)
        for block in self.blocks:
            block.attn.core = self.dense_attention()

    def dense_attention(self) -> nn.Module:
        return TokenCausalAttention()

    @staticmethod
    def teacher_inputs(quantizer, tokens_BL: torch.Tensor) -> torch.Tensor:
        """The codebook vectors of tokens ``0 .. L-2``: ``(B, L - 1, Cvae)`` (no gradient)."""
        with torch.no_grad():
            return quantizer.embedding(tokens_BL[:, :-1])


def model_class(cfg: VARConfig) -> type[VAR]:
    """The transformer a config describes: :class:`RasterAR` for an :class:`ARConfig`, else :class:`VAR`."""
    return RasterAR if isinstance(cfg, ARConfig) else VAR


def build(cfg: VARConfig) -> VAR:
    return model_class(cfg)(cfg)


@torch.no_grad()
@cudnn_autotune()
def sample_tokens(model: RasterAR, quantizer: MultiScaleQuantizer, label_B: torch.Tensor,
                  sampling: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate the token map token by token: ``(B, h, h)`` tokens and their ``f_hat``.

    Deterministic for a given ``generator`` state; ``L`` transformer calls, each on one new
    token per image (twice the batch with CFG) against the KV cache of the tokens before it.
    """
    cfg = model.cfg
    cfg.check_tokenizer(quantizer.vocab_size, quantizer.Cvae, quantizer.patch_nums)
    B, L, h = label_B.shape[0], cfg.L, cfg.patch_nums[0]
    use_cfg = sampling.cfg > 0
    labels = torch.cat([label_B, torch.full_like(label_B, cfg.num_classes)]) if use_cfg else label_B
    cond_BC = model.cond(labels)
    caches = model.new_kv_caches()
    x_B1C = model.sos(cond_BC)
    idx_BL = label_B.new_empty(B, L)
    for t in range(L):
        logits_B1V = model.forward_scale(x_B1C, cond_BC, t, caches).float()
        if use_cfg:
            logits_B1V = (1 + sampling.cfg) * logits_B1V[:B] - sampling.cfg * logits_B1V[B:]
        tok_B1 = sample_logits(logits_B1V, sampling.top_k, sampling.top_p, generator)
        idx_BL[:, t:t + 1] = tok_B1
        x_B1C = model.word_embed(quantizer.embedding(tok_B1).to(model.word_embed.weight.dtype))
        if use_cfg:
            x_B1C = x_B1C.repeat(2, 1, 1)
    idx_Bhw = idx_BL.view(B, h, h)
    f_hat = quantizer.embedding.weight.new_zeros(B, quantizer.Cvae, h, h)
    f_hat, _ = quantizer.add_scale(0, f_hat, quantizer.lookup(idx_Bhw))
    return idx_Bhw, f_hat


@torch.no_grad()
def generate(model: RasterAR, vqvae: VQVAE, label_B: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Class-conditional images ``(B, 3, H, W)`` in [-1, 1]."""
    _, f_hat = sample_tokens(model, vqvae.quantizer, label_B, sampling, generator)
    return decode_images(vqvae, f_hat, compiled=None if sampling.engine == "auto" else False)


def sequential_calls(cfg: VARConfig) -> int:
    """Transformer calls one image needs at sampling: ``L`` in raster order, ``K`` scale by scale."""
    return cfg.L if isinstance(cfg, ARConfig) else len(cfg.patch_nums)
