"""Stage ``report``: ``reports/scaling.md`` with its figures and ``reports/runs.csv``, the end of ``dvc repro``.

Collects every depth's training and evaluation (:func:`pipeline.evaluation.runs.read_runs`) into
one pandas DataFrame, from which the runs table and ``runs.csv`` come; draws the paper's Fig. 5
and Fig. 6 and FID/IS against N from the fit's points; copies each depth's sample picture; and
writes the fitted exponents beside the paper's, every flag, and the provenance (git commit,
params hash, data manifest, tokenizer and feature-network hashes, package versions). The report,
its figures and the fit go to the MLflow parent run as artifacts.

The same stage writes the GPU profile's report (``gpu/dvc.yaml``): there the in-painting section
is left out (``--zeroshot`` not given), ``--compare`` puts another profile's exponents beside the
fitted ones and ``--notes`` adds a paragraph on what the run was and what limits it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.figures import fidelity_vs_N, scaling_vs_C, scaling_vs_N
from ..evaluation.report import markdown, versions
from ..evaluation.runs import RunFiles, read_runs, runs_frame
from ..errors import InputError
from ..files import atomic_path, read_json, sha256_file
from ..images import IMAGES_MANIFEST, read_images_manifest
from ..params import load
from ..stage import stage_main
from ..tracking import git_commit, log_parent_artifact, params_hash
from ..training.config import TrainParams


@dataclass(frozen=True)
class ReportConfig:
    depths: tuple[int, ...]
    params_file: str


@dataclass(frozen=True)
class Paths:
    train: Path          # metrics/train
    train_records: Path  # runs/train
    eval: Path           # metrics/eval
    eval_records: Path   # runs/eval
    fit: Path            # runs/fit.json
    reference: Path      # runs/reference.json
    images: Path         # data/images (its manifest describes the data)
    out: Path            # reports
    zeroshot: Path | None = None       # runs/zeroshot.json (the in-painting measurement)
    zeroshot_grid: Path | None = None  # metrics/zeroshot.png
    compare: Path | None = None        # another profile's runs/fit.json: its alpha and r beside these
    notes: Path | None = None          # a markdown paragraph placed under the title


def load_config(params: dict[str, Any], file: str, paths: Paths) -> ReportConfig:
    return ReportConfig(tuple(load(TrainParams, params, "train", file).depths), file)


def machines(runs) -> str:
    """The machines the depths were trained on (CPU numerics differ between machines)."""
    seen: dict[str, list[int]] = {}
    for r in runs:
        m = r.train.get("machine")
        key = f"{m['cpu']} ({m['isa']}), accelerator {m['accelerator']}" if m else "not recorded"
        seen.setdefault(key, []).append(r.depth)
    return "; ".join(f"{k}: d{', d'.join(map(str, ds))}" for k, ds in seen.items())


def _provenance(cfg: ReportConfig, paths: Paths, ev: dict[str, Any], runs) -> dict[str, str]:
    return {"git commit": git_commit(), "params hash": f"{params_hash(cfg.params_file)} ({cfg.params_file})",
            "data manifest sha256": sha256_file(paths.images / IMAGES_MANIFEST),
            "tokenizer sha256": ev["tokenizer_sha256"],
            "feature network": f"{ev['feature_network']['name']}, sha256 {ev['feature_network']['sha256']}",
            "packages": versions(), "trained on": machines(runs)}


def _data_line(paths: Paths, depths: tuple[int, ...], runs) -> str:
    man = read_images_manifest(paths.images)
    s = man["splits"]
    L = runs[0].train["tokens"] // runs[0].train["images_seen"]
    return (f"Data: {man['source']} ({len(man['classes'])} classes), {s['train']['count']:,} train and "
            f"{s['val']['count']:,} val images at {man['image_size']}x{man['image_size']}; {L} tokens per image; "
            f"depths {list(depths)}.")


def throughput_rows(runs) -> list[list[Any]]:
    """Per depth: the trainer's tokens/s between log points, the loop's and the stage's seconds, where."""
    rows = []
    for r in runs:
        rate = r.train.get("tokens_per_s")
        if rate is not None:
            m = r.train.get("machine") or {}
            rows.append([r.depth, f"{rate:,.0f}", r.train.get("train_seconds"), r.train.get("wall_seconds"),
                         m.get("accelerator") or m.get("cpu", "-")])
    return rows


def run(cfg: ReportConfig, paths: Paths) -> dict:
    runs = read_runs(cfg.depths, RunFiles(paths.train, paths.train_records, paths.eval, paths.eval_records))
    fit, reference = read_json(paths.fit), read_json(paths.reference)
    frame = runs_frame(runs)
    figures = paths.out / "figures"
    rows = frame.to_dict("records")
    fits = fit.get("fits", {})
    scaling_vs_N(rows, fits, figures / "scaling_vs_N.png")
    scaling_vs_C(fit.get("frontiers", {}), fits, figures / "scaling_vs_C.png")
    fidelity_vs_N(rows, fits, figures / "fidelity_vs_N.png")
    pictures = {f"samples-d{d}.png": paths.eval / f"samples-d{d}.png" for d in cfg.depths}
    if paths.zeroshot is not None:
        if paths.zeroshot_grid is None:
            raise InputError("--zeroshot needs --zeroshot-grid (the in-painting picture)")
        pictures["zeroshot.png"] = paths.zeroshot_grid
    for name, src in pictures.items():
        with atomic_path(figures / name) as tmp:
            shutil.copyfile(src, tmp)
    with atomic_path(paths.out / "runs.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    ev = runs[0].eval
    compare = None if paths.compare is None else {"source": str(paths.compare), **read_json(paths.compare)}
    profile = "" if cfg.params_file == "params.yaml" else f" ({cfg.params_file})"
    text = markdown({"title": "VAR scaling laws" + profile,
                     "data": _data_line(paths, cfg.depths, runs), "frame": frame,
                     "fit": fit, "reference": reference, "eval": ev, "depths": cfg.depths,
                     "sources": f"`{paths.train.parent}/` and `{paths.train_records.parent}/`",
                     "notes": None if paths.notes is None else paths.notes.read_text().strip(),
                     "compare": compare, "throughput": throughput_rows(runs),
                     "zeroshot": None if paths.zeroshot is None else read_json(paths.zeroshot),
                     "provenance": _provenance(cfg, paths, ev, runs)})
    with atomic_path(paths.out / "scaling.md") as tmp:
        tmp.write_text(text)
    for p in (paths.out / "scaling.md", paths.out / "runs.csv", paths.fit, *sorted(figures.glob("*.png"))):
        log_parent_artifact(p, "report")
    return {"depths": len(runs), "flags": len(fit.get("flags", [])), "fit_status": fit["status"]}


main = stage_main("report", Paths, load_config, run, summary_keys=("depths", "flags", "fit_status"), doc=__doc__)

if __name__ == "__main__":
    main()
