"""Stage `tokenize`: encode the train/val images once into multi-scale token shards.

Writes ``data/tokens/<split>/shard-NNNNN.npz`` (``tokens (N, L)`` uint16 in scale order,
``labels (N,)``) and ``data/tokens/manifest.json`` with the scale list, V, the tokenizer's
sha256 and a sha256 and count per shard. Throughput (images/s) and the share of time
spent in the encoder versus file I/O are logged and written to ``metrics/tokenize.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from varcore import VQVAE, VQVAEConfig, flatten_tokens

from .artifacts import ArtifactError, TOKENS_MANIFEST, load_tokenizer, write_shard
from .cli import stage_main
from .config import TokenizeParams, load_tokenize_params, load_tokenizer_params, read_params, resolve_device
from .data import load_split
from .io import read_json, sha256_file, write_json
from .tokenizer import to_float_images

log = logging.getLogger(__name__)


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
    return np.concatenate(out) if out else np.zeros((0, sum(p * p for p in vq.cfg.patch_nums)), np.uint16), seconds


def run(p: TokenizeParams, tokenizer_path: Path, data_dir: Path, out_dir: Path,
        expected: VQVAEConfig | None = None) -> dict:
    vq = load_tokenizer(tokenizer_path).to(resolve_device(p.device))
    if expected is not None and (vq.cfg.patch_nums != expected.patch_nums or vq.cfg.vocab_size != expected.vocab_size):
        raise ArtifactError(f"{tokenizer_path}: trained with patch_nums {list(vq.cfg.patch_nums)}, "
                            f"V={vq.cfg.vocab_size}, but params say patch_nums {list(expected.patch_nums)}, "
                            f"V={expected.vocab_size}; re-run the tokenizer stage")
    if vq.cfg.vocab_size > 65536:
        raise ArtifactError(f"{tokenizer_path}: vocab_size {vq.cfg.vocab_size} does not fit uint16 shards")
    data_manifest = read_json(data_dir / "manifest.json")
    tok_sha = sha256_file(tokenizer_path)
    build_dir = out_dir.with_name(out_dir.name + ".tmp")
    if build_dir.exists():
        shutil.rmtree(build_dir)  # left by a crashed run
    manifest = {"patch_nums": list(vq.cfg.patch_nums), "vocab_size": vq.cfg.vocab_size, "Cvae": vq.cfg.Cvae,
                "L": sum(pn * pn for pn in vq.cfg.patch_nums), "image_size": vq.cfg.image_size,
                "tokenizer": str(tokenizer_path), "tokenizer_sha256": tok_sha,
                "num_classes": len(data_manifest["classes"]), "class_names": data_manifest["classes"],
                "splits": {}}
    timing = {"encode_seconds": 0.0, "io_seconds": 0.0, "images": 0}
    for split in ("train", "val"):
        t_io = time.perf_counter()
        images, labels = load_split(data_dir, split)
        timing["io_seconds"] += time.perf_counter() - t_io
        tokens, enc_s = encode_images(vq, images, p.batch_size, desc=f"tokenize {split}")
        timing["encode_seconds"] += enc_s
        timing["images"] += len(images)
        t_io = time.perf_counter()
        shards = []
        for j, start in enumerate(range(0, len(tokens), p.shard_size)):
            path = build_dir / split / f"shard-{j:05d}.npz"
            shards.append(write_shard(path, tokens[start:start + p.shard_size], labels[start:start + p.shard_size]))
        timing["io_seconds"] += time.perf_counter() - t_io
        manifest["splits"][split] = {"count": int(len(tokens)), "shards": shards}
    write_json(build_dir / TOKENS_MANIFEST, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    build_dir.rename(out_dir)  # readers never see a mix of old and new shards
    total = timing["encode_seconds"] + timing["io_seconds"]
    metrics = {"images": timing["images"], "images_per_second": timing["images"] / max(total, 1e-9),
               "encode_images_per_second": timing["images"] / max(timing["encode_seconds"], 1e-9),
               "encode_fraction": timing["encode_seconds"] / max(total, 1e-9),
               "encode_seconds": round(timing["encode_seconds"], 2), "io_seconds": round(timing["io_seconds"], 2)}
    log.info("tokenize: %d images at %.0f images/s (%.0f%% of the time in the encoder)",
             metrics["images"], metrics["images_per_second"], 100 * metrics["encode_fraction"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokenizer", default="models/tokenizer.pt")
    ap.add_argument("--data", default="data/images")
    ap.add_argument("--out", default="data/tokens")
    ap.add_argument("--metrics", default="metrics/tokenize.json")
    stage_main("tokenize", ap, _main, argv)


def _main(args: argparse.Namespace) -> None:
    import mlflow

    from .tracking import stage_run
    params = read_params(args.params)
    p = load_tokenize_params(params, args.params)
    tok = load_tokenizer_params(params, args.params)
    with stage_run("tokenize", {"tokenize": dataclasses.asdict(p)}):
        metrics = run(p, Path(args.tokenizer), Path(args.data), Path(args.out), tok.model)
        write_json(args.metrics, metrics)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(args.out) / TOKENS_MANIFEST))


if __name__ == "__main__":
    main()
