"""A tiny `dvc repro` of check_params -> data -> train_tokenizer -> encode_tokens in a temp copy of
the repo (slow): outputs, MLflow runs, what reruns, params errors and killed stages."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]
PART = ("check_params", "data", "train_tokenizer", "encode_tokens")
pytestmark = pytest.mark.slow

TINY = {
    "tokenizer": {
        "model": {"image_size": 16, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attn": False,
                  "Cvae": 8, "vocab_size": 32, "patch_nums": [1, 2, 4, 8]},
        "train": {"epochs": 2, "batch_size": 8, "disc_start_step": 3, "disc_ch": 8, "log_every": 2,
                  "checkpoint_every": 1},
    },
    "encode_tokens": {"batch_size": 16, "shard_size": 16},
}


def _run(cmd, cwd, env):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def make_checkout(work: Path, tmp: Path, images: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """A git + DVC checkout of the pipeline's first stages at ``work`` with tiny params (over the
    image folder ``images``, made under ``tmp`` when not given)."""
    for name in ("pipeline", "varcore"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    # the data -> encode_tokens part of the stage graph (later stages need more than these tests give)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in PART}}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    images = images or write_image_folder(tmp / "imgs", classes=3, per_class=12)
    params["data"].update(source="image_folder", root=str(images), image_size=16, val_fraction=0.25)
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
    return env, dvc


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dvcrepo")
    work = tmp / "repo"
    env, dvc = make_checkout(work, tmp)
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


OUTPUTS = ("data/images", "models/tokenizer.pt", "data/tokens", "runs/params-check.json")

def _timing(key: str) -> bool:
    return "seconds" in key or "per_second" in key or key == "encode_fraction"


def _files(work: Path) -> dict[str, str]:
    """sha256 of every output file, by path (DVC's outputs and the metrics but their timings)."""
    from pipeline.files import sha256_file
    out = {}
    for name in OUTPUTS:
        root = work / name
        for f in sorted([root] if root.is_file() else root.rglob("*")):
            if f.is_file():
                out[str(f.relative_to(work))] = sha256_file(f)
    for f in sorted((work / "metrics").glob("*.json")):
        out[str(f.relative_to(work))] = {k: v for k, v in json.loads(f.read_text()).items() if not _timing(k)}
    return out


def _stage_pids(work: Path, stage: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if f"pipeline.stages.{stage}" in cmd and Path(os.readlink(proc / "cwd")) == work:
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def _repro_killed(work: Path, env, dvc, stage: str, ready, rng: random.Random) -> str:
    """Start `dvc repro`, wait until ``stage`` runs and ``ready()`` holds, wait a random 0-0.3 s and
    kill -9 the whole process group (DVC and the stage); returns what DVC printed."""
    proc = subprocess.Popen(dvc + ["repro", "encode_tokens"], cwd=work, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (_stage_pids(work, stage) and ready()):
        assert proc.poll() is None, f"dvc repro ended before {stage} could be killed:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.3) if stage != "train_tokenizer" else 0)
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    return out


def test_killed_stages_lose_nothing(repo, tmp_path):
    """kill -9 of `dvc repro` during data, then train_tokenizer (after a training state was written),
    then encode_tokens; each rerun finishes what was left, the tokenizer resumes at the step its
    last state holds, and the outputs equal the uninterrupted run's exactly (CPU, same machine)."""
    work0, env0, dvc, _, tmp0 = repo
    work = tmp_path / "repo"
    env, dvc = make_checkout(work, tmp_path, images=tmp0 / "imgs")
    rng = random.Random(0)
    state = work / "checkpoints" / "tokenizer" / "state.pt"
    _repro_killed(work, env, dvc, "data", lambda: True, rng)
    _repro_killed(work, env, dvc, "train_tokenizer", state.is_file, rng)
    import torch
    saved_step = torch.load(state, weights_only=True)["state"]["step"]
    assert 1 <= saved_step < 6
    resumed = _repro_killed(work, env, dvc, "encode_tokens", lambda: True, rng)
    assert f"(step {saved_step})" in resumed    # "resuming tokenizer training from ... (step N)"
    out = _run(dvc + ["repro", "encode_tokens"], work, env)
    assert "Stage 'data' didn't change" in out and "Stage 'train_tokenizer' didn't change" in out
    assert _files(work) == _files(work0)
    assert json.loads((work / "metrics" / "tokenizer.json").read_text())["steps"] == 6
    status = _run(dvc + ["status", "--json"], work, env)
    assert json.loads(status.strip().splitlines()[-1]) == {}


def test_params_error_stops_before_any_output_is_deleted_and_a_second_repro_is_refused(repo):
    """A wrong type in params.yaml: `dvc repro` stops at check_params, naming the key, and every
    output of the later stages (the cache: false metrics too) is still there. With the params put
    back, the rerun runs check_params alone; a second `dvc repro` started while it runs is refused
    by DVC's lock, and the outputs are unchanged."""
    work, env, dvc, _, _ = repo
    before = _files(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tokenizer"]["train"]["epochs"] = "two"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        res = subprocess.run(dvc + ["repro", "encode_tokens"], cwd=work, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode != 0
        assert "check_params: params.yaml:tokenizer.train.epochs" in res.stdout + res.stderr
        assert "Running stage 'train_tokenizer'" not in res.stdout + res.stderr
        assert {k: v for k, v in _files(work).items() if k != "runs/params-check.json"} == {
            k: v for k, v in before.items() if k != "runs/params-check.json"}
    finally:
        _run(["git", "checkout", "-q", "--", "params.yaml"], work, env)
    first = subprocess.Popen(dvc + ["repro", "encode_tokens"], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not _stage_pids(work, "check_params"):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    second = subprocess.run(dvc + ["repro", "encode_tokens"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=120)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 0, out
    assert second.returncode != 0 and "lock" in (second.stdout + second.stderr).lower()
    assert "Running stage 'check_params'" in out and "Running stage 'data'" not in out
    assert _files(work) == before


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


def test_changed_tokenizer_param_reruns_tokenizer_not_data_and_exp_run_overrides(repo):
    """A hand-edited tokenizer param makes train_tokenizer (not data) stale; `dvc exp run -S` on top
    of it reruns train_tokenizer and encode_tokens, skips data, and applies the override."""
    work, env, dvc, out, tmp = repo
    assert "Stage 'data' didn't change" not in out
    status = json.loads(_run(dvc + ["status", "--json"], work, env).strip().splitlines()[-1])
    assert status == {}
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tokenizer"]["train"]["lr"] = 0.001
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run(dvc + ["status", "--json"], work, env).strip().splitlines()[-1])
    assert "train_tokenizer" in status and "data" not in status
    out2 = _run(dvc + ["exp", "run", "-S", "encode_tokens.shard_size=8", "encode_tokens"], work, env)
    assert "Stage 'data' didn't change, skipping" in out2
    assert "Running stage 'train_tokenizer'" in out2 and "Running stage 'encode_tokens'" in out2
    man = json.loads((work / "data" / "tokens" / "manifest.json").read_text())
    assert [s["count"] for s in man["splits"]["train"]["shards"]][:3] == [8, 8, 8]


def test_plots_render_without_the_network(repo, tmp_path):
    """`dvc plots show` with the page template install.sh builds (vega inlined) loads no script from
    the network; DVC's default page takes vega from a CDN."""
    import re
    template = REPO / ".dvc" / "plots" / "offline.html"
    if not template.is_file():
        pytest.skip("install.sh could not fetch vega from registry.npmjs.org, so there is no offline template")
    work, env, dvc, _, _ = repo
    (work / "curve.json").write_text(json.dumps([{"step": s, "L": 5.0 - 0.1 * s} for s in range(5)]))
    pages = {}
    try:
        for name, extra in (("offline", ["--html-template", str(template)]), ("default", [])):
            _run(dvc + ["plots", "show", "curve.json", "-x", "step", "-y", "L", "-o", str(tmp_path / name), *extra],
                 work, env)
            pages[name] = (tmp_path / name / "index.html").read_text()
    finally:
        (work / "curve.json").unlink()

    def external_scripts(page: str) -> list[str]:
        return [u for u in re.findall(r"<script[^>]*\bsrc=[\"']([^\"']+)", page) if "//" in u]
    assert "vegaEmbed" in pages["offline"] and external_scripts(pages["offline"]) == []
    assert external_scripts(pages["default"])     # what the template replaces
