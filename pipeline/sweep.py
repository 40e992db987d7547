"""Ray Tune grid over depths (and optionally other params) with the `train` stage's code.

    ray job submit --working-dir . -- python -m pipeline.sweep \\
        --tokenizer /shared/models/tokenizer.pt --tokens /shared/data/tokens \\
        --out-dir /shared/sweeps --depths 2 4 6 8 --grid train.lr=1e-4,2e-4

Each trial is a small driver that runs one ``TorchTrainer`` (``train.ray`` sets its workers
and resources) through :func:`pipeline.training.driver.train_depth`, so a trial writes exactly what
the DVC stage writes (``var-d{D}.pt``, ``train-d{D}.json``, an MLflow child run) under
``<out-dir>/<sweep name>/<trial>/``. Ray Train reports reach Tune through
``TuneReportCallback`` (the Ray Train V2 way to run Train inside Tune). All MLflow runs of
a sweep hang under one parent run. Paths are made absolute here because under
``ray job submit`` the job runs in a temporary copy of the working directory.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import ArtifactError, ParamsError
from .params import PARAMS_FILE, load, read_params
from .stage import run_cli, setup_logging
from .training.config import TrainParams, load_train_var_config

log = logging.getLogger(__name__)


def parse_value(text: str) -> Any:
    """YAML scalar, except that ``1e-4`` is a float (YAML 1.1 wants ``1.0e-4``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["train.lr=1e-4,2e-4"]`` -> ``{"train.lr": [0.0001, 0.0002]}`` (values parsed as YAML)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ParamsError(f"--grid {item!r}: expected section.key=v1,v2,...")
        grid[key] = [parse_value(v) for v in values.split(",")]
    return grid


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.ray.num_workers``) in a copy of the params."""
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--grid {dotted}: {p} is not a section")
        node[leaf] = value
    return out


def trial_name(config: dict[str, Any]) -> str:
    parts = [f"d{config['depth']}"] + [f"{k.split('.')[-1]}={v}" for k, v in sorted(config["overrides"].items())]
    return "-".join(parts).replace("/", "_")


def sweep_trial(config: dict[str, Any]) -> None:
    """One Tune trial: train one depth under one set of overrides."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from .tracking import log_metrics, stage_run
    from .training.driver import TrainPaths, train_depth

    os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_uri"]
    os.environ["VARSCALE_PARENT_RUN_ID"] = config["parent_run_id"]
    depth, out = config["depth"], Path(config["out_dir"]) / trial_name(config)
    train_config = load_train_var_config(apply_overrides(config["params"], config["overrides"]),
                                         config["params_file"], depth)
    paths = TrainPaths(tokenizer=Path(config["tokenizer"]), tokens=Path(config["tokens"]),
                       model_out=out / f"var-d{depth}.pt", metrics_out=out / f"train-d{depth}.json",
                       curve_out=out / f"train-d{depth}-curve.json", run_out=out / f"run-d{depth}.json")
    with stage_run("train_var", train_config, run_name=f"train_var-d{depth}", tags={"varscale.depth": str(depth)}):
        metrics = train_depth(train_config, paths, callbacks=[TuneReportCallback()])
        log_metrics(metrics, step=metrics["steps"])


def default_concurrency(params: dict[str, Any], file: str) -> int:
    """Trials that fit the cluster at once, from the workers one trial asks for."""
    import ray
    r = load(TrainParams, params, "train", file).ray
    res = ray.cluster_resources()
    if r.use_gpu:
        return max(1, int(res.get("GPU", 0) // r.num_workers))
    return max(1, int(res.get("CPU", 1) // (r.num_workers * r.cpus_per_worker)))


def sweep_parent_run(name: str, uri: str, grid: dict[str, list[Any]], depths: list[int]) -> str:
    """An MLflow parent run for the whole sweep in the store at ``uri`` (trials log their child runs under it)."""
    from .tracking import connect, experiment_id, run_tags
    client = connect(uri)
    run = client.create_run(experiment_id(client), run_name=f"sweep {name}", tags={
        "varscale.kind": "sweep", **run_tags(),
        "varscale.sweep.depths": ",".join(map(str, depths)),
        "varscale.sweep.grid": yaml.safe_dump(grid, default_flow_style=True).strip()})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def default_mlflow_uri(tokens: Path, fallback_dir: Path) -> str:
    """The store of the checkout whose tokens the sweep trains on (the folder of its dvc.yaml), so
    sweeps and `dvc repro` runs compare in one MLflow UI; a SQLite file in ``fallback_dir`` when
    the tokens are not inside a checkout. (Under `ray job submit` the job runs in a temporary copy
    of the working directory, so its own folder is the wrong place.)"""
    for parent in Path(tokens).resolve().parents:
        if (parent / "dvc.yaml").is_file() and (parent / ".dvc").is_dir():
            return f"sqlite:///{parent / 'mlflow.db'}"
    return f"sqlite:///{fallback_dir / 'mlflow.db'}"


def run_sweep(params: dict[str, Any], depths: list[int], grid: dict[str, list[Any]], *, tokenizer: Path,
              tokens: Path, out_dir: Path, name: str, params_file: str = PARAMS_FILE,
              max_concurrent: int | None = None, mlflow_uri: str | None = None):
    """Run the grid on the connected Ray cluster; returns Tune's ``ResultGrid``."""
    import itertools

    from ray import tune

    for d in depths:
        if d < 1:
            raise ParamsError(f"--depths: depth must be >= 1, got {d}")
    for combo in itertools.product(*grid.values()) if grid else [()]:
        for d in depths:   # every trial's config, checked before launching any
            load_train_var_config(apply_overrides(params, dict(zip(grid, combo))), params_file, d)
    out_dir = out_dir.expanduser().resolve() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    mlflow_uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(tokens, out_dir.parent)
    parent = sweep_parent_run(name, mlflow_uri, grid, depths)
    # Ray Train's checkpoints of every trial go under the sweep dir unless the params pin a shared path
    storage = params.get("train", {}).get("ray", {}).get("storage_path")
    if not storage or not Path(storage).is_absolute():
        params = apply_overrides(params, {"train.ray.storage_path": str(out_dir / "ray")})
    overrides = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    space = {"depth": tune.grid_search(list(depths)), "overrides": tune.grid_search(overrides),
             "params": params, "params_file": params_file, "tokenizer": str(tokenizer.resolve()),
             "tokens": str(tokens.resolve()), "out_dir": str(out_dir), "mlflow_uri": mlflow_uri,
             "parent_run_id": parent}
    concurrency = max_concurrent or default_concurrency(params, params_file)
    log.info("sweep %s: %d trials (depths %s x %d override sets), %d at a time; outputs in %s; MLflow %s "
             "(parent run %s)", name, len(depths) * len(overrides), depths, len(overrides), concurrency, out_dir,
             mlflow_uri, parent)
    tuner = tune.Tuner(
        # the trial only drives its TorchTrainer (Tune refuses 0 CPU); the workers hold the resources
        tune.with_resources(sweep_trial, {"cpu": 0.01}),
        param_space=space,
        # no metric/mode: no scheduler ranks trials, and the checkpoint reports between evaluations
        # carry no L_mean (Tune's strict check would fail them); rank with get_best_result("L_mean", "min")
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency,
                                    trial_name_creator=lambda t: trial_name(t.config)),
        run_config=tune.RunConfig(name=name, storage_path=str(out_dir / "tune")),
    )
    return tuner.fit()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=PARAMS_FILE)
    ap.add_argument("--depths", type=int, nargs="+", help="default: train.depths of the params file")
    ap.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                    help="extra grid axis over a params key (repeatable), e.g. train.lr=1e-4,2e-4")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=V",
                    help="override a params key for every trial, e.g. train.ray.num_workers=8")
    ap.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer.pt"))
    ap.add_argument("--tokens", type=Path, default=Path("data/tokens"))
    ap.add_argument("--out-dir", type=Path, default=Path("~/varscale-sweeps"),
                    help="absolute or ~ path: under `ray job submit` the cwd is a temporary copy")
    ap.add_argument("--name", default=None, help="sweep name (default: sweep-<timestamp>)")
    ap.add_argument("--max-concurrent", type=int, default=None, help="default: as many as the cluster fits")
    ap.add_argument("--mlflow-uri", default=None,
                    help="default: $MLFLOW_TRACKING_URI, else the mlflow.db of the checkout that holds --tokens")
    args = ap.parse_args(argv)
    setup_logging()
    results = run_cli("sweep", lambda: _sweep(args))
    failed = [r for r in results if r.error is not None]
    for r in results:
        m = r.metrics or {}
        log.info("%s: L_mean %s L_last %s Err_mean %s", trial_name(r.config), m.get("L_mean"), m.get("L_last"),
                 m.get("Err_mean"))
    if failed:
        raise SystemExit(f"sweep: {len(failed)} of {len(results)} trials failed; first: {failed[0].error}")


def _sweep(args: argparse.Namespace):
    from .training.driver import init_ray
    params = read_params(args.params)
    for item in args.set:
        key, _, value = item.partition("=")
        params = apply_overrides(params, {key: parse_value(value)})
    tp = load(TrainParams, params, "train", args.params)
    for path in (args.tokenizer, args.tokens):
        if not path.exists():
            raise ArtifactError(f"{path}: not found (pass absolute --tokenizer/--tokens paths that every "
                                "node can read; `dvc repro encode_tokens` makes them)")
    init_ray(tp.ray.address)
    return run_sweep(params, list(args.depths or tp.depths), parse_grid(args.grid), tokenizer=args.tokenizer,
                     tokens=args.tokens, out_dir=args.out_dir, name=args.name or time.strftime("sweep-%Y%m%d-%H%M%S"),
                     params_file=args.params, max_concurrent=args.max_concurrent, mlflow_uri=args.mlflow_uri)


if __name__ == "__main__":
    main()
