"""The one shape of every DVC stage, and the ``main`` they share.

A stage module ``pipeline.stages.<name>`` defines

- ``Paths``: a frozen dataclass of its inputs and outputs; each field is a command-line option
  (``--tokens data/tokens``), required unless the field has a default, so paths are written once,
  in ``dvc.yaml``'s ``cmd``;
- ``load_config(params, file, paths)``: its params sections, parsed once into one typed config;
- ``run(config, paths) -> metrics``: the work (pure of argument parsing and of MLflow set-up),

and ends with ``main = stage_main(...)``. :func:`stage_main` parses the options, sets up logging,
reads and checks the params before anything else happens, opens the stage's MLflow child run
(the config as params), calls ``run``, logs the returned metrics and prints one summary line.
Bad input (:class:`pipeline.errors.InputError`) ends the process with one line naming the file or key.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import typing
from pathlib import Path
from typing import Any, Callable

from .errors import InputError
from .params import read_params
from .tracking import log_metrics, stage_run
from .tracking_store import tracking_uri

log = logging.getLogger(__name__)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_paths(paths_cls: type, argv: list[str] | None, description: str) -> tuple[Path, Any]:
    """``--params`` and one required option per field of ``paths_cls`` (typed by its annotation)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", type=Path, required=True, help="the params file (params.yaml)")
    hints = typing.get_type_hints(paths_cls)
    for f in dataclasses.fields(paths_cls):
        optional = f.default is not dataclasses.MISSING      # e.g. ``compare: Path | None = None``
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        ap.add_argument(_option(f.name), dest=f.name, type=kind, required=not optional,
                        default=f.default if optional else None)
    args = vars(ap.parse_args(argv))
    params_file = args.pop("params")
    return params_file, paths_cls(**args)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_cli(name: str, body: Callable[[], Any]) -> Any:
    """Run ``body``; an :class:`InputError` exits with ``<name>: <message>`` and no traceback, and so
    does an MLflow failure (after the stage's bounded retries), naming the store."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:     # a node without MLflow (VARSCALE_TRACKING=off or journal:<dir>)
        MlflowException = ()   # noqa: N806 (catches nothing)
    try:
        return body()
    except InputError as e:
        raise SystemExit(f"{name}: {e}") from None
    except MlflowException as e:
        first = " ".join(str(e).split())[:300]
        raise SystemExit(f"{name}: MLflow store {tracking_uri()} failed: {first}") from None


def summary(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        v = metrics.get(k)
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def stage_main(name: str, paths_cls: type, load_config: Callable, run: Callable, *,
               summary_keys: tuple[str, ...] = (), run_name: Callable[[Any], str] | None = None,
               tags: Callable[[Any], dict[str, str]] | None = None, doc: str = "") -> Callable:
    """The ``main(argv=None)`` of one stage (see the module docstring)."""

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        setup_logging()
        params_file, paths = parse_paths(paths_cls, argv, doc.split("\n")[0])

        def body():
            config = load_config(read_params(params_file), str(params_file), paths)   # before any work
            t0 = time.perf_counter()
            with stage_run(name, config, run_name=run_name(paths) if run_name else None,
                           tags=tags(paths) if tags else None, params_file=params_file):
                metrics = run(config, paths)
                log_metrics(metrics, step=metrics.get("steps"))   # final values, at the last step of a training
            log.info("%s done in %.0f s: %s", run_name(paths) if run_name else name, time.perf_counter() - t0,
                     summary(metrics, summary_keys))
            return metrics
        return run_cli(name, body)
    return main
