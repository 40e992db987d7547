"""Reading ``params.yaml`` into typed, frozen, validated config dataclasses.

Each stage reads its sections once, at its entry. A missing section, an unknown key, a wrong
type or an out-of-range value raises :class:`ParamsError` naming ``file:section.key``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from varcore.errors import ConfigError, require

from .errors import ParamsError

PARAMS_FILE = "params.yaml"


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a type annotation, converting lists to tuples where declared."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ParamsError(f"{where}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return load_section(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ParamsError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def section(params: dict[str, Any], dotted: str, file: str | Path = PARAMS_FILE) -> Any:
    """The value at ``dotted`` (e.g. ``tokenizer.model``); a missing section is an error, not a default."""
    node: Any = params
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(dotted.split(".")[:i + 1])
            raise ParamsError(f"{file}:{where}: section missing (see params.yaml of the repository for its keys)")
        node = node[key]
    return node


def load(cls: type, params: dict[str, Any], dotted: str, file: str | Path = PARAMS_FILE):
    """Section ``dotted`` of ``params`` as dataclass ``cls``; every error names ``file:dotted.key``."""
    return load_section(cls, section(params, dotted, file), f"{file}:{dotted}")


def load_section(cls: type, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, naming ``where.key`` in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ParamsError(f"{where}.{e.field}: {str(e).split(': ', 1)[1]}") from e
    except ParamsError:
        raise
    except (TypeError, ValueError) as e:
        raise ParamsError(f"{where}: {e}") from e


def check_device(device: str) -> None:
    require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), "device",
          f"must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_device(device: str):
    """``auto`` -> the first GPU if torch sees one, else the CPU."""
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


