"""Tokenizer training (stage ``train_tokenizer``): compound loss pieces, LPIPS from local weights,
exact resume after a crash."""


import numpy as np
import pytest
import torch

from pipeline.errors import WeightsError
from pipeline.tokenizer.config import TokenizerParams, TokenizerTrainParams
from pipeline.tokenizer.perceptual import load_lpips
from pipeline.tokenizer.training import Trainer, evaluate, psnr
from varcore import VQVAEConfig
from varcore.disc import adaptive_gan_weight, hinge_d_loss, hinge_g_loss

MODEL = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, mid_attn=False, Cvae=8,
                    vocab_size=32, patch_nums=(1, 2, 4, 8))


def _images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _params(**kw):
    train = dict(epochs=2, batch_size=8, lr=1e-3, disc_start_step=3, disc_ch=8, log_every=1, seed=3)
    train.update(kw)
    return TokenizerParams(model=MODEL, train=TokenizerTrainParams(**train))


def test_hinge_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    w = torch.ones(3, requires_grad=True)
    rec, gan = (w * 4).sum(), (w * 2).sum()       # gradients 4 and 2 per element
    assert adaptive_gan_weight(rec, gan, w).item() == pytest.approx(2.0, rel=1e-3)


class Crash(Exception):
    pass


def crash_at_5(step):
    """An ``on_step`` hook: the run dies at step 5."""
    if step == 5:
        raise Crash


def test_resume_after_crash_gives_identical_weights(tmp_path):
    imgs = _images()
    p = _params(checkpoint_every=2)                 # 3 steps/epoch, GAN from epoch 1
    ref = Trainer(p, "fp")
    ref.fit(imgs, tmp_path / "ref.pt")

    crashed = Trainer(p, "fp")
    with pytest.raises(Crash):
        crashed.fit(imgs, tmp_path / "state.pt", on_step=crash_at_5)
    resumed = Trainer(p, "fp")
    assert resumed.try_resume(tmp_path / "state.pt")
    assert resumed.state.step == 4 and resumed.state.epoch == 1 and resumed.state.batch == 1
    resumed.fit(imgs, tmp_path / "state.pt")
    assert resumed.state.step == ref.state.step == 6
    for (k, a), b in zip(ref.vq.state_dict().items(), resumed.vq.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(ref.disc.state_dict().values(), resumed.disc.state_dict().values()):
        assert torch.equal(a, b)
    # state of another run (other fingerprint) is not resumed
    assert not Trainer(p, "other").try_resume(tmp_path / "state.pt")


def test_corrupt_latest_state_falls_back_to_the_one_before(tmp_path, caplog):
    """States are kept at steps 2, 3 (epoch end) and 4 when the run dies at step 5; the step-4 file
    is truncated: the run resumes from the step-3 state with a warning naming the bad file and ends
    with the uninterrupted run's weights."""
    imgs = _images()
    p = _params(checkpoint_every=2)
    ref = Trainer(p, "fp")
    ref.fit(imgs, tmp_path / "ref.pt")

    with pytest.raises(Crash):
        Trainer(p, "fp").fit(imgs, tmp_path / "state.pt", on_step=crash_at_5)
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    resumed = Trainer(p, "fp")
    with caplog.at_level("WARNING"):
        assert resumed.try_resume(state)
    assert f"skipping unreadable tokenizer state {state}" in caplog.text
    assert (resumed.state.step, resumed.state.epoch, resumed.state.batch) == (3, 1, 0)
    resumed.fit(imgs, state)
    for (k, a), b in zip(ref.vq.state_dict().items(), resumed.vq.state_dict().values()):
        assert torch.equal(a, b), k


def test_training_reduces_reconstruction_error(tmp_path):
    imgs = np.repeat(_images(8), 4, axis=0)           # few distinct images: fast to fit
    p = _params(epochs=6, disc_start_step=10**6, lambda_g=0.0)
    tr = Trainer(p, "fp")
    before = evaluate(tr.vq, imgs)["psnr"]
    logged = []
    tr.fit(imgs, tmp_path / "s.pt", on_log=lambda s, m: logged.append(m))
    after = evaluate(tr.vq, imgs)
    assert after["psnr"] > before + 1.0
    assert len(after["codebook_used"]) == 4 and after["codebook_used"][0] <= 1 / 32 + 1e-9
    assert {"rec", "commit", "psnr", "codebook_used_s0", "codebook_ppl_s3"} <= set(logged[0])
    assert "gan_g" not in logged[0]


def test_gan_terms_logged_after_disc_start(tmp_path):
    logged = []
    Trainer(_params(), "fp").fit(_images(), tmp_path / "s.pt", on_log=lambda s, m: logged.append((s, m)))
    assert all("gan_g" not in m for s, m in logged if s <= 3)
    assert all({"gan_g", "gan_d", "gan_weight"} <= set(m) for s, m in logged if s > 3)


def test_psnr_value():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a + 0.2, a) == pytest.approx(10 * np.log10(4 / 0.04))


def test_lpips_from_local_vgg_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    model = load_lpips(path)
    assert torch.equal(model.net.slice1[0].weight, vgg.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "28").bias, vgg.features[28].bias)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max() < 1e-6 and (model(x, y) > 0).all()
    tr = Trainer(_params(lambda_g=0.0), "fp", lpips_model=model)
    m = tr.step(torch.rand(2, 3, 16, 16) * 2 - 1, gan_on=False)
    assert m["lpips"] > 0


def test_lpips_missing_or_wrong_weights_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="vgg16.pth: VGG16 weights for LPIPS not found"):
        load_lpips(tmp_path / "vgg16.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="bad.pth: expected a torchvision vgg16 state dict"):
        load_lpips(tmp_path / "bad.pth")


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="batch_size 8 exceeds the 4 training images"):
        Trainer(_params(), "fp").fit(_images(4), tmp_path / "s.pt")
