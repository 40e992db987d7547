"""VARSCALE_TRACKING: stages run without MLflow (off, journal) and journals replay into a store.

The GPU node of docs/gpu.md has no MLflow: a stage must run there with MLflow unimportable, write
its journal, and the journal must arrive in the checkout's store as the run MLflow would have had.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.errors import InputError
from pipeline.tracking_journal import read_journal, replay

REPO = Path(__file__).resolve().parents[1]
# runs a stage with `import mlflow` failing, as on a node that lacks it
NO_MLFLOW = ("import runpy, sys; sys.modules['mlflow'] = None; sys.argv = ['check_params'] + sys.argv[1:]; "
             "runpy.run_module('pipeline.stages.check_params', run_name='__main__', alter_sys=True)")


def _check_params(cwd: Path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VARSCALE_TRACKING": mode}
    return subprocess.run([sys.executable, "-c", NO_MLFLOW, "--params", str(REPO / "params.yaml"), "--out",
                           "check.json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_journal_mode_runs_a_stage_without_mlflow_and_records_its_run(tmp_path):
    res = _check_params(tmp_path, "journal:journal")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "check.json").is_file() and not (tmp_path / "mlflow.db").exists()
    [path] = (tmp_path / "journal").glob("check_params-*.jsonl")
    records = read_journal(path)
    assert [r["event"] for r in records][0] == "start" and records[-1] == {**records[-1], "event": "end",
                                                                           "status": "FINISHED"}
    start = records[0]
    assert start["stage"] == "check_params" and start["tags"]["varscale.stage"] == "check_params"
    assert start["tags"]["varscale.params_hash"] == tracking.params_hash(REPO / "params.yaml")
    assert all(r["time"] >= start["time"] for r in records)


def test_off_mode_logs_nothing_and_a_bad_mode_is_named(tmp_path, monkeypatch):
    from pipeline.stages import check_params
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VARSCALE_TRACKING", "off")
    check_params.main(["--params", str(REPO / "params.yaml"), "--out", "check.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json"]      # no store, no journal
    monkeypatch.setenv("VARSCALE_TRACKING", "wandb")
    with pytest.raises(SystemExit, match=r"VARSCALE_TRACKING='wandb': not one of mlflow, off, journal:<dir>"):
        check_params.main(["--params", str(REPO / "params.yaml"), "--out", "check2.json"])
    assert not (tmp_path / "check2.json").exists()
    monkeypatch.setenv("VARSCALE_TRACKING", "journal:")
    with pytest.raises(InputError, match="names no folder"):
        tracking.tracking_mode()


def _journal_a_run(folder: Path, artifact: Path, fail: bool = False) -> None:
    """What a training stage logs: params, a curve over steps, tags, an artifact, final values."""
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with tracking.journal_run(folder, "train_var", {"train": {"lr": 0.008, "steps": 3}}, "train_var-d2",
                                  {"varscale.depth": "2"}):
            for step in (1, 2, 3):
                tracking.log_metrics({"train_loss": 6.0 - step, "note": "not a scalar"}, step=step)
            tracking.log_params({"plan.attention": "dense"})
            tracking.set_tags({"varscale.model_path": "models/var-d2.pt"})
            tracking.log_artifact(artifact)
            tracking.log_parent_artifact(artifact, "report")
            if fail:
                raise RuntimeError("worker died")


def test_replay_gives_the_run_mlflow_would_have_had_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("VARSCALE_PARENT_RUN_ID", raising=False)
    artifact = tmp_path / "d2.json"
    artifact.write_text(json.dumps({"L_mean": 3.0}))
    folder = tmp_path / "journal"
    _journal_a_run(folder, artifact)
    _journal_a_run(folder, artifact, fail=True)
    artifact.write_text("changed after the run")    # the journal kept the file as it was logged

    runs = replay(folder)
    assert len(runs) == 2 and replay(folder) == []    # a second replay adds nothing
    client = tracking.connect()
    ok, failed = (client.get_run(r) for r in runs)
    assert ok.info.status == "FINISHED" and failed.info.status == "FAILED"
    assert ok.info.run_name == "train_var-d2" and ok.data.params["train.lr"] == "0.008"
    assert ok.data.params["plan.attention"] == "dense"
    assert ok.data.tags["varscale.model_path"] == "models/var-d2.pt" and ok.data.tags["varscale.depth"] == "2"
    history = client.get_metric_history(ok.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert "note" not in ok.data.metrics
    parent = ok.data.tags["mlflow.parentRunId"]
    assert failed.data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).data.tags["varscale.params_hash"] == ok.data.tags["varscale.params_hash"]
    local = Path(client.download_artifacts(ok.info.run_id, "d2.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == {"L_mean": 3.0}
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/d2.json"]


def test_a_journal_cut_by_a_kill_replays_as_killed_and_a_bad_one_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("VARSCALE_PARENT_RUN_ID", raising=False)
    artifact = tmp_path / "d2.json"
    artifact.write_text("{}")
    folder = tmp_path / "journal"
    _journal_a_run(folder, artifact)
    [path] = folder.glob("*.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])     # killed while writing line 5
    [run] = replay(folder)
    got = tracking.connect().get_run(run)
    assert got.info.status == "KILLED"
    assert len(tracking.connect().get_metric_history(run, "train_loss")) == 3
    path.write_text("not json\n" + "\n".join(lines))
    with pytest.raises(InputError, match=rf"{path.name}:1: not a journal line"):
        replay(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no"):
        replay(empty)
