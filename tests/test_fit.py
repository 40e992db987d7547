"""The power-law fits of the fit stage: recovery, the C_min envelope, every flag, refusals."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pipeline.errors import ArtifactError
from pipeline.evaluation.config import FitParams
from pipeline.evaluation.fit import (Point, falling_flags, fit_line, frontier_flags, irreducible_fit, lower_envelope,
                                     quality_flags)
from pipeline.evaluation.runs import RunFiles, read_runs
from pipeline.files import write_json
from pipeline.stages.fit import FitConfig, fit_runs

TH = FitParams()


def power_points(alpha=-0.2, beta=2.0, noise=0.0, n=6, seed=0):
    rng = np.random.default_rng(seed)
    N = np.geomspace(1e5, 1e9, n)
    y = (beta * N) ** alpha * np.exp(noise * rng.standard_normal(n))
    return [Point(float(x), float(v), d + 1) for d, (x, v) in enumerate(zip(N, y))]


def test_exact_power_law_is_recovered_exactly():
    fit = fit_line(power_points(), "L_vs_N")
    assert fit.alpha == pytest.approx(-0.2, abs=1e-12)
    assert 10 ** fit.log10_beta == pytest.approx(2.0, rel=1e-9)
    assert fit.k == pytest.approx(2.0 ** -0.2, rel=1e-9) and fit.r == pytest.approx(-1.0, abs=1e-12)
    assert max(abs(e) for e in fit.residuals) < 1e-12
    assert quality_flags(fit, TH) == []


def test_noisy_alpha_lies_in_its_95_percent_interval_at_the_nominal_rate():
    """Over 400 noisy data sets (6 points, 3% multiplicative noise) the true alpha falls inside the
    t-based 95% interval about 95% of the time: binomial sd sqrt(.95 .05 / 400) = 1.1%, so 4 sd
    either side is [0.906, 0.994]."""
    hits = 0
    for seed in range(400):
        fit = fit_line(power_points(noise=0.03, seed=seed), "L_vs_N")
        lo, hi = fit.alpha_ci95
        hits += lo <= -0.2 <= hi
    assert 0.906 <= hits / 400 <= 0.994


def test_lower_envelope_on_a_hand_made_set():
    pts = [Point(1, 5.0, 1), Point(2, 4.0, 1), Point(4, 3.5, 1), Point(8, 3.4, 1),     # depth 1 flattens
           Point(3, 4.5, 2), Point(6, 3.2, 2), Point(12, 2.8, 2),                       # depth 2 crosses at C=6
           Point(6, 3.3, 3), Point(12, 2.8, 3), Point(24, 2.5, 3)]                     # ties: lower Y first
    env = lower_envelope(pts)
    assert [(p.x, p.y, p.depth) for p in env] == [(1, 5.0, 1), (2, 4.0, 1), (4, 3.5, 1), (6, 3.2, 2), (12, 2.8, 2),
                                                   (24, 2.5, 3)]
    assert frontier_flags(env) == []   # three depths; depth 1 owns exactly half, not more


def test_frontier_flags_fire():
    one_depth = [Point(1, 3.0, 1), Point(2, 2.0, 1), Point(4, 1.0, 1), Point(8, 0.9, 2)]
    flags = frontier_flags(one_depth)
    assert any("2 depth(s) (fewer than 3)" in f for f in flags)
    assert any("depth 1 owns 3 of the 4 frontier points" in f for f in flags)


@pytest.mark.parametrize("case, expected", [
    ("weak_r", "|r| = "),
    ("rising", "alpha = "),
    ("residual", "% off the line"),
    ("loo", "when one depth is left out"),
])
def test_each_quality_flag_fires_on_its_case(case, expected):
    pts = power_points(n=6)
    if case == "weak_r":       # a flat, noisy cloud
        pts = [Point(p.x, 1.0 + 0.05 * ((-1) ** i), p.depth) for i, p in enumerate(pts)]
    elif case == "rising":
        pts = [Point(p.x, 1.0 / p.y, p.depth) for p in pts]
    elif case == "residual":    # one point 5% off a perfect law
        pts[2] = Point(pts[2].x, pts[2].y * 1.05, pts[2].depth)
    elif case == "loo":         # a shallow law whose slope hangs on the last point
        pts = [Point(p.x, 1.0 - 0.001 * i + (0.3 if i == 5 else 0.0) * -1, p.depth) for i, p in enumerate(pts)]
    flags = quality_flags(fit_line(pts, "Y_vs_N"), TH)
    assert any(expected in f for f in flags), flags


def test_falling_and_beta_flags():
    pts = power_points(n=4)
    pts[2] = Point(pts[2].x, pts[1].y * 1.01, pts[2].depth)          # depth 3 no better than depth 2
    assert falling_flags(pts) == [f"Y does not fall from depth 2 to depth 3 ({pts[1].y:.4g} -> {pts[2].y:.4g})"]
    # alpha near 0 (as the paper's error fits): log10 beta = b / alpha moves by |b| / alpha^2 per unit of alpha
    tiny = fit_line(power_points(alpha=-0.005, beta=1e12, noise=0.02, n=5), "Err_vs_N")
    assert tiny.log10_beta_sd > 1
    assert any("beta is ill-conditioned" in f for f in quality_flags(tiny, TH))
    assert not any("ill-conditioned" in f for f in quality_flags(fit_line(power_points(noise=0.01), "L"), TH))


def test_irreducible_fit_finds_the_floor():
    N = np.geomspace(1e5, 1e9, 8)
    pts = [Point(float(x), float(1.5 + 3.0 * (x / N[0]) ** -0.3), i) for i, x in enumerate(N)]
    e = irreducible_fit(pts)
    assert e["E"] == pytest.approx(1.5, rel=1e-3) and e["alpha"] == pytest.approx(-0.3, rel=1e-3)


def test_a_fit_needs_three_positive_points():
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_line(power_points(n=2), "L_vs_N")
    with pytest.raises(ValueError, match="positive"):
        fit_line([Point(1, 1, 1), Point(2, 0, 2), Point(3, 1, 3)], "L_vs_N")


# ---- the stage's inputs -------------------------------------------------------------------------
def write_runs(tmp_path, depths, alpha=-0.1, fid_alpha=-0.5, evals=True, steps=100) -> RunFiles:
    """metrics/ and runs/ files of a clean power law (loss falls with N; the curves do not cross)."""
    files = RunFiles(tmp_path / "train", tmp_path / "runs" / "train", tmp_path / "eval", tmp_path / "runs" / "eval")
    for d in depths:
        N = 73728 * d ** 3
        flops = 6.0 * N
        curve = []
        for step in (10, 25, 50, 100):
            tokens = step * 1000
            L = 5.0 * (N * 1e-4) ** alpha * (1 + 2.0 / (1 + step / 5) ** 0.5)
            curve.append({"step": step, "tokens": tokens, "compute": flops * tokens, "L_mean": L, "L_last": L * 1.02,
                          "Err_mean": 0.8 * L / 5, "Err_last": 0.82 * L / 5})
        final = {k: curve[-1][k] for k in ("L_mean", "L_last", "Err_mean", "Err_last")}
        write_json(files.train / f"d{d}.json", {"depth": d, "N": N, "steps": steps, "tokens": steps * 1000,
                                                "compute": curve[-1]["compute"], "train_loss": 1.0, **final})
        write_json(files.train_records / f"d{d}.json", {"images_seen": steps * 10,
                                                        "model_sha256": f"sha-{d}"})
        write_json(files.train / f"d{d}-curve.json", curve)
        if evals:
            fid = 40.0 * (N * 1e-4) ** fid_alpha
            write_json(files.eval / f"d{d}.json", {"depth": d, "fid": fid, "fid_spread": 0.1 * fid, "is_mean": 5.0 + d,
                                                   "kid_mean": 0.01, "precision": 0.5, "recall": 0.4})
            write_json(files.eval_records / f"d{d}.json", {"model_sha256": f"sha-{d}"})
    return files


def test_fit_stage_fits_and_refuses_below_three_depths(tmp_path):
    files = write_runs(tmp_path, (1, 2, 3, 4))
    cfg = FitConfig((1, 2, 3, 4), 0.05, TH)
    summary, detail = fit_runs(read_runs(cfg.depths, files), cfg)
    assert summary["status"] == "ok"
    assert summary["fits"]["L_mean_vs_N"]["alpha"] == pytest.approx(-0.1, abs=1e-9)
    assert summary["fits"]["FID_vs_N"]["alpha"] == pytest.approx(-0.5, abs=1e-9)
    assert {"L_mean_vs_C", "L_last_vs_C"} <= set(summary["fits"])
    assert detail["fits"]["L_mean_vs_N"]["points"][0]["depth"] == 1
    two = FitConfig((1, 2), 0.05, TH)
    refused, _ = fit_runs(read_runs(two.depths, files), two)
    assert refused["status"] == "refused" and "2 depth(s) [1, 2]" in refused["reason"]


def test_missing_or_stale_metrics_name_the_file_and_the_stage(tmp_path):
    files = write_runs(tmp_path, (1, 2, 3))
    (files.eval / "d2.json").unlink()
    with pytest.raises(ArtifactError, match=r"d2.json: not found \(run `dvc repro evaluate@2`\)"):
        read_runs((1, 2, 3), files)
    write_json(files.eval / "d2.json", {"fid": 1.0})
    write_json(files.eval_records / "d2.json", {"model_sha256": "sha-of-an-older-model"})
    with pytest.raises(ArtifactError, match=r"d2.json: evaluates another model .* run `dvc repro evaluate@2`"):
        read_runs((1, 2, 3), files)
    (files.train / "d3-curve.json").unlink()
    no_eval = dataclasses.replace(files, eval=None)
    with pytest.raises(ArtifactError, match=r"d3-curve.json: not found \(run `dvc repro train_var@3`\)"):
        read_runs((1, 2, 3), no_eval)
    assert math.isfinite(read_runs((1, 2), no_eval)[0].train["N"])
