"""Errors raised by config validation, so callers can report the offending field."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; ``field`` names the key (dotted for nested configs)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def require(cond: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(field, message)


def check_patch_nums(patch_nums: tuple[int, ...], field: str = "patch_nums") -> None:
    """A scale schedule is a non-empty, strictly increasing list of positive side lengths."""
    require(len(patch_nums) >= 1, field, "needs at least one scale")
    require(all(isinstance(p, int) and p >= 1 for p in patch_nums), field,
            f"every scale must be a positive int, got {list(patch_nums)}")
    require(all(a < b for a, b in zip(patch_nums, patch_nums[1:])), field,
            f"scales must be strictly increasing, got {list(patch_nums)}")
