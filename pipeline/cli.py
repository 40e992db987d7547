"""Shared entry point of the stage modules: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import argparse
import logging
from typing import Callable


class InputError(ValueError):
    """Bad params, data or artifacts: reported as one line naming the file, key or value."""


def stage_main(name: str, ap: argparse.ArgumentParser, body: Callable[[argparse.Namespace], object],
               argv: list[str] | None = None) -> None:
    """Parse args, run ``body``; an :class:`InputError` exits with ``<stage>: <message>``, no traceback."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        body(args)
    except InputError as e:
        raise SystemExit(f"{name}: {e}") from None
