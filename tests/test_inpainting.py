"""In-painting against its two baselines, scored in the hole (the zeroshot stage's outputs:
test_stage_runs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.evaluation.config import SamplingParams, ZeroShotParams
from pipeline.evaluation.inpainting import METHODS, box_pixels, fill_holes, hole_masks, hole_mse
from pipeline.params import load_section
from tests.conftest import randomize_
from varcore import VAR, VARConfig, VQVAE


def test_holes_cycle_and_boxes_round_to_pixels():
    assert box_pixels((0.25, 0.25, 0.75, 0.75), 32) == (8, 8, 24, 24)
    assert box_pixels((0.5, 0.5, 0.5001, 0.51), 16) == (8, 8, 9, 9)     # at least one pixel
    m = hole_masks(4, 8, ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)))
    assert m.shape == (4, 8, 8)
    assert m[0, :4].all() and not m[0, 4:].any() and m[1, 4:].all() and not m[1, :4].any()
    assert torch.equal(m[2], m[0]) and torch.equal(m[3], m[1])


def test_hole_mse_counts_hole_pixels_only():
    orig = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    holes = torch.zeros(2, 4, 4, dtype=torch.bool)
    holes[:, :2] = True                         # half of each image
    filled = orig.clone()
    filled[:, :, :2] = 255                      # wrong by 1.0 everywhere in the hole
    filled[:, :, 3] = 255                       # outside the hole: not counted
    assert hole_mse(filled, orig, holes) == 1.0
    filled[0, :, :2] = 0                        # one image right: half the hole pixels wrong
    assert hole_mse(filled, orig, holes) == 0.5


def test_params_name_bad_boxes_and_depth():
    with pytest.raises(InputError, match=r"zeroshot.holes\[1\]"):
        load_section(ZeroShotParams, {"holes": [[0, 0, 1, 1], [0.5, 0.5, 0.2, 1]]}, "params.yaml:zeroshot")
    with pytest.raises(InputError, match="zeroshot.edit_box"):
        load_section(ZeroShotParams, {"edit_box": [0, 0, 1.5, 1]}, "params.yaml:zeroshot")
    from pipeline.stages import check_params
    from pipeline.params import read_params
    params = read_params("params.yaml")
    params["zeroshot"]["depth"] = 7
    with pytest.raises(InputError, match="zeroshot.depth: 7 is not one of train.depths"):
        check_params.load_config(params, "params.yaml", None)


@pytest.fixture
def tiny_models(tiny_vq_cfg):
    torch.manual_seed(0)
    vq = VQVAE(tiny_vq_cfg).eval()
    var = randomize_(VAR(VARConfig(depth=1, vocab_size=tiny_vq_cfg.vocab_size, Cvae=tiny_vq_cfg.Cvae,
                                   patch_nums=tiny_vq_cfg.patch_nums, num_classes=3))).eval()
    return var, vq


def test_every_method_keeps_the_pixels_outside_the_hole(tiny_models):
    """Composited: outside the hole each method's image is the original, byte for byte; inside,
    the original method is the original and the sampled methods differ from it."""
    var, vq = tiny_models
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    holes = hole_masks(6, 16, ((0.25, 0.25, 0.75, 0.75), (0.5, 0.0, 1.0, 1.0)))
    out = fill_holes(var, vq, images, labels, holes, SamplingParams(cfg=1.0, top_k=20, top_p=0.9), 0, batch_size=4)
    original = torch.from_numpy(images).permute(0, 3, 1, 2)
    outside = (~holes).unsqueeze(1).expand_as(original)
    assert set(out) == set(METHODS)
    for m in METHODS:
        assert out[m].shape == (6, 3, 16, 16) and out[m].dtype == torch.uint8
        assert torch.equal(out[m][outside], original[outside]), m
    assert torch.equal(out["original"], original)
    for m in ("var_inpaint", "uncond_fill", "class_fill"):
        assert hole_mse(out[m], original, holes) > 0.01
    again = fill_holes(var, vq, images, labels, holes, SamplingParams(cfg=1.0, top_k=20, top_p=0.9), 0, batch_size=4)
    assert all(torch.equal(again[m], out[m]) for m in METHODS)   # seeded: the same images again
