"""PatchGAN discriminator and hinge losses for the tokenizer's GAN term (paper eq. 5, lambda_G)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """Strided conv stack giving one real/fake logit per image patch: ``(B, 1, h, w)``."""

    def __init__(self, in_channels: int = 3, ch: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, num_layers):
            c_next = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_next, 4, stride=2, padding=1), nn.GroupNorm(math.gcd(32, c_next), c_next),
                       nn.LeakyReLU(0.2)]
            c = c_next
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(math.gcd(32, c), c), nn.LeakyReLU(0.2),
                   nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(img_B3HW)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ||grad rec|| / ||grad gan|| at the decoder's last layer, so the GAN term
    neither swamps nor vanishes next to reconstruction."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()
