"""The channels-last GroupNorm + SiLU kernels compute ``silu(group_norm(x))``.

The Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is
imported, so in a child process), with tiles made small so that every program loops over
several pixel blocks and the last block of each image is partial. Tolerances: the statistics
are float32 sums of ``n = HW * C/G`` terms, so the normalised value is off from float64 by at
most ``(2n + 8) u |x|_max rstd`` (mean, then centred squares, then the products); the affine
map and SiLU (slope at most 1.1) carry that over, plus a few roundings of the result.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from varcore.fast.group_norm import fused_available, group_norm_silu
from varcore.fast.subpixel import decode_with

ROOT = Path(__file__).resolve().parents[1]
N, C, G, H, W, EPS = 2, 20, 4, 7, 9, 1e-6   # 5 channels a group, 63 pixels, C padded to 32

_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from varcore.fast import group_norm as gn
gn.TILE_ELEMENTS, gn.TARGET_PROGRAMS = 128, 16   # 4 pixels a step, 8 pixel blocks of 8 an image
a = torch.load(sys.argv[1], weights_only=True)
kernels = (gn.channel_sums_kernel, gn.norm_silu_kernel)
out = {"blocks": gn._tiles(H * W, C, N)}
for name in ("fp32", "bf16"):
    x = a["x"].to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[name]))
    out[name] = gn.launch(kernels, x.contiguous(memory_format=torch.channels_last), G, a["w"], a["b"], EPS)
torch.save(out, sys.argv[2])
""".replace("H * W", str(H * W)).replace("C, N)", f"{C}, {N})").replace(", G,", f", {G},").replace("EPS)", f"{EPS})")


def _inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 4.0]).view(N, 1, 1, 1)   # images with different statistics
    return {"x": (torch.randn(N, C, H, W, generator=g) * scale + 2.0).bfloat16().float(),   # bf16-exact
            "w": torch.randn(C, generator=g), "b": torch.randn(C, generator=g)}


def _reference64(a: dict) -> torch.Tensor:
    return F.silu(F.group_norm(a["x"].double(), G, a["w"].double(), a["b"].double(), EPS))


def _bound(a: dict) -> torch.Tensor:
    u, n = 2.0 ** -24, H * W * (C // G)
    x = a["x"].double().view(N, G, -1)
    rstd = 1 / (x.var(-1, unbiased=False) + EPS).sqrt()                       # (N, G)
    xmax = x.abs().amax(-1)
    normed = (xmax * rstd).repeat_interleave(C // G, dim=1).view(N, C, 1, 1)
    y = _reference64(a).abs()
    return 1.1 * ((2 * n + 8) * u * normed * a["w"].double().abs().view(1, C, 1, 1)
                  + 2 * u * a["b"].double().abs().view(1, C, 1, 1)) + 4 * u * y


def test_kernels_in_triton_interpreter_match_group_norm_silu(tmp_path):
    a = _inputs()
    torch.save(a, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert tuple(out["blocks"]) == (32, 4, 8, 8)   # (padded C, pixels a step, pixels a program, programs)
    ref = _reference64(a)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        y = out[name]
        assert y.dtype == dtype and y.shape == (N, C, H, W)
        assert y.is_contiguous(memory_format=torch.channels_last)
    bound = _bound(a)
    assert ((out["fp32"].double() - ref).abs() <= bound).all()
    eager = F.silu(F.group_norm(a["x"], G, a["w"], a["b"], EPS)).double()
    assert ((eager - ref).abs() <= bound).all()   # torch's own float32 kernel is inside the bound too
    # bf16 input is exact (the inputs are bf16 values); the output is rounded once: one ulp (2^-7 relative)
    assert ((out["bf16"].double() - ref).abs() <= 2.0 ** -7 * ref.abs() + bound).all()


def test_cpu_and_decoder_fall_back_to_the_modules(tiny_vqvae):
    gn = nn.GroupNorm(G, C, eps=EPS)
    x = torch.randn(N, C, H, W)
    assert not fused_available(x, gn)
    assert torch.equal(group_norm_silu(x, gn), F.silu(gn(x)))
    f = torch.randn(2, tiny_vqvae.cfg.Cvae, 4, 4)
    with torch.no_grad():
        plain = decode_with(tiny_vqvae, f, "interpolate")
        assert torch.equal(decode_with(tiny_vqvae, f, "interpolate", fused_norm=True), plain)
        assert torch.equal(plain, tiny_vqvae.f_hat_to_img(f))


def test_fused_decoder_walks_every_resblock_and_the_output_norm(tiny_vqvae, monkeypatch):
    """With ``fused_norm`` each GroupNorm that a SiLU follows goes through group_norm_silu
    (2 per ResBlock outside the mid block, 1 for the output), and nothing else does."""
    import varcore.fast.subpixel as subpixel
    seen = []
    monkeypatch.setattr(subpixel, "group_norm_silu", lambda x, gn: seen.append(gn) or F.silu(gn(x)))
    with torch.no_grad():
        decode_with(tiny_vqvae, torch.randn(1, tiny_vqvae.cfg.Cvae, 4, 4), "interpolate", fused_norm=True)
    net = tiny_vqvae.decoder.net
    top_blocks = [m for m in net if isinstance(m, subpixel.ResBlock)]
    expected = [gn for b in top_blocks for gn in (b.net[0], b.net[3])] + [net[-3]]
    assert [id(g) for g in seen] == [id(g) for g in expected] and len(top_blocks) > 0
