"""MLflow helpers: a local SQLite store by default, one parent run per pipeline configuration.

Every stage runs as a child of a parent run keyed by the git commit and the hash of
``params.yaml``, so one ``dvc repro`` (or one sweep) groups under one parent in the UI.
``MLFLOW_TRACKING_URI`` overrides the store; ``VARSCALE_PARENT_RUN_ID`` pins the parent.
Each run is tagged with the commit, the params hash, the package versions and the machine
(:mod:`pipeline.machine`). How the store is reached, bounded in time and kept portable is
:mod:`pipeline.tracking_store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from . import machine
from .files import sha256_bytes
from .tracking_store import (bound_http_waits, check_reachable, create_store_once, experiment_location,
                             make_default_experiment_portable, retry_locked, tracking_uri)

log = logging.getLogger(__name__)
EXPERIMENT = "varscale"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def params_hash(path: str | Path = "params.yaml") -> str:
    p = Path(path)
    return sha256_bytes(p.read_bytes())[:16] if p.is_file() else "none"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params -> ``a.b.c`` keys, as MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def experiment_id(client: MlflowClient) -> str:
    """The experiment's id, created on first use (in a local store with portable artifact paths)."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    try:
        return client.create_experiment(name, artifact_location=experiment_location(uri, name))
    except Exception:   # another process (a sweep's trial) created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
    finally:
        make_default_experiment_portable(uri)


def connect(uri: str | None = None) -> MlflowClient:
    """The client of ``uri`` (default: the configured store), after checking within seconds that it answers."""
    uri = uri or tracking_uri()
    bound_http_waits()
    check_reachable(uri)
    create_store_once(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


def run_tags() -> dict[str, str]:
    """What every run records: commit, params hash, package versions, machine, and a source name
    without the checkout's absolute path (MLflow's default is ``sys.argv[0]``)."""
    import sys
    source = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
    return {"varscale.git_commit": git_commit(), "varscale.params_hash": params_hash(),
            "mlflow.source.name": source,
            **{f"varscale.version.{k}": v for k, v in machine.versions().items()},
            **{f"varscale.machine.{k}": v for k, v in machine.describe().items()}}


def parent_run_id(client: MlflowClient, experiment_id: str) -> str:
    pinned = os.environ.get("VARSCALE_PARENT_RUN_ID")
    if pinned:
        return pinned
    commit, ph = git_commit(), params_hash()
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`varscale.kind` = 'pipeline' and tags.`varscale.params_hash` = '{ph}' "
        f"and tags.`varscale.git_commit` = '{commit}'"), max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {commit[:8]} params {ph[:8]}", tags={
        "varscale.kind": "pipeline", "varscale.params_hash": ph, "varscale.git_commit": commit,
        "mlflow.source.git.commit": commit})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def as_params(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass or dict as flat ``a.b.c`` MLflow params."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return flatten(config or {})


def log_params(params: dict[str, Any]) -> None:
    items = [(k, str(v)[:500]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        retry_locked(mlflow.log_params, dict(items[i:i + 100]))


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow child run of one stage, with its config as params, the commit and the params hash."""
    client = connect()
    exp = retry_locked(experiment_id, client)
    parent = retry_locked(parent_run_id, client, exp)
    all_tags = {"varscale.stage": stage, **run_tags(), **(tags or {})}
    with retry_locked(mlflow.start_run, experiment_id=exp, run_name=run_name or stage, parent_run_id=parent,
                      tags=all_tags) as run:
        log_params(as_params(config))
        log.info("MLflow run %s (stage %s) in %s", run.info.run_id, stage, tracking_uri())
        yield run


def active() -> bool:
    """Whether a run is open (stages called from tests or notebooks log nothing)."""
    return mlflow.active_run() is not None


def log_metrics(metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
    """The numeric scalars of ``metrics`` (lists, strings and nested values are left out)."""
    if not active():
        return
    scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        retry_locked(mlflow.log_metrics, scalars, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if active():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_parent_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """An artifact of the active run's parent (the pipeline's run, where the report belongs)."""
    run = mlflow.active_run()
    if run is None:
        return
    parent = run.data.tags.get("mlflow.parentRunId") or mlflow.get_run(run.info.run_id).data.tags.get(
        "mlflow.parentRunId")
    MlflowClient().log_artifact(parent or run.info.run_id, str(path), artifact_path)


def set_tags(tags: dict[str, str]) -> None:
    if active():
        retry_locked(mlflow.set_tags, tags)
