"""Speed paths of varcore, applied to built models from outside; each computes the plain path's function.

- ``plan``: :class:`ExecutionPlan` (closed choices, ``auto`` resolved once per run) and
  :func:`apply_plan` / :func:`reset_plan`, which change a finished model in place.
- ``attention`` + ``flex`` + ``fa4``: block-causal attention kernels (FlexAttention block mask,
  one unmasked call per scale, FlashAttention-4).
- ``fused_mlp`` + ``cublaslt``: the FFN's GELU inside cuBLASLt matmul epilogues.
- ``compile``: ``torch.compile`` regions and activation checkpointing of modules.
- ``static_sampler``: sampling as one CUDA graph per scale over a preallocated KV cache.
- ``add_norm``: a block's residual add + LayerNorm + AdaLN modulation as one Triton kernel (sampling).
- ``adaln``: the same in training, forward and backward kernels registered with autograd.
- ``master_weights``: bf16 working copies of the linear weights, AdamW on float32 masters.
- ``bicubic``: the quantiser's bicubic upsampling as two matmuls on CUDA.
- ``subpixel``: the decoder's nearest 2x upsampling + 3x3 convolution as one 2x2 convolution.

Submodules load on first use (PEP 562), so importing one does not import the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"ExecutionPlan": "plan", "apply_plan": "plan", "reset_plan": "plan"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'varcore.fast' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
