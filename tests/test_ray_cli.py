"""The README's sweep path, done as a user does it: `ray start` on our 2-core machine, `ray job
submit` of a sweep whose trials run 4 at a time, all logging into the checkout's SQLite MLflow
store; every trial finished and logged, disk bounded by `num_to_keep`, `ray stop` leaving no
process. CI runs 2 trials, depths 1 and 2 at one learning rate (slow, ~75 s; the grid's expansion
has its own in-process test in tests/test_train_sweep.py); the 24-trial load test takes ~9 min on 2
cores and runs with `pytest -m load` (outside the 15-minute CI budget; its result is in
benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic import write_synthetic_artifacts

from .test_train import TINY_VQ, tiny_params

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).parent / "ray"
    return subprocess.run([str(ray), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _our_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if marker in line and "ps -eo" not in line]


@pytest.fixture
def cluster(tmp_path):
    """A local cluster started by the CLI, in its own temp dir and ports, with token authentication
    (the token in a HOME of its own, never printed); stopped afterwards, every process gone."""
    home, temp = tmp_path / "home", Path(f"/tmp/vs-{os.getpid()}")   # Ray's socket paths must stay short
    home.mkdir()
    dash = _free_port()
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(var, None)
    # as the README: make the token once (~/.ray/auth_token, not shown), then run everything with
    # RAY_AUTH_MODE=token: the cluster checks it, the CLI sends it
    gen = _ray(["get-auth-token", "--generate"], env)
    assert gen.returncode == 0 and (home / ".ray" / "auth_token").is_file()
    env["RAY_AUTH_MODE"] = "token"
    start = _ray(["start", "--head", "--num-cpus", "2", "--port", str(_free_port()), "--dashboard-port", str(dash),
                  "--temp-dir", str(temp), "--disable-usage-stats"], env)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        stop = _ray(["stop", "--force"], env)
        assert stop.returncode == 0
        leftover = _our_processes(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        assert leftover == [], leftover
    assert (home / ".ray" / "auth_token").is_file()


NUM_TO_KEEP = 2


@pytest.mark.parametrize("n_lrs", [1, pytest.param(12, marks=pytest.mark.load)], ids=["2-trials", "24-trials"])
def test_ray_job_submit_sweep_loses_nothing(cluster, tmp_path, n_lrs):
    """depths 1, 2 x ``n_lrs`` learning rates, up to 4 trials at a time."""
    env, address = cluster
    lrs = [round(0.001 * (i + 1), 3) for i in range(n_lrs)]
    n_trials = 2 * n_lrs
    checkout = tmp_path / "checkout"           # what `dvc repro` made: a tokenizer and token shards
    (checkout / ".dvc").mkdir(parents=True)
    (checkout / "dvc.yaml").write_text("stages: {}\n")
    tok, tokens = write_synthetic_artifacts(checkout / "data", TINY_VQ, n_train=32, n_val=16, num_classes=2)
    params = tiny_params(steps=3, batch_size=8, num_evals=1, log_every=1, checkpoint_every=1,
                         ray={"num_workers": 1, "cpus_per_worker": 0.5, "num_to_keep": NUM_TO_KEEP})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    submit = _ray(["job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                   "python", "-m", "pipeline.sweep", "--params", str(tmp_path / "params.yaml"), "--depths", "1", "2",
                   "--grid", "train.lr=" + ",".join(map(str, lrs)), "--max-concurrent", "4",
                   "--tokenizer", str(tok), "--tokens", str(tokens), "--out-dir", str(tmp_path / "sweeps"),
                   "--name", "ci"], env, timeout=900)
    assert submit.returncode == 0 and "succeeded" in submit.stdout, submit.stdout[-3000:] + submit.stderr[-2000:]
    assert "auth_token" not in submit.stdout and open(Path(env["HOME"]) / ".ray" / "auth_token").read().strip() \
        not in submit.stdout + submit.stderr                                          # the token is never printed
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")   # the checkout's own store
    exp = client.get_experiment_by_name("varscale").experiment_id
    (parent,) = client.search_runs([exp], "tags.`varscale.kind` = 'sweep'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)
    got = sorted((int(c.data.tags["varscale.depth"]), float(c.data.params["train.lr"])) for c in children)
    assert got == sorted((d, lr) for d in (1, 2) for lr in lrs)
    for c in children:   # every metric and artifact of every trial arrived
        assert c.info.status == "FINISHED" and c.data.metrics["L_mean"] > 0 and c.data.metrics["steps"] == 3
        assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "train_loss")) == [1, 2, 3]
        d = c.data.tags["varscale.depth"]
        assert [a.path for a in client.list_artifacts(c.info.run_id, "metrics")] == [f"metrics/train-d{d}.json"]
        assert [a.path for a in client.list_artifacts(c.info.run_id, "record")] == [f"record/run-d{d}.json"]
    for d in (1, 2):
        for lr in lrs:   # each trial's own files, its override applied
            trial = tmp_path / "sweeps" / "ci" / f"d{d}-lr={lr}"
            m = json.loads((trial / f"train-d{d}.json").read_text())
            record = json.loads((trial / f"run-d{d}.json").read_text())
            assert m["depth"] == d and m["steps"] == 3 and record["lr_peak"] == pytest.approx(lr * 8 / 256)
    # checkpoints: at most num_to_keep per trial, so the bytes stay bounded whatever the steps
    runs = sorted(p for p in (tmp_path / "sweeps" / "ci" / "ray").glob("var-d*") if p.is_dir())   # not the .lock files
    assert len(runs) == n_trials
    for run in runs:
        kept = list(run.glob("step-*"))
        assert 1 <= len(kept) <= NUM_TO_KEEP, (run, kept)
    state_bytes = max(p.stat().st_size for p in (tmp_path / "sweeps" / "ci" / "ray").rglob("state.pt"))
    total = sum(p.stat().st_size for p in (tmp_path / "sweeps" / "ci" / "ray").rglob("*") if p.is_file())
    assert total <= n_trials * NUM_TO_KEEP * state_bytes * 1.1   # + the small Ray bookkeeping files
