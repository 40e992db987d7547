"""LPIPS (VGG16 trunk) from a local weights file; nothing is downloaded.

The linear calibration layers ship inside the ``lpips`` package; the ImageNet VGG16 trunk
must come from ``tokenizer.train.lpips_weights``: a torchvision ``vgg16`` state dict
(``features.N.weight`` keys), e.g. saved once on a machine with internet by
``torch.save(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict(), "vgg16.pth")``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..errors import WeightsError

log = logging.getLogger(__name__)
# torchvision vgg16.features indices per lpips slice
_SLICES = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}


def vgg_features_to_lpips(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Map torchvision ``features.i.*`` keys onto lpips' ``net.sliceK.i.*``."""
    out = {}
    for k, idx in _SLICES.items():
        for i in idx:
            for p in ("weight", "bias"):
                src = f"features.{i}.{p}"
                if src in state:
                    out[f"net.slice{k}.{i}.{p}"] = state[src]
    if len(out) != 26:  # 13 conv layers x (weight, bias)
        raise WeightsError(f"{path}: expected a torchvision vgg16 state dict with 13 conv layers under "
                           f"'features.N.weight', found {len(out) // 2}")
    return out


def load_lpips(weights_path: str | Path) -> torch.nn.Module:
    """LPIPS-VGG with the trunk from ``weights_path``; frozen, eval mode."""
    import lpips
    path = Path(weights_path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: VGG16 weights for LPIPS not found. Save them on a machine with internet with "
            f"torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), '{path.name}'), "
            f"copy the file here, or set tokenizer.train.lpips_weights: null to train without LPIPS")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read weights: {e}") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained=`
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    missing = model.load_state_dict(vgg_features_to_lpips(state, path), strict=False)
    if any(k.startswith("net.") for k in missing.missing_keys):
        raise WeightsError(f"{path}: weights do not cover the VGG16 trunk: {missing.missing_keys[:3]}")
    model.eval().requires_grad_(False)
    return model
