"""Power laws of the paper's scaling study (eqs. 9-16, Fig. 5/6), fitted as lines in log10-log10 space.

``Y = (beta X)^alpha`` is ``log10 Y = alpha log10 X + b`` with ``b = alpha log10 beta``. Each fit
(``scipy.stats.linregress``) reports the slope alpha with a 95% confidence interval from the t
distribution with n-2 degrees of freedom, the intercept b, ``k = 10^b`` (``Y = k X^alpha``),
``beta = 10^(b / alpha)`` with how ill-conditioned it is, Pearson r, the range of alpha when one
point is left out, and the relative residual of every point. Flags say where a fit should not be
trusted; they are reported, never tuned away.

Against compute the points are the lower envelope C_min of every evaluation point of every depth
(the paper's Pareto frontier): points inside warm-up are dropped, then a point is kept when its Y
is below the minimum of every point of lower compute.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, stats

from .config import FitParams

# The paper's fits (Tian et al., eqs. 9-16). Units of N and C are not stated: compare alpha and r, not beta.
PAPER = {
    ("L_last", "N"): {"alpha": -0.23, "beta": 2.0, "r": -0.998}, ("L_mean", "N"): {"alpha": -0.20, "beta": 2.5, "r": -0.998},
    ("Err_last", "N"): {"alpha": -0.016, "beta": 4.9e2, "r": -0.998},
    ("Err_mean", "N"): {"alpha": -0.010, "beta": 6.5e2, "r": -0.998},
    ("L_last", "C"): {"alpha": -0.13, "beta": 2.2e-5, "r": -0.99}, ("L_mean", "C"): {"alpha": -0.16, "beta": 1.5e-5, "r": -0.99},
    ("Err_last", "C"): {"alpha": -0.0067, "beta": 8.1e-2, "r": -0.99},
    ("Err_mean", "C"): {"alpha": -0.011, "beta": 4.4e-2, "r": -0.99},
}


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    depth: int
    step: int | None = None


@dataclass
class PowerLaw:
    """One fitted line in log10-log10 space and what it is worth."""

    name: str
    n: int
    alpha: float
    alpha_ci95: tuple[float, float]
    alpha_stderr: float
    intercept: float                   # b in log10 Y = alpha log10 X + b
    r: float
    p_value: float
    loo_alpha: tuple[float, float]     # min and max of alpha with one point left out
    residuals: list[float]             # Y / fitted Y - 1, per point
    points: list[Point]
    flags: list[str] = field(default_factory=list)

    @property
    def k(self) -> float:
        """``Y = k X^alpha``."""
        return 10.0 ** self.intercept

    @property
    def log10_beta(self) -> float:
        return self.intercept / self.alpha if self.alpha != 0 else math.nan

    @property
    def log10_beta_sd(self) -> float:
        """How far log10 beta moves per standard error of alpha: |b| / alpha^2 * se(alpha)."""
        return abs(self.intercept) / self.alpha ** 2 * self.alpha_stderr if self.alpha != 0 else math.inf

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.k * np.asarray(x, dtype=float) ** self.alpha

    def summary(self) -> dict[str, Any]:
        """Scalars and flags (the metrics file); :meth:`detail` adds the points."""
        beta = 10.0 ** self.log10_beta if math.isfinite(self.log10_beta) and abs(self.log10_beta) < 300 else None
        return {"n": self.n, "alpha": self.alpha, "alpha_ci95_low": self.alpha_ci95[0],
                "alpha_ci95_high": self.alpha_ci95[1], "alpha_stderr": self.alpha_stderr, "intercept": self.intercept,
                "k": self.k, "beta": beta, "log10_beta_sd": self.log10_beta_sd, "r": self.r, "p_value": self.p_value,
                "loo_alpha_min": self.loo_alpha[0], "loo_alpha_max": self.loo_alpha[1],
                "max_abs_residual": max(abs(e) for e in self.residuals), "flags": list(self.flags)}

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "residuals": self.residuals,
                "points": [{"x": p.x, "y": p.y, "depth": p.depth, "step": p.step} for p in self.points]}


def fit_line(points: list[Point], name: str) -> PowerLaw:
    """Least squares of log10 y on log10 x (needs >= 3 points, positive values)."""
    if len(points) < 3:
        raise ValueError(f"{name}: a fit needs at least 3 points, got {len(points)}")
    if any(p.x <= 0 or p.y <= 0 for p in points):
        raise ValueError(f"{name}: power laws need positive values")
    lx, ly = np.log10([p.x for p in points]), np.log10([p.y for p in points])
    res = stats.linregress(lx, ly)
    t = stats.t.ppf(0.975, len(points) - 2)
    loo = [stats.linregress(np.delete(lx, i), np.delete(ly, i)).slope for i in range(len(points))] \
        if len(points) >= 4 else [res.slope]
    resid = (10 ** (ly - (res.slope * lx + res.intercept)) - 1).tolist()
    return PowerLaw(name, len(points), float(res.slope), (res.slope - t * res.stderr, res.slope + t * res.stderr),
                    float(res.stderr), float(res.intercept), float(res.rvalue), float(res.pvalue),
                    (float(min(loo)), float(max(loo))), resid, points)


def falling_flags(points: list[Point]) -> list[str]:
    """Y must fall with every step up in X (each depth better than the one below it)."""
    ordered = sorted(points, key=lambda p: p.x)
    return [f"Y does not fall from depth {a.depth} to depth {b.depth} ({a.y:.4g} -> {b.y:.4g})"
            for a, b in zip(ordered, ordered[1:]) if b.y >= a.y]


def quality_flags(fit: PowerLaw, th: FitParams) -> list[str]:
    """Weak correlation, a slope that does not fall, large residuals, a slope that hangs on one point."""
    flags = []
    if abs(fit.r) < th.min_abs_r:
        flags.append(f"|r| = {abs(fit.r):.3f} < {th.min_abs_r}")
    if fit.alpha >= 0:
        flags.append(f"alpha = {fit.alpha:.4g} >= 0: Y does not fall with X")
    worst = max(range(fit.n), key=lambda i: abs(fit.residuals[i]))
    if abs(fit.residuals[worst]) > th.max_residual:
        flags.append(f"a point (depth {fit.points[worst].depth}) is {100 * fit.residuals[worst]:+.1f}% off the line "
                     f"(limit {100 * th.max_residual:.0f}%)")
    swing = max(abs(a - fit.alpha) for a in fit.loo_alpha) / abs(fit.alpha) if fit.alpha else math.inf
    if fit.n >= 4 and swing > th.max_loo_swing:
        flags.append(f"alpha moves {100 * swing:.0f}% when one depth is left out "
                     f"({fit.loo_alpha[0]:.4g} .. {fit.loo_alpha[1]:.4g}; limit {100 * th.max_loo_swing:.0f}%)")
    if fit.log10_beta_sd > 1:
        flags.append(f"beta is ill-conditioned: one standard error of alpha moves log10 beta by "
                     f"{fit.log10_beta_sd:.2g} (compare alpha and r, not beta)")
    return flags


def lower_envelope(points: list[Point]) -> list[Point]:
    """The points below the minimum of every point of lower compute (ties in compute: lower Y first)."""
    out, best = [], math.inf
    for p in sorted(points, key=lambda p: (p.x, p.y)):
        if p.y < best:
            out.append(p)
            best = p.y
    return out


def frontier_flags(frontier: list[Point]) -> list[str]:
    counts = Counter(p.depth for p in frontier)
    flags = []
    if len(counts) < 3:
        flags.append(f"the frontier holds {len(counts)} depth(s) (fewer than 3): it measures one model's curve, "
                     f"not a scaling law")
    depth, most = counts.most_common(1)[0] if counts else (None, 0)
    if frontier and most > len(frontier) / 2:
        flags.append(f"depth {depth} owns {most} of the {len(frontier)} frontier points (more than half)")
    return flags


def irreducible_fit(points: list[Point]) -> dict[str, float] | None:
    """``Y = E + A X^-a`` by least squares (a diagnostic: needs the many depths it is only given
    on large sweeps); None where it does not converge."""
    x, y = np.array([p.x for p in points]), np.array([p.y for p in points])
    try:
        (E, A, a), cov = optimize.curve_fit(lambda x, E, A, a: E + A * (x / x.min()) ** -a, x, y,
                                            p0=(0.5 * y.min(), y.max() - 0.5 * y.min(), 0.2), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    sd = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else [math.nan] * 3
    return {"E": float(E), "E_sd": float(sd[0]), "A_at_min_x": float(A), "alpha": float(-a), "alpha_sd": float(sd[2])}
