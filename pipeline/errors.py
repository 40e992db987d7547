"""Errors for bad input: each is reported as one line that names the file, key or value."""

from __future__ import annotations


class InputError(ValueError):
    """Bad params, data or artifacts, or an environment the user must fix (a full disk, an unreachable
    tracking server): reported as ``<stage>: <message>``, without a traceback."""


class ParamsError(InputError):
    """A params value is invalid; the message names the file and the dotted key."""


class ArtifactError(InputError):
    """An input artifact is missing, corrupt or does not match the params; names the file."""


class DataError(InputError):
    """The data source is missing or unusable; the message names the path."""


class WeightsError(InputError):
    """Pretrained weights are missing or do not fit; names the path and the params key."""


class OutputError(InputError):
    """An output cannot be written (disk full); names the file and the space it needs. The previous
    file at that path is left as it was."""
