"""FID, IS, KID, precision and recall through torch-fidelity, with a named feature network.

Two feature networks: the default profile's classifier (:mod:`pipeline.evaluation.classifier`,
registered with torch-fidelity's feature-extractor API: penultimate features for FID/KID/PR,
pre-softmax logits for IS) and, on the paper profile, torch-fidelity's own Inception-v3 read
from a local weights file. Nothing is downloaded, no cache is shared between weights
(``cache=False``: torch-fidelity's cache key ignores an extractor's weights), the device is set
explicitly (its default is CUDA), and the sample sets are uint8 ``(N, 3, H, W)`` tensors made by
the caller (its class-conditional generator route does not run on numpy 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ArtifactError, WeightsError
from ..files import sha256_file

log = logging.getLogger(__name__)
CLASSIFIER_EXTRACTOR = "varscale-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
METRIC_KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "is_mean", "inception_score_std": "is_std",
               "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std",
               "precision": "precision", "recall": "recall", "f_score": "f_score"}


def _classifier_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    from .classifier import load_classifier

    class ClassifierFeatures(FeatureExtractorBase):
        """The trained classifier as a torch-fidelity feature extractor: ``features`` (FID, KID,
        precision/recall) and ``logits`` (IS). Input: uint8 ``(B, 3, H, W)`` in 0..255."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if not feature_extractor_weights_path:
                raise WeightsError("the classifier feature network needs its checkpoint (feature_extractor_weights_path)")
            self.model, _ = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x_B3HW: torch.Tensor):
            f = self.model.features(x_B3HW.float().div(127.5).sub(1.0))
            out = {"features": f, "logits": self.model.head(f)}
            return tuple(out[k] for k in self.features_list)   # the order torch-fidelity asked for

    return ClassifierFeatures


def register_classifier_extractor() -> None:
    """Register the classifier with torch-fidelity once per process (a name registers only once)."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER_EXTRACTOR, _classifier_extractor_class())


@dataclass(frozen=True)
class FeatureNetwork:
    """Which network every number names: torch-fidelity's extractor, its weights file and their sha256."""

    name: str                 # "classifier" or "inception"
    extractor: str
    weights: Path
    sha256: str
    val_accuracy: float | None = None   # the classifier's, on the val split

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "extractor": self.extractor, "weights": self.weights.name,
                "sha256": self.sha256, "val_accuracy": self.val_accuracy}


def feature_network(kind: str, classifier_path: Path | None, inception_weights: str | None) -> FeatureNetwork:
    """The feature network of an evaluation; a missing weights file names its params key."""
    if kind == "inception":
        path = Path(inception_weights or "")
        if not path.is_file():
            raise WeightsError(f"{path}: Inception weights not found (evaluate.inception_weights): save torch-fidelity's "
                               f"{INCEPTION_FILE} from its v0.2.0 release where you have internet and copy it here")
        return FeatureNetwork("inception", INCEPTION_EXTRACTOR, path, sha256_file(path))
    from .classifier import load_classifier
    _, meta = load_classifier(classifier_path)
    register_classifier_extractor()
    return FeatureNetwork("classifier", CLASSIFIER_EXTRACTOR, Path(classifier_path), sha256_file(classifier_path),
                          meta.get("val_accuracy"))


class UInt8Images(Dataset):
    """uint8 images as torch-fidelity reads them: bare ``(3, H, W)`` tensors, no labels. Takes a
    ``(N, 3, H, W)`` uint8 tensor or a ``(N, H, W, 3)`` uint8 array (the image splits' layout)."""

    def __init__(self, images: torch.Tensor | np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.array(x, dtype=np.uint8)).permute(2, 0, 1)   # a copy: splits are read-only maps
        return x


def check_images(images: torch.Tensor, n: int, size: int, what: str) -> None:
    """A sample set is ``n`` uint8 images ``(3, size, size)``; anything else is an error naming it."""
    shape = tuple(images.shape)
    if images.dtype != torch.uint8 or shape != (n, 3, size, size):
        raise ArtifactError(f"{what}: expected {n} uint8 images of shape (3, {size}, {size}), "
                            f"got {images.dtype} {shape}")


def score(generated: Dataset, reference: Dataset, net: FeatureNetwork, device: torch.device,
          kid_subset_size: int = 1000, batch_size: int = 256) -> dict[str, float]:
    """FID, IS (of ``generated``), KID and precision/recall (``generated`` against ``reference``)."""
    import torch_fidelity
    subset = min(kid_subset_size, len(generated), len(reference))
    out = torch_fidelity.calculate_metrics(
        input1=generated, input2=reference, feature_extractor=net.extractor,
        feature_extractor_weights_path=str(net.weights), isc=True, fid=True, kid=True, prc=True,
        kid_subset_size=subset, cuda=device.type == "cuda", cache=False, save_cpu_ram=True, verbose=False,
        batch_size=batch_size)
    return {METRIC_KEYS[k]: float(v) for k, v in out.items() if k in METRIC_KEYS}
