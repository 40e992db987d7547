"""The scaling-law report as markdown: runs, reference rows, fitted exponents beside the paper's,
flags, figures and provenance. No timestamps: a rerun with nothing changed writes the same file."""

from __future__ import annotations

import math
from typing import Any

from .. import machine


def fmt(v: Any, digits: int = 4, spec: str | None = None) -> str:
    """A table cell: "-" for a missing value; numbers in ``spec`` when given (".2f", ","), else ints
    with thousands separators (3 significant digits from a million) and floats to ``digits``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if spec is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) < 1e6 else f"{v:.3g}"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def si(v: float) -> str:
    """73.7k, 590k, 2.0M, 1.1G: counts at a glance."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(frame) -> str:
    header = ["depth", "N", "tokens", "C (FLOPs)", "L_last", "L_mean", "Err_last", "Err_mean", "FID (spread)", "IS",
              "KID", "precision", "recall"]
    rows = []
    for r in frame.to_dict("records"):
        fid = "-" if r["fid"] is None or r["fid"] != r["fid"] else f"{r['fid']:.3f} ({r['fid_spread']:.3f})"
        rows.append([int(r["depth"]), si(r["N"]), si(r["tokens"]), f"{r['compute']:.3g}", r["L_last"], r["L_mean"],
                     r["Err_last"], r["Err_mean"], fid, r["is_mean"], r["kid_mean"], r["precision"], r["recall"]])
    return table(header, rows)


def reference_table(ref: dict[str, Any]) -> str:
    rows = []
    for name, key in (("real train images vs val (floor)", "real_vs_real"), ("tokenizer round trip of val (rFID)",
                                                                            "tokenizer")):
        m = ref[key]
        rows.append([name, m["images"], f"{m['fid']:.3f}", m["is_mean"], m["kid_mean"], m["precision"], m["recall"]])
    return table(["reference", "images", "FID", "IS", "KID", "precision", "recall"], rows)


FIT_ORDER = ("L_last_vs_N", "L_mean_vs_N", "Err_last_vs_N", "Err_mean_vs_N", "FID_vs_N",
             "L_last_vs_C", "L_mean_vs_C", "Err_last_vs_C", "Err_mean_vs_C")


def exponents_table(fits: dict[str, Any], paper: dict[str, Any], compare: dict[str, Any] | None = None) -> str:
    """One row per fit: alpha with its CI, r, the leave-one-out range, the paper's alpha and r, and
    those of ``compare`` (another profile's fit record) when given."""
    other = (compare or {}).get("fits", {})
    rows = []
    for name in sorted(fits, key=lambda n: FIT_ORDER.index(n) if n in FIT_ORDER else len(FIT_ORDER)):
        f = fits[name]
        p, o = paper.get(name, {}), other.get(name, {})
        rows.append([name.replace("_vs_", " vs "), f["n"], f"{f['alpha']:.4f}",
                     f"[{f['alpha_ci95_low']:.4f}, {f['alpha_ci95_high']:.4f}]", f"{f['r']:.4f}",
                     f"{f['loo_alpha_min']:.4f} .. {f['loo_alpha_max']:.4f}", f["k"], f["beta"],
                     fmt(p.get("alpha")), fmt(p.get("r")),
                     *([fmt(o.get("alpha")), fmt(o.get("r"))] if compare else []), str(len(f["flags"]))])
    return table(["fit", "points", "alpha", "95% CI", "r", "alpha, one depth left out", "k", "beta",
                  "paper alpha", "paper r", *(["compared alpha", "compared r"] if compare else []), "flags"], rows)


def throughput_section(rows: list[list[Any]]) -> list[str]:
    if not rows:
        return []
    return ["## Training throughput", "",
            "Tokens/s of the training steps between log points (median over the run: evaluations, checkpoints and "
            "the first window's compilation left out), the training loop's seconds (all of it) and the stage's.", "",
            table(["depth", "tokens/s", "loop s", "stage s", "device"], rows), ""]


ZEROSHOT_ROWS = (("var_inpaint", "VAR in-painting (zero-shot)"), ("uncond_fill", "unconditional sample in the hole"),
                 ("class_fill", "class sample in the hole"), ("original", "original, no hole (floor)"))


def zeroshot_section(z: dict[str, Any]) -> list[str]:
    """The in-painting table and picture (stage ``zeroshot``)."""
    lpips = z.get("lpips", False)
    header = ["method", "MSE in the hole", *(["LPIPS"] if lpips else []), "FID", "KID", "precision", "recall"]
    rows = []
    for key, name in ZEROSHOT_ROWS:
        m = z["methods"][key]
        rows.append([name, f"{m['mse_hole']:.5f}", *([m["lpips"]] if lpips else []), f"{m['fid']:.3f}",
                     m["kid_mean"], m["precision"], m["recall"]])
    holes = ", ".join(str(h) for h in z["holes"])
    return ["## Zero-shot in-painting", "",
            f"VAR d{z['depth']} fills one hole in each of the last {z['images']:,} val images (holes cycled: "
            f"{holes} as [top, left, bottom, right] fractions; {100 * z['hole_fraction']:.1f}% of the pixels), "
            "against pasting a sample of the same model into the hole. Every output is composited into the "
            "original outside the hole; MSE is over hole pixels in [0, 1]; FID, KID, precision and recall "
            f"against the other {z['reference_images']:,} val images"
            + ("" if lpips else "; LPIPS is off (no VGG16 weights: `zeroshot.lpips_weights`)") + ".", "",
            table(header, rows), "",
            "Rows of the picture: " + "; ".join(z["rows"]) + ".", "", "![zero-shot tasks](figures/zeroshot.png)", "",
            "The raster-scan AR baseline against VAR (paper Table 3, rows 1-2) is a pipeline of its own: "
            "`dvc repro ablation/dvc.yaml` writes [ablation.md](ablation.md) beside this report.", ""]


def versions() -> str:
    return ", ".join(f"{k} {v}" for k, v in machine.versions().items())


def settings_line(ev: dict[str, Any]) -> str:
    s, net = ev["sampling"], ev["feature_network"]
    acc = f", val accuracy {100 * net['val_accuracy']:.1f}%" if net.get("val_accuracy") is not None else ""
    return (f"Samples: {ev['samples_per_seed']:,} per seed ({ev['samples_per_seed'] // max(len(ev['class_names']), 1)}"
            f" per class) for each of the seeds {ev['seeds']}, CFG {s['cfg']}, top-k {s['top_k']}, top-p {s['top_p']}; "
            f"scored against {ev['reference_images']:,} val images by the feature network `{net['name']}` "
            f"({net['weights']}, sha256 {net['sha256'][:12]}{acc}). FID, IS, KID, precision and recall are "
            f"means over the seeds; the spread is max - min of FID over them.")


def markdown(ctx: dict[str, Any]) -> str:
    """The report from ``ctx``: ``title``, ``data``, ``frame``, ``fit``, ``reference``, ``eval``
    (one depth's evaluation, for its settings), ``depths``, ``provenance``; optional: ``notes``,
    ``sources``, ``compare`` (another fit record), ``throughput`` rows, ``zeroshot`` (the in-painting record)."""
    fit = ctx["fit"]
    parts = [f"# {ctx['title']}", "", ctx["data"], ""] + ([ctx["notes"], ""] if ctx.get("notes") else [])
    parts += [f"Generated by `dvc repro` (stage `report`) from {ctx.get('sources', '`metrics/` and `runs/`')}; the "
              "table is also `runs.csv` beside this file.", "", "## Runs", "", runs_table(ctx["frame"]), "",
              settings_line(ctx["eval"]), "", reference_table(ctx["reference"]), ""]
    if fit["status"] != "ok":
        parts += ["## Fits", "", f"**The fit refused:** {fit['reason']}.", ""]
    else:
        parts += ["## Fitted power laws", "",
                  "Y = (beta X)^alpha fitted as a line in log10-log10 space; 95% CI from the t distribution with n-2 "
                  "degrees of freedom. The paper states no units for N and C: compare alpha and r, not beta. Against "
                  "compute the points are the C_min frontier (the lower envelope of every evaluation point past "
                  "warm-up)." + (f" Compared: the fits of `{ctx['compare']['source']}`." if ctx.get("compare") else ""),
                  "", exponents_table(fit["fits"], fit.get("paper", {}), ctx.get("compare")), ""]
        parts += ["### Flags", ""] + ([f"- {f}" for f in fit["flags"]] or ["- none"]) + [""]
        if fit.get("irreducible_L_mean_vs_N"):
            e = fit["irreducible_L_mean_vs_N"]
            parts += [f"Irreducible-loss diagnostic (L_mean = E + A N^alpha): E = {e['E']:.4g} +- {e['E_sd']:.2g}, "
                      f"alpha = {e['alpha']:.4g} +- {e['alpha_sd']:.2g}.", ""]
    parts += ["## Figures", "", "![loss and error vs N](figures/scaling_vs_N.png)", "",
              "![loss vs compute](figures/scaling_vs_C.png)", "", "![FID and IS vs N](figures/fidelity_vs_N.png)", "",
              "Samples, one row per class (first seed):", ""]
    parts += [f"- d{d}: ![samples of depth {d}](figures/samples-d{d}.png)" for d in ctx["depths"]]
    parts += [""] + throughput_section(ctx.get("throughput", []))
    parts += zeroshot_section(ctx["zeroshot"]) if ctx.get("zeroshot") else []
    parts += ["## Provenance", ""] + [f"- {k}: {v}" for k, v in ctx["provenance"].items()] + [""]
    return "\n".join(parts)
