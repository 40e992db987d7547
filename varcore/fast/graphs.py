"""CUDA graph captures that keep their cuBLAS workspace to themselves.

Torch caches one cuBLAS workspace per (handle, stream) and hands it to every matmul on that
stream; a capture writes the workspace's address into its graph. Torch captures on one default
stream per process, so a second graph captured there (a second sampling engine, a second training
step) reused the workspace that the first capture had allocated inside the first graph's memory
pool. Once the first graph was gone and something dropped the cached workspaces (inductor's CUDA
graph trees do, around the decoder's graphs at batch 1), that memory was freed while the second
graph still wrote to it: round 25's illegal memory access when batch 1 followed batch 64 in one
process (RESULTS.md; confirmed in round 26 by ``benchmarks/batch_switch.py``: without the bracket
the sequence fails, with it, or with no workspace at all, it runs). :func:`own_cublas_workspace`
brackets a capture the way inductor's graph trees bracket theirs.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

__all__ = ["fresh_cublas_workspaces", "own_cublas_workspace"]


def fresh_cublas_workspaces() -> None:
    """Drop torch's cached cuBLAS workspaces (nothing to do where CUDA was never initialised)."""
    if not torch.cuda.is_initialized():
        return
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:   # a torch without it: say so, since graphs captured later may share a workspace
        log.warning("torch %s has no _cuda_clearCublasWorkspaces: CUDA graphs captured on one stream may "
                    "share a cuBLAS workspace (RESULTS.md round 25)", torch.__version__)
        return
    clear()


@contextlib.contextmanager
def own_cublas_workspace() -> Iterator[None]:
    """Around the captures of one graph memory pool: the workspaces are dropped before, so the
    captures allocate theirs inside the pool (alive as long as their graphs), and after, also when
    a capture fails, so no later capture is handed memory of this pool."""
    fresh_cublas_workspaces()
    try:
        yield
    finally:
        fresh_cublas_workspaces()
