"""The decoder's nearest-neighbour 2x upsampling + 3x3 convolution as one sub-pixel convolution.

``conv3x3(upsample2x(x))`` repeats every input pixel four times before convolving, so each of
the four output phases (even/odd row, even/odd column) sees only two distinct input rows and
two distinct input columns under the 3x3 kernel: row phase 0 reads input rows ``i-1, i`` with
kernel rows ``w0`` and ``w1 + w2``, row phase 1 reads ``i, i+1`` with ``w0 + w1`` and ``w2`` (the
same for columns). The four phases are one 2x2 convolution with ``4 C_out`` output channels over
the low-resolution input (padded by one), followed by interleaving the phases into the
high-resolution grid (a pixel shuffle). That is 16 instead of 36 multiply-adds per output pixel
and channel pair, on a matmul shape four times wider in ``N``, and the upsampled input is never
written. The same function up to the order of the additions (the kernel-tap sums are taken once
in float32 before the convolution rounds the weights to its dtype). The same phases are also a
transposed convolution (stride 2, 4x4 kernel), which writes them interleaved itself
(:func:`upsample_conv_transposed`); :data:`UPSAMPLE_FORMS` names the forms the decoder can use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..vqvae import Upsample


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernel rows (or columns, by ``dim``) each output phase applies to its two input
    rows after a nearest 2x upsampling: phase 0 ``(w0, w1 + w2)``, phase 1 ``(w0 + w1, w2)``."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def subpixel_weight(w_OI33: torch.Tensor) -> torch.Tensor:
    """The 2x2 kernels of the four output phases, ``(4 O, I, 2, 2)`` in phase order
    ``(row phase, column phase, O)``, summed in float32 (or wider) from a 3x3 kernel ``(O, I, 3, 3)``
    (additions only: no matmul that autocast would run in bf16)."""
    if w_OI33.shape[-2:] != (3, 3):
        raise ValueError(f"sub-pixel upsampling needs a 3x3 kernel, got {tuple(w_OI33.shape)}")
    O, I = w_OI33.shape[:2]
    w = w_OI33.to(torch.promote_types(w_OI33.dtype, torch.float32))
    K = torch.stack([torch.stack(_phase_taps(rows, -1)) for rows in _phase_taps(w, -2)])   # (a, b, O, I, 2, 2)
    return K.reshape(4 * O, I, 2, 2).to(w_OI33.dtype)


def upsample_conv(x_BChw: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, padding-1
    ``conv``, computed as one 2x2 convolution over ``x`` and a phase interleave: ``(B, O, 2h, 2w)``."""
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1 \
            or conv.dilation != (1, 1):
        raise ValueError(f"sub-pixel upsampling needs a 3x3 conv with stride 1, padding 1, got {conv}")
    B, _, h, w = x_BChw.shape
    O = conv.out_channels
    bias = None if conv.bias is None else conv.bias.repeat(4)
    # (B, 4 O, h + 1, w + 1): phase (a, b) of output pixel (i, j) sits at (i + a, j + b)
    y = F.conv2d(x_BChw, subpixel_weight(conv.weight), bias, padding=1).unflatten(1, (2, 2, O))
    # interleave in (B, h, 2, w, 2, O) order: the result has channels-last strides, the layout
    # the decoder's convolutions run in, and each phase moves whole channel vectors
    rows = [torch.stack([y[:, a, b, :, a:a + h, b:b + w].permute(0, 2, 3, 1) for b in range(2)], dim=3)
            for a in range(2)]
    return torch.stack(rows, dim=2).reshape(B, 2 * h, 2 * w, O).permute(0, 3, 1, 2)


# (row phase a, phase tap r) -> tap k of the 4-tap transposed kernel, k = 3 - a - 2 r; as an
# index list over the flattened (a, r): k = 0, 1, 2, 3 take (a, r) = (1, 1), (0, 1), (1, 0), (0, 0)
TRANSPOSED_TAPS = [3, 1, 2, 0]


def upsample_conv_transposed(x_BChw: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """:func:`upsample_conv` as a transposed convolution (stride 2, 4x4 kernel, padding 1): each
    output pixel of phase ``(a, b)`` receives its four taps from the 2x2 input pixels the
    sub-pixel form reads, and the convolution writes the phases interleaved itself."""
    O, I = conv.out_channels, conv.in_channels
    K = subpixel_weight(conv.weight).view(2, 2, O, I, 2, 2)               # (a, b, O, I, r, s)
    W_OI44 = K.permute(2, 3, 0, 4, 1, 5).reshape(O, I, 4, 4)[:, :, TRANSPOSED_TAPS][:, :, :, TRANSPOSED_TAPS]
    return F.conv_transpose2d(x_BChw, W_OI44.transpose(0, 1), conv.bias, stride=2, padding=1)


# How the fast decoder runs each upsampling + convolution: as the plain module ("interpolate"),
# as a 2x2 convolution and a phase interleave ("subpixel"), or as a transposed convolution
# ("transposed"); all three compute the same function.
UPSAMPLE_FORMS = {"interpolate": None, "subpixel": upsample_conv, "transposed": upsample_conv_transposed}


def decode_with(vqvae, f_hat_BChw: torch.Tensor, upsample: str = "subpixel", clamp: bool = True) -> torch.Tensor:
    """What :meth:`varcore.vqvae.VQVAE.f_hat_to_img` computes, with every ``Upsample`` of the
    decoder run in the form ``upsample`` (a key of :data:`UPSAMPLE_FORMS`)."""
    if upsample not in UPSAMPLE_FORMS:
        raise ValueError(f"upsample must be one of {sorted(UPSAMPLE_FORMS)}, got {upsample!r}")
    form = UPSAMPLE_FORMS[upsample]
    x = vqvae.post_quant_conv(f_hat_BChw)
    for layer in vqvae.decoder.net:
        x = form(x, layer.conv) if form is not None and isinstance(layer, Upsample) else layer(x)
    return x.clamp(-1, 1) if clamp else x
