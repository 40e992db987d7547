"""Typed, validated stage configs loaded from ``params.yaml``.

Each stage reads one section into a frozen dataclass. Unknown keys, wrong types and
out-of-range values raise :class:`ParamsError` naming ``file:section.key``, once, at load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from varcore import VARConfig, VQVAEConfig
from varcore.errors import ConfigError, require

from .cli import InputError

PARAMS_FILE = "params.yaml"


class ParamsError(InputError):
    """A params value is invalid; the message names the file and the dotted key."""


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


# ---- stage configs -------------------------------------------------------------------------
@dataclass(frozen=True)
class DataParams:
    source: str = "fashion_mnist"          # fashion_mnist | image_folder
    root: str = "/usr/share/datasets/fashion-mnist"
    image_size: int = 32
    val_fraction: float = 0.1
    max_per_class: int | None = None       # cap images per class (quick runs)
    seed: int = 0

    def __post_init__(self):
        require(self.source in ("fashion_mnist", "image_folder"), "source",
              f"must be 'fashion_mnist' or 'image_folder', got {self.source!r}")
        require(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        require(self.max_per_class is None or self.max_per_class >= 2, "max_per_class",
              f"must be >= 2 or null, got {self.max_per_class}")


@dataclass(frozen=True)
class TokenizerTrainParams:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    recon_loss: str = "l1"                 # l1 | l2
    lambda_p: float = 1.0                  # LPIPS weight (active only with lpips_weights)
    lambda_g: float = 0.1                  # GAN weight (times the adaptive weight)
    disc_start_step: int = 1000            # discriminator joins after this many steps
    disc_ch: int = 32
    lpips_weights: str | None = None       # local path to VGG16 weights (torchvision state dict)
    log_every: int = 50
    max_steps: int | None = None           # stop early (tests)
    seed: int = 0
    num_threads: int = 0                   # torch threads; 0 = torch default
    device: str = "auto"                   # auto (cuda if available) | cpu | cuda | cuda:N

    def __post_init__(self):
        check_device(self.device)
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.recon_loss in ("l1", "l2"), "recon_loss", f"must be 'l1' or 'l2', got {self.recon_loss!r}")
        require(self.lambda_p >= 0 and self.lambda_g >= 0, "lambda_p", "loss weights must be >= 0")


@dataclass(frozen=True)
class TokenizerParams:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TokenizerTrainParams = field(default_factory=TokenizerTrainParams)


@dataclass(frozen=True)
class TokenizeParams:
    batch_size: int = 256
    shard_size: int = 8192
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")


def load_tokenizer_params(params: dict[str, Any], file: str = PARAMS_FILE) -> TokenizerParams:
    return load_section(TokenizerParams, params.get("tokenizer"), f"{file}:tokenizer")


def load_data_params(params: dict[str, Any], file: str = PARAMS_FILE) -> DataParams:
    return load_section(DataParams, params.get("data"), f"{file}:data")


def load_tokenize_params(params: dict[str, Any], file: str = PARAMS_FILE) -> TokenizeParams:
    return load_section(TokenizeParams, params.get("tokenize"), f"{file}:tokenize")


def var_config(params: dict[str, Any], depth: int, num_classes: int, file: str = PARAMS_FILE) -> VARConfig:
    """The transformer config of one depth: the tokenizer fixes V, Cvae and the scales."""
    tok = load_tokenizer_params(params, file).model
    extra = dict(params.get("var", {}).get("model", {}) or {})
    return load_section(VARConfig, dict(extra, depth=depth, vocab_size=tok.vocab_size, Cvae=tok.Cvae,
                                        patch_nums=list(tok.patch_nums), num_classes=num_classes),
                        f"{file}:var.model")
