"""The README's sweep path, done as a user does it: `ray start`, `ray job submit` of a 2-trial
sweep, its runs in the checkout's MLflow store beside the pipeline's, `ray stop` (slow)."""

from __future__ import annotations

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


def test_ray_job_submit_sweep_logs_into_the_checkouts_store(cluster, tmp_path):
    env, address = cluster
    checkout = tmp_path / "checkout"           # what `dvc repro` made: a tokenizer and token shards
    (checkout / ".dvc").mkdir(parents=True)
    (checkout / "dvc.yaml").write_text("stages: {}\n")
    tok, tokens = write_synthetic_artifacts(checkout / "data", TINY_VQ, n_train=32, n_val=16, num_classes=2)
    params = tiny_params(steps=3, batch_size=8, num_evals=1, log_every=1, checkpoint_every=10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    submit = _ray(["job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                   "python", "-m", "pipeline.sweep", "--params", str(tmp_path / "params.yaml"), "--depths", "1",
                   "--grid", "train.lr=0.01,0.02", "--tokenizer", str(tok), "--tokens", str(tokens),
                   "--out-dir", str(tmp_path / "sweeps"), "--name", "ci"], env, timeout=600)
    assert submit.returncode == 0 and "succeeded" in submit.stdout, submit.stdout[-3000:] + submit.stderr[-2000:]
    assert "auth_token" not in submit.stdout and open(Path(env["HOME"]) / ".ray" / "auth_token").read().strip() \
        not in submit.stdout + submit.stderr                                          # the token is never printed
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")   # the checkout's own store
    exp = client.get_experiment_by_name("varscale").experiment_id
    (parent,) = client.search_runs([exp], "tags.`varscale.kind` = 'sweep'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(float(c.data.params["train.lr"]) for c in children) == [0.01, 0.02]
    assert all(c.data.metrics["L_mean"] > 0 and c.info.status == "FINISHED" for c in children)
    for lr in ("0.01", "0.02"):
        assert (tmp_path / "sweeps" / "ci" / f"d1-lr={lr}" / "train-d1.json").is_file()
