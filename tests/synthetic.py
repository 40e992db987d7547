"""Synthetic stand-ins for the upstream artifacts of the ``train_var`` stage (tests).

Writes a randomly initialised tokenizer with :func:`save_tokenizer` and token shards with
:func:`write_shard` plus a manifest in the format the ``encode_tokens`` stage produces. Tokens are
class-dependent with a share ``noise`` of uniform tokens, so a model can learn them and the
loss has a known floor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.files import write_json
from pipeline.tokenizer.checkpoint import save_tokenizer
from pipeline.tokens import TOKENS_MANIFEST, manifest_header, write_shard
from varcore import VQVAE, VQVAEConfig
from varcore.scales import ScaleLayout


def synthetic_tokens(n: int, L: int, vocab_size: int, num_classes: int, noise: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    pattern = (labels[:, None] * 37 + np.arange(L)[None, :] * 11) % vocab_size
    random = rng.integers(0, vocab_size, (n, L))
    tokens = np.where(rng.random((n, L)) < noise, random, pattern)
    return tokens.astype(np.uint16), labels.astype(np.int64)


def write_synthetic_artifacts(root: str | Path, vq_cfg: VQVAEConfig, n_train: int = 256, n_val: int = 64,
                              num_classes: int = 4, noise: float = 0.5, shard_size: int = 128,
                              seed: int = 0) -> tuple[Path, Path]:
    """``root/tokenizer.pt`` and ``root/tokens/{train,val}/shard-*.npz`` + manifest; returns both paths."""
    root = Path(root)
    torch.manual_seed(seed)
    tok_path = root / "tokenizer.pt"
    save_tokenizer(tok_path, VQVAE(vq_cfg))
    L = ScaleLayout(vq_cfg.patch_nums).L
    tokens_dir = root / "tokens"
    manifest = manifest_header(vq_cfg, tok_path, [f"class{c}" for c in range(num_classes)])
    for k, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        tokens, labels = synthetic_tokens(n, L, vq_cfg.vocab_size, num_classes, noise, seed + 1 + k)
        shards = [write_shard(tokens_dir / split / f"shard-{j:05d}.npz", tokens[s:s + shard_size],
                              labels[s:s + shard_size])
                  for j, s in enumerate(range(0, n, shard_size))]
        manifest["splits"][split] = {"count": n, "shards": shards}
    write_json(tokens_dir / TOKENS_MANIFEST, manifest)
    return tok_path, tokens_dir
