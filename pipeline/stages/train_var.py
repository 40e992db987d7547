"""Stage ``train_var@D``: one VAR transformer of depth D on the cached token shards, under Ray Train.

Trains with ``TorchTrainer`` (workers, CPU/GPU and resources from ``train.ray``; the execution
plan from ``execution``), then writes the model, the metrics the scaling-law fit reads (N,
tokens, compute C, train loss, test loss L and error Err for the last scale and over all scales,
and the loss-vs-compute curve) and the run's record, and logs the same to an MLflow child run.
Checkpoints go through Ray; a run with the same recipe resumes from the latest one in
``train.ray.storage_path`` (after a crash, or when re-run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..stage import stage_main
from ..training.config import TrainVarConfig, load_train_var_config
from ..training.driver import TrainPaths, init_ray, train_depth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths(TrainPaths):
    depth: int = 0


def load_config(params: dict[str, Any], file: str, paths: Paths) -> TrainVarConfig:
    config = load_train_var_config(params, file, paths.depth)
    if paths.depth not in config.train.depths:
        log.warning("depth %d is not in %s:train.depths %s", paths.depth, file, list(config.train.depths))
    return config


def run(config: TrainVarConfig, paths: Paths) -> dict:
    init_ray(config.train.ray.address)
    return train_depth(config, paths)


main = stage_main("train_var", Paths, load_config, run,
                  summary_keys=("N", "compute", "L_mean", "L_last", "Err_mean"),
                  run_name=lambda paths: f"train_var-d{paths.depth}",
                  tags=lambda paths: {"varscale.depth": str(paths.depth)}, doc=__doc__)

if __name__ == "__main__":
    main()
