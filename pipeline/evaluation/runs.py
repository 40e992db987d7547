"""Every depth's training and evaluation results, read and checked together, as one table.

The fit and the report read the same files through :func:`read_runs`: per depth the training's
numbers (``metrics/train/dD.json``) and record (``runs/train/dD.json``: steps, the model's sha256,
...), its validation curve (``metrics/train/dD-curve.json``), and the evaluation's numbers
(``metrics/eval/dD.json``) and record (``runs/eval/dD.json``: per seed, settings, feature network).
A missing file, or an evaluation of another model than the one the training produced, is an error
naming the file and the stage to rerun.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from ..files import read_json

RUN_COLUMNS = ("depth", "N", "tokens", "compute", "L_last", "L_mean", "Err_last", "Err_mean",
               "fid", "fid_spread", "is_mean", "kid_mean", "precision", "recall")


@dataclass(frozen=True)
class DepthRun:
    depth: int
    train: dict[str, Any]
    curve: list[dict[str, Any]]
    eval: dict[str, Any] | None

    def row(self) -> dict[str, Any]:
        ev = self.eval or {}
        return {"depth": self.depth, **{k: self.train[k] for k in RUN_COLUMNS[1:8]},
                **{k: ev.get(k) for k in RUN_COLUMNS[8:]}}


def _read(path: Path, stage: str) -> Any:
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise ArtifactError(f"{e} (run `dvc repro {stage}`)") from e


@dataclass(frozen=True)
class RunFiles:
    """Where the per-depth files are (the folders ``dvc.yaml`` names)."""

    train: Path            # metrics/train
    train_records: Path    # runs/train
    eval: Path | None      # metrics/eval (None: leave the evaluations out)
    eval_records: Path | None = None   # runs/eval


def read_runs(depths: tuple[int, ...], files: RunFiles) -> list[DepthRun]:
    """The runs of ``depths`` (sorted), each training merged with its record."""
    runs = []
    for d in sorted(depths):
        stage = f"train_var@{d}"
        train = {**_read(files.train_records / f"d{d}.json", stage), **_read(files.train / f"d{d}.json", stage)}
        curve = _read(files.train / f"d{d}-curve.json", stage)
        ev = None
        if files.eval is not None:
            path = files.eval / f"d{d}.json"
            ev = {**_read(files.eval_records / f"d{d}.json", f"evaluate@{d}"), **_read(path, f"evaluate@{d}")}
            if ev.get("model_sha256") != train.get("model_sha256"):
                raise ArtifactError(f"{path}: evaluates another model than {files.train_records / f'd{d}.json'} "
                                    f"records (stale: run `dvc repro evaluate@{d}`)")
        runs.append(DepthRun(d, train, curve, ev))
    return runs


def runs_frame(runs: list[DepthRun]):
    """One row per depth (:data:`RUN_COLUMNS`): the report's table and ``reports/runs.csv``."""
    import pandas as pd
    return pd.DataFrame([r.row() for r in runs], columns=list(RUN_COLUMNS))
