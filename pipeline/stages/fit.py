"""Stage ``fit``: the power laws of loss, token error and FID against model size N and compute C_min.

For every depth of ``train.depths`` it reads the training's final values and validation curve and
the evaluation (:mod:`pipeline.evaluation.runs`), then fits (:mod:`pipeline.evaluation.fit`):
L_last, L_mean, Err_last, Err_mean against N (the paper's eqs. 9-12) and against C_min, the lower
envelope of every evaluation point past warm-up (eqs. 13-16), and FID against N. Every fit carries
its flags. With fewer than ``fit.min_depths`` depths it refuses and says so (the report still
lists the runs). Writes ``metrics/scaling.json`` (alpha and r of every fit, the flag count) and
``runs/fit.json`` (every fit whole: intervals, leave-one-out ranges, residuals, points, flags).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.config import FitParams
from ..evaluation.fit import (PAPER, Point, PowerLaw, falling_flags, fit_line, frontier_flags, irreducible_fit,
                              lower_envelope, quality_flags)
from ..evaluation.runs import DepthRun, RunFiles, read_runs
from ..files import write_json
from ..params import load
from ..stage import stage_main
from ..tracking import flatten, log_artifact
from ..training.config import TrainParams

log = logging.getLogger(__name__)
METRICS = ("L_last", "L_mean", "Err_last", "Err_mean")


@dataclass(frozen=True)
class FitConfig:
    depths: tuple[int, ...]      # train.depths
    warmup_frac: float           # train.warmup_frac: curve points inside warm-up are not on the frontier
    fit: FitParams


@dataclass(frozen=True)
class Paths:
    train: Path          # metrics/train (dD.json, dD-curve.json per depth)
    train_records: Path  # runs/train (dD.json per depth)
    eval: Path           # metrics/eval (dD.json per depth)
    eval_records: Path   # runs/eval (dD.json per depth)
    metrics: Path        # metrics/scaling.json: alpha and r of every fit, the flag count
    detail: Path         # runs/fit.json: everything of every fit and frontier, with the points and flags


def load_config(params: dict[str, Any], file: str, paths: Paths) -> FitConfig:
    train = load(TrainParams, params, "train", file)
    return FitConfig(tuple(train.depths), train.warmup_frac, load(FitParams, params, "fit", file))


def _checked(points: list[Point], name: str, th: FitParams) -> PowerLaw:
    fit = fit_line(points, name)
    fit.flags += quality_flags(fit, th) + (falling_flags(points) if name.endswith("_vs_N") else [])
    return fit


def vs_N(runs: list[DepthRun], th: FitParams) -> dict[str, PowerLaw]:
    fits = {f"{m}_vs_N": _checked([Point(r.train["N"], r.train[m], r.depth) for r in runs], f"{m}_vs_N", th)
            for m in METRICS}
    if all(r.eval for r in runs):
        fits["FID_vs_N"] = _checked([Point(r.train["N"], r.eval["fid"], r.depth) for r in runs], "FID_vs_N", th)
    return fits


def curve_points(runs: list[DepthRun], metric: str, warmup_frac: float) -> list[Point]:
    """Every evaluation point of every depth past its warm-up steps."""
    return [Point(row["compute"], row[metric], r.depth, row["step"]) for r in runs for row in r.curve
            if row["step"] > round(warmup_frac * r.train["steps"])]


def vs_C(runs: list[DepthRun], cfg: FitConfig) -> tuple[dict[str, PowerLaw], dict[str, dict]]:
    fits, frontiers = {}, {}
    for m in METRICS:
        pts = curve_points(runs, m, cfg.warmup_frac)
        env = lower_envelope(pts)
        flags = frontier_flags(env)
        frontiers[m] = {"points": [p.__dict__ for p in pts], "frontier": [p.__dict__ for p in env], "flags": flags}
        if len(env) >= 3:
            fits[f"{m}_vs_C"] = _checked(env, f"{m}_vs_C", cfg.fit)
            fits[f"{m}_vs_C"].flags += flags
    return fits, frontiers


def fit_runs(runs: list[DepthRun], cfg: FitConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary for metrics/scaling.json, detail with the points)."""
    depths = [r.depth for r in runs]
    if len(runs) < cfg.fit.min_depths:
        reason = f"{len(runs)} depth(s) {depths}: a fit needs at least {cfg.fit.min_depths} (fit.min_depths)"
        log.warning("fit refused: %s", reason)
        return {"status": "refused", "reason": reason, "depths": depths}, {"status": "refused", "reason": reason}
    fits = vs_N(runs, cfg.fit)
    c_fits, frontiers = vs_C(runs, cfg)
    fits.update(c_fits)
    irreducible = None
    if len(runs) >= cfg.fit.irreducible_min_depths:
        irreducible = irreducible_fit([Point(r.train["N"], r.train["L_mean"], r.depth) for r in runs])
    paper = {f"{m}_vs_{x}": v for (m, x), v in PAPER.items()}
    summary = {"status": "ok", "depths": depths, "fits": {k: f.summary() for k, f in fits.items()},
               "flags": sorted(f"{k}: {flag}" for k, f in fits.items() for flag in f.flags),
               "irreducible_L_mean_vs_N": irreducible}
    detail = {**summary, "fits": {k: f.detail() for k, f in fits.items()}, "frontiers": frontiers, "paper": paper}
    return summary, detail


def compact(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``dvc metrics show`` lists: alpha and r of every fit and how many flags were raised."""
    fits = summary.get("fits", {})
    return {"n_depths": len(summary["depths"]), "n_flags": len(summary.get("flags", [])),
            **{k: {"alpha": f["alpha"], "r": f["r"]} for k, f in fits.items()}}


def run(cfg: FitConfig, paths: Paths) -> dict:
    runs = read_runs(cfg.depths, RunFiles(paths.train, paths.train_records, paths.eval, paths.eval_records))
    summary, detail = fit_runs(runs, cfg)
    metrics = compact(summary)
    write_json(paths.metrics, metrics)
    write_json(paths.detail, detail)
    log_artifact(paths.detail)
    for flag in summary.get("flags", []):
        log.warning("flag: %s", flag)
    return flatten(metrics)   # L_mean_vs_N.alpha, ...: MLflow metrics are flat


main = stage_main("fit", Paths, load_config, run, summary_keys=("n_depths", "n_flags", "L_mean_vs_N.alpha",
                                                                "L_mean_vs_N.r"), doc=__doc__)

if __name__ == "__main__":
    main()
