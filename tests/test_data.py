"""Stage ``data``: sources, odd and corrupt images, deterministic stratified split."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DataError, ParamsError
from pipeline.images import load_split
from pipeline.stages.data import DataParams, Paths, load_config, run, stratified_split
from tests.helpers import write_idx_images, write_idx_labels, write_image_folder


def _params(root, **kw):
    return DataParams(**{"source": "image_folder", "root": str(root), "image_size": 16, "val_fraction": 0.25, **kw})


def test_odd_and_corrupt_images_are_converted_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=16)
    Image.fromarray(np.full((16, 16), 128, np.uint8), mode="L").save(root / "class0" / "grey.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255                                           # red, fully transparent -> white
    Image.fromarray(rgba, mode="RGBA").save(root / "class0" / "alpha.png")
    Image.fromarray(np.zeros((40, 24, 3), np.uint8)).save(root / "class1" / "big.jpg")
    good = (root / "class1" / "img0.png").read_bytes()
    (root / "class1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class1" / "notanimage.png").write_text("hello")
    (root / "empty_class").mkdir()
    m = run(_params(root), Paths(tmp_path / "out", tmp_path / "metrics.json"))
    assert m["converted_grey"] == 1 and m["converted_alpha"] == 1 and m["resized"] == 1
    assert m["skipped_unreadable"] == 2 and m["skipped_empty_classes"] == 1
    assert m["num_classes"] == 2 and m["train_images"] + m["val_images"] == 4 + 2 + 4 + 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == ["class0", "class1"]
    imgs, labels = load_split(tmp_path / "out", "train")
    vimgs, vlabels = load_split(tmp_path / "out", "val")
    assert imgs.shape[1:] == (16, 16, 3) and imgs.dtype == np.uint8
    all_imgs = np.concatenate([imgs, vimgs])
    # the transparent image became white, the grey one grey in all three channels
    assert any((im == 255).all() for im in all_imgs)
    assert any((im == 128).all() for im in all_imgs)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m


def test_missing_or_empty_root_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        run(_params(tmp_path / "nope"), Paths(tmp_path / "out", tmp_path / "m.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        run(_params(tmp_path / "empty"), Paths(tmp_path / "out", tmp_path / "m.json"))
    (tmp_path / "empty" / "a").mkdir()
    (tmp_path / "empty" / "a" / "x.png").write_text("not an image")
    with pytest.raises(DataError, match="no readable images"):
        run(_params(tmp_path / "empty"), Paths(tmp_path / "out", tmp_path / "m.json"))
    assert not (tmp_path / "out" / "train.npy").exists()


def test_split_is_deterministic_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 30, 5])
    tr, va = stratified_split(labels, 0.2, seed=3)
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    _, va3 = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2) and not np.array_equal(va, va3)
    assert np.bincount(labels[va]).tolist() == [2, 4, 6, 1]
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)


def test_manifest_records_counts_and_split_hashes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=8)
    run(_params(root, seed=1), Paths(tmp_path / "a", tmp_path / "ma.json"))
    run(_params(root, seed=1), Paths(tmp_path / "b", tmp_path / "mb.json"))
    run(_params(root, seed=2), Paths(tmp_path / "c", tmp_path / "mc.json"))
    a, b, c = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "abc")
    assert a["splits"] == b["splits"]
    assert a["splits"]["val"]["ids_sha256"] != c["splits"]["val"]["ids_sha256"]
    assert a["splits"]["val"]["per_class"] == {"class0": 2, "class1": 2, "class2": 2}


def test_fashion_mnist_reader(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("t10k", 10)):
        write_idx_images(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_labels(tmp_path / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    p = DataParams(source="fashion_mnist", root=str(tmp_path), image_size=32, val_fraction=0.25)
    m = run(p, Paths(tmp_path / "out", tmp_path / "m.json"))
    assert m["num_classes"] == 10 and m["train_images"] + m["val_images"] == 40
    assert m["converted_grey"] == 40 and m["resized"] == 40
    imgs, _ = load_split(tmp_path / "out", "train")
    assert imgs.shape[1:] == (32, 32, 3) and (imgs[..., 0] == imgs[..., 2]).all()
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        run(DataParams(source="fashion_mnist", root=str(tmp_path / "none")),
            Paths(tmp_path / "o2", tmp_path / "m2.json"))


def test_bad_params_name_the_key():
    with pytest.raises(ParamsError, match=r"params.yaml:data.val_fraction"):
        load_config({"data": {"val_fraction": 1.5}}, "params.yaml", None)
    with pytest.raises(ParamsError, match=r"params.yaml:data: unknown key\(s\) \['colour'\]"):
        load_config({"data": {"colour": True}}, "params.yaml", None)
    with pytest.raises(ParamsError, match=r"params.yaml:data.image_size: expected int"):
        load_config({"data": {"image_size": "big"}}, "params.yaml", None)
    with pytest.raises(ParamsError, match=r"params.yaml:data: section missing"):   # never silent defaults
        load_config({"tokenizer": {}}, "params.yaml", None)
    with pytest.raises(ParamsError, match=r"data.source: must be one of \['fashion_mnist', 'image_folder'\]"):
        load_config({"data": {"source": "cifar"}}, "params.yaml", None)
