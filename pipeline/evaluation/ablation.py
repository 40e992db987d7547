"""The AR-vs-VAR comparison (paper Table 3, rows 1-2, in miniature): sampling timings and the table.

Both models come out of the same stages (tokenizer, train_var under Ray Train, evaluate with the
same feature network and sampling settings); this module adds what only a side-by-side run can
measure, the wall-clock time per image of each sampler on one machine in one process, and
writes the rows: parameters, training compute, FID/IS/precision/recall, sequential transformer
calls per image and time per image. Differences the comparison must not hide (compute or
parameter counts that are not equal) are flagged, never adjusted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from varcore.ar import sequential_calls
from varcore.var import VAR
from varcore.vqvae import VQVAE

from .config import SamplingParams
from .report import fmt
from .samples import balanced_labels, sample_images

TIMING_BATCHES = (1, 64)
EQUAL_TOLERANCE = 0.02      # compute / parameter counts within 2% count as equal (steps are whole numbers)


@dataclass(frozen=True)
class Side:
    """One column of the table: a trained model's files, read."""

    name: str                   # "AR (raster, next-token)" / "VAR (next-scale)"
    train: dict[str, Any]       # metrics/train/dD.json
    train_record: dict[str, Any]
    eval: dict[str, Any]        # metrics/eval/dD.json
    tokenizer: dict[str, Any]   # metrics/tokenizer.json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_sampling(model: VAR, vq: VQVAE, sampling: SamplingParams, batch: int, repeats: int,
                  device: torch.device) -> dict[str, float]:
    """Milliseconds per image of sampling and decoding ``batch`` images (the fastest of
    ``repeats`` timed runs after one warm-up run; the labels cycle through the classes)."""
    labels = balanced_labels(model.cfg.num_classes, math.ceil(batch / model.cfg.num_classes))[:batch]
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        sample_images(model, vq, labels, sampling, seed=i, batch_size=batch, desc=f"time B={batch}")
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return {"batch": batch, "ms_per_image": 1000.0 * best / batch, "ms_per_batch": 1000.0 * best}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(ar: Side, var: Side, ar_model: VAR, var_model: VAR, timings: dict[str, list[dict[str, float]]]
          ) -> dict[str, Any]:
    """The comparison as data: one dict per side, the ratios and the flags."""
    out: dict[str, Any] = {"sides": {}, "flags": []}
    for key, side, model in (("ar", ar, ar_model), ("var", var, var_model)):
        out["sides"][key] = {
            "name": side.name, "depth": model.cfg.depth, "width": model.cfg.C, "N": side.train["N"],
            "params_total": side.train_record.get("params_total"), "compute": side.train["compute"],
            "images_seen": side.train_record.get("images_seen"), "steps": side.train["steps"],
            "tokens_per_image": model.cfg.L, "patch_nums": list(model.cfg.patch_nums),
            "L_mean": side.train["L_mean"], "tokenizer_val_psnr": side.tokenizer.get("val_psnr"),
            "tokenizer_codes_used": side.tokenizer.get("codebook_used_any_scale"),
            **{k: side.eval[k] for k in ("fid", "is_mean", "precision", "recall")},
            "sequential_calls": sequential_calls(model.cfg),
            "timing": timings[key],
        }
    a, v = out["sides"]["ar"], out["sides"]["var"]
    out["compute_ratio_ar_over_var"] = _ratio(a["compute"], v["compute"])
    out["N_ratio_ar_over_var"] = _ratio(a["N"], v["N"])
    out["speedup_var_over_ar"] = {str(ta["batch"]): _ratio(ta["ms_per_image"], tv["ms_per_image"])
                                  for ta, tv in zip(a["timing"], v["timing"])}
    if abs(out["compute_ratio_ar_over_var"] - 1) > EQUAL_TOLERANCE:
        out["flags"].append(f"training compute differs: AR/VAR = {out['compute_ratio_ar_over_var']:.3f} "
                            f"(set the ablation's train.steps to match)")
    if abs(out["N_ratio_ar_over_var"] - 1) > EQUAL_TOLERANCE:
        out["flags"].append(f"parameter counts differ: AR/VAR N = {out['N_ratio_ar_over_var']:.3f}")
    return out


def markdown(t: dict[str, Any], device: str, machine: str, grids: dict[str, str]) -> str:
    """The report page: the table, the ratios, the flags, the sample grids."""
    a, v = t["sides"]["ar"], t["sides"]["var"]
    rows = [
        ("order", "raster, one token per call", "coarse to fine, one scale per call"),
        ("tokenizer", f"1 scale {a['patch_nums']}, {a['tokens_per_image']} tokens",
         f"{len(v['patch_nums'])} scales {v['patch_nums']}, {v['tokens_per_image']} tokens"),
        ("tokenizer val PSNR (dB)", fmt(a["tokenizer_val_psnr"], spec=".2f"),
         fmt(v["tokenizer_val_psnr"], spec=".2f")),
        ("tokenizer codes used (share of V)", fmt(a["tokenizer_codes_used"], spec=".3f"),
         fmt(v["tokenizer_codes_used"], spec=".3f")),
        ("depth / width", f"{a['depth']} / {a['width']}", f"{v['depth']} / {v['width']}"),
        ("parameters N (eq. 8)", fmt(a["N"], spec=","), fmt(v["N"], spec=",")),
        ("parameters, all", fmt(a["params_total"], spec=","), fmt(v["params_total"], spec=",")),
        ("training compute C (FLOPs)", fmt(a["compute"], spec=".4g"), fmt(v["compute"], spec=".4g")),
        ("training steps / images seen", f"{a['steps']} / {fmt(a['images_seen'], spec=',')}",
         f"{v['steps']} / {fmt(v['images_seen'], spec=',')}"),
        ("FID (lower is better)", fmt(a["fid"], spec=".2f"), fmt(v["fid"], spec=".2f")),
        ("IS", fmt(a["is_mean"], spec=".2f"), fmt(v["is_mean"], spec=".2f")),
        ("precision", fmt(a["precision"], spec=".3f"), fmt(v["precision"], spec=".3f")),
        ("recall", fmt(a["recall"], spec=".3f"), fmt(v["recall"], spec=".3f")),
        ("sequential transformer calls / image", fmt(a["sequential_calls"], spec=","),
         fmt(v["sequential_calls"], spec=",")),
    ]
    for ta, tv in zip(a["timing"], v["timing"]):
        rows.append((f"time / image at batch {ta['batch']} (ms)", fmt(ta["ms_per_image"], spec=".3g"),
                     fmt(tv["ms_per_image"], spec=".3g")))
    lines = ["# Raster-scan AR vs next-scale VAR (paper Table 3, rows 1-2, in miniature)", "",
             "Same blocks, width rule, class conditioning, recipe, feature network and sampling settings; "
             "the AR baseline reads a single-scale tokenizer's token map in raster order (`varcore.ar`). "
             "Written by `dvc repro ablation/dvc.yaml` from the numbers that run produced.", "",
             "| | AR | VAR |", "|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    speed = ", ".join(f"{s:.2f}x at batch {b}" for b, s in t["speedup_var_over_ar"].items())
    lines += ["", f"VAR samples faster than AR by {speed} (time per image, {device}; {machine}). "
              f"Training compute AR/VAR = {t['compute_ratio_ar_over_var']:.3f}; N AR/VAR = "
              f"{t['N_ratio_ar_over_var']:.3f}.", "",
              "The test losses (AR "
              f"{a['L_mean']:.4f}, VAR {v['L_mean']:.4f} nats per token) are over different token sets and are "
              "not comparable; FID, IS, precision and recall are, since both are scored against the same val "
              "split with the same feature network.", "",
              "Paper, for scale (ImageNet 256x256, abstract): the VQGAN-style AR baseline has FID 18.65 and IS "
              "80.4; VAR improves them with about 20x faster inference. The scaling-law report: "
              "[scaling.md](scaling.md).", ""]
    lines += ["## Flags", ""] + ([f"- {f}" for f in t["flags"]] or ["- none"]) + [""]
    lines += ["## Samples (one row per class)", ""] + [f"- {name}: ![{name}]({path})" for name, path in grids.items()]
    return "\n".join(lines) + "\n"
