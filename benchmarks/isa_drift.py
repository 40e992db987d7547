"""How much CPU numerics move training results between machines (x86 ISA extensions).

The same seed gives slightly different float results on CPUs whose kernels differ (oneDNN, which
runs the convolutions, and MKL, which runs float32 matmuls, pick AVX2, AVX-512 or AMX code paths
at run time, each summing in its own order); training amplifies the last-bit differences. Run
this under the libraries' ISA limits on one machine to see the size of the effect without a
second machine:

    PYTHONPATH=. python benchmarks/isa_drift.py
    ONEDNN_MAX_CPU_ISA=AVX512_CORE PYTHONPATH=. python benchmarks/isa_drift.py
    ONEDNN_MAX_CPU_ISA=AVX2 PYTHONPATH=. python benchmarks/isa_drift.py
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PYTHONPATH=. python benchmarks/isa_drift.py

Needs ``dvc repro encode_tokens`` (real images, tokenizer and tokens). One JSON line per part:
the tokenizer trained ``--tokenizer-steps`` steps from the default params (final loss, val PSNR,
sha256 of the weights) and the depth-2 transformer trained ``--var-steps`` steps on the real
tokens in float32 (the CPU recipe): losses at a few steps and the weights' sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import emit, env  # noqa: E402
from pipeline.machine import cpu  # noqa: E402
from pipeline.checkpoints import weights_sha256  # noqa: E402
from pipeline.images import load_split  # noqa: E402
from pipeline.params import read_params  # noqa: E402
from pipeline.tokenizer.checkpoint import load_tokenizer  # noqa: E402
from pipeline.tokenizer.config import load_tokenizer_params  # noqa: E402
from pipeline.tokenizer.training import Trainer, evaluate  # noqa: E402
from pipeline.tokens import TokenSpec, load_token_split  # noqa: E402
from pipeline.training.config import load_train_var_config  # noqa: E402
from pipeline.training.worker import make_optimizer, teacher_forcing  # noqa: E402
from varcore.step import TrainStep  # noqa: E402
from varcore.var import VAR  # noqa: E402


def tokenizer_part(params: dict, steps: int) -> dict:
    p = load_tokenizer_params(params)
    images, _ = load_split("data/images", "train")
    val, _ = load_split("data/images", "val")
    n = steps * p.train.batch_size
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, epochs=1, checkpoint_every=10**9))
    trainer = Trainer(p, "isa-drift")
    losses = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer.fit(images[:n], Path(tmp) / "state.pt", on_log=lambda step, m: losses.append(m["rec"]))
    ev = evaluate(trainer.vq, torch.from_numpy(val[:1000].copy()))
    return {"part": "tokenizer", "steps": trainer.state.step, "rec_last": losses[-1], "val_psnr": ev["psnr"],
            "weights_sha256": weights_sha256(trainer.vq.state_dict())[:16]}


def var_part(params: dict, steps: int, depth: int = 2) -> dict:
    config = load_train_var_config(params, "params.yaml", depth)
    vq = load_tokenizer("models/tokenizer.pt")
    cfg = config.var_config(num_classes=10)
    tokens, labels = load_token_split("data/tokens", "train", TokenSpec(cfg.patch_nums, cfg.vocab_size))
    torch.manual_seed(config.train.seed)
    model = VAR(cfg)
    step = TrainStep(model, make_optimizer(model, config.train), amp=None)
    g = torch.Generator().manual_seed(0)
    record, B = {}, config.train.batch_size
    for s in range(1, steps + 1):
        idx = torch.randint(len(tokens), (B,), generator=g)
        loss, _ = step(labels[idx], teacher_forcing(vq.quantizer, tokens[idx]), tokens[idx], lr=config.train.peak_lr)
        if s in (1, steps // 2, steps):
            record[f"loss_step_{s}"] = float(loss)
    return {"part": "var", "depth": depth, "steps": steps, **record,
            "weights_sha256": weights_sha256(model.state_dict())[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer-steps", type=int, default=40)
    ap.add_argument("--var-steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = read_params("params.yaml")
    limits = {k: os.environ.get(k, "default") for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    for rec in (tokenizer_part(params, args.tokenizer_steps), var_part(params, args.var_steps)):
        emit({"bench": "isa_drift", **limits, **env(), **cpu(), **rec})


if __name__ == "__main__":
    main()
