"""Multi-scale residual quantisation (Alg. 1 / 2)."""

import pytest
import torch
import torch.nn.functional as F

from varcore import MultiScaleQuantizer, flatten_tokens
from varcore.errors import ConfigError


def _quantizer(V=512, C=16, patch_nums=(1, 2, 3, 4, 6, 8), num_phi=None, scale=1.0):
    q = MultiScaleQuantizer(V, C, patch_nums, num_phi=num_phi)
    with torch.no_grad():
        q.embedding.weight.normal_().mul_(scale)
    return q


def _err_after_each_scale(q, f):
    idx = q.f_to_idx(f)
    return [F.mse_loss(q.idx_to_f_hat(idx, upto=k), f).item() for k in range(1, len(idx) + 1)], idx


@pytest.mark.parametrize("num_phi", [0, 1, 3, None])
def test_residual_error_shrinks_scale_by_scale(num_phi):
    q = _quantizer(num_phi=num_phi, scale=0.5)
    if num_phi:
        with torch.no_grad():  # phi near identity (a trained tokenizer's phi; random convs are not)
            for phi in q.phis:
                phi.weight.mul_(0.1)
                phi.weight[:, :, 1, 1] += torch.eye(16)
    f = torch.randn(4, 16, 8, 8)
    errs, _ = _err_after_each_scale(q, f)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.6 * errs[0]


@pytest.mark.parametrize("num_phi", [0, None])
def test_roundtrip_tokens_fhat_tokens_exact(num_phi):
    """tokens -> f_hat -> tokens is exact when f is built from a well separated codebook.

    Exactness needs each scale's own code to dominate its cell after the bicubic-up /
    area-down round trip; that holds for integer scale ratios (1, 2, 4, 8). With ratios
    like 3 -> 8 a cell mixes several codes and Alg. 1 may re-encode differently.
    """
    q = _quantizer(V=32, C=128, patch_nums=(1, 2, 4, 8), num_phi=num_phi)
    with torch.no_grad():  # phi near identity, as a trained tokenizer's
        for phi in q.phis:
            phi.weight.mul_(0.1)
            phi.weight[:, :, 1, 1] += torch.eye(128)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        idx = [torch.randint(0, 32, (3, pn, pn), generator=g) for pn in q.patch_nums]
        f = q.idx_to_f_hat(idx)
        idx2 = q.f_to_idx(f)
        assert all(torch.equal(a, b) for a, b in zip(idx, idx2))
        assert torch.allclose(q.idx_to_f_hat(idx2), f)


def test_alg1_training_pass_matches_alg2_decode():
    q = _quantizer()
    f = torch.randn(2, 16, 8, 8, requires_grad=True)
    f_hat_st, loss, usage = q(f)
    idx = q.f_to_idx(f)
    assert torch.allclose(f_hat_st, q.idx_to_f_hat(idx), atol=1e-5)
    # straight-through: d f_hat / d f is the identity
    g = torch.randn_like(f)
    (f_hat_st * g).sum().backward()
    assert torch.allclose(f.grad, g)
    assert loss.item() > 0
    assert len(usage.used_fraction) == 6 and all(0 < u <= 1 for u in usage.used_fraction)
    # scale 1 (1x1, B=2) can use at most 2 of 512 codes; perplexity is bounded by that count
    assert usage.used_fraction[0] <= 2 / 512 and 1 <= usage.perplexity[0] <= 2 + 1e-6
    assert all(1 <= p <= 512 for p in usage.perplexity)


def test_commitment_loss_trains_codebook_and_phi():
    q = _quantizer(num_phi=2)
    f = torch.randn(2, 16, 8, 8)
    _, loss, _ = q(f)
    loss.backward()
    assert q.embedding.weight.grad.abs().sum() > 0
    assert all(p.weight.grad.abs().sum() > 0 for p in q.phis)


def test_var_input_is_downsampled_partial_f_hat():
    q = _quantizer()
    idx = q.f_to_idx(torch.randn(2, 16, 8, 8))
    x = q.idx_to_var_input(idx)
    L = sum(p * p for p in q.patch_nums)
    assert x.shape == (2, L - 1, 16)
    start = 0
    for k in range(1, len(q.patch_nums)):
        pn = q.patch_nums[k]
        expect = F.interpolate(q.idx_to_f_hat(idx, upto=k), size=(pn, pn), mode="area")
        got = x[:, start:start + pn * pn].transpose(1, 2).reshape(2, 16, pn, pn)
        assert torch.allclose(got, expect, atol=1e-5)
        start += pn * pn


def test_add_scale_builds_same_f_hat_as_decode():
    q = _quantizer()
    idx = q.f_to_idx(torch.randn(2, 16, 8, 8))
    f_hat = torch.zeros(2, 16, 8, 8)
    for k, r in enumerate(idx):
        f_hat, nxt = q.add_scale(k, f_hat, q.lookup(r))
        assert (nxt is None) == (k == len(idx) - 1)
    assert torch.allclose(f_hat, q.idx_to_f_hat(idx), atol=1e-6)


def test_flatten_and_split_tokens_roundtrip():
    q = _quantizer()
    idx = q.f_to_idx(torch.randn(2, 16, 8, 8))
    flat = flatten_tokens(idx)
    assert flat.shape == (2, 1 + 4 + 9 + 16 + 36 + 64)
    assert all(torch.equal(a, b) for a, b in zip(idx, q.split_tokens(flat)))


def test_wrong_latent_shape_and_bad_config():
    q = _quantizer()
    with pytest.raises(ValueError, match=r"\(B, 16, 8, 8\)"):
        q.f_to_idx(torch.randn(1, 16, 6, 6))
    with pytest.raises(ConfigError) as e:
        MultiScaleQuantizer(16, 4, (1, 2), num_phi=3)
    assert e.value.field == "num_phi"
