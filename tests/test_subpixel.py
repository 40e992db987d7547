"""The sub-pixel form of the decoder's upsampling computes nearest 2x upsampling + 3x3 conv.

Tolerances are the floating-point bound of the reordered sums: both forms add the same
products, the sub-pixel form after summing up to three kernel taps first, so each output
differs by at most ``n u sum|w||x|`` with ``n`` the number of terms (``9 C_in + 1``, bias
included) and ``u`` the unit roundoff, which :func:`_bound` evaluates per output.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from varcore.fast.subpixel import UPSAMPLE_FORMS, decode_with, subpixel_weight, upsample_conv, upsample_conv_transposed
from varcore.sample import decode_images
from tests.conftest import randomize_


def _reference(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _bound(x, conv) -> torch.Tensor:
    """Per-output bound of the reordering error: ``2 n u (|w| * |up(x)| + |b|)``."""
    u = torch.finfo(x.dtype).eps / 2
    n = 9 * conv.in_channels + 1
    absconv = F.conv2d(F.interpolate(x.abs(), scale_factor=2.0, mode="nearest"), conv.weight.abs(),
                       None if conv.bias is None else conv.bias.abs(), padding=1)
    return 2 * n * u * absconv


@pytest.mark.parametrize("form", [upsample_conv, upsample_conv_transposed])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cin, cout, h, w, bias", [(5, 7, 4, 6, True), (3, 3, 1, 1, True), (8, 4, 9, 5, False)])
def test_upsample_conv_equals_upsample_then_conv(form, dtype, cin, cout, h, w, bias):
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias).to(dtype)
    x = torch.randn(2, cin, h, w, dtype=dtype)
    ref, got = _reference(x, conv), form(x, conv)
    assert got.shape == (2, cout, 2 * h, 2 * w)
    assert ((got - ref).abs() <= _bound(x, conv)).all(), (got - ref).abs().max()


def test_upsample_conv_keeps_channels_last():
    """The decoder's convolutions run in NHWC; the interleave hands them that layout."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    assert upsample_conv(x, conv).is_contiguous(memory_format=torch.channels_last)


def test_subpixel_weight_phases():
    """A kernel with a single 1 at tap (r, s) lands on the phase taps the upsampling maps it to:
    phase 0 reads input rows (i - 1, i) with taps (0, 1 + 2), phase 1 rows (i, i + 1) with (0 + 1, 2)."""
    to_phase_tap = {0: {0: 0, 1: 1, 2: 1}, 1: {0: 0, 1: 0, 2: 1}}
    for r in range(3):
        for s in range(3):
            w = torch.zeros(1, 1, 3, 3)
            w[0, 0, r, s] = 1.0
            K = subpixel_weight(w).view(2, 2, 2, 2)   # (row phase, column phase, 2, 2)
            for a in range(2):
                for b in range(2):
                    expect = torch.zeros(2, 2)
                    expect[to_phase_tap[a][r], to_phase_tap[b][s]] = 1.0
                    assert torch.equal(K[a, b], expect), (r, s, a, b)


def test_subpixel_weight_sums_in_float32_under_autocast():
    """bf16 weights: the tap sums are taken in float32 and rounded once (not summed in bf16)."""
    w = torch.randn(3, 2, 3, 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        K = subpixel_weight(w)
    w32 = w.float()
    row = w32[:, :, 1] + w32[:, :, 2]      # phase (0, *), kernel row 1: rows 1 + 2 of w
    expect = (row[:, :, 0]).to(torch.bfloat16)   # phase (0, 0), column tap 0: column 0
    assert K.dtype == torch.bfloat16 and torch.equal(K.view(2, 2, 3, 2, 2, 2)[0, 0, :, :, 1, 0], expect)


def test_upsample_conv_checks_the_conv():
    with pytest.raises(ValueError, match="3x3 conv with stride 1, padding 1"):
        upsample_conv(torch.randn(1, 2, 4, 4), nn.Conv2d(2, 2, 3, padding=0))
    with pytest.raises(ValueError, match="3x3 kernel"):
        subpixel_weight(torch.randn(2, 2, 1, 1))
    with pytest.raises(ValueError, match="upsample must be one of"):
        decode_with(None, torch.zeros(1), upsample="bilinear")


@pytest.mark.parametrize("form", sorted(UPSAMPLE_FORMS))
def test_decoder_with_each_upsampling_form_decodes_the_same_images(tiny_vqvae, tiny_vq_cfg, form):
    """The whole decoder (two upsamplings in the tiny config): same images as ``f_hat_to_img``
    within float32 rounding carried through the later layers (GroupNorm rescales each level,
    so the bound per upsampling does not apply after it: 1e-4 is ~1000 float32 ulps of the
    unit-range output, against observed ~1e-6)."""
    vq = randomize_(tiny_vqvae)
    s = tiny_vq_cfg.latent_size
    f_hat = torch.randn(3, tiny_vq_cfg.Cvae, s, s)
    with torch.no_grad():
        ref, got = vq.f_hat_to_img(f_hat, clamp=False), decode_with(vq, f_hat, form, clamp=False)
    assert got.shape == ref.shape == (3, 3, tiny_vq_cfg.image_size, tiny_vq_cfg.image_size)
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
    assert ref.abs().max() > 0.1   # the decoder is not near zero, so the comparison means something


def test_compiled_decode_runs_the_subpixel_decoder(tiny_vqvae, tiny_vq_cfg, monkeypatch, aot_eager):
    """``decode_images(compiled=True)`` (the CUDA default) goes through the fast decoder in the
    form ``DECODE_UPSAMPLE``, in chunks, and clamps; here through dynamo's aot_eager backend."""
    calls = []
    import varcore.sample as sample_mod
    monkeypatch.setattr(sample_mod, "decode_with",
                        lambda vq, f, form: calls.append(form) or decode_with(vq, f, form))
    vq = randomize_(tiny_vqvae)
    s = tiny_vq_cfg.latent_size
    f_hat = torch.randn(5, tiny_vq_cfg.Cvae, s, s) * 3
    got = decode_images(vq, f_hat, chunk=2, compiled=True)
    ref = decode_images(vq, f_hat, chunk=2, compiled=False)
    assert calls and set(calls) == {sample_mod.DECODE_UPSAMPLE}
    assert got.shape == ref.shape and got.abs().max() <= 1.0
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
