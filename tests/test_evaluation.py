"""The evaluation: the classifier as torch-fidelity's feature network ranks known degradations,
and bad sample sets are named (what the evaluate stages record: test_stage_runs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ArtifactError, WeightsError
from pipeline.evaluation.classifier import accuracy, load_classifier, save_classifier, train_classifier
from pipeline.evaluation.config import ClassifierParams, EvaluateParams, SamplingParams
from pipeline.evaluation.fidelity import UInt8Images, check_images, feature_network, score
from pipeline.evaluation.samples import balanced_labels, balanced_subset, class_grid

SIZE = 16


def pattern_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8 classes of 16x16 stripes: 4 orientations x 2 colours, random phase and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    images, labels = [], []
    for c in range(8):
        angle, colour = (c % 4) * np.pi / 4, c // 4
        for _ in range(n_per_class):
            wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 1.2 + rng.uniform(0, 2 * np.pi))
            img = np.zeros((SIZE, SIZE, 3), np.float32)
            img[..., colour] = 127 + 110 * wave
            img[..., 2] = 60
            img += rng.normal(0, 12, img.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    images, labels = pattern_images(150, seed=0)
    p = ClassifierParams(width=8, epochs=3, batch_size=64, lr=5e-3, seed=0)
    model = train_classifier(p, images, labels, 8, torch.device("cpu"))
    val, val_labels = pattern_images(100, seed=1)
    acc = accuracy(model, val, val_labels)
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    save_classifier(path, model, {"val_accuracy": acc})
    return path, acc, val, val_labels


def _fid(a, b, path) -> float:
    return score(UInt8Images(a), UInt8Images(b), feature_network("classifier", path, None), torch.device("cpu"),
                 kid_subset_size=100)["fid"]


def test_classifier_ranks_copy_blur_and_mode_dropping(classifier):
    """FID(val, val) is 0 up to the matrix square root's round-off; a blur is worse; keeping 2 of 8
    classes (mode dropping) is worse still."""
    path, acc, val, val_labels = classifier
    assert acc > 0.9
    blurred = F.avg_pool2d(torch.from_numpy(val).permute(0, 3, 1, 2).float(), 3, stride=1, padding=1,
                           count_include_pad=False).round().byte().permute(0, 2, 3, 1).numpy()
    two = val[np.isin(val_labels, [0, 5])]
    same, blur, dropped = _fid(val, val, path), _fid(blurred, val, path), _fid(two, val, path)
    assert abs(same) < 1e-3 < blur < dropped


def test_extractor_features_and_logits_follow_the_requested_order(classifier):
    from pipeline.evaluation.fidelity import _classifier_extractor_class
    path, _, val, _ = classifier
    cls = _classifier_extractor_class()
    model, meta = load_classifier(path)
    x = torch.from_numpy(val[:4]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        feats = model.features(x.float().div(127.5).sub(1))
        logits = model.head(feats)
        a = cls("x", ["logits", "features"], feature_extractor_weights_path=str(path))(x)
        b = cls("x", ["features"], feature_extractor_weights_path=str(path))(x)
    assert torch.allclose(a[0], logits) and torch.allclose(a[1], feats) and torch.allclose(b[0], feats)
    assert cls.get_default_feature_layer_for_metric("isc") == "logits"
    assert cls.get_default_feature_layer_for_metric("fid") == "features"
    assert meta["val_accuracy"] > 0.9


def test_inception_weights_missing_name_the_params_key(tmp_path):
    with pytest.raises(WeightsError, match=r"evaluate.inception_weights.*weights-inception-2015-12-05"):
        feature_network("inception", None, str(tmp_path / "weights.pth"))
    with pytest.raises(Exception, match="inception_weights"):
        EvaluateParams(feature_network="inception")


def test_bad_sample_sets_are_named():
    good = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    check_images(good, 6, 8, "samples of d2, seed 0")
    with pytest.raises(ArtifactError, match=r"samples of d2, seed 0: expected 6 uint8 images .* got torch.float32"):
        check_images(good.float(), 6, 8, "samples of d2, seed 0")
    with pytest.raises(ArtifactError, match=r"samples of d2, seed 1: expected 6 .* \(5, 3, 8, 8\)"):
        check_images(good[:5], 6, 8, "samples of d2, seed 1")


def test_class_balanced_labels_subsets_and_grid():
    labels = balanced_labels(3, 4)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    idx = balanced_subset(np.repeat(np.arange(3), 10), 4, seed=0)
    assert np.bincount(np.repeat(np.arange(3), 10)[idx]).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="class 2 has 1 images"):
        balanced_subset(np.array([0, 0, 1, 1, 2]), 2, seed=0)
    images = torch.arange(3).repeat_interleave(4).view(12, 1, 1, 1).expand(12, 3, 2, 2).to(torch.uint8)
    g = class_grid(images, labels, columns=3)
    assert g.shape == (6, 6, 3) and g[0, 0, 0] == 0 and g[2, 0, 0] == 1 and g[4, 5, 0] == 2


def test_sampling_params_are_checked():
    with pytest.raises(Exception, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(Exception, match="seeds"):
        EvaluateParams(seeds=(1, 1))
