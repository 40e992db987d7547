"""The layout of the K token maps in one sequence (paper Sec. 3.2): the one home of it.

An image is K token maps ``r_1 .. r_K`` of sides ``patch_nums`` (1, 2, 3, 4, 5, 6, 8, 10, 13, 16
at paper scale), laid out scale after scale: ``L = sum pn^2`` tokens (680). Scale k occupies
``[starts[k], ends[k])``. The block-causal mask lets a token of scale k see every token of the
scales ``<= k``. Everything that slices, splits, flattens or masks the sequence asks this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .errors import check_patch_nums

PAPER_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class ScaleLayout:
    """Token layout of a scale schedule ``patch_nums`` (validated: increasing positive sides)."""

    patch_nums: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        check_patch_nums(self.patch_nums)

    @property
    def K(self) -> int:
        """Number of scales."""
        return len(self.patch_nums)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens of each scale: ``pn^2``."""
        return tuple(pn * pn for pn in self.patch_nums)

    @property
    def L(self) -> int:
        """Tokens in one image: ``sum pn^2`` (680 at paper scale)."""
        return sum(self.lengths)

    @property
    def first_l(self) -> int:
        """Tokens of the first scale (the class start tokens of the transformer input)."""
        return self.lengths[0]

    @property
    def ends(self) -> tuple[int, ...]:
        """End (exclusive) of every scale: ``(1, 5, 14, 30, 55, 91, 155, 255, 424, 680)`` at paper scale."""
        out, n = [], 0
        for length in self.lengths:
            n += length
            out.append(n)
        return tuple(out)

    @property
    def starts(self) -> tuple[int, ...]:
        """Start of every scale: ``(0, 1, 5, ...)``."""
        return (0,) + self.ends[:-1]

    def scale_ids(self) -> torch.Tensor:
        """Scale index of every token: long ``(L,)``."""
        return torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(self.lengths)])

    def block_causal_mask(self) -> torch.Tensor:
        """Bool ``(L, L)``: entry ``[i, j]`` is True where token i may attend to token j (scale_j <= scale_i)."""
        s = self.scale_ids()
        return s[None, :] <= s[:, None]

    def attention_pairs(self) -> int:
        """Query-key pairs the block-causal mask allows: ``sum_k n_k S_k`` (S_k = tokens of scales <= k)."""
        return sum(n * e for n, e in zip(self.lengths, self.ends))

    def split(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """Flat token sequence ``(B, L)`` -> K token maps ``(B, pn, pn)``."""
        return [idx_BL[:, s:e].reshape(-1, pn, pn) for s, e, pn in zip(self.starts, self.ends, self.patch_nums)]

    @staticmethod
    def flatten(idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K token maps ``(B, pn, pn)`` -> flat sequence ``(B, L)`` in scale order."""
        return torch.cat([idx.flatten(1) for idx in idx_list], dim=1)


@functools.lru_cache(maxsize=32)
def layout(patch_nums: tuple[int, ...]) -> ScaleLayout:
    """The (cached) layout of ``patch_nums``."""
    return ScaleLayout(tuple(patch_nums))


@functools.lru_cache(maxsize=32)
def block_causal_mask(patch_nums: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    """The bool ``(L, L)`` block-causal mask on ``device``, built once per (schedule, device)."""
    return layout(tuple(patch_nums)).block_causal_mask().to(device)
