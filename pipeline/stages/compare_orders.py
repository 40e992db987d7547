"""Stage ``compare`` of the ablation pipeline (``ablation/dvc.yaml``): raster AR against VAR at one depth.

Reads what the two pipelines wrote for the same depth (training metrics and records, evaluation
metrics, tokenizer metrics), times both samplers here, one after the other in this process, at
batch 1 and 64 with the evaluate stage's sampling settings, and writes the Table-3 rows as JSON
(``ablation/metrics/compare.json``) and as a page (``reports/ablation.md``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import machine
from ..evaluation.ablation import TIMING_BATCHES, Side, markdown, table, time_sampling
from ..evaluation.config import EvaluateParams
from ..files import atomic_path, read_json, write_json
from ..params import load, resolve_device
from ..stage import stage_main
from ..tokenizer.checkpoint import load_tokenizer
from ..tracking import log_artifact
from ..training.checkpoint import load_var

log = logging.getLogger(__name__)
TIMING_REPEATS = 5   # timed runs after a warm-up; the fastest counts (2-core CPUs are noisy)


@dataclass(frozen=True)
class Paths:
    ar_model: Path                # ablation/models/ar-dD.pt
    ar_tokenizer: Path            # ablation/models/tokenizer.pt (single scale)
    ar_tokenizer_metrics: Path    # ablation/metrics/tokenizer.json
    ar_train: Path                # ablation/metrics/train/dD.json
    ar_train_record: Path         # ablation/runs/train/dD.json
    ar_eval: Path                 # ablation/metrics/eval/dD.json
    ar_grid: Path                 # ablation/metrics/eval/samples-dD.png
    var_model: Path               # models/var-dD.pt
    var_tokenizer: Path           # models/tokenizer.pt
    var_tokenizer_metrics: Path   # metrics/tokenizer.json
    var_train: Path               # metrics/train/dD.json
    var_train_record: Path        # runs/train/dD.json
    var_eval: Path                # metrics/eval/dD.json
    var_grid: Path                # metrics/eval/samples-dD.png
    metrics: Path                 # ablation/metrics/compare.json
    report: Path                  # reports/ablation.md


def load_config(params: dict[str, Any], file: str, paths: Paths) -> EvaluateParams:
    return load(EvaluateParams, params, "evaluate", file)


def _side(name: str, paths: Paths, prefix: str) -> Side:
    get = lambda key: read_json(getattr(paths, f"{prefix}_{key}"))   # noqa: E731
    return Side(name, get("train"), get("train_record"), get("eval"), get("tokenizer_metrics"))


def run(p: EvaluateParams, paths: Paths) -> dict:
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    device = resolve_device(p.device)
    models, timings = {}, {}
    for key in ("ar", "var"):
        model, _ = load_var(getattr(paths, f"{key}_model"))
        vq = load_tokenizer(getattr(paths, f"{key}_tokenizer"))
        model, vq = model.to(device), vq.to(device)
        timings[key] = [time_sampling(model, vq, p.sampling, b, TIMING_REPEATS, device) for b in TIMING_BATCHES]
        log.info("%s: %s ms per image at batch %s", key, [round(t["ms_per_image"], 3) for t in timings[key]],
                 list(TIMING_BATCHES))
        models[key] = model
    ar_side, var_side = _side("AR (raster, next-token)", paths, "ar"), _side("VAR (next-scale)", paths, "var")
    t = table(ar_side, var_side, models["ar"], models["var"], timings)
    m = machine.describe()
    where = f"{m['cpu']} ({m['isa']}), accelerator {m['accelerator']}"
    grids = {side.name: os.path.relpath(getattr(paths, f"{key}_grid"), paths.report.parent)
             for key, side in (("ar", ar_side), ("var", var_side))}
    write_json(paths.metrics, {**t, "device": str(device), "machine": m})
    with atomic_path(paths.report) as tmp:
        tmp.write_text(markdown(t, str(device), where, grids))
    log_artifact(paths.report, "report")
    log_artifact(paths.metrics)
    a, v = t["sides"]["ar"], t["sides"]["var"]
    return {"fid_ar": a["fid"], "fid_var": v["fid"], "compute_ratio": t["compute_ratio_ar_over_var"],
            **{f"speedup_b{b}": s for b, s in t["speedup_var_over_ar"].items()}, "flags": len(t["flags"])}


main = stage_main("compare", Paths, load_config, run,
                  summary_keys=("fid_ar", "fid_var", "compute_ratio", "speedup_b1", "speedup_b64", "flags"),
                  doc=__doc__)

if __name__ == "__main__":
    main()
