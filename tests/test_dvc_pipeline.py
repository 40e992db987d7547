"""A tiny `dvc repro` of data -> train_tokenizer -> encode_tokens in a temp copy of the repo (slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]
PART = ("data", "train_tokenizer", "encode_tokens")
pytestmark = pytest.mark.slow

TINY = {
    "tokenizer": {
        "model": {"image_size": 16, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attn": False,
                  "Cvae": 8, "vocab_size": 32, "patch_nums": [1, 2, 4, 8]},
        "train": {"epochs": 2, "batch_size": 8, "disc_start_step": 3, "disc_ch": 8, "log_every": 2},
    },
    "encode_tokens": {"batch_size": 16, "shard_size": 16},
}


def _run(cmd, cwd, env):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dvcrepo")
    work = tmp / "repo"
    for name in ("pipeline", "varcore"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    # the data -> encode_tokens part of the stage graph (later stages need more than these tests give)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in PART}}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="image_folder", root=str(write_image_folder(tmp / "imgs", classes=3, per_class=12)),
                          image_size=16, val_fraction=0.25)
    for sec, val in TINY.items():
        params[sec] = {**params.get(sec, {}), **val} if sec != "tokenizer" else {
            "model": {**params["tokenizer"]["model"], **val["model"]}, "train": {**params["tokenizer"]["train"], **val["train"]}}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONPATH": str(work),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], work, env)
    _run(dvc + ["init", "-q"], work, env)
    _run(dvc + ["config", "core.analytics", "false"], work, env)
    out = _run(dvc + ["repro", "encode_tokens"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "tiny pipeline"], work, env)
    return work, env, dvc, out, tmp


def test_repro_produces_all_outputs(repo):
    work, env, dvc, out, tmp = repo
    assert json.loads((work / "metrics" / "data.json").read_text())["train_images"] == 27
    tok = json.loads((work / "metrics" / "tokenizer.json").read_text())
    assert tok["steps"] == 2 * (27 // 8) and len(tok["codebook_used"]) == 4 and tok["val_psnr"] > 0
    man = json.loads((work / "data" / "tokens" / "manifest.json").read_text())
    assert man["splits"]["train"]["count"] == 27 and man["L"] == 85
    assert (work / "metrics" / "tokenizer-recon.png").stat().st_size > 0


def test_mlflow_has_one_child_run_per_stage(repo):
    work, env, dvc, out, tmp = repo
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("varscale")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags.get("varscale.stage"): r for r in runs if "varscale.stage" in r.data.tags}
    assert set(stages) == set(PART)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in stages.values()}
    assert len(parents) == 1 and None not in parents
    tok = stages["train_tokenizer"].data
    assert "val/psnr" in tok.metrics and "train.lr" in tok.params and "model.vocab_size" in tok.params


def test_changed_tokenizer_param_reruns_tokenizer_not_data(repo):
    work, env, dvc, out, tmp = repo
    assert "Stage 'data' didn't change" not in out
    status = json.loads(_run(dvc + ["status", "--json"], work, env).strip().splitlines()[-1])
    assert status == {}
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tokenizer"]["train"]["lr"] = 0.001
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run(dvc + ["status", "--json"], work, env).strip().splitlines()[-1])
    assert "train_tokenizer" in status and "data" not in status
    out2 = _run(dvc + ["repro", "encode_tokens"], work, env)
    assert "Stage 'data' didn't change, skipping" in out2
    assert "Running stage 'train_tokenizer'" in out2 and "Running stage 'encode_tokens'" in out2


def test_dvc_exp_run_with_override(repo):
    work, env, dvc, out, tmp = repo
    _run(["git", "checkout", "-q", "--", "params.yaml"], work, env)
    _run(dvc + ["exp", "run", "-S", "encode_tokens.shard_size=8", "encode_tokens"], work, env)
    man = json.loads((work / "data" / "tokens" / "manifest.json").read_text())
    assert [s["count"] for s in man["splits"]["train"]["shards"]][:3] == [8, 8, 8]
