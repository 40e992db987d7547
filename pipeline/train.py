"""Stage `train`: one VAR transformer per depth on the cached token shards, under Ray Train.

``python -m pipeline.train --depth D`` trains depth D with ``TorchTrainer`` (workers, CPU/GPU
and resources from ``train.ray``), then writes ``models/var-d{D}.pt`` and
``metrics/train-d{D}.json`` (N, tokens, compute C, train loss, test loss L and error Err
for the last scale and over all scales, and the loss-vs-compute curve) and logs the same
to an MLflow child run. Checkpoints go through Ray; a run with the same recipe resumes
from the latest one in ``train.ray.storage_path`` (after a crash, or when re-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from varcore import VAR, VARConfig
from varcore.errors import ConfigError
from varcore.flops import count_main_params, count_params, main_N, var_flops
from varcore.quant import MultiScaleQuantizer

from .artifacts import ArtifactError, TokenSpec, load_token_split, load_tokenizer, read_tokens_manifest
from .config import PARAMS_FILE, ParamsError, read_params, var_config
from .io import sha256_file, write_json
from .metrics import train_compute
from .train_artifacts import save_var
from .train_config import TrainParams, config_hash, load_train_params, load_var_params
from .train_loop import RunSpec, read_state_file, train_worker

log = logging.getLogger(__name__)


@dataclass
class TrainInputs:
    """What the driver loads once per depth: config, quantiser, data and class names."""

    cfg: VARConfig
    quantizer: MultiScaleQuantizer
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    class_names: list[str]
    tokenizer_sha256: str


def load_inputs(params: dict[str, Any], depth: int, tokenizer_path: str | Path, tokens_dir: str | Path,
                file: str = PARAMS_FILE) -> TrainInputs:
    """Build the depth's VARConfig from params + the tokenizer and load the verified token splits."""
    vq = load_tokenizer(tokenizer_path)
    manifest = read_tokens_manifest(tokens_dir)
    num_classes = int(manifest.get("num_classes") or 0)
    if num_classes < 1:
        raise ArtifactError(f"{Path(tokens_dir) / 'manifest.json'}: no num_classes (re-run `dvc repro tokenize`)")
    load_var_params(params, file)  # validate the section (var_config reads its model overrides)
    cfg = var_config(params, depth, num_classes, file)
    try:
        cfg.check_tokenizer(vq.cfg.vocab_size, vq.cfg.Cvae, vq.cfg.patch_nums)
    except ConfigError as e:
        raise ArtifactError(f"{tokenizer_path}: does not fit {file}:var.model: {e}") from e
    sha = sha256_file(tokenizer_path)
    spec = TokenSpec(cfg.patch_nums, cfg.vocab_size, tokenizer_sha256=sha)

    def split(name):
        t, lab = load_token_split(tokens_dir, name, spec)
        return t.numpy().astype(np.uint16), lab.numpy()

    names = list(manifest.get("class_names") or [str(i) for i in range(num_classes)])
    return TrainInputs(cfg, vq.quantizer, split("train"), split("val"), names, sha)


def run_name(depth: int, inputs: TrainInputs, tp: TrainParams) -> str:
    """Ray run name: same recipe and data -> same name -> Ray resumes its latest checkpoint.
    The depth list and the cluster address are not part of the recipe of one depth."""
    recipe = dataclasses.replace(tp, depths=(depth,), ray=dataclasses.replace(tp.ray, address=None))
    return f"var-d{depth}-{config_hash(inputs.cfg, recipe, inputs.tokenizer_sha256)}"


def fit(inputs: TrainInputs, tp: TrainParams, *, name: str | None = None, callbacks: list | None = None,
        fail_once_at_step: int | None = None, fail_marker: str | None = None):
    """Run :func:`train_worker` under ``TorchTrainer``; returns the Ray ``Result``. Needs ``ray.init``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = inputs.cfg
    spec = RunSpec(cfg, tp, tp.total_steps(len(inputs.train[0])), fail_once_at_step, fail_marker)
    r = tp.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {}), **r.resources_per_worker}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec, "quantizer": inputs.quantizer,
                           "train": ray.put(inputs.train), "val": ray.put(inputs.val)},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name or run_name(cfg.depth, inputs, tp),
            storage_path=str(Path(r.storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=r.num_to_keep),
            callbacks=callbacks),
    )
    log.info("d%d: %d steps of %d images on %d %s worker(s), run %s", cfg.depth, spec.total_steps,
             tp.batch_size, r.num_workers, "GPU" if r.use_gpu else "CPU", trainer.run_config.name)
    return trainer.fit()


def summarize_run(inputs: TrainInputs, tp: TrainParams, payload: dict[str, Any], wall_seconds: float
                  ) -> tuple[dict[str, Any], VAR]:
    """The metrics json and the trained model from the final checkpoint's payload."""
    cfg, st = inputs.cfg, payload["state"]
    model = VAR(cfg)
    model.load_state_dict(payload["model"])
    if not st["curve"]:
        raise RuntimeError("the final checkpoint has no validation point")
    last, steps = st["curve"][-1], st["step"]
    tokens = steps * tp.batch_size * cfg.L
    N = main_N(cfg)
    metrics = {
        "depth": cfg.depth, "width": cfg.C, "heads": cfg.H,
        "N": N, "N_counted_main": count_main_params(model), "params_total": count_params(model),
        "steps": steps, "images_seen": steps * tp.batch_size, "tokens": tokens,
        "flops_per_token": var_flops(cfg).train_per_token,
        "compute": train_compute(cfg, tokens), "compute_6NT": 6.0 * N * tokens,
        "train_loss": st["train_curve"][-1]["train_loss"],
        **{k: last[k] for k in ("L_last", "L_mean", "Err_last", "Err_mean")},
        "curve": st["curve"], "train_curve": st["train_curve"],
        "batch_size": tp.batch_size, "lr_peak": tp.peak_lr, "num_workers": tp.ray.num_workers,
        "train_seconds": round(st.get("train_seconds", 0.0), 1),  # all attempts, resumes included
        "wall_seconds": round(wall_seconds, 1),  # this invocation of the stage
        "var_config": dataclasses.asdict(cfg),
    }
    return metrics, model


def log_to_mlflow(metrics: dict[str, Any], model_path: Path, metrics_path: Path) -> None:
    import mlflow
    for row in metrics["train_curve"]:
        mlflow.log_metrics({"train_loss": row["train_loss"], "lr": row["lr"], "compute": row["compute"]},
                           step=row["step"])
    for row in metrics["curve"]:
        mlflow.log_metrics({f"val_{k}": row[k] for k in ("L_last", "L_mean", "Err_last", "Err_mean")},
                           step=row["step"])
    # final values under their own names (the curves above already end with them)
    mlflow.log_metrics({k: float(metrics[k]) for k in (
        "N", "params_total", "compute_6NT", "L_last", "L_mean", "Err_last", "Err_mean", "wall_seconds")})
    mlflow.log_metrics({"tokens_total": float(metrics["tokens"]), "compute_total": float(metrics["compute"])})
    mlflow.log_artifact(str(metrics_path))
    mlflow.set_tag("varscale.model_path", str(model_path))


def curve_path(metrics_out: str | Path) -> Path:
    """``metrics/train-d4.json`` -> ``metrics/train-d4-curve.json``."""
    p = Path(metrics_out)
    return p.with_name(f"{p.stem}-curve{p.suffix}")


def train_depth(params: dict[str, Any], depth: int, *, tokenizer: str | Path, tokens: str | Path,
                model_out: str | Path, metrics_out: str | Path, file: str = PARAMS_FILE,
                callbacks: list | None = None, mlflow_run: bool = True) -> dict[str, Any]:
    """Load, fit under Ray, write the model + metrics json and log the MLflow child run."""
    tp = load_train_params(params, file)
    inputs = load_inputs(params, depth, tokenizer, tokens, file)
    t0 = time.perf_counter()
    result = fit(inputs, tp, callbacks=callbacks)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"d{depth}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        payload = read_state_file(d)
    metrics, model = summarize_run(inputs, tp, payload, time.perf_counter() - t0)
    metrics["ray_run_path"] = result.path
    save_var(model_out, model, inputs.class_names,
             extra={"tokenizer_sha256": inputs.tokenizer_sha256, "steps": metrics["steps"]})
    write_json(metrics_out, metrics)
    write_json(curve_path(metrics_out), metrics["curve"])   # flat rows for `dvc plots`
    log.info("d%d: N=%.3g C=%.3g FLOPs L_mean=%.4f L_last=%.4f Err_mean=%.4f -> %s", depth, metrics["N"],
             metrics["compute"], metrics["L_mean"], metrics["L_last"], metrics["Err_mean"], model_out)
    if mlflow_run:
        from .tracking import stage_run
        with stage_run("train", {"var": dataclasses.asdict(inputs.cfg), "train": dataclasses.asdict(tp)},
                       run_name=f"train-d{depth}", tags={"varscale.depth": str(depth)}):
            log_to_mlflow(metrics, Path(model_out), Path(metrics_out))
    return metrics


def init_ray(address: str | None) -> None:
    import ray
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=None, log_to_driver=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--params", default=PARAMS_FILE)
    ap.add_argument("--tokenizer", default="models/tokenizer.pt")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--model-out", default=None, help="default models/var-d{depth}.pt")
    ap.add_argument("--metrics-out", default=None, help="default metrics/train-d{depth}.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = read_params(args.params)
        tp = load_train_params(params, args.params)
        if args.depth not in tp.depths:
            log.warning("depth %d is not in %s:train.depths %s", args.depth, args.params, list(tp.depths))
        init_ray(tp.ray.address)
        train_depth(params, args.depth, tokenizer=args.tokenizer, tokens=args.tokens,
                    model_out=args.model_out or f"models/var-d{args.depth}.pt",
                    metrics_out=args.metrics_out or f"metrics/train-d{args.depth}.json", file=args.params)
    except (ParamsError, ArtifactError) as e:
        raise SystemExit(f"train: {e}") from None


if __name__ == "__main__":
    main()
