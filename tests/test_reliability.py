"""Faults lose nothing and stop quickly with one line naming the file, key or URI.

Tracking outages, concurrent writers of one SQLite store, a moved checkout, a full disk, corrupt
and mismatched files, a params error before any output is deleted, and two runs of one recipe.
Killed stages and corrupt Ray checkpoints are in test_dvc_pipeline.py, test_stage_runs.py and test_train_ray.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoints import weights_sha256
from pipeline.errors import ArtifactError, OutputError, ParamsError
from pipeline.files import exclusive_lock, save_torch, write_json
from pipeline.stages import check_params
from pipeline.training.checkpoint import load_var, save_var

REPO = Path(__file__).resolve().parents[1]
OUTAGE_LIMIT_S = 30   # the bound; the probe waits 5 s, MLflow's bounded retries ~22 s


def _stage(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=timeout)


def _check_params(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = _stage(["pipeline.stages.check_params", "--params", str(REPO / "params.yaml"), "--out", "check.json"],
                 tmp_path, env, timeout=4 * OUTAGE_LIMIT_S)
    return res, time.monotonic() - t0


# ---- tracking outages -------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]    # closed again when the block ends: nothing listens there


def test_tracking_server_at_a_closed_port_fails_fast_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    res, seconds = _check_params(tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert res.returncode != 0 and seconds < OUTAGE_LIMIT_S
    assert f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "check.json").exists()


def test_tracking_server_that_never_answers_fails_fast_naming_the_uri(tmp_path):
    """A server that accepts connections and never replies (a hung proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        res, seconds = _check_params(tmp_path, {"MLFLOW_TRACKING_URI": uri})
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        server.close()
    assert res.returncode != 0 and seconds < OUTAGE_LIMIT_S
    assert f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered" in res.stderr and "timed out" in res.stderr


# ---- one SQLite store: concurrent writers, portable paths, run tags ------------------------------
WRITER = """
import sys
from pathlib import Path
from pipeline.tracking import log_artifact, log_metrics, stage_run
i = int(sys.argv[1])
Path(f"note-{i}.txt").write_text(str(i))
with stage_run("writer", {"writer": i}, run_name=f"writer-{i}"):
    for step in range(40):
        log_metrics({"x": i * 1000 + step}, step=step)
    log_artifact(f"note-{i}.txt")
"""


@pytest.mark.slow
def test_concurrent_writers_of_one_sqlite_store_lose_nothing(tmp_path):
    """Four processes (a sweep's trials) log 40 steps and an artifact each into one SQLite file at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("varscale").experiment_id],
                              "tags.`varscale.stage` = 'writer'")
    assert len(runs) == 4
    for run in runs:
        i = int(run.data.params["writer"])
        history = client.get_metric_history(run.info.run_id, "x")
        assert sorted(m.value for m in history) == [i * 1000 + s for s in range(40)]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"note-{i}.txt"]
        tags = run.data.tags
        assert tags["varscale.params_hash"] and tags["varscale.git_commit"]
        assert tags["varscale.version.torch"] == metadata.version("torch")
        assert tags["varscale.machine.cpu"] and "varscale.machine.isa" in tags
        assert tags["mlflow.source.name"] == "-c"    # sys.argv[0]'s stem, never a path of the checkout


PORTABLE = """
from pathlib import Path
from pipeline.tracking import log_artifact, stage_run
Path("note.txt").write_text("x")
with stage_run("portable", {"k": 1}):
    log_artifact("note.txt")
"""


def test_a_copied_checkout_writes_only_into_itself(tmp_path):
    """Artifacts go under the folder of the SQLite file, which stores no absolute path of it."""
    first, second = tmp_path / "checkout", tmp_path / "copy"
    first.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    subprocess.run([sys.executable, "-c", PORTABLE], cwd=first, env=env, check=True, capture_output=True)
    shutil.copytree(first, second)
    subprocess.run([sys.executable, "-c", PORTABLE], cwd=second, env=env, check=True, capture_output=True)
    assert len(list(first.glob("mlruns/varscale/*/artifacts/note.txt"))) == 1   # the copy's run did not write here
    assert len(list(second.glob("mlruns/varscale/*/artifacts/note.txt"))) == 2
    with sqlite3.connect(second / "mlflow.db") as db:
        dump = "\n".join(db.iterdump())
    assert str(tmp_path) not in dump
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{second / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("varscale").experiment_id],
                              "tags.`varscale.stage` = 'portable'")
    assert len(runs) == 2
    for run in runs:   # MLflow reads the artifacts back through the same relative location
        local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / run.info.run_id[:8]))
        assert Path(local).read_text() == "x"


# ---- a full disk ------------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("write", [lambda p: write_json(p, {"new": 1}), lambda p: save_torch(p, {"new": torch.ones(3)})])
def test_disk_full_leaves_the_previous_file_and_names_the_size(tmp_path, monkeypatch, write):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous")
    monkeypatch.setattr(Path, "write_bytes", _disk_full)
    with pytest.raises(OutputError, match=rf"{path}: disk full while writing it \(needs \d+\.\d MiB, .* free in "):
        write(path)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]    # no temp file left


def test_disk_full_while_saving_a_training_checkpoint_names_it(tmp_path, monkeypatch):
    from pipeline.training.state import TrainState, save_state
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    monkeypatch.setattr(Path, "write_bytes", _disk_full)
    with pytest.raises(OutputError, match=r"state.pt: disk full while writing it \(needs \d+\.\d MiB"):
        save_state(tmp_path, model, opt, TrainState(step=3))


# ---- corrupt and mismatched files --------------------------------------------------------------
@pytest.fixture
def var_file(tmp_path, tiny_var):
    path = tmp_path / "var-d1.pt"
    save_var(path, tiny_var, ["a", "b"], extra={"tokenizer_sha256": "0" * 64})
    return path


def test_changed_weights_under_the_same_checkpoint_are_refused(var_file):
    """A flipped bit in tensor data still unpickles; the recorded sha256 of the weights catches it."""
    ckpt = torch.load(var_file, weights_only=True)
    name = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][name].view(-1)[0] += 1.0
    torch.save(ckpt, var_file)
    with pytest.raises(ArtifactError, match=rf"{var_file}: the weights do not match their recorded sha256"):
        load_var(var_file)


def test_every_byte_flip_is_refused_or_harmless(var_file, tiny_var):
    """Flip one byte at 64 places spread over the file: each load names the file, or (a byte torch
    never reads, such as zip padding) gives exactly the saved weights; never wrong weights."""
    data = bytearray(var_file.read_bytes())
    expected = weights_sha256(tiny_var.state_dict())
    refused = 0
    for k in range(64):
        pos = (k * 7919 + 13) % len(data)
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        var_file.write_bytes(bytes(flipped))
        try:
            model, _ = load_var(var_file)
        except ArtifactError as e:
            assert str(var_file) in str(e)
            refused += 1
            continue
        assert weights_sha256(model.state_dict()) == expected, f"byte {pos} changed the weights silently"
    assert refused >= 32


def test_truncated_checkpoint_names_the_file(var_file):
    var_file.write_bytes(var_file.read_bytes()[: len(var_file.read_bytes()) // 2])
    with pytest.raises(ArtifactError, match=rf"{var_file}: cannot read VAR checkpoint"):
        load_var(var_file)


def test_model_of_another_tokenizer_is_refused_before_sampling(var_file, tmp_path, tiny_vqvae):
    from pipeline.tokenizer.checkpoint import save_tokenizer
    from pipeline.training.checkpoint import check_fits
    tok = tmp_path / "tokenizer.pt"
    save_tokenizer(tok, tiny_vqvae)
    model, meta = load_var(var_file)
    with pytest.raises(ArtifactError, match=rf"{var_file}: trained on the tokens of another tokenizer"):
        check_fits(model, meta, tiny_vqvae, var_file, tok, 1)
    with pytest.raises(ArtifactError, match=rf"{var_file}: holds a depth-{model.cfg.depth} model, not depth 7"):
        check_fits(model, {**meta, "tokenizer_sha256": None}, tiny_vqvae, var_file, tok, 7)


def test_truncated_image_split_is_named_before_any_work(tmp_path):
    from pipeline.images import load_split
    from pipeline.stages import data
    from tests.helpers import write_image_folder
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="image_folder", root=str(write_image_folder(tmp_path / "imgs", 2, 8)),
                          image_size=16, val_fraction=0.25)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "images"
    data.run(data.load_config(params, "params.yaml", None), data.Paths(out=out, metrics=tmp_path / "m.json"))
    images, labels = load_split(out, "val")
    assert len(images) == len(labels) == 4
    val = out / "val.npy"
    val.write_bytes(val.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=rf"{val}: sha256 differs from {out / 'manifest.json'}"):
        load_split(out, "val")
    (out / "train-labels.npy").write_bytes(b"not an array")
    with pytest.raises(ArtifactError, match="train-labels.npy: sha256 differs"):
        load_split(out, "train")


# ---- params: every section checked before any stage runs -----------------------------------------
def _repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("section", check_params.SECTIONS)
def test_check_params_refuses_a_missing_section(section):
    params = _repo_params()
    del params[section]
    with pytest.raises(ParamsError, match=rf"params.yaml.*{section}"):
        check_params.load_config(params, "params.yaml", None)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(trian={}), r"unknown section\(s\) \['trian'\]"),
    (lambda p: p["train"].update(lr="fast"), r"train\.lr"),
    (lambda p: p["tokenizer"]["train"].update(epoks=3), r"epoks"),
    (lambda p: p["evaluate"].update(samples_per_class=1), r"samples_per_class"),
    (lambda p: p["train"].update(depths=[0]), r"depth"),
])
def test_check_params_names_the_key(change, message):
    params = _repo_params()
    change(params)
    with pytest.raises(ParamsError, match=message):
        check_params.load_config(params, "params.yaml", None)


def test_repo_params_and_the_paper_profile_pass_the_check():
    for file in (REPO / "params.yaml", REPO / "profiles" / "paper.yaml"):
        params = yaml.safe_load(file.read_text())
        assert check_params.load_config(params, str(file), None) is params


def test_every_stage_depends_on_the_params_check():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        if name != "check_params":
            assert "runs/params-check.json" in body["deps"], name
    assert stages["check_params"]["params"] == [{"params.yaml": None}]


# ---- two runs of one recipe ---------------------------------------------------------------------
HOLDER = """
import sys, time
from pipeline.files import exclusive_lock
with exclusive_lock(sys.argv[1], "a test run"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_of_one_recipe_is_refused_naming_the_holder(tmp_path):
    lock = tmp_path / "ray" / "var-d1-abc.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"{lock}: locked by process {holder.pid} \(a test run\); wait for it"):
            with exclusive_lock(lock, "another run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "another run"):   # the dead holder's lock is gone with its process
        assert lock.read_text() == f"{os.getpid()} another run\n"


def test_check_params_output_is_constant_across_valid_changes(tmp_path):
    """Its output is every stage's dep: a valid value change must not change it (no needless reruns)."""
    outs = []
    for lr in (1e-4, 2e-4):
        params = _repo_params()
        params["train"]["lr"] = lr
        out = tmp_path / f"check-{lr}.json"
        check_params.run(check_params.load_config(params, "params.yaml", None), check_params.Paths(out))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and json.loads(outs[0]) == {"checked": list(check_params.SECTIONS)}


def _free_bytes(n):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    return lambda path: usage(10 * n, 9 * n, n)


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_ray_copies_it(tmp_path, monkeypatch):
    """Ray copies each checkpoint into its storage itself; the worker checks the space first, so a
    full disk stops the run with the folder and both sizes named, the earlier checkpoints intact."""
    import shutil
    from pipeline.training.state import SPACE_MARGIN, check_space
    (tmp_path / "step-000000100").mkdir()
    (tmp_path / "step-000000100" / "state.pt").write_bytes(b"good")
    monkeypatch.setattr(shutil, "disk_usage", _free_bytes(3 << 20))
    check_space(tmp_path / "run", (3 << 20) - SPACE_MARGIN, "checkpoint step-000000200")   # just fits
    with pytest.raises(OutputError, match=rf"{tmp_path / 'run'}: disk too full to write checkpoint step-000000200 "
                                          r"\(needs 4\.0 MiB, 3\.0 MiB free\)"):
        check_space(tmp_path / "run", 3 << 20, "checkpoint step-000000200")
    assert (tmp_path / "step-000000100" / "state.pt").read_bytes() == b"good"


def test_a_run_whose_checkpoints_cannot_fit_stops_before_any_work(tmp_path, monkeypatch):
    """The driver checks room for one checkpoint (12 bytes per parameter) before Ray starts."""
    import shutil
    from pipeline.training.config import load_train_var_config
    from pipeline.training.driver import TrainPaths, fit, load_inputs
    from tests.synthetic import write_synthetic_artifacts
    from tests.test_train import TINY_VQ, tiny_params
    ray = pytest.importorskip("ray")
    tok, tokens = write_synthetic_artifacts(tmp_path / "art", TINY_VQ, n_train=32, n_val=16)
    config = load_train_var_config(tiny_params(ray={"storage_path": str(tmp_path / "ray")}), "params.yaml", 1)
    inputs = load_inputs(config, TrainPaths(tok, tokens, *(Path("unused") for _ in range(4))))
    monkeypatch.setattr(shutil, "disk_usage", _free_bytes(1 << 20))
    with pytest.raises(OutputError, match=r"ray/var-d1-[0-9a-f]{12}: disk too full to write the run's checkpoints"):
        fit(config, inputs)
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()
