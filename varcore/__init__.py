"""varcore: VAR (next-scale prediction) models in plain PyTorch.

Importable without ray, mlflow or dvc; runs on torch >= 2.11. The model as the paper states
it lives in the top-level modules (``scales``, ``quant``, ``vqvae``, ``disc``, ``var``, ``sample``,
``flops``), and the raster-scan next-token baseline built from its blocks (``ar``); speed paths that compute the same functions live in ``varcore.fast`` and are
applied to built models from outside (``varcore.fast.apply_plan``).

Names are imported on first use (PEP 562), so ``import varcore.vqvae`` loads only what the
VQ-VAE needs: the pipeline's stages depend on exactly the modules they use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConfigError": "errors",
    "PAPER_PATCH_NUMS": "scales", "ScaleLayout": "scales", "block_causal_mask": "scales",
    "MultiScaleQuantizer": "quant", "flatten_tokens": "quant",
    "VQVAE": "vqvae", "VQVAEConfig": "vqvae",
    "VAR": "var", "VARConfig": "var", "ARConfig": "ar", "RasterAR": "ar",
    "SamplingConfig": "sample", "generate": "sample", "sample_tokens": "sample", "inpaint": "sample",
    "outpaint": "sample", "edit_class": "sample",
    "count_params": "flops", "count_main_params": "flops", "main_N": "flops", "paper_N": "flops",
    "var_flops": "flops",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'varcore' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
