"""The MLflow store a stage logs to: found quickly or refused quickly, and portable on disk.

- **Reachable or refused within seconds.** MLflow's HTTP client waits up to 120 s per request
  and retries 7 times (about 4 minutes, longer against a server that accepts and never
  answers). A stage probes an ``http(s)`` tracking URI once with a short timeout before any
  work and bounds MLflow's own waits, so an outage fails the stage in under 30 s with a
  message naming the URI (:class:`TrackingError`), never a hang.
- **Portable artifacts.** A SQLite store records each experiment's artifact location, and
  MLflow makes local ones absolute, so a copied or moved checkout would keep writing into
  the original's ``mlruns/``. The local store's experiment uses the ``varscale-checkout:``
  scheme instead (:class:`pipeline.tracking_artifacts.CheckoutArtifactRepository`, registered as
  an MLflow plugin in ``pyproject.toml``): ``varscale-checkout:///mlruns/...`` is read relative to the folder of the
  SQLite file, so the store and its artifacts move together and no absolute path of the
  checkout is stored.
- **No lost writes.** Concurrent writers of one SQLite file (a sweep's trials) wait on its
  lock; a write that still fails with ``database is locked`` is retried (:func:`retry_locked`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from .errors import InputError

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"
SCHEME = "varscale-checkout"
PROBE_TIMEOUT_S = 5
# MLflow's HTTP client per request: 10 s timeout, one retry, 1 s backoff -> at most ~22 s per call
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
T = TypeVar("T")


class TrackingError(InputError):
    """The tracking store cannot be reached; names the URI and how to fix or bypass it."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def sqlite_file(uri: str | None) -> Path | None:
    """The SQLite file of ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (else None)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def bound_http_waits() -> None:
    """Shorter MLflow HTTP timeouts and retries, unless the user set their own."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` unless an ``http(s)`` tracking server answers within ``timeout_s``.
    Any HTTP answer counts (a proxy may not serve ``/health``); other schemes are not probed."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered within {timeout_s:.0f} s ({reason}); start it, "
            f"fix the URI, or unset MLFLOW_TRACKING_URI to log to the checkout's {DEFAULT_URI}") from None


def experiment_location(uri: str, name: str) -> str | None:
    """Artifact location for a new experiment: the portable scheme for a local SQLite store, else the
    server's default (None)."""
    return f"{SCHEME}:///mlruns/{name}" if sqlite_file(uri) is not None else None


def create_store_once(uri: str) -> None:
    """Create (and migrate) a SQLite store under a file lock: MLflow's schema migration is not safe
    against several processes creating the same new file at once (a sweep's first trials)."""
    import fcntl

    from mlflow.tracking import MlflowClient
    db_file = sqlite_file(uri)
    if db_file is None:
        return
    db_file.parent.mkdir(parents=True, exist_ok=True)
    with open(db_file.with_name(db_file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)


def make_default_experiment_portable(uri: str) -> None:
    """MLflow creates experiment 0 ("Default") with an absolute path as its location when it creates a
    SQLite store; point it into the store's folder through the portable scheme as well."""
    db_file = sqlite_file(uri)
    if db_file is None or not db_file.is_file():
        return
    with contextlib.closing(sqlite3.connect(db_file, timeout=20)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0 "
                   "AND artifact_location NOT LIKE ?", (f"{SCHEME}:///mlruns/0", f"{SCHEME}:%"))


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 6, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried with backoff (0.5 s doubling, ~16 s in all) while SQLite
    reports ``database is locked`` (MLflow already waits 20 s on the lock per write)."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException or sqlalchemy's OperationalError, depending on the call
            if "database is locked" not in str(e) or i == attempts - 1:
                raise
            log.warning("MLflow store busy (database is locked); retry %d of %d", i + 1, attempts - 1)
            time.sleep(0.5 * 2 ** i)
    raise AssertionError("unreachable")
