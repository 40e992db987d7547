"""The fused residual add + LayerNorm + AdaLN modulation kernel computes the block's eager math.

The Triton kernel runs here in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported, so in a child process). The interpreter rounds float32 to bf16 by truncation where the
GPU rounds to nearest, so the inputs make every intermediate bf16 rounding exact: ``y`` and
``gate`` carry at most 4 significant bits each (their product at most 8, which bf16 holds) and
``1 + scale`` at most 5. What remains is the LayerNorm's float32 summation order, bounded in
:func:`_bound`, and the one rounding of ``h`` to bf16.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from varcore.fast.add_norm import add_ln_modulate, fused_available
from varcore.var import modulate

ROOT = Path(__file__).resolve().parents[1]
B, L, C, EPS = 3, 5, 96, 1e-6   # C not a power of two: the kernel masks its 128-wide row

_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from varcore.fast import add_norm
args = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    out["x_" + name], out["h_" + name] = add_norm.launch(
        add_norm.add_ln_modulate_kernel, args["x"], args["y"], args["gate"], args["scale"], args["shift"],
        args["eps"], dtype)
torch.save(out, sys.argv[2])
"""


def _inputs() -> dict:
    g = torch.Generator().manual_seed(7)
    mod_B16C = torch.empty(B, 1, 6, C)
    mod_B16C[:, :, 0] = torch.randint(-8, 9, (B, 1, C), generator=g) / 8      # gate: 4 bits
    mod_B16C[:, :, 2] = torch.randint(-8, 9, (B, 1, C), generator=g) / 16     # scale: 1 + scale in 5 bits
    mod_B16C[:, :, 4] = torch.randn(B, 1, C, generator=g)                     # shift
    gate, _, scale, _, shift, _ = mod_B16C.to(torch.bfloat16).unbind(2)       # strided views, as a block's
    return {"x": torch.randn(B, L, C, generator=g) * 3 + 1.5,
            "y": (torch.randint(-8, 9, (B, L, C), generator=g) / 4).to(torch.bfloat16),
            "gate": gate, "scale": scale, "shift": shift, "eps": EPS}


def _reference64(a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = a["x"].double() + a["y"].double() * a["gate"].double()
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return x, (x - mean) / (var + a["eps"]).sqrt() * (1 + a["scale"].double()) + a["shift"].double()


def _bound(a: dict, x64: torch.Tensor) -> torch.Tensor:
    """Float32 error of the LayerNorm + modulation against float64: the mean and the variance are
    sums of ``C`` terms (relative error at most ``C u`` each), so the normalised value is off by at
    most ``2 C u |x|_max rstd``; times ``|1 + scale|``, plus one rounding of each later product and sum."""
    u = 2.0 ** -24
    rstd = 1 / (x64.var(-1, unbiased=False, keepdim=True) + a["eps"]).sqrt()
    normed = x64.abs().amax(-1, keepdim=True) * rstd
    return (2 * C + 4) * u * normed * (1 + a["scale"].double()).abs() + 2 * u * a["shift"].double().abs()


def test_kernel_in_triton_interpreter_matches_eager_math(tmp_path):
    a = _inputs()
    torch.save(a, tmp_path / "in.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env, cwd=ROOT, timeout=300)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    x64, h64 = _reference64(a)

    eager_x = a["x"] + a["y"].mul(a["gate"])
    for name in ("bf16", "fp32"):   # the stream is the eager stream bit for bit
        assert out["x_" + name].dtype == torch.float32 and torch.equal(out["x_" + name], eager_x)
    bound = _bound(a, x64)
    assert out["h_fp32"].dtype == torch.float32 and out["h_fp32"].shape == (B, L, C)
    assert ((out["h_fp32"].double() - h64).abs() <= bound).all()
    eager_h = modulate(nn.LayerNorm(C, eps=EPS, elementwise_affine=False)(eager_x), a["scale"], a["shift"])
    assert ((eager_h.double() - h64).abs() <= bound).all()   # the bound holds for torch's own kernel too
    # one rounding to bf16: at most one unit in the last place (2^-7 of the value) either way
    assert out["h_bf16"].dtype == torch.bfloat16
    assert ((out["h_bf16"].double() - h64).abs() <= 2.0 ** -7 * h64.abs() + bound).all()


def test_kernel_reads_each_rows_own_modulation(tmp_path):
    """A row of batch entry b must read b's gate/scale/shift: swapping two entries' modulation
    moves exactly their rows' results (checked against the reference, not the kernel)."""
    a = _inputs()
    swapped = dict(a, scale=a["scale"].flip(0).contiguous(), shift=a["shift"].flip(0).contiguous(),
                   gate=a["gate"].flip(0).contiguous())
    x_a, h_a = _reference64(a)
    x_s, h_s = _reference64(swapped)
    assert not torch.allclose(h_a, h_s)   # the test inputs do tell entries apart
    torch.save(swapped, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert ((out["h_fp32"].double() - h_s).abs() <= _bound(swapped, x_s)).all()


def test_cpu_runs_the_eager_composition():
    a = _inputs()
    ln = nn.LayerNorm(C, eps=EPS, elementwise_affine=False)
    assert not fused_available(a["x"], ln)
    x, h = add_ln_modulate(a["x"], a["y"], a["gate"], ln, a["scale"], a["shift"], torch.bfloat16)
    ref_x = a["x"] + a["y"].mul(a["gate"])
    assert torch.equal(x, ref_x) and torch.equal(h, modulate(ln(ref_x), a["scale"], a["shift"]))
    assert not fused_available(a["x"], nn.LayerNorm(C))   # affine LayerNorms keep the composition
