"""Multi-scale token shards, the input of transformer training (written by ``encode_tokens``).

Token shards (``data/tokens/<split>/shard-00000.npz``) hold ``tokens`` ``(N, L)`` uint16,
flattened scale by scale (scale 1 first, :class:`varcore.scales.ScaleLayout`), and ``labels``
``(N,)`` int64. A manifest ``data/tokens/manifest.json`` records the scale list, V, the
tokenizer's sha256 and a sha256 and count per shard; :func:`load_token_split` refuses any mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varcore.scales import ScaleLayout
from varcore.vqvae import VQVAEConfig

from .errors import ArtifactError
from .files import atomic_path, read_manifest, sha256_file

TOKENS_MANIFEST = "manifest.json"


# ---- token shards ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSpec:
    """What a consumer expects of the token shards."""

    patch_nums: tuple[int, ...]
    vocab_size: int
    tokenizer_sha256: str | None = None   # None: do not check

    @property
    def L(self) -> int:
        return ScaleLayout(self.patch_nums).L


def write_shard(path: str | Path, tokens_NL: np.ndarray, labels_N: np.ndarray) -> dict[str, Any]:
    """Write one shard atomically; return its manifest entry."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, tokens=tokens_NL.astype(np.uint16), labels=labels_N.astype(np.int64))
    return {"file": path.name, "sha256": sha256_file(path), "count": int(len(labels_N))}


def manifest_header(vq_cfg: VQVAEConfig, tokenizer_path: str | Path, class_names: list[str]) -> dict[str, Any]:
    """What every token manifest records besides its splits (the tokenizer file is hashed here)."""
    lay = ScaleLayout(vq_cfg.patch_nums)
    return {"patch_nums": list(lay.patch_nums), "vocab_size": vq_cfg.vocab_size, "Cvae": vq_cfg.Cvae, "L": lay.L,
            "image_size": vq_cfg.image_size, "tokenizer": str(tokenizer_path),
            "tokenizer_sha256": sha256_file(tokenizer_path), "num_classes": len(class_names),
            "class_names": list(class_names), "splits": {}}


def read_tokens_manifest(tokens_dir: str | Path) -> dict[str, Any]:
    return read_manifest(Path(tokens_dir) / TOKENS_MANIFEST, "encode_tokens")


def check_manifest(manifest: dict[str, Any], spec: TokenSpec, where: str) -> None:
    if tuple(manifest.get("patch_nums", ())) != tuple(spec.patch_nums):
        raise ArtifactError(f"{where}: patch_nums {manifest.get('patch_nums')} != expected {list(spec.patch_nums)}")
    if manifest.get("vocab_size") != spec.vocab_size:
        raise ArtifactError(f"{where}: vocab_size {manifest.get('vocab_size')} != expected {spec.vocab_size}")
    if spec.tokenizer_sha256 is not None and manifest.get("tokenizer_sha256") != spec.tokenizer_sha256:
        raise ArtifactError(f"{where}: tokenizer_sha256 {manifest.get('tokenizer_sha256')} does not match the "
                            f"tokenizer ({spec.tokenizer_sha256}); re-run `dvc repro encode_tokens`")


def load_token_split(tokens_dir: str | Path, split: str, spec: TokenSpec
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """All shards of one split as ``tokens (N, L)`` int64 and ``labels (N,)``, verified."""
    tokens_dir = Path(tokens_dir)
    manifest = read_tokens_manifest(tokens_dir)
    check_manifest(manifest, spec, str(tokens_dir / TOKENS_MANIFEST))
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise ArtifactError(f"{tokens_dir / TOKENS_MANIFEST}: no split {split!r}")
    toks, labs = [], []
    for sh in entry["shards"]:
        path = tokens_dir / split / sh["file"]
        if not path.is_file():
            raise ArtifactError(f"{path}: shard listed in the manifest is missing")
        digest = sha256_file(path)
        if digest != sh["sha256"]:
            raise ArtifactError(f"{path}: sha256 {digest[:12]}… does not match the manifest ({sh['sha256'][:12]}…)")
        with np.load(path) as z:
            t, lab = z["tokens"], z["labels"]
        if t.ndim != 2 or t.shape[1] != spec.L or len(lab) != len(t) or len(t) != sh["count"]:
            raise ArtifactError(f"{path}: tokens shape {t.shape}, labels {lab.shape}, expected "
                                f"({sh['count']}, {spec.L}) for patch_nums {list(spec.patch_nums)}")
        if t.size and int(t.max()) >= spec.vocab_size:
            raise ArtifactError(f"{path}: token id {int(t.max())} >= vocab_size {spec.vocab_size}")
        toks.append(torch.from_numpy(t.astype(np.int64)))
        labs.append(torch.from_numpy(lab.astype(np.int64)))
    if not toks:
        raise ArtifactError(f"{tokens_dir / split}: split {split!r} has no shards")
    return torch.cat(toks), torch.cat(labs)
