"""On-disk formats shared by stages: the tokenizer checkpoint and multi-scale token shards.

Token shards (``data/tokens/<split>/shard-00000.npz``) hold ``tokens`` ``(N, L)`` uint16,
flattened scale by scale (scale 1 first), and ``labels`` ``(N,)`` int64. A manifest
``data/tokens/manifest.json`` records the scale list, V, the tokenizer's sha256 and a
sha256 and count per shard; :func:`load_token_split` refuses any mismatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varcore import VQVAE, VQVAEConfig

from .cli import InputError
from .io import atomic_path, read_json, save_torch, sha256_file

TOKENS_MANIFEST = "manifest.json"


class ArtifactError(InputError):
    """An input artifact is missing, corrupt or does not match the params; names the file."""


# ---- tokenizer checkpoint --------------------------------------------------------------------
def save_tokenizer(path: str | Path, vqvae: VQVAE, extra: dict[str, Any] | None = None) -> None:
    cfg = dataclasses.asdict(vqvae.cfg)
    save_torch(path, {"format": "varscale.tokenizer.v1", "config": cfg, "state_dict": vqvae.state_dict(),
                      **(extra or {})})


def read_checkpoint(path: str | Path, fmt: str, what: str, stage: str,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict of format ``fmt``; missing, corrupt or foreign files name the path."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} checkpoint not found (run `dvc repro {stage}`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a truncated/corrupt file
        raise ArtifactError(f"{path}: cannot read {what} checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ArtifactError(f"{path}: not a varscale {what} checkpoint")
    return ckpt


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
    ckpt = read_checkpoint(path, "varscale.tokenizer.v1", "tokenizer", "tokenizer", map_location)
    vqvae = VQVAE(VQVAEConfig(**ckpt["config"]))
    vqvae.load_state_dict(ckpt["state_dict"])
    return vqvae.eval()


# ---- token shards ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSpec:
    """What a consumer expects of the token shards."""

    patch_nums: tuple[int, ...]
    vocab_size: int
    tokenizer_sha256: str | None = None   # None: do not check

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)


def write_shard(path: str | Path, tokens_NL: np.ndarray, labels_N: np.ndarray) -> dict[str, Any]:
    """Write one shard atomically; return its manifest entry."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, tokens=tokens_NL.astype(np.uint16), labels=labels_N.astype(np.int64))
    return {"file": path.name, "sha256": sha256_file(path), "count": int(len(labels_N))}


def read_tokens_manifest(tokens_dir: str | Path) -> dict[str, Any]:
    path = Path(tokens_dir) / TOKENS_MANIFEST
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise ArtifactError(f"{path}: {e} (run `dvc repro tokenize`)") from e


def check_manifest(manifest: dict[str, Any], spec: TokenSpec, where: str) -> None:
    if tuple(manifest.get("patch_nums", ())) != tuple(spec.patch_nums):
        raise ArtifactError(f"{where}: patch_nums {manifest.get('patch_nums')} != expected {list(spec.patch_nums)}")
    if manifest.get("vocab_size") != spec.vocab_size:
        raise ArtifactError(f"{where}: vocab_size {manifest.get('vocab_size')} != expected {spec.vocab_size}")
    if spec.tokenizer_sha256 is not None and manifest.get("tokenizer_sha256") != spec.tokenizer_sha256:
        raise ArtifactError(f"{where}: tokenizer_sha256 {manifest.get('tokenizer_sha256')} does not match the "
                            f"tokenizer ({spec.tokenizer_sha256}); re-run `dvc repro tokenize`")


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
