"""The report's figures (matplotlib, no display): the paper's Fig. 5 (loss and error against N),
Fig. 6 (loss against compute with the C_min frontier) and FID/IS against N."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path

METRIC_LABELS = {"L_last": "test loss, last scale", "L_mean": "test loss, all scales",
                 "Err_last": "token error, last scale", "Err_mean": "token error, all scales"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plain_y(ax) -> None:
    """Log-scaled y axes over less than a decade read better with plain tick labels."""
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _save(fig, path: Path) -> None:
    """Write the PNG atomically; log x axes keep their decade labels only (minor labels such as
    2x10^7, 4x10^7 run into each other when N spans one or two decades)."""
    from matplotlib.ticker import NullFormatter
    for ax in fig.axes:
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def _fit_label(fit: dict[str, Any], x: str) -> str:
    beta = f"{fit['beta']:.2g}" if fit.get("beta") else "?"
    return f"$({beta}\\,{x})^{{{fit['alpha']:.4f}}}$, r = {fit['r']:.4f}" + (" (flags)" if fit["flags"] else "")


def _draw_fit(ax, fit: dict[str, Any], x_name: str) -> None:
    xs = np.array([p["x"] for p in fit["points"]])
    grid = np.geomspace(xs.min() / 1.3, xs.max() * 1.3, 50)
    ax.plot(grid, fit["k"] * grid ** fit["alpha"], "--", color="C3", label=_fit_label(fit, x_name))


def scaling_vs_N(runs: list[dict[str, Any]], fits: dict[str, Any], path: Path) -> None:
    """Fig. 5: the four losses and errors against N, log-log, with the fitted lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    N = [r["N"] for r in runs]
    for ax, m in zip(axes.flat, METRIC_LABELS):
        ax.loglog(N, [r[m] for r in runs], "o", color="C0")
        for r in runs:
            ax.annotate(f"d{r['depth']}", (r["N"], r[m]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if f"{m}_vs_N" in fits:
            _draw_fit(ax, fits[f"{m}_vs_N"], "N")
            ax.legend(fontsize=8)
        ax.set(xlabel="N (eq. 8)", ylabel=METRIC_LABELS[m], title=f"{m} vs N")
        ax.grid(True, which="both", alpha=0.3)
        _plain_y(ax)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def scaling_vs_C(frontiers: dict[str, Any], fits: dict[str, Any], path: Path) -> None:
    """Fig. 6: each depth's loss against training compute, the C_min frontier and its fit."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, m in zip(axes, ("L_mean", "L_last")):
        fr = frontiers.get(m, {"points": [], "frontier": []})
        for i, d in enumerate(sorted({p["depth"] for p in fr["points"]})):
            pts = sorted((p["x"], p["y"]) for p in fr["points"] if p["depth"] == d)
            ax.loglog(*zip(*pts), "o-", ms=3, color=f"C{i}", alpha=0.8, label=f"d{d}")
        if fr["frontier"]:
            env = sorted((p["x"], p["y"]) for p in fr["frontier"])
            ax.loglog(*zip(*env), "s:", color="k", ms=5, mfc="none", label="C_min frontier")
        if f"{m}_vs_C" in fits:
            _draw_fit(ax, fits[f"{m}_vs_C"], "C")
        ax.set(xlabel="training compute C (FLOPs)", ylabel=METRIC_LABELS[m], title=f"{m} vs compute")
        ax.grid(True, which="both", alpha=0.3)
        _plain_y(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def fidelity_vs_N(runs: list[dict[str, Any]], fits: dict[str, Any], path: Path) -> None:
    """FID (with its spread over seeds) and IS against N."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in runs if r.get("fid") is not None]
    N = [r["N"] for r in rows]
    axes[0].errorbar(N, [r["fid"] for r in rows], yerr=[r["fid_spread"] / 2 for r in rows], fmt="o", capsize=3)
    axes[0].set(xscale="log", yscale="log", xlabel="N", ylabel="FID (mean over seeds; bar: spread)", title="FID vs N")
    if "FID_vs_N" in fits:
        _draw_fit(axes[0], fits["FID_vs_N"], "N")
        axes[0].legend(fontsize=8)
    axes[1].plot(N, [r["is_mean"] for r in rows], "o-")
    axes[1].set(xscale="log", xlabel="N", ylabel="IS", title="IS vs N")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        _plain_y(ax)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
