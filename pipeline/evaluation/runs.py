"""Every depth's training and evaluation results, read and checked together, as one table.

The fit and the report read the same files through :func:`read_runs`: per depth the training's
final values (``metrics/train/dD.json``), its validation curve (``dD-curve.json``) and the
evaluation (``metrics/eval/dD.json``). A missing file, or an evaluation of another model than
the one the training metrics describe, is an error naming the file and the stage to rerun.
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


def read_runs(depths: tuple[int, ...], train_dir: Path, eval_dir: Path | None) -> list[DepthRun]:
    """The runs of ``depths`` (sorted); without ``eval_dir`` the evaluations are left out."""
    runs = []
    for d in sorted(depths):
        train = _read(train_dir / f"d{d}.json", f"train_var@{d}")
        curve = _read(train_dir / f"d{d}-curve.json", f"train_var@{d}")
        ev = None
        if eval_dir is not None:
            path = eval_dir / f"d{d}.json"
            ev = _read(path, f"evaluate@{d}")
            if ev.get("model_sha256") != train.get("model_sha256"):
                raise ArtifactError(f"{path}: evaluates another model than {train_dir / f'd{d}.json'} describes "
                                    f"(stale: run `dvc repro evaluate@{d}`)")
        runs.append(DepthRun(d, train, curve, ev))
    return runs


def runs_frame(runs: list[DepthRun]):
    """One row per depth (:data:`RUN_COLUMNS`): the report's table and ``reports/runs.csv``."""
    import pandas as pd
    return pd.DataFrame([r.row() for r in runs], columns=list(RUN_COLUMNS))
