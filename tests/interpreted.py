"""Running Triton kernels in Triton's interpreter for the kernel tests, and comparing under bounds.

``TRITON_INTERPRET=1`` has to be set before Triton is imported, so a test's kernels run in a child
process: :func:`run_child` saves the inputs, runs the child's code with the input and output paths
as its arguments, and loads what it saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_child(code: str, inputs: dict, tmp: Path) -> dict:
    """Run ``code`` (which reads ``sys.argv[1]`` and saves its results to ``sys.argv[2]``) in a
    Python child with the repository importable; return what it saved."""
    torch.save(inputs, tmp / "in.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code, str(tmp / "in.pt"), str(tmp / "out.pt")],
                   check=True, env=env, cwd=ROOT, timeout=600)
    return torch.load(tmp / "out.pt", weights_only=True)


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """``|got - want| <= bound`` everywhere (``want`` and ``bound`` in float64)."""
    excess = (got.double() - want).abs() - bound
    assert excess.max() <= 0, f"{what}: off by {excess.max().item():.3g} past its bound"
