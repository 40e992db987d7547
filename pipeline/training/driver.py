"""The driver side of one depth's training: inputs, the Ray Train run, and what it leaves behind.

:func:`train_depth` loads the verified token shards and the tokenizer's quantiser, runs
:func:`pipeline.training.worker.train_worker` under ``TorchTrainer`` (workers, CPU/GPU and
resources from ``train.ray``), and writes the model, the metrics the scaling-law fit reads and
the run's configuration. The ``train_var`` stage and the sweep's trials both call it.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varcore.errors import ConfigError
from varcore.flops import count_main_params, count_params, main_N, var_flops
from varcore.quant import MultiScaleQuantizer
from varcore.ar import build
from varcore.var import VAR, VARConfig

from .. import machine
from ..errors import ArtifactError, InputError
from ..files import exclusive_lock, sha256_file, write_json
from ..tokenizer.checkpoint import load_tokenizer
from ..tokens import TOKENS_MANIFEST, TokenSpec, load_token_split, read_tokens_manifest
from ..tracking import log_artifact, log_metrics, log_params, set_tags
from .checkpoint import save_var
from .config import TrainVarConfig, config_hash
from .metrics import train_compute
from .state import check_space, read_state_file
from .worker import RunSpec, train_worker

log = logging.getLogger(__name__)
METRIC_KEYS = ("L_last", "L_mean", "Err_last", "Err_mean")
CHECKPOINT_BYTES_PER_PARAM = 12   # float32 weights and AdamW's two float32 moments


@dataclass(frozen=True)
class TrainPaths:
    tokenizer: Path     # models/tokenizer.pt
    tokens: Path        # data/tokens
    model_out: Path     # models/var-dD.pt
    metrics_out: Path   # metrics/train/dD.json: the numbers a user compares (N, C, L, Err)
    curve_out: Path     # metrics/train/dD-curve.json: the validation curve (the fit's C_min, `dvc plots`)
    run_out: Path       # runs/train/dD.json: counts, hashes, configuration, execution plan, train-loss curve, timings


@dataclass
class TrainInputs:
    """What the driver loads once per depth: config, quantiser, data and class names."""

    cfg: VARConfig
    quantizer: MultiScaleQuantizer
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    class_names: list[str]
    tokenizer_sha256: str


def load_inputs(config: TrainVarConfig, paths: TrainPaths) -> TrainInputs:
    """The depth's VARConfig (params + the data's classes) and the verified token splits."""
    vq = load_tokenizer(paths.tokenizer)
    manifest = read_tokens_manifest(paths.tokens)
    num_classes = int(manifest.get("num_classes") or 0)
    if num_classes < 1:
        raise ArtifactError(f"{paths.tokens / TOKENS_MANIFEST}: no num_classes (re-run `dvc repro encode_tokens`)")
    cfg = config.var_config(num_classes)
    try:
        cfg.check_tokenizer(vq.cfg.vocab_size, vq.cfg.Cvae, vq.cfg.patch_nums)
    except ConfigError as e:
        raise ArtifactError(f"{paths.tokenizer}: does not fit {config.file}:tokenizer.model: {e}") from e
    sha = sha256_file(paths.tokenizer)
    spec = TokenSpec(cfg.patch_nums, cfg.vocab_size, tokenizer_sha256=sha)

    def split(name):
        t, lab = load_token_split(paths.tokens, name, spec)
        return t.numpy().astype(np.uint16), lab.numpy()

    names = list(manifest.get("class_names") or [str(i) for i in range(num_classes)])
    return TrainInputs(cfg, vq.quantizer, split("train"), split("val"), names, sha)


def run_name(config: TrainVarConfig, inputs: TrainInputs) -> str:
    """Ray run name: same recipe and data -> same name -> Ray resumes its latest checkpoint.
    The depth list, the cluster address and the execution plan are not part of it."""
    kind = "ar" if config.var.order == "raster" else "var"
    return f"{kind}-d{config.depth}-{config_hash(inputs.cfg, config.recipe().train, inputs.tokenizer_sha256)}"


def fit(config: TrainVarConfig, inputs: TrainInputs, *, name: str | None = None, callbacks: list | None = None,
        after_step: tuple = ()):
    """Run :func:`train_worker` under ``TorchTrainer``; returns the Ray ``Result``. Needs ``ray.init``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    tp, r = config.train, config.train.ray
    spec = RunSpec(inputs.cfg, tp, config.execution, tp.total_steps(len(inputs.train[0])))
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {}), **r.resources_per_worker}
    name = name or run_name(config, inputs)
    storage = Path(r.storage_path).resolve() / name
    # before any work: room for one checkpoint (weights + AdamW's two moments, float32)
    with torch.device("meta"):   # counted without allocating: a d30 model is 2B parameters
        params = count_params(build(inputs.cfg))
    check_space(storage, CHECKPOINT_BYTES_PER_PARAM * params, "the run's checkpoints")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec, "quantizer": inputs.quantizer, "after_step": after_step,
                           "train": ray.put(inputs.train), "val": ray.put(inputs.val), "storage": str(storage)},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(Path(r.storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=r.num_to_keep), callbacks=callbacks))
    log.info("d%d: %d steps of %d images on %d %s worker(s), run %s", config.depth, spec.total_steps,
             tp.batch_size, r.num_workers, "GPU" if r.use_gpu else "CPU", trainer.run_config.name)
    # two runs of one recipe would share (and corrupt) one checkpoint folder: the second is refused
    lock = Path(trainer.run_config.storage_path) / f"{trainer.run_config.name}.lock"
    with exclusive_lock(lock, f"training run {trainer.run_config.name}"):
        return trainer.fit()


def summarize_run(config: TrainVarConfig, inputs: TrainInputs, payload: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any], VAR]:
    """From the final checkpoint's payload: the numbers a user compares (``metrics/train/dD.json``:
    N, tokens, compute C, train loss, test loss L and error Err), the counts behind them (for the
    run record) and the trained model."""
    cfg, st, tp = inputs.cfg, payload["state"], config.train
    model = build(cfg)
    model.load_state_dict(payload["model"])
    if not st["curve"]:
        raise RuntimeError("the final checkpoint has no validation point")
    steps, N = st["step"], main_N(cfg)
    tokens = steps * tp.batch_size * cfg.L
    metrics = {"depth": cfg.depth, "N": N, "steps": steps, "tokens": tokens, "compute": train_compute(cfg, tokens),
               "train_loss": st["train_curve"][-1]["train_loss"], **{k: st["curve"][-1][k] for k in METRIC_KEYS}}
    counts = {"width": cfg.C, "heads": cfg.H, "N_counted_main": count_main_params(model),
              "params_total": count_params(model), "images_seen": steps * tp.batch_size,
              "flops_per_token": var_flops(cfg).train_per_token, "compute_6NT": 6.0 * N * tokens}
    return metrics, counts, model


def run_record(config: TrainVarConfig, inputs: TrainInputs, payload: dict[str, Any], ray_path: str,
               wall_seconds: float) -> dict[str, Any]:
    """What the run was, apart from what it measured: configuration, plan, timings, Ray run."""
    st = payload["state"]
    return {"var_config": dataclasses.asdict(inputs.cfg), "train": dataclasses.asdict(config.train),
            "execution_plan": st.get("plan", {}), "tokenizer_sha256": inputs.tokenizer_sha256,
            "lr_peak": config.train.peak_lr, "ray_run": Path(ray_path).name,
            "train_seconds": round(st.get("train_seconds", 0.0), 1),   # all attempts, resumes included
            "tokens_per_s": step_throughput(st["train_curve"]),
            "wall_seconds": round(wall_seconds, 1),                     # this invocation
            "machine": machine.describe(), "train_curve": st["train_curve"]}


def step_throughput(train_curve: list[dict[str, Any]]) -> float | None:
    """Median tokens/s of the training steps between log points (evaluations, checkpoints and the
    first window's compilation left out by the median): the figure benchmarks/train_step.py measures."""
    rates = [r["tokens_per_s"] for r in train_curve if "tokens_per_s" in r]
    return round(statistics.median(rates)) if rates else None


def log_run(curve: list[dict[str, Any]], record: dict[str, Any], paths: TrainPaths) -> None:
    """The MLflow child run: curves per step, the resolved plan, timings, the files (the stage
    logs the final values)."""
    final_step = record["train_curve"][-1]["step"] if record["train_curve"] else None
    for row in record["train_curve"]:   # the last step's train_loss and compute come with the final values
        keys = ("lr",) if row["step"] == final_step else ("train_loss", "lr", "compute")
        keys += ("tokens_per_s",) if "tokens_per_s" in row else ()
        log_metrics({k: row[k] for k in keys}, step=row["step"])
    for row in curve:
        log_metrics({k: row[k] for k in METRIC_KEYS}, step=row["step"], prefix="val_")
    log_metrics({k: record[k] for k in ("train_seconds", "wall_seconds", "tokens_per_s") if record[k] is not None})
    log_params({f"plan.{k}": v for k, v in record["execution_plan"].items()})
    log_artifact(paths.metrics_out, "metrics")   # metrics/train/dD.json and runs/train/dD.json share a name
    log_artifact(paths.run_out, "record")
    set_tags({"varscale.model_path": str(paths.model_out)})


def user_error_in(error: BaseException) -> InputError | None:
    """An :class:`InputError` (a full disk, a bad file) that a worker raised, found in the error
    Ray Train wraps it in, so the stage reports it as one line."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InputError):
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None


def train_depth(config: TrainVarConfig, paths: TrainPaths, *, callbacks: list | None = None,
                after_step: tuple = ()) -> dict[str, Any]:
    """Load, fit under Ray, write the model, the metrics and the run record, log the MLflow run."""
    inputs = load_inputs(config, paths)
    t0 = time.perf_counter()
    result = fit(config, inputs, callbacks=callbacks, after_step=after_step)
    if result.error is not None:
        raise user_error_in(result.error) or result.error
    if result.checkpoint is None:
        raise RuntimeError(f"d{config.depth}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        payload = read_state_file(d)
    metrics, counts, model = summarize_run(config, inputs, payload)
    save_var(paths.model_out, model, inputs.class_names,
             extra={"tokenizer_sha256": inputs.tokenizer_sha256, "steps": metrics["steps"]})
    record = {**counts, "model_sha256": sha256_file(paths.model_out),   # what evaluations of it must have sampled
              **run_record(config, inputs, payload, result.path, time.perf_counter() - t0)}
    write_json(paths.metrics_out, metrics)
    write_json(paths.curve_out, payload["state"]["curve"])
    write_json(paths.run_out, record)
    log_run(payload["state"]["curve"], record, paths)
    log.info("d%d: N=%.3g C=%.3g FLOPs L_mean=%.4f L_last=%.4f Err_mean=%.4f -> %s", config.depth, metrics["N"],
             metrics["compute"], metrics["L_mean"], metrics["L_last"], metrics["Err_mean"], paths.model_out)
    return metrics


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (or a cluster ``ray start`` runs here), else start a local one. Token
    authentication is asked for explicitly (Ray turns it on for local clusters anyway, and warns
    when it was not asked for); a cluster started with it off still accepts the connection."""
    import os

    import ray
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray reads the mode into its config when it is imported: refresh it, as Ray itself does
        # when it turns token authentication on (else this process would not send the token)
        ray._raylet.Config.initialize("")
    if address is None:
        # a local instance has no preemptible nodes to watch; Ray Train's watcher actor would only
        # print a core_worker error line about its restart arguments at every run
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=None, log_to_driver=True)
