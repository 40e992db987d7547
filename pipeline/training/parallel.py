"""Data-parallel wrapping of a built, planned VAR on one worker of a process group.

DDP (every worker holds the whole model and all-reduces float32 gradients) goes through Ray
Train's ``prepare_model``. FSDP is torch's FSDP2: :func:`fully_shard` on every transformer block,
then on the model, so each block's parameters are gathered just before it runs and freed after
(forward and backward), the gradients reduce-scattered as they are produced, and each worker keeps
only its shard of the float32 parameters and of the AdamW state. Applied from outside, after the
execution plan (compiled blocks and recomputed blocks keep working: FSDP2 hooks the module call,
not its forward), as torchtitan applies it.

With bf16 autocast the shards are gathered in bf16 (``param_dtype``; autocast would cast them
anyway) and the gradients reduced in float32 (``reduce_dtype``), so the update is the one DDP
makes from float32 gradient sums.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def fully_sharded(model: nn.Module, device: torch.device, amp: torch.dtype | None) -> nn.Module:
    """``model`` (a VAR on ``device``) with FSDP2 over the default process group: one unit per
    block and one for the rest (embeddings, head). Returns the same object, now an ``FSDPModule``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp is not None
          else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model

