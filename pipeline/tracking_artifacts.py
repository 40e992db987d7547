"""The ``varscale-checkout:`` artifact scheme: MLflow artifacts stored relative to the checkout.

Registered as an MLflow plugin in ``pyproject.toml``; why the local store needs it is
:mod:`pipeline.tracking_store`. Apart from it so that the stages import no MLflow unless they log to it.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from .tracking_store import SCHEME, sqlite_file


class CheckoutArtifactRepository(LocalArtifactRepository):
    """``varscale-checkout:///mlruns/<experiment>/<run>/artifacts``: a folder relative to the SQLite
    file of the tracking URI (the checkout), or to the working directory when that is not SQLite
    (``mlflow ui`` started in the checkout)."""

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
        import mlflow
        relative = artifact_uri[len(SCHEME) + 1:].lstrip("/")
        db_file = sqlite_file(tracking_uri or mlflow.get_tracking_uri())
        root = db_file.parent if db_file is not None else Path(".")
        super().__init__((root.resolve() / relative).as_uri(), tracking_uri, registry_uri)
