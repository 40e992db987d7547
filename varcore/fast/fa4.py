"""FlashAttention-4 (the optional ``flash-attn-4`` package, CuTe DSL kernels) for the
unmasked per-scale calls of :class:`varcore.var.ScaleSplit` (``attn_backends=("fa4",)``).

The kernels take ``(B, L, H, hd)`` tensors, the layout the model's qkv projection writes, so
the ``(B, H, L, hd)`` views that :func:`varcore.var.attend` passes are transposed back
without copies. The call stays outside ``torch.compile`` graphs (FlashAttention-4 launches
its own compiled kernels and has its own autograd function).
"""

from __future__ import annotations

import torch


@torch.compiler.disable
def fa4_attention(q_BHlc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor,
                  scale: float | None) -> torch.Tensor:
    """Unmasked attention of ``l`` queries over ``L`` keys: ``(B, H, l, hd)``."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as e:
        raise ImportError("attn_backends=('fa4',) needs FlashAttention-4: pip install flash-attn-4 "
                          "(CUDA, Hopper or newer)") from e
    out = flash_attn_func(q_BHlc.transpose(1, 2), k_BHLc.transpose(1, 2), v_BHLc.transpose(1, 2),
                          softmax_scale=scale)
    out_BlHc = out[0] if isinstance(out, tuple) else out
    return out_BlHc.transpose(1, 2)
