"""The transformer file ``models/var-d{D}.pt``: VARConfig fields, weights, class names, metadata.

The raster AR baseline (:class:`varcore.ar.RasterAR`, the ablation's ``ablation/models/ar-d{D}.pt``)
is written the same way under its own format tag, so a file never loads as the other model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from varcore.ar import ARConfig, RasterAR, build
from varcore.var import VAR, VARConfig

from ..checkpoints import config_from, load_weights, read_checkpoint, write_checkpoint
from ..errors import ArtifactError
from ..files import sha256_file

VAR_FORMAT = "varscale.var.v1"
AR_FORMAT = "varscale.ar.v1"
CONFIGS = {VAR_FORMAT: VARConfig, AR_FORMAT: ARConfig}
# VARConfig fields that earlier versions saved and that never changed the model's function, so
# a checkpoint holding them still loads: qk_norm_impl chose the form of the q/k-norm's backward;
# the rest are the execution choices that now live in varcore.fast.plan.ExecutionPlan.
RETIRED_CONFIG_FIELDS = ("qk_norm_impl", "attn_impl", "attn_prefix_scales", "attn_backends", "mlp_impl",
                         "compile_blocks", "checkpointing")


def save_var(path: str | Path, model: VAR, class_names: list[str] | None = None,
             extra: dict[str, Any] | None = None) -> None:
    """Write atomically: ``config`` (VARConfig fields), ``state_dict``, ``num_classes``, ``class_names``."""
    fmt = AR_FORMAT if isinstance(model, RasterAR) else VAR_FORMAT
    write_checkpoint(path, fmt, model.cfg, model.state_dict(),
                     {"num_classes": model.cfg.num_classes, "class_names": list(class_names or []), **(extra or {})})


def load_var(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VAR, dict[str, Any]]:
    """The model (eval mode: a :class:`VAR`, or a :class:`RasterAR` for the baseline's files) and the
    checkpoint's metadata (everything but the weights)."""
    ckpt = read_checkpoint(path, tuple(CONFIGS), "VAR", "train_var", map_location)
    cls = CONFIGS[ckpt["format"]]
    model = build(config_from(path, cls, ckpt["config"], RETIRED_CONFIG_FIELDS))
    load_weights(path, model, ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta


def check_fits(var: VAR, meta: dict[str, Any], vq, model: str | Path, tokenizer: str | Path,
               depth: int | None = None) -> None:
    """Raise :class:`ArtifactError` naming both files unless the model was trained on this tokenizer's
    tokens (the sha256 its checkpoint recorded, when it did), its vocabulary, latent width and scales
    fit the tokenizer, and (``depth`` given) it is that depth's model. Every command that samples
    with a model and a tokenizer checks this before any work."""
    trained_on, tok_sha = meta.get("tokenizer_sha256"), sha256_file(tokenizer)
    if trained_on is not None and trained_on != tok_sha:
        again = f"rerun `dvc repro train_var@{depth}`" if depth is not None else "train it on this tokenizer's tokens"
        raise ArtifactError(f"{model}: trained on the tokens of another tokenizer (sha256 {trained_on[:12]}) "
                            f"than {tokenizer} ({tok_sha[:12]}); {again}")
    try:
        var.cfg.check_tokenizer(vq.cfg.vocab_size, vq.cfg.Cvae, vq.cfg.patch_nums)
    except ValueError as e:
        raise ArtifactError(f"{model}: does not fit {tokenizer}: {e}") from e
    if depth is not None and var.cfg.depth != depth:
        raise ArtifactError(f"{model}: holds a depth-{var.cfg.depth} model, not depth {depth}")
