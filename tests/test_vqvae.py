"""VQ-VAE shapes, gradients and token interface."""

import torch

from varcore import VQVAE, VQVAEConfig


def test_paper_scale_config_downsamples_16x():
    cfg = VQVAEConfig(image_size=256, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, Cvae=32,
                      vocab_size=4096, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert cfg.downsample == 16 and cfg.latent_size == 16


def test_shapes_and_token_interface(tiny_vqvae, tiny_vq_cfg):
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    out = tiny_vqvae(img)
    assert out.img_hat.shape == img.shape and out.f.shape == (3, 8, 4, 4)
    idx = tiny_vqvae.img_to_idx(img)
    assert [tuple(i.shape) for i in idx] == [(3, p, p) for p in tiny_vq_cfg.patch_nums]
    assert all(i.dtype == torch.long and 0 <= i.min() and i.max() < tiny_vq_cfg.vocab_size for i in idx)
    rec = tiny_vqvae.idx_to_img(idx)
    assert rec.shape == img.shape and rec.abs().max() <= 1
    # tokens decode to the same image the training pass produces (Alg. 1 == Alg. 2)
    assert torch.allclose(rec, out.img_hat.clamp(-1, 1), atol=1e-5)


def test_gradients_reach_encoder_through_straight_through(tiny_vq_cfg):
    vq = VQVAE(tiny_vq_cfg).train()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    out = vq(img)
    ((out.img_hat - img).abs().mean() + out.commit_loss).backward()
    enc_grad = sum(p.grad.abs().sum() for p in vq.encoder.parameters() if p.grad is not None)
    assert enc_grad > 0 and vq.quantizer.embedding.weight.grad.abs().sum() > 0


def test_rejects_wrong_image_shape(tiny_vqvae):
    import pytest
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        tiny_vqvae(torch.zeros(1, 3, 32, 32))
