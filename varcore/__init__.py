"""varcore: VAR (next-scale prediction) models in plain PyTorch.

Importable without ray, mlflow or dvc; runs on torch >= 2.11.
"""

from .errors import ConfigError
from .flops import count_main_params, count_params, main_N, paper_N, var_flops
from .quant import MultiScaleQuantizer, flatten_tokens
from .sample import SamplingConfig, edit_class, generate, inpaint, outpaint, sample_tokens
from .var import PAPER_PATCH_NUMS, VAR, VARConfig, block_causal_mask
from .vqvae import VQVAE, VQVAEConfig

__all__ = [
    "ConfigError", "MultiScaleQuantizer", "flatten_tokens", "VAR", "VARConfig", "PAPER_PATCH_NUMS",
    "block_causal_mask", "VQVAE", "VQVAEConfig", "SamplingConfig", "generate", "sample_tokens",
    "inpaint", "outpaint", "edit_class", "count_params", "count_main_params", "main_N", "paper_N",
    "var_flops",
]
