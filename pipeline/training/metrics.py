"""What the scaling-law fit reads from a training run: test loss, token error, N and compute.

Test loss ``L`` and token error rate ``Err = 1 - top-1 accuracy`` are reported for the
last scale (the ``pn_K^2`` tokens of the finest map) and averaged over all scales. The
all-scale average weights every token equally (sum over all ``L`` tokens of an image,
divided by the token count), as the cross-entropy the model is trained on does.

Training compute (paper Sec. 5, C in FLOPs):

    C = var_flops(cfg).train_per_token * tokens_seen,   tokens_seen = steps * batch * L

``train_per_token`` is 3x the forward FLOPs of one image divided by ``L`` (forward plus a
backward of twice its cost): per token 2 x 12 d w^2 for the block linears (qkv, proj,
FFN), 4 w d S_k for attention over the S_k tokens the block-causal mask lets a token of
scale k see, and the word embedding and V-way head; per image the AdaLN projections
(see ``varcore.flops``). ``6 N T`` (the usual approximation with N from eq. 8)
is recorded beside it as ``compute_6NT``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from varcore.flops import var_flops
from varcore.var import VARConfig


@dataclass
class TokenStats:
    """Per-scale sums over a validation set; additive, so ranks and batches all-reduce by ``+``."""

    loss_sum_K: torch.Tensor   # summed cross-entropy (nats) of the tokens of each scale
    wrong_K: torch.Tensor      # tokens whose argmax is not the target
    count_K: torch.Tensor      # tokens of each scale

    @classmethod
    def zeros(cls, K: int) -> "TokenStats":
        z = torch.zeros(K, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([self.loss_sum_K, self.wrong_K, self.count_K])

    @classmethod
    def from_tensor(cls, t_3K: torch.Tensor) -> "TokenStats":
        return cls(t_3K[0].clone(), t_3K[1].clone(), t_3K[2].clone())

    def __add__(self, other: "TokenStats") -> "TokenStats":
        return TokenStats(self.loss_sum_K + other.loss_sum_K, self.wrong_K + other.wrong_K,
                          self.count_K + other.count_K)


def token_stats(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor, scale_L: torch.Tensor, K: int) -> TokenStats:
    """Per-scale loss sum, error count and token count of one batch (``scale_L``: scale index per token)."""
    ce_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), tokens_BL, reduction="none")
    wrong_BL = (logits_BLV.argmax(-1) != tokens_BL).double()
    scale_BL = scale_L.to(tokens_BL.device).expand_as(tokens_BL)
    out = TokenStats.zeros(K)
    out.loss_sum_K.index_add_(0, scale_BL.flatten().cpu(), ce_BL.double().flatten().cpu())
    out.wrong_K.index_add_(0, scale_BL.flatten().cpu(), wrong_BL.flatten().cpu())
    out.count_K.index_add_(0, scale_BL.flatten().cpu(), torch.ones(scale_BL.numel(), dtype=torch.float64))
    return out


def summarize(stats: TokenStats) -> dict[str, float | list[float]]:
    """``L_last, L_mean, Err_last, Err_mean`` and the per-scale lists behind them."""
    n = stats.count_K
    if bool((n == 0).any()):
        raise ValueError("no validation tokens were evaluated")
    return {
        "L_last": float(stats.loss_sum_K[-1] / n[-1]),
        "L_mean": float(stats.loss_sum_K.sum() / n.sum()),
        "Err_last": float(stats.wrong_K[-1] / n[-1]),
        "Err_mean": float(stats.wrong_K.sum() / n.sum()),
        "L_per_scale": (stats.loss_sum_K / n).tolist(),
        "Err_per_scale": (stats.wrong_K / n).tolist(),
    }


# ---- compute accounting ------------------------------------------------------------------
def tokens_seen(steps: int, batch_size: int, cfg: VARConfig) -> int:
    return steps * batch_size * cfg.L


def train_compute(cfg: VARConfig, tokens: int) -> float:
    """Training FLOPs C after ``tokens`` training tokens (module docstring)."""
    return var_flops(cfg).train_per_token * tokens
