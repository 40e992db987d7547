"""The train_var stage under Ray Train on a tiny model: DDP equivalence, restart from checkpoints, outputs.

Class dropout and drop-path are set to 0 here: with them, each rank draws its own masks
(seeded by seed, step, rank), so 2 workers would match 1 worker only in distribution.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.files import sha256_file
from pipeline.stages import train_var
from pipeline.training.checkpoint import load_var
from pipeline.training.config import load_train_var_config
from pipeline.training.driver import TrainPaths, fit, load_inputs
from pipeline.training.state import read_state_file
from pipeline.training.worker import evaluate
from tests.synthetic import write_synthetic_artifacts
from varcore.flops import count_params, main_N, var_flops

from .test_train import TINY_VQ, tiny_params

ray = pytest.importorskip("ray")

STEPS = 10


def start_local_ray() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module")
def ray_local():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def no_local_ray(ray_local):
    """This process's Ray stopped for the test and started again after it: a test whose stage runs
    in a child process (with a Ray of its own) then has the machine's two cores to itself."""
    ray.shutdown()
    yield
    start_local_ray()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_art")
    tok, tokens = write_synthetic_artifacts(root, TINY_VQ, n_train=64, n_val=32, num_classes=4)
    return root, tok, tokens


def params_for(root, workers=1, **train):
    p = tiny_params(steps=STEPS, batch_size=8, lr=0.05, num_evals=2, log_every=1, checkpoint_every=4,
                    ray={"num_workers": workers, "storage_path": str(root / "ray"), "max_failures": 1}, **train)
    p["var"]["model"] = {"cond_drop_rate": 0.0, "drop_path_rate": 0.0}
    return p


def config_for(root, workers=1, **train):
    return load_train_var_config(params_for(root, workers, **train), "params.yaml", 1)


def inputs_for(config, tok, tokens):
    return load_inputs(config, TrainPaths(tok, tokens, *(Path("unused") for _ in range(4))))


def fail_once_after(step: int, marker: Path):
    """An ``after_step`` hook that raises once after ``step`` (the marker file remembers it across restarts)."""
    def hook(s: int) -> None:
        if s == step and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected failure after step {step}")
    return hook


def reference_state(out):
    """The one-worker run's curves as its files hold them: validation curve and run record."""
    return {"curve": json.loads((out / "train-d1-curve.json").read_text()),
            "train_curve": json.loads((out / "run-d1.json").read_text())["train_curve"],
            "step": json.loads((out / "train-d1.json").read_text())["steps"]}


def curves(state):
    return np.array([r["train_loss"] for r in state["train_curve"]]), np.array([r["L_mean"] for r in state["curve"]])


@pytest.fixture(scope="module")
def one_worker_run(ray_local, artifacts, tmp_path_factory):
    """The reference: the stage's command end to end (1 worker), with MLflow in a temp store."""
    root, tok, tokens = artifacts
    out = tmp_path_factory.mktemp("train_out")
    return out, run_stage(out, params_for(root), tok, tokens, "var-d1.pt", "train-d1-curve.json")


def run_stage(out: Path, params: dict, tok: Path, tokens: Path, model: str, curve: str) -> dict:
    """The train_var stage's command for depth 1 in ``out`` (params, outputs, a temp MLflow store there)."""
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    mp.chdir(out)   # MLflow puts artifacts of a new store under ./mlruns
    try:
        return train_var.main(["--params", "params.yaml", "--depth", "1", "--tokenizer", str(tok), "--tokens",
                               str(tokens), "--model-out", model, "--metrics-out", "train-d1.json",
                               "--curve-out", curve, "--run-out", "run-d1.json"])
    finally:
        mp.undo()


def test_stage_outputs_metrics_model_and_mlflow(one_worker_run, artifacts):
    out, m = one_worker_run
    saved = json.loads((out / "train-d1.json").read_text())
    assert saved == m and set(saved) == {"depth", "N", "steps", "tokens", "compute", "train_loss", "L_last",
                                         "L_mean", "Err_last", "Err_mean"}   # what a user compares (dvc metrics show)
    assert saved["steps"] == STEPS and saved["tokens"] == STEPS * 8 * 30
    record = json.loads((out / "run-d1.json").read_text())
    assert 0 < record["train_seconds"] <= record["wall_seconds"]   # loop time within the stage's time
    assert record["execution_plan"]["attention"] == "dense" and record["var_config"]["depth"] == 1
    assert not any(str(v).startswith("/") for v in record.values() if isinstance(v, str))   # no absolute paths
    model, meta = load_var(out / "var-d1.pt")
    assert saved["N"] == main_N(model.cfg) and record["params_total"] == count_params(model)
    assert saved["compute"] == pytest.approx(var_flops(model.cfg).train_per_token * saved["tokens"])
    assert meta["class_names"] == ["class0", "class1", "class2", "class3"]
    assert record["model_sha256"] == sha256_file(out / "var-d1.pt")
    # a curve point per evaluation (steps 5, 10), monotone in compute, last one = the summary
    curve = json.loads((out / "train-d1-curve.json").read_text())
    assert [r["step"] for r in curve] == [5, 10]
    assert curve[-1]["L_mean"] == saved["L_mean"]
    assert curve[0]["compute"] * 2 == pytest.approx(curve[1]["compute"])
    assert curve[-1]["L_mean"] < curve[0]["L_mean"] < np.log(64)   # it learns
    assert [r["step"] for r in record["train_curve"]] == list(range(1, STEPS + 1))
    # throughput of the steps between log points (here every step), the trainer's figure
    rates = [r["tokens_per_s"] for r in record["train_curve"]]
    assert all(r > 0 for r in rates) and record["tokens_per_s"] == round(float(np.median(rates)))
    # the saved model reproduces the recorded test loss
    root, tok, tokens = artifacts
    inputs = inputs_for(config_for(root), tok, tokens)
    ev = evaluate(model, inputs.quantizer, *inputs.val, model.cfg, 16, 0, 1, torch.device("cpu"))
    assert ev["L_mean"] == pytest.approx(saved["L_mean"], rel=1e-5)
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("varscale").experiment_id],
                              "tags.`varscale.stage` = 'train_var'")
    assert len(runs) == 1 and runs[0].data.metrics["val_L_mean"] == pytest.approx(saved["L_mean"])
    assert runs[0].data.params["plan.attention"] == "dense" and runs[0].data.params["train.steps"] == str(STEPS)
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")   # one point per step
    assert sorted(h.step for h in history) == list(range(1, STEPS + 1))
    assert [h.value for h in history if h.step == STEPS] == [saved["train_loss"]]   # the final value, once
    # metrics/train/dD.json and runs/train/dD.json share a name: each keeps its own folder
    arts = {a.path: [f.path for f in client.list_artifacts(runs[0].info.run_id, a.path)]
            for a in client.list_artifacts(runs[0].info.run_id)}
    assert arts == {"metrics": ["metrics/train-d1.json"], "record": ["record/run-d1.json"]}


def test_two_workers_follow_the_one_worker_trajectory(one_worker_run, artifacts):
    root, tok, tokens = artifacts
    config = config_for(root, workers=2)
    res = fit(config, inputs_for(config, tok, tokens))
    with res.checkpoint.as_directory() as d:
        two = read_state_file(d)["state"]
    ref = reference_state(one_worker_run[0])
    t2, v2 = curves(two)
    t1, v1 = curves(ref)
    assert two["step"] == STEPS and len(t2) == STEPS
    np.testing.assert_allclose(t2, t1, rtol=1e-4)
    np.testing.assert_allclose(v2, v1, rtol=1e-4)
    assert t1[-1] < t1[0] - 0.05   # a trajectory, not a constant


def test_worker_failure_restarts_from_the_last_checkpoint(one_worker_run, artifacts, tmp_path):
    """A worker dies after step 7; FailureConfig restarts it from the step-4 checkpoint and the
    run ends with the uninterrupted run's step count and losses."""
    root, tok, tokens = artifacts
    config = config_for(root)
    marker = tmp_path / "failed-once"
    res = fit(config, inputs_for(config, tok, tokens), name="fail-once", after_step=(fail_once_after(7, marker),))
    assert marker.exists() and res.error is None
    with res.checkpoint.as_directory() as d:
        state = read_state_file(d)["state"]
    ref = reference_state(one_worker_run[0])
    assert state["step"] == ref["step"] == STEPS
    t, v = curves(state)
    np.testing.assert_allclose(t, curves(ref)[0], rtol=1e-5)
    np.testing.assert_allclose(v, curves(ref)[1], rtol=1e-5)


def assert_ends_as_the_uninterrupted_run(result, one_worker_run) -> None:
    """The resumed run reached the last step with the uninterrupted run's loss curves."""
    with result.checkpoint.as_directory() as d:
        state = read_state_file(d)["state"]
    ref = reference_state(one_worker_run[0])
    assert state["step"] == STEPS
    np.testing.assert_allclose(curves(state)[0], curves(ref)[0], rtol=1e-5)
    np.testing.assert_allclose(curves(state)[1], curves(ref)[1], rtol=1e-5)


def record_first_step(path: Path):
    """An ``after_step`` hook that writes the first step this worker finishes (once per attempt file)."""
    def hook(s: int) -> None:
        if not path.exists():
            path.write_text(str(s))
    return hook


@pytest.mark.slow
def test_crashed_run_resumes_when_rerun_past_a_corrupt_latest_checkpoint(one_worker_run, artifacts, tmp_path):
    """With no retries left the run dies after step 6, with checkpoints at steps 4 and 5; running
    it again (same name and storage, as a DVC re-run does) resumes from a checkpoint instead of
    starting over. A bit of step 5's state is flipped first, so the rerun warns, falls back to step 4
    (its first step is 5) and ends as the uninterrupted run did."""
    root, tok, tokens = artifacts
    p = params_for(root)
    p["train"]["ray"]["max_failures"] = 0
    config = load_train_var_config(p, "params.yaml", 1)
    inputs = inputs_for(config, tok, tokens)
    with pytest.raises(ray.train.TrainingFailedError, match="injected failure after step 6"):
        fit(config, inputs, name="corrupt", after_step=(fail_once_after(6, tmp_path / "failed"),))
    saved = sorted(p.name for p in (root / "ray" / "corrupt").glob("step-*"))
    assert saved == ["step-000000004", "step-000000005"]   # checkpoint_every=4, eval at 5
    latest = root / "ray" / "corrupt" / "step-000000005" / "state.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0x01
    latest.write_bytes(bytes(data))
    first = tmp_path / "first-step"
    second = fit(config, inputs, name="corrupt", after_step=(record_first_step(first),))
    assert second.error is None and first.read_text() == "5"
    assert_ends_as_the_uninterrupted_run(second, one_worker_run)


def test_state_file_with_a_flipped_bit_is_named(tmp_path):
    from pipeline.training.state import TrainState, save_state
    model = torch.nn.Linear(4, 3)
    save_state(tmp_path, model, torch.optim.AdamW(model.parameters()), TrainState(step=2))
    path = tmp_path / "state.pt"
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}: sha256 does not match state.pt.sha256"):
        read_state_file(tmp_path)


@pytest.mark.slow
def test_killed_stage_resumes_from_its_last_checkpoint(one_worker_run, artifacts, no_local_ray, tmp_path):
    """kill -9 of the stage's process group (driver, Ray, workers) once Ray has registered a
    checkpoint; the rerun resumes at a checkpointed step, not 0, and ends with the uninterrupted
    run's numbers."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    root, tok, tokens = artifacts
    params = params_for(root)
    params["train"]["ray"]["storage_path"] = str(tmp_path / "ray")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipeline.stages.train_var", "--params", "params.yaml", "--depth", "1",
           "--tokenizer", str(tok), "--tokens", str(tokens), "--model-out", "var-d1.pt", "--metrics-out",
           "train-d1.json", "--curve-out", "train-d1-curve.json", "--run-out", "run-d1.json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_AUTH_MODE", None)   # as `dvc repro` runs it: the stage asks for token authentication itself
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    def registered() -> bool:   # Ray resumes from the checkpoints its snapshot lists
        snap = list((tmp_path / "ray").glob("var-d1-*/checkpoint_manager_snapshot.json"))
        return bool(snap) and "step-" in snap[0].read_text(errors="replace")
    while not registered():
        assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    on_disk = {int(p.parent.name[5:]) for p in (tmp_path / "ray").glob("var-d1-*/step-*/state.pt")}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", res.stdout + res.stderr)]
    assert resumed and resumed[0] in on_disk and resumed[0] > 0
    ref = json.loads((one_worker_run[0] / "train-d1.json").read_text())
    got = json.loads((tmp_path / "train-d1.json").read_text())
    assert got["steps"] == ref["steps"] == STEPS
    for k in ("L_mean", "L_last", "Err_mean", "train_loss"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5), k


def test_raster_ar_baseline_trains_under_the_same_stage(ray_local, tmp_path):
    """var.order: raster trains varcore.ar.RasterAR over a single-scale tokenizer's map with the same
    stage, worker and recipe: L = h^2 tokens per image, compute from its token-causal FLOPs, a
    model file of its own kind, and a test loss the saved model reproduces."""
    import dataclasses

    from varcore.ar import RasterAR
    vq_cfg = dataclasses.replace(TINY_VQ, patch_nums=(4,))
    tok, tokens = write_synthetic_artifacts(tmp_path / "art", vq_cfg, n_train=64, n_val=32, num_classes=4)
    p = params_for(tmp_path)
    p["tokenizer"]["model"]["patch_nums"] = [4]
    p["var"]["order"] = "raster"
    m = run_stage(tmp_path, p, tok, tokens, "ar-d1.pt", "curve-d1.json")
    model, meta = load_var(tmp_path / "ar-d1.pt")
    assert type(model) is RasterAR and meta["format"] == "varscale.ar.v1"
    assert m["tokens"] == STEPS * 8 * 16 and m["N"] == main_N(model.cfg)
    assert m["compute"] == pytest.approx(var_flops(model.cfg).train_per_token * m["tokens"])
    record = json.loads((tmp_path / "run-d1.json").read_text())
    assert record["ray_run"].startswith("ar-d1-") and record["execution_plan"]["attention"] == "dense"
    curve = json.loads((tmp_path / "curve-d1.json").read_text())
    assert curve[-1]["L_mean"] < curve[0]["L_mean"] < np.log(64)   # it learns
    assert curve[-1]["L_last"] == curve[-1]["L_mean"]               # one "scale": the whole map
    config = load_train_var_config(p, "params.yaml", 1)
    inputs = inputs_for(config, tok, tokens)
    ev = evaluate(model, inputs.quantizer, *inputs.val, model.cfg, 16, 0, 1, torch.device("cpu"))
    assert ev["L_mean"] == pytest.approx(m["L_mean"], rel=1e-5)
