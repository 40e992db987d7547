"""The `varscale` command: samples and the zero-shot tasks from files, settings in the PNG, and one
error naming the flag for each bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.files import sha256_file
from pipeline.evaluation.config import SamplingParams
from pipeline.evaluation.samples import sample_images
from pipeline.images import grid, to_uint8_images
from pipeline.tokenizer.checkpoint import save_tokenizer
from pipeline.training.checkpoint import save_var
from pipeline.zeroshot import main
from varcore import VAR, VARConfig, VQVAE, VQVAEConfig
from varcore.sample import SamplingConfig, inpaint, outpaint

from .conftest import randomize_

NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"]
SETTINGS = ["--cfg", "1.5", "--top-k", "20", "--top-p", "0.9", "--params", "absent.yaml"]


@pytest.fixture
def files(tmp_path):
    vq_cfg = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, Cvae=8, vocab_size=64,
                         patch_nums=(1, 2, 3, 4))
    vq = VQVAE(vq_cfg).eval()
    save_tokenizer(tmp_path / "tokenizer.pt", vq)
    var = randomize_(VAR(VARConfig(depth=2, vocab_size=64, Cvae=8, patch_nums=(1, 2, 3, 4), num_classes=5))).eval()
    save_var(tmp_path / "var-d2.pt", var, NAMES, {"tokenizer_sha256": sha256_file(tmp_path / "tokenizer.pt")})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    return tmp_path, vq, var


def run(tmp, *args):
    """The command as its console script calls it: ``sys.exit(main())`` must mean success."""
    assert main([args[0], "--model", str(tmp / "var-d2.pt"), "--tokenizer", str(tmp / "tokenizer.pt"),
                 *SETTINGS, *args[1:]]) is None


def png(path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_generate_writes_a_class_grid_with_its_settings(files):
    tmp, _, _ = files
    run(tmp, "generate", "--classes", "Trouser,3", "--per-class", "3", "--seed", "5", "--out", str(tmp / "g.png"))
    arr, text = png(tmp / "g.png")
    assert arr.shape == (2 * 16, 3 * 16, 3)
    assert text["varscale.seed"] == "5" and text["varscale.classes"] == "1,3"
    assert "'cfg': 1.5" in text["varscale.sampling"] and "'top_k': 20" in text["varscale.sampling"]
    run(tmp, "generate", "--classes", "Trouser,3", "--per-class", "3", "--seed", "5", "--out", str(tmp / "h.png"))
    run(tmp, "generate", "--classes", "Trouser,3", "--per-class", "3", "--seed", "6", "--out", str(tmp / "i.png"))
    assert np.array_equal(png(tmp / "h.png")[0], arr) and not np.array_equal(png(tmp / "i.png")[0], arr)
    # the images the evaluate stage would draw with these labels, seed and settings
    _, vq, var = files
    want = sample_images(var, vq, torch.tensor([1, 3]).repeat_interleave(3), SamplingParams(1.5, 20, 0.9), 5, 64)
    assert np.array_equal(arr, grid(list(want.view(2, 3, 3, 16, 16))))


def test_inpaint_is_varcore_inpainting_and_mask_equals_box(files):
    tmp, vq, var = files
    run(tmp, "inpaint", "--image", str(tmp / "in.png"), "--box", "4,2,12,10", "--class", "dress", "--seed", "3",
        "--out", str(tmp / "box.png"))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    run(tmp, "inpaint", "--image", str(tmp / "in.png"), "--mask", str(tmp / "mask.png"), "--class", "3",
        "--seed", "3", "--out", str(tmp / "mask_out.png"))
    got, text = png(tmp / "box.png")
    assert np.array_equal(png(tmp / "mask_out.png")[0], got) and text["varscale.class"] == "3"
    img = torch.from_numpy(np.asarray(Image.open(tmp / "in.png").convert("RGB")).copy()).permute(2, 0, 1)[None]
    x = img.float().div(127.5).sub(1)
    out, idx, teacher = inpaint(var, vq, x, torch.from_numpy(mask == 255)[None], torch.tensor([3]),
                                SamplingConfig(cfg=1.5, top_k=20, top_p=0.9), torch.Generator().manual_seed(3))
    assert np.array_equal(got, to_uint8_images(out)[0].permute(1, 2, 0).numpy())
    for k, keep in enumerate(teacher.keep_masks):   # every token outside the region is the image's own
        assert torch.equal(idx[k][keep], teacher.idx_list[k][keep])


def test_outpaint_and_edit_keep_the_input_size(files):
    tmp, vq, var = files
    for cmd, extra in (("outpaint", []), ("edit", ["--class", "Coat"]), ("inpaint", [])):
        run(tmp, cmd, "--image", str(tmp / "big.png"), "--box", "12,12,36,36", *extra, "--out", str(tmp / f"{cmd}.png"))
        arr, text = png(tmp / f"{cmd}.png")
        assert arr.shape == (48, 48, 3) and text["varscale.command"] == cmd
    assert png(tmp / "edit.png")[1]["varscale.class"] == "4"
    assert png(tmp / "inpaint.png")[1]["varscale.class"] == "5"     # no --class: the unconditional class
    # out-painting keeps the box: the same as varcore's outpaint at the model's size
    run(tmp, "outpaint", "--image", str(tmp / "in.png"), "--box", "4,4,12,12", "--class", "1", "--out",
        str(tmp / "o16.png"))
    x = torch.from_numpy(np.asarray(Image.open(tmp / "in.png").convert("RGB")).copy()).permute(2, 0, 1)[None]
    keep = torch.zeros(1, 16, 16, dtype=torch.bool)
    keep[:, 4:12, 4:12] = True
    out, _, _ = outpaint(var, vq, x.float().div(127.5).sub(1), keep, torch.tensor([1]),
                         SamplingConfig(cfg=1.5, top_k=20, top_p=0.9), torch.Generator().manual_seed(0))
    assert np.array_equal(png(tmp / "o16.png")[0], to_uint8_images(out)[0].permute(1, 2, 0).numpy())


def test_bad_inputs_name_the_flag(files):
    tmp, _, _ = files
    (tmp / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "small_mask.png")
    grey = np.zeros((16, 16), np.uint8)
    grey[2:5, 2:5] = 128
    Image.fromarray(grey).save(tmp / "grey.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "empty.png")
    img, out = ["--image", str(tmp / "in.png")], ["--out", str(tmp / "x.png")]
    cases = [
        (["generate", "--depth", "9", *out], None, r"--depth 9: models/var-d9.pt not found"),
        (["inpaint", "--image", str(tmp / "text.png"), "--box", "0,0,4,4", *out], tmp, r"--image .*text.png: cannot read"),
        (["inpaint", *img, "--mask", str(tmp / "small_mask.png"), *out], tmp, r"--mask .*: 8x8, the image is 16x16"),
        (["inpaint", *img, "--mask", str(tmp / "grey.png"), *out], tmp, r"--mask .*grey.png: not black and white"),
        (["inpaint", *img, "--mask", str(tmp / "empty.png"), *out], tmp, r"--mask .*empty.png: empty"),
        (["edit", *img, "--box", "0,0,4,4", "--class", "Sandal", *out], tmp, r"--class 'Sandal': not a class name"),
        (["edit", *img, "--box", "0,0,4,4", "--class", "7", *out], tmp, r"--class 7: class ids are 0..4"),
        (["inpaint", *img, "--box", "0,0,4,20", *out], tmp, r"--box 0,0,4,20: not inside the 16x16 image"),
        (["inpaint", *img, "--box", "4,4", *out], tmp, r"--box 4,4: expected top,left,bottom,right"),
        (["inpaint", *img, *out], tmp, r"give exactly one of --mask and --box"),
        (["edit", *img, "--box", "0,0,4,4", *out], tmp, r"edit needs --class"),
        (["inpaint", "--image", str(tmp / "nope.png"), "--box", "0,0,4,4", *out], tmp, r"--image .*nope.png: not found"),
    ]
    for args, model_dir, message in cases:
        argv = args if model_dir is None else [args[0], "--model", str(tmp / "var-d2.pt"), *args[1:]]
        with pytest.raises(SystemExit, match=r"varscale \w+: " + message):
            main([*argv, "--tokenizer", str(tmp / "tokenizer.pt"), *SETTINGS])
    assert not (tmp / "x.png").exists()


def test_a_model_of_another_tokenizer_is_refused(files):
    tmp, vq, var = files
    save_var(tmp / "other.pt", var, NAMES, {"tokenizer_sha256": "0" * 64})
    with pytest.raises(SystemExit, match=r"other.pt: trained on the tokens of another tokenizer"):
        main(["generate", "--model", str(tmp / "other.pt"), "--tokenizer", str(tmp / "tokenizer.pt"),
              "--out", str(tmp / "x.png"), *SETTINGS])
