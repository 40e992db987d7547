"""Typed params of the evaluation stages: ``classifier`` (the default profile's feature network),
``evaluate`` (samples and metrics per depth, and the reference rows), ``fit`` (power laws)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from varcore.errors import require

from ..params import check_device


@dataclass(frozen=True)
class ClassifierParams:
    """A small CNN trained on the real train split; its penultimate features serve FID/KID/PR
    and its logits IS (section ``classifier``)."""

    width: int = 32                 # channels of the first conv block (then 2x, 4x)
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    num_threads: int = 0            # torch threads; 0 = torch default
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        require(self.width >= 4, "width", f"must be >= 4, got {self.width}")
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


@dataclass(frozen=True)
class SamplingParams:
    """What every depth is sampled with (recorded beside every number)."""

    cfg: float = 1.5                 # guidance at the last scale (ramps from 0)
    top_k: int = 900                 # 0: off
    top_p: float = 0.96              # 1.0: off
    engine: Literal["auto", "plain", "static", "static_exact"] = "auto"

    def __post_init__(self):
        require(self.cfg >= 0, "cfg", f"must be >= 0, got {self.cfg}")
        require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class EvaluateParams:
    """Section ``evaluate``: class-balanced samples of every depth scored against the val split."""

    feature_network: Literal["classifier", "inception"] = "classifier"
    inception_weights: str | None = None     # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    samples_per_class: int = 200             # per seed
    seeds: tuple[int, ...] = (0, 1)          # one sample set per seed: the spread shows the ranking's stability
    batch_size: int = 250                    # images per sampling batch
    sampling: SamplingParams = field(default_factory=SamplingParams)
    kid_subset_size: int = 1000
    reference_images: int | None = None      # val images scored against (null: all)
    feature_batch_size: int = 256
    grid_columns: int = 8                    # samples per class in the grid picture
    device: str = "auto"
    num_threads: int = 0

    def __post_init__(self):
        check_device(self.device)
        require(self.samples_per_class >= 2, "samples_per_class", f"must be >= 2, got {self.samples_per_class}")
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"must be a non-empty list of distinct ints, got {list(self.seeds)}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.kid_subset_size >= 2, "kid_subset_size", f"must be >= 2, got {self.kid_subset_size}")
        require(self.reference_images is None or self.reference_images >= 2, "reference_images",
                f"must be >= 2 or null, got {self.reference_images}")
        require(self.feature_network != "inception" or bool(self.inception_weights), "inception_weights",
                "feature_network inception needs the local Inception weights file (README: Evaluation)")
        require(self.grid_columns >= 1, "grid_columns", f"must be >= 1, got {self.grid_columns}")


@dataclass(frozen=True)
class FitParams:
    """Section ``fit``: thresholds of the flags the fits raise (never hidden, never tuned away)."""

    min_depths: int = 3              # fewer: the fit refuses, the report still lists the runs
    min_abs_r: float = 0.98          # flag |Pearson r| below this
    max_residual: float = 0.02       # flag a point more than this fraction off the fitted line
    max_loo_swing: float = 0.5       # flag alpha moving more than this fraction when one depth is left out
    irreducible_min_depths: int = 6  # the L = E + A N^-alpha diagnostic needs this many depths

    def __post_init__(self):
        require(self.min_depths >= 3, "min_depths", f"must be >= 3 (a line through 2 points has no error), "
                f"got {self.min_depths}")
        require(0 < self.min_abs_r <= 1, "min_abs_r", f"must be in (0, 1], got {self.min_abs_r}")
        require(self.max_residual > 0, "max_residual", f"must be > 0, got {self.max_residual}")
        require(self.max_loo_swing > 0, "max_loo_swing", f"must be > 0, got {self.max_loo_swing}")


Box = tuple[float, float, float, float]


def _check_box(key: str, box) -> None:
    require(len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1, key,
            f"must be [top, left, bottom, right] as fractions of the image side with top < bottom and "
            f"left < right, got {list(box)}")


@dataclass(frozen=True)
class ZeroShotParams:
    """Section ``zeroshot``: in-painting measured on held-out val images at the largest depth
    (stage ``zeroshot``), against filling the hole with an unconditional or a class-conditional
    sample of the same model; sampled with ``evaluate.sampling``."""

    depth: int = 4                           # the VAR measured (one of train.depths)
    images: int = 1000                       # the LAST this many val images get holes; the rest is FID's reference
    holes: tuple[Box, ...] = ((0.25, 0.25, 0.75, 0.75), (0.5, 0.0, 1.0, 1.0), (0.0, 0.5, 1.0, 1.0))
    outpaint_keep: Box = (0.25, 0.25, 0.75, 0.75)   # the grid's out-painting: keep this, generate around it
    edit_box: Box = (0.0, 0.0, 0.5, 1.0)     # the grid's editing: redraw this under the next class
    seed: int = 0
    batch_size: int = 250
    lpips_weights: str | None = None         # torchvision VGG16 weights: LPIPS of the filled images (null: off)
    grid_images: int = 8                     # columns of the picture
    device: str = "auto"
    num_threads: int = 0

    def __post_init__(self):
        object.__setattr__(self, "holes", tuple(tuple(h) for h in self.holes))
        check_device(self.device)
        require(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        require(self.images >= 2, "images", f"must be >= 2, got {self.images}")
        require(len(self.holes) >= 1, "holes", "must list at least one [top, left, bottom, right] box")
        for i, h in enumerate(self.holes):
            _check_box(f"holes[{i}]", h)
        _check_box("outpaint_keep", self.outpaint_keep)
        _check_box("edit_box", self.edit_box)
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.grid_images >= 1, "grid_images", f"must be >= 1, got {self.grid_images}")
