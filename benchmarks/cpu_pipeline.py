"""Wall time of the default profile's data -> train_tokenizer -> encode_tokens stages on this machine.

Runs each stage as `python -m pipeline.stages.<stage>` (as `dvc repro` does) into a scratch
directory with a scratch MLflow store, and prints one JSON line per figure: seconds per
stage, the total, the tokenizer's validation PSNR and codebook usage, tokenize throughput.

    python benchmarks/cpu_pipeline.py [--params params.yaml] [--workdir /tmp/varscale-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workdir", default="/tmp/varscale-bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    p = ["--params", args.params]
    stages = {
        "data": p + ["--out", f"{work}/images", "--metrics", f"{work}/data.json"],
        "train_tokenizer": p + ["--images", f"{work}/images", "--out", f"{work}/tokenizer.pt",
                                "--metrics", f"{work}/tokenizer.json", "--recon", f"{work}/recon.png",
                                "--state", f"{work}/state.pt"],
        "encode_tokens": p + ["--tokenizer", f"{work}/tokenizer.pt", "--images", f"{work}/images",
                              "--out", f"{work}/tokens", "--metrics", f"{work}/encode_tokens.json"],
    }
    common = {"machine": platform.node(), "cpus": os.cpu_count(), "params": args.params}
    total = 0.0
    for stage, stage_args in stages.items():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}", *stage_args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        total += dt
        emit(figure="stage_seconds", stage=stage, seconds=round(dt, 1), **common)
    emit(figure="pipeline_part1_seconds", seconds=round(total, 1), budget_seconds=900, **common)
    tok = json.loads((work / "tokenizer.json").read_text())
    emit(figure="tokenizer_quality", val_psnr_db=round(tok["val_psnr"], 2),
         codebook_used_any_scale=round(tok["codebook_used_any_scale"], 3),
         codebook_used_per_scale=[round(u, 3) for u in tok["codebook_used"]],
         codebook_perplexity_per_scale=[round(u, 1) for u in tok["codebook_perplexity"]],
         steps=tok["steps"], images_seen=tok["images_seen"], **common)
    tz = json.loads((work / "encode_tokens.json").read_text())
    emit(figure="tokenize_throughput", images_per_second=round(tz["images_per_second"], 1),
         encode_fraction=round(tz["encode_fraction"], 3), **common)


if __name__ == "__main__":
    main()
