"""Which machine and software made a result: CPU numerics differ between machines.

bf16 matmuls accumulate differently on CPUs with AMX than on AVX-512 or AVX2 ones, and
training amplifies last-bit differences, so the same seed gives slightly different numbers
on different CPUs (README, "Reproducibility"). Records and MLflow runs carry this
description so a committed number says where it came from.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "numpy", "scipy", "pandas", "matplotlib", "torch-fidelity", "lpips", "ray", "mlflow", "dvc")
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")   # the ones oneDNN's bf16 paths use


def cpu() -> dict[str, str]:
    """CPU model and the ISA extensions that change float results (Linux ``/proc/cpuinfo``)."""
    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"cpu": model, "isa": " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + " ".join(ISA_FLAGS)}


def accelerator() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, CUDA {torch.version.cuda}"
    return "none"


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe() -> dict[str, str]:
    """``{cpu, isa, accelerator, os}``: enough to tell whether two results can be bit-equal."""
    return {**cpu(), "accelerator": accelerator(), "os": f"{platform.system()} {platform.release()}"}
