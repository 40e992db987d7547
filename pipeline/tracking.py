"""MLflow helpers: a local SQLite store by default, one parent run per pipeline configuration.

Every stage runs as a child of a parent run keyed by the git commit and the hash of
``params.yaml``, so one ``dvc repro`` (or one sweep) groups under one parent in the UI.
``MLFLOW_TRACKING_URI`` overrides the store; ``VARSCALE_PARENT_RUN_ID`` pins the parent.
Each run is tagged with the commit, the params hash, the package versions and the machine
(:mod:`pipeline.machine`). How the store is reached, bounded in time and kept portable is
:mod:`pipeline.tracking_store`.

``VARSCALE_TRACKING`` chooses where the stages log: ``mlflow`` (the default), ``off`` (nothing),
or ``journal:<dir>`` (a JSON-lines journal per stage run, replayed into MLflow later by
``python -m pipeline.tracking_journal <dir>``: :mod:`pipeline.tracking_journal`). MLflow is
imported only in the ``mlflow`` mode, so the stages run on a node without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from . import machine
from .errors import InputError
from .files import sha256_bytes
from .tracking_journal import Journal, journal_dir
from .tracking_store import (bound_http_waits, check_reachable, create_store_once, experiment_location,
                             make_default_experiment_portable, retry_locked, tracking_uri)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
EXPERIMENT = "varscale"
MODES = ("mlflow", "off", "journal:<dir>")
# the journal of the stage run open in this context (journal mode only)
_JOURNAL: contextvars.ContextVar[Journal | None] = contextvars.ContextVar("varscale_journal", default=None)


def tracking_mode() -> str:
    """``VARSCALE_TRACKING``: mlflow (default), off, or journal:<dir>; anything else is refused."""
    mode = os.environ.get("VARSCALE_TRACKING", "mlflow").strip() or "mlflow"
    if mode in ("mlflow", "off") or journal_dir(mode) is not None:
        return mode
    raise InputError(f"VARSCALE_TRACKING={mode!r}: not one of {', '.join(MODES)}")


def _mlflow():
    import mlflow
    return mlflow


def git_commit() -> str:
    """HEAD of the checkout; ``VARSCALE_GIT_COMMIT`` names it for a copy without ``.git`` (a GPU node)."""
    if os.environ.get("VARSCALE_GIT_COMMIT"):
        return os.environ["VARSCALE_GIT_COMMIT"]
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
    uri = _mlflow().get_tracking_uri()
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
    from mlflow.tracking import MlflowClient
    uri = uri or tracking_uri()
    bound_http_waits()
    check_reachable(uri)
    create_store_once(uri)
    _mlflow().set_tracking_uri(uri)
    return MlflowClient()


def run_tags(params_file: str | Path = "params.yaml") -> dict[str, str]:
    """What every run records: commit, hash of the params file the stage read, package versions,
    machine, and a source name without the checkout's absolute path (MLflow's default is ``sys.argv[0]``)."""
    import sys
    source = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
    return {"varscale.git_commit": git_commit(), "varscale.params_hash": params_hash(params_file),
            "mlflow.source.name": source,
            **{f"varscale.version.{k}": v for k, v in machine.versions().items()},
            **{f"varscale.machine.{k}": v for k, v in machine.describe().items()}}


def parent_run_id(client: MlflowClient, experiment_id: str, commit: str | None = None,
                  params_digest: str | None = None) -> str:
    """The pipeline run of ``commit`` and ``params_digest`` (default: this checkout's), created once."""
    pinned = os.environ.get("VARSCALE_PARENT_RUN_ID")
    if pinned:
        return pinned
    commit, ph = commit or git_commit(), params_digest or params_hash()
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
    if not active():
        return
    items = [(k, str(v)[:500]) for k, v in params.items()]
    journal = _JOURNAL.get()
    if journal is not None:
        journal.params(dict(items))
        return
    for i in range(0, len(items), 100):
        retry_locked(_mlflow().log_params, dict(items[i:i + 100]))


@contextlib.contextmanager
def journal_run(folder: Path, stage: str, config: Any, run_name: str | None, tags: dict[str, str] | None,
                params_file: str | Path = "params.yaml") -> Iterator[None]:
    """A stage run recorded in a journal file (``VARSCALE_TRACKING=journal:<dir>``)."""
    journal = Journal.open(folder, run_name or stage, stage,
                           {"varscale.stage": stage, **run_tags(params_file), **(tags or {})}, as_params(config))
    token, status = _JOURNAL.set(journal), "FAILED"
    log.info("tracking journal %s (stage %s)", journal.path, stage)
    try:
        yield None
        status = "FINISHED"
    finally:
        journal.end(status)
        _JOURNAL.reset(token)


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, run_name: str | None = None,
              tags: dict[str, str] | None = None, params_file: str | Path = "params.yaml") -> Iterator[Any]:
    """Open the tracking run of one stage, with its config as params, the commit and the params hash:
    an MLflow child run (yields the active run), a journal, or nothing (``VARSCALE_TRACKING``)."""
    mode = tracking_mode()
    if mode == "off":
        log.info("VARSCALE_TRACKING=off: stage %s logs no run", stage)
        yield None
        return
    folder = journal_dir(mode)
    if folder is not None:
        with journal_run(folder, stage, config, run_name, tags, params_file):
            yield None
        return
    mlflow = _mlflow()
    client = connect()
    exp = retry_locked(experiment_id, client)
    all_tags = {"varscale.stage": stage, **run_tags(params_file), **(tags or {})}
    parent = retry_locked(parent_run_id, client, exp, params_digest=all_tags["varscale.params_hash"])
    with retry_locked(mlflow.start_run, experiment_id=exp, run_name=run_name or stage, parent_run_id=parent,
                      tags=all_tags) as run:
        log_params(as_params(config))
        log.info("MLflow run %s (stage %s) in %s", run.info.run_id, stage, tracking_uri())
        yield run


def active() -> bool:
    """Whether a run is open (stages called from tests or notebooks log nothing)."""
    if _JOURNAL.get() is not None:
        return True
    return tracking_mode() == "mlflow" and _mlflow().active_run() is not None


def log_metrics(metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
    """The numeric scalars of ``metrics`` (lists, strings and nested values are left out)."""
    if not active():
        return
    scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    journal = _JOURNAL.get()
    if scalars and journal is not None:
        journal.metrics(scalars, step)
    elif scalars:
        retry_locked(_mlflow().log_metrics, scalars, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    journal = _JOURNAL.get()
    if journal is not None:
        journal.artifact(path, artifact_path)
    elif active():
        _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_parent_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """An artifact of the active run's parent (the pipeline's run, where the report belongs)."""
    journal = _JOURNAL.get()
    if journal is not None:
        journal.artifact(path, artifact_path, parent=True)
        return
    if not active():
        return
    from mlflow.tracking import MlflowClient
    mlflow = _mlflow()
    run = mlflow.active_run()
    parent = run.data.tags.get("mlflow.parentRunId") or mlflow.get_run(run.info.run_id).data.tags.get(
        "mlflow.parentRunId")
    MlflowClient().log_artifact(parent or run.info.run_id, str(path), artifact_path)


def set_tags(tags: dict[str, str]) -> None:
    journal = _JOURNAL.get()
    if journal is not None:
        journal.tags(tags)
    elif active():
        retry_locked(_mlflow().set_tags, tags)
