"""The block-causal mask as a FlexAttention block mask, and the tiles its CUDA kernels use.

FlexAttention skips the (query tile, key tile) pairs of the block mask that no query of
the tile may see and evaluates the mask only on partial tiles. How much it computes
depends on the mask's tile size, because VAR's scale edges (1, 5, 14, 30, 55, 91, 155,
255, 424, 680) fall inside tiles: at paper scale the 128-token tiles of flex's default
compute 1.60x the allowed query-key pairs, 64-token tiles 1.22x (:func:`computed_pairs`).

Torch releases up to at least 2.11 check a block mask against flex's *default* backward
tiles (on Hopper with head dim 64: 128 wide) before applying the caller's tiles, and find
no kernel for a 64-token mask. :func:`compile_options` hands inductor a choices handler
whose default backward tiles are the caller's, so the check passes; it compiles the same
kernel that ``kernel_options`` asks for.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch

from ..scales import ScaleLayout

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = flex_attention = None

log = logging.getLogger(__name__)

# Tokens per block-mask tile (queries and keys). 64 computes 24% fewer query-key pairs
# than flex's default of 128 at paper scale; the kernel tiles below must divide it.
FLEX_MASK_BLOCK = 64
# Tiles of the compiled flex kernels on CUDA. Head dim is 64 at every depth (w = 64 d, h = d).
# Forward: 64x64, 4 warps, 3 stages (what inductor's autotuning picks at L=680 on Hopper).
# Backward with the 64-token mask: 32-query tiles for dk/dv and 32-key tiles for dq (faster
# there than 64 everywhere, 4 stages or 16-wide tiles; benchmarks/attention.py compares them).
# {}: inductor's defaults.
# BLOCKS_ARE_CONTIGUOUS: the kernels step to the next tile instead of loading its index. The
# block-causal mask allows it: a query sees the keys [0, end of its scale), so every tile row's
# (and column's) full tiles and partial tiles are each one run of consecutive tiles, which
# flex_block_mask checks.
FLEX_KERNEL_OPTIONS: dict = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
    "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
    "bwd_num_warps": 4, "bwd_num_stages": 3, "BLOCKS_ARE_CONTIGUOUS": True,
}
# The FlashAttention-4 backend of flex (torch >= 2.10 with the optional flash-attn-4 package:
# CuTe DSL kernels, FlashAttention-3's design on Hopper). Its Hopper backward at head dim 64
# runs 128x128 tiles and takes a block mask only in tiles of its own size, so its mask is
# cut in 128-token tiles (1.60x the allowed pairs computed, against 1.22x at 64: computed_pairs).
FLASH_KERNEL_OPTIONS: dict = {"BACKEND": "FLASH"}
FLASH_MASK_BLOCK = 128
_BWD_FIELDS = {"block_m1": "bwd_BLOCK_M1", "block_n1": "bwd_BLOCK_N1", "block_m2": "bwd_BLOCK_M2",
               "block_n2": "bwd_BLOCK_N2", "num_warps": "bwd_num_warps", "num_stages": "bwd_num_stages"}


@functools.lru_cache(maxsize=16)
def flex_block_mask(patch_nums: tuple[int, ...], device: str, block: int | None = None) -> "BlockMask":
    """The block-causal mask (scale of key <= scale of query) as a ``BlockMask`` with
    ``block``-token tiles (None: :data:`FLEX_MASK_BLOCK`); tiles listed as in :func:`tile_lists`."""
    block = block or FLEX_MASK_BLOCK
    s_L = ScaleLayout(patch_nums).scale_ids().to(device)
    L = s_L.numel()
    # The mask reads scale ids padded to whole tiles with one past the last scale: a kernel
    # that evaluates it on a tile running past the end (FlashAttention-4's CuTe kernels do not
    # bound the indices as flex's Triton kernels do) reads a key that no real query sees.
    s_pad = torch.nn.functional.pad(s_L, (0, -L % block), value=int(s_L[-1]) + 1)

    def block_causal(b, h, q_idx, kv_idx):
        return s_pad[kv_idx] <= s_pad[q_idx]

    partial_QK, full_QK = tile_lists(s_L[None, :] <= s_L[:, None], block)
    lists = [(m.sum(-1).int()[None, None], torch.argsort(m.int(), dim=-1, descending=True, stable=True).int()[None, None])
             for m in (partial_QK, full_QK)]        # (1, 1, tiles) counts, (1, 1, tiles, tiles) ascending indices
    mask = BlockMask.from_kv_blocks(*lists[0], *lists[1], BLOCK_SIZE=block, mask_mod=block_causal, seq_lengths=(L, L))
    if not blocks_contiguous(mask):   # FLEX_KERNEL_OPTIONS' BLOCKS_ARE_CONTIGUOUS would be wrong
        raise RuntimeError(f"block mask of patch_nums {patch_nums} has non-contiguous tiles")
    return mask


def tile_lists(allowed_LL: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(tiles, tiles)`` maps of the partial tiles (flex evaluates the mask there) and the
    full ones (it does not) of a square mask cut into ``block``-token tiles.

    Unlike ``create_block_mask``, a query tile that runs past the sequence's end is full
    against a key tile when all of its real queries see all of that tile's keys: flex's
    kernels load the rows past the end as zeros and never store them, so the mask need not
    exclude them. For VAR that makes every tile column's full tiles one run (the last query
    tile would otherwise be partial against every key tile and split the run), which
    ``BLOCKS_ARE_CONTIGUOUS`` needs. Key tiles that run past the end stay partial."""
    L = allowed_LL.shape[0]
    n = math.ceil(L / block)
    pad = n * block - L
    a = torch.nn.functional.pad(allowed_LL, (0, pad, 0, pad)).view(n, block, n, block)
    real_q = (torch.arange(n * block, device=a.device) < L).view(n, block, 1, 1)
    real_k_tile = torch.arange(1, n + 1, device=a.device) * block <= L
    full = (a | ~real_q).all(3).all(1) & real_k_tile[None, :]
    return a.any(3).any(1) & ~full, full


def blocks_contiguous(mask: "BlockMask") -> bool:
    """Whether every tile row's (and, for the backward, every tile column's) list of partial
    tiles and list of full tiles each name consecutive tiles in ascending order, the
    condition for flex's ``BLOCKS_ARE_CONTIGUOUS``."""
    pairs = [(mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices),
             (mask.q_num_blocks, mask.q_indices), (mask.full_q_num_blocks, mask.full_q_indices)]
    for num, idx in pairs:
        if num is None:
            continue
        steps = torch.arange(idx.shape[-1], device=idx.device)
        used = steps < num.unsqueeze(-1)                              # (B, H, rows, max_blocks)
        if not bool(((idx - idx[..., :1] == steps) | ~used).all()):
            return False
    return True


def computed_pairs(patch_nums: tuple[int, ...], block: int) -> int:
    """Query-key pairs a block mask of ``block``-token tiles computes (every tile it does not skip)."""
    ends = ScaleLayout(patch_nums).ends
    L, total = ends[-1], 0
    for q0 in range(0, L, block):
        last_q = min(L, q0 + block) - 1
        end = next(e for e in ends if last_q < e)       # keys the tile's last query sees
        total += block * math.ceil(end / block) * block
    return total


class _TiledChoices:
    """Mixin for inductor's choices handler: flex's default backward tiles are the caller's
    (``FLEX_KERNEL_OPTIONS``) when those pin every tile, so its divisibility check tests
    the tiles that will actually run."""

    def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
        configs = super().get_flex_attention_bwd_configs(head_dim, dtype, device_type)
        opts = FLEX_KERNEL_OPTIONS
        if device_type != "cuda" or not configs or not all(k in opts for k in _BWD_FIELDS.values()):
            return configs
        try:
            return [dataclasses.replace(configs[0], **{f: opts[k] for f, k in _BWD_FIELDS.items()})]
        except (TypeError, ValueError):   # another config type in this torch: leave it
            return configs

    def uuid(self):   # inductor's cache key for the handler
        return f"varcore-flex-tiles-{sorted(FLEX_KERNEL_OPTIONS.items())}"


@functools.cache
def _choices_class():
    from torch._inductor.choices import InductorChoices
    return type("VarcoreFlexChoices", (_TiledChoices, InductorChoices), {})


def _choices_factory():
    return _choices_class()()


@functools.cache
def compile_options() -> dict:
    """Inductor options that make a mask of :data:`FLEX_MASK_BLOCK`-token tiles compile
    (see the module docstring); empty where this torch has no choices-handler option.

    Inductor builds its choices handler once per thread, from the options of the first
    compilation there, so a thread that compiled other code without these options first
    keeps the default handler (and a 64-token mask's backward then finds no kernel)."""
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config, "inductor_choices_class"):
        return {}
    return {"inductor_choices_class": _choices_factory}


def mask_block() -> int:
    """The block-mask tile the compiled model uses: :data:`FLEX_MASK_BLOCK`, or flex's own
    128 where this torch cannot be told the backward tiles (an older torch)."""
    if FLEX_MASK_BLOCK < 128 and not compile_options():
        _warn_fallback()
        return 128
    return FLEX_MASK_BLOCK


@functools.cache
def _warn_fallback() -> None:
    log.warning("this torch has no inductor_choices_class option: the flex block mask uses 128-token tiles")


def flash_available() -> bool:
    """Whether flex's FlashAttention-4 backend can run here: this torch has it and the
    ``flash-attn-4`` package (``flash_attn.cute``) imports."""
    import importlib.util
    try:   # find_spec imports the parent packages, and raises when one is missing
        return all(importlib.util.find_spec(m) is not None
                   for m in ("torch._inductor.kernel.flex.flex_flash_attention", "flash_attn.cute"))
    except ModuleNotFoundError:
        return False
