"""Stage ``encode_tokens``: encode the train/val images once into multi-scale token shards.

Writes ``data/tokens/<split>/shard-NNNNN.npz`` (``tokens (N, L)`` uint16 in scale order,
``labels (N,)``) and ``data/tokens/manifest.json`` with the scale list, V, the tokenizer's
sha256 and a sha256 and count per shard (:mod:`pipeline.tokens`). Throughput (images/s) and
the share of time spent in the encoder versus file I/O go to the metrics.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from varcore.quant import flatten_tokens
from varcore.scales import ScaleLayout
from varcore.vqvae import VQVAE, VQVAEConfig

from ..tokenizer.checkpoint import load_tokenizer
from ..errors import ArtifactError
from ..files import write_json
from ..images import load_split, read_images_manifest, to_float_images
from ..params import load, resolve_device
from ..stage import stage_main
from ..tokenizer.config import EncodeParams, load_tokenizer_model
from ..tokens import TOKENS_MANIFEST, manifest_header, write_shard
from ..tracking import log_artifact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    encode: EncodeParams          # section encode_tokens
    tokenizer: VQVAEConfig        # section tokenizer.model: what the checkpoint must be


@dataclass(frozen=True)
class Paths:
    tokenizer: Path    # models/tokenizer.pt
    images: Path       # data/images
    out: Path          # data/tokens
    metrics: Path      # metrics/encode_tokens.json


def load_config(params: dict[str, Any], file: str, paths: Paths) -> Config:
    return Config(load(EncodeParams, params, "encode_tokens", file), load_tokenizer_model(params, file))


@torch.no_grad()
def encode_images(vq: VQVAE, images: np.ndarray, batch_size: int, desc: str = "encode"
                  ) -> tuple[np.ndarray, float]:
    """uint8 images -> ``(N, L)`` uint16 tokens; returns them and the seconds spent encoding."""
    vq.eval()
    device = vq.quantizer.embedding.weight.device
    out, seconds = [], 0.0
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=2):
        t0 = time.perf_counter()
        idx = flatten_tokens(vq.img_to_idx(to_float_images(images[i:i + batch_size]).to(device))).cpu()
        seconds += time.perf_counter() - t0
        out.append(idx.numpy().astype(np.uint16))
    return np.concatenate(out) if out else np.zeros((0, ScaleLayout(vq.cfg.patch_nums).L), np.uint16), seconds


def _check_tokenizer(vq: VQVAE, path: Path, expected: VQVAEConfig) -> None:
    if vq.cfg.patch_nums != expected.patch_nums or vq.cfg.vocab_size != expected.vocab_size:
        raise ArtifactError(f"{path}: trained with patch_nums {list(vq.cfg.patch_nums)}, V={vq.cfg.vocab_size}, "
                            f"but params say patch_nums {list(expected.patch_nums)}, V={expected.vocab_size}; "
                            f"re-run the train_tokenizer stage")
    if vq.cfg.vocab_size > 65536:
        raise ArtifactError(f"{path}: vocab_size {vq.cfg.vocab_size} does not fit uint16 shards")


def _encode_split(vq: VQVAE, cfg: EncodeParams, paths: Paths, build_dir: Path, split: str, timing: dict) -> dict:
    t_io = time.perf_counter()
    images, labels = load_split(paths.images, split)
    timing["io_seconds"] += time.perf_counter() - t_io
    tokens, enc_s = encode_images(vq, images, cfg.batch_size, desc=f"encode {split}")
    timing["encode_seconds"] += enc_s
    timing["images"] += len(images)
    t_io = time.perf_counter()
    shards = [write_shard(build_dir / split / f"shard-{j:05d}.npz", tokens[s:s + cfg.shard_size],
                          labels[s:s + cfg.shard_size])
              for j, s in enumerate(range(0, len(tokens), cfg.shard_size))]
    timing["io_seconds"] += time.perf_counter() - t_io
    return {"count": int(len(tokens)), "shards": shards}


def run(cfg: Config, paths: Paths) -> dict:
    vq = load_tokenizer(paths.tokenizer).to(resolve_device(cfg.encode.device))
    _check_tokenizer(vq, paths.tokenizer, cfg.tokenizer)
    manifest = manifest_header(vq.cfg, paths.tokenizer, read_images_manifest(paths.images)["classes"])
    build_dir = paths.out.with_name(paths.out.name + ".tmp")
    if build_dir.exists():
        shutil.rmtree(build_dir)  # left by a crashed run
    timing = {"encode_seconds": 0.0, "io_seconds": 0.0, "images": 0}
    for split in ("train", "val"):
        manifest["splits"][split] = _encode_split(vq, cfg.encode, paths, build_dir, split, timing)
    write_json(build_dir / TOKENS_MANIFEST, manifest)
    if paths.out.exists():
        shutil.rmtree(paths.out)
    build_dir.rename(paths.out)  # readers never see a mix of old and new shards
    total = timing["encode_seconds"] + timing["io_seconds"]
    metrics = {"images": timing["images"], "images_per_second": timing["images"] / max(total, 1e-9),
               "encode_images_per_second": timing["images"] / max(timing["encode_seconds"], 1e-9),
               "encode_fraction": timing["encode_seconds"] / max(total, 1e-9),
               "encode_seconds": round(timing["encode_seconds"], 2), "io_seconds": round(timing["io_seconds"], 2)}
    write_json(paths.metrics, metrics)
    log_artifact(paths.out / TOKENS_MANIFEST)
    return metrics


main = stage_main("encode_tokens", Paths, load_config, run, summary_keys=("images", "images_per_second",
                                                                          "encode_fraction"), doc=__doc__)

if __name__ == "__main__":
    main()
