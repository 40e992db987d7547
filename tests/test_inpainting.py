"""The zeroshot stage: in-painting against its two baselines, scored in the hole and by FID."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.evaluation.config import EvaluateParams, SamplingParams, ZeroShotParams
from pipeline.evaluation.inpainting import METHODS, box_pixels, fill_holes, hole_masks, hole_mse
from pipeline.params import load_section
from tests.conftest import randomize_
from varcore import VAR, VARConfig, VQVAE

from . import test_evaluation

classifier = test_evaluation.classifier   # the module-scoped feature network fixture


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


@pytest.mark.slow
def test_zeroshot_stage_writes_the_table_record_and_picture(classifier, tmp_path, tiny_models):
    from pipeline.stages import data, zeroshot
    from pipeline.tokenizer.checkpoint import save_tokenizer
    from pipeline.training.checkpoint import save_var
    from tests.helpers import write_image_folder
    var, vq = tiny_models
    path, _, _, _ = classifier
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=20, size=16)
    data.run(data.DataParams(source="image_folder", root=str(root), image_size=16, val_fraction=0.5),
             data.Paths(tmp_path / "images", tmp_path / "data.json"))
    save_tokenizer(tmp_path / "tok.pt", vq)
    save_var(tmp_path / "var-d1.pt", var, ["a", "b", "c"])
    cfg = zeroshot.ZeroShotConfig(ZeroShotParams(depth=1, images=12, batch_size=5, grid_images=4),
                                  EvaluateParams(sampling=SamplingParams(cfg=1.0, top_k=20, top_p=0.9),
                                                 kid_subset_size=10))
    paths = zeroshot.Paths(tmp_path / "var-d1.pt", tmp_path / "tok.pt", path, tmp_path / "images",
                           tmp_path / "zeroshot.json", tmp_path / "runs" / "zeroshot.json", tmp_path / "zeroshot.png")
    m = zeroshot.run(cfg, paths)
    assert json.loads(paths.metrics.read_text()) == m
    assert m["original/mse_hole"] == 0.0 and m["var_inpaint/mse_hole"] > 0
    assert {f"{k}/fid" for k in METHODS} <= set(m)
    r = json.loads(paths.record.read_text())
    assert r["images"] == 12 and r["reference_images"] == 30 - 12 and r["lpips"] is False
    assert 0.3 < r["hole_fraction"] < 0.5       # centre quarter, bottom half, right half, cycled over 12 images
    from PIL import Image
    with Image.open(paths.grid) as im:
        assert im.size == (4 * 16, 7 * 16) and im.info["varscale.rows"].startswith("original | masked")
    assert zeroshot.run(cfg, paths) == m      # same seed: the same numbers
    bad = zeroshot.ZeroShotConfig(ZeroShotParams(depth=1, images=30), cfg.evaluate)
    with pytest.raises(InputError, match="too few for zeroshot.images=30"):
        zeroshot.run(bad, paths)
