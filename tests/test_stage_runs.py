"""check_params and the stages after train_var (train_classifier, evaluate_reference, evaluate@D,
zeroshot, fit, report) run by their dvc.yaml commands on tiny inputs: what evaluate and zeroshot
record, and kill -9 of each stage (test_dvc_pipeline.py and test_train_ray.py kill the others), at a
random point of its run and just before one of its output renames: every output is its old
version or the new one, whole; the rerun finishes and its outputs equal an uninterrupted run's
byte for byte (CPU, same machine: these stages are deterministic and write no timings).

Each stage runs its command from dvc.yaml (`python -m pipeline.stages.<stage>` with the same
options) in a checkout-shaped folder with tiny inputs: a 16x16 image folder, a random tokenizer,
random VARs of depths 1-3 and synthetic train_var metrics. To spare every run the seconds of
importing torch, MLflow and matplotlib, each run is a process forked from one that imported them
and the stage modules once (``SERVER``); it calls the module's ``main(argv)``, which is what
``python -m`` runs (the outputs are the same bytes). These stages start no process of their own,
so killing that process kills the stage. Tracking is off (``VARSCALE_TRACKING=off``); what a
killed run leaves in MLflow is test_tracking_journal.py's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from pipeline.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
DEPTHS = (1, 2, 3)
EVAL_DEPTH = 1            # evaluate@D is one command for every depth: one is killed
HERE = ("check_params", "train_classifier", "evaluate_reference", "evaluate", "zeroshot", "fit", "report")
ELSEWHERE = ("data", "train_tokenizer", "encode_tokens", "train_var")   # test_dvc_pipeline.py, test_train_ray.py
TINY = {
    "train": {"depths": list(DEPTHS)},
    "classifier": {"width": 8, "epochs": 2, "batch_size": 16},
    "evaluate": {"samples_per_class": 6, "seeds": [0, 1], "batch_size": 9, "kid_subset_size": 10,
                 "sampling": {"cfg": 1.5, "top_k": 20, "top_p": 0.9, "engine": "auto"}, "grid_columns": 4},
    "zeroshot": {"depth": 2, "images": 12, "batch_size": 6, "grid_images": 4},
}
pytestmark = pytest.mark.slow


# ---- the stages as dvc.yaml runs them -----------------------------------------------------------
def stage_command(name: str, params: dict) -> tuple[str, list[str], list[str]]:
    """(module, options, declared outputs) of ``name`` in dvc.yaml (``evaluate@2``: foreach item 2)."""
    stage, _, item = name.partition("@")
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    spec = spec.get("do", spec)

    def sub(s: str) -> str:
        return s.replace("${item}", item).replace("${zeroshot.depth}", str(params["zeroshot"]["depth"]))
    cmd = shlex.split(sub(spec["cmd"]))
    assert cmd[:2] == ["python", "-m"], cmd
    outs = [sub(o if isinstance(o, str) else next(iter(o))) for key in ("outs", "metrics", "plots")
            for o in spec.get(key, [])]
    return cmd[2], cmd[3:], outs


def _stage_process(work: str, module: str, argv: list[str], log: str, events: str, kill_at: int | None) -> None:
    """A stage's process (forked by SERVER): ``main(argv)`` of ``module`` in ``work``. ``events`` gets
    ``start``, each rename of a whole temp file onto an output (``pipeline.files.atomic_path``),
    ``end`` and what ``main`` returned (what MLflow gets). With ``kill_at`` = k the process SIGKILLs
    itself just before the k-th (0-based) rename: the moment that output's temp file is complete
    and the output still the old one."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(work)
    os.environ.update(VARSCALE_TRACKING="off", VARSCALE_GIT_COMMIT="0" * 40)
    os.close(0)     # the server's requests
    replace, renamed = os.replace, []

    def event(line: str) -> None:
        with open(events, "a") as f:
            f.write(line + "\n")

    def replace_output(src, dst, *args, **kwargs):
        if Path(src).name.startswith(f".{Path(dst).name}.") and str(src).endswith(".tmp"):
            if len(renamed) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            renamed.append(os.path.relpath(os.path.abspath(dst), work))
            event(f"rename {renamed[-1]}")
        return replace(src, dst, *args, **kwargs)
    os.replace = replace_output
    t0 = time.monotonic()
    event("start")
    result = importlib.import_module(module).main(argv)
    event(f"end {time.monotonic() - t0}")
    event(f"result {json.dumps(result, sort_keys=True)}")


# The fork server: imports, then per request (a JSON line on stdin) forks a stage process, prints its
# pid, waits for it and prints its exit code (negative: the signal that ended it).
SERVER = """
import importlib, json, os, sys, traceback
for name in sys.argv[1:]:
    importlib.import_module(name)
from tests.test_stage_runs import _stage_process
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _stage_process(**json.loads(line))
            code = 0
        except SystemExit as e:     # as Python exits on it; a stage's InputError: SystemExit("<stage>: <message>")
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Stages:
    """Runs stage commands, one at a time, in processes forked from one that imported the stage
    modules and what they import lazily (MLflow's exceptions, torch-fidelity, matplotlib) once and
    ran nothing else (no torch thread pool to lose in the fork)."""

    PRELOAD = ["mlflow.exceptions", "torch_fidelity", "matplotlib.pyplot", "pandas"]

    def __init__(self, logs: Path):
        import subprocess
        import sys
        logs.mkdir(parents=True, exist_ok=True)
        self.logs, self.n = logs, 0
        with open(logs / "server.log", "w") as err:     # it imports on the other core while this process goes on
            self.server = subprocess.Popen(
                [sys.executable, "-c", SERVER, *(f"pipeline.stages.{s}" for s in HERE), *self.PRELOAD],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, bufsize=0)     # unbuffered: select sees every line

    def _line(self, timeout: float = 300) -> int:
        import select
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        line = self.server.stdout.readline() if ready else b""
        assert line, f"fork server: no answer:\n{(self.logs / 'server.log').read_text()[-3000:]}"
        return int(line)

    def stop(self) -> None:
        """End the server (idle, ~0.9 GB of imports) without its seconds of interpreter shutdown."""
        self.server.stdin.close()
        self.server.kill()
        self.server.wait(timeout=60)

    def start(self, work: Path, name: str, kill_at: int | None = None) -> tuple[int, Path, Path]:
        """(pid, log, events) of a new run of ``name`` in ``work``."""
        module, argv, _ = stage_command(name, yaml.safe_load((work / "params.yaml").read_text()))
        self.n += 1
        log, events = self.logs / f"{self.n:02d}-{name}.log", self.logs / f"{self.n:02d}-{name}.events"
        events.touch()
        self.server.stdin.write(json.dumps({"work": str(work), "module": module, "argv": argv, "log": str(log),
                                            "events": str(events), "kill_at": kill_at}).encode() + b"\n")
        return self._line(), log, events

    def _result(self, log: Path, events: Path) -> dict:
        """The exit code, the outputs renamed into place (in order), the seconds of ``main`` and what it
        returned (None if it did not end), and the log of the run that just ended."""
        code = self._line()
        lines = [e.partition(" ") for e in events.read_text().splitlines()]
        end = [float(v) for k, _, v in lines if k == "end"]
        result = [json.loads(v) for k, _, v in lines if k == "result"]
        return {"code": code, "renamed": [v for k, _, v in lines if k == "rename"],
                "seconds": end[0] if end else None, "result": result[0] if result else None,
                "log": log.read_text()[-3000:] if log.is_file() else ""}

    def run(self, work: Path, name: str, kill_at: int | None = None) -> dict:
        """One run of ``name`` to its end (see ``_result``)."""
        _, log, events = self.start(work, name, kill_at)
        return self._result(log, events)

    def kill_at_random_time(self, work: Path, name: str, seconds: float, rng: random.Random) -> float:
        """SIGKILL a run of ``name`` a random 0..``seconds`` after its ``main`` started; returns the delay.
        A run that ends first is run again, the window shrunk to the seconds that run took."""
        for _ in range(5):
            delay = rng.uniform(0, seconds)
            pid, log, events = self.start(work, name)
            pidfd = os.pidfd_open(pid)      # the process itself: its pid may be reused once the server reaps it
            deadline = time.monotonic() + 60
            while not events.read_text() and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):     # it ended first
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            run = self._result(log, events)
            if run["code"] == -signal.SIGKILL:
                return delay
            assert run["code"] == 0 and run["seconds"] is not None, run["log"]
            seconds = min(seconds, run["seconds"])
        raise AssertionError(f"{name} ended before each of 5 kills")


# ---- tiny inputs and the uninterrupted runs -------------------------------------------------------
def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by path."""
    return {str(f.relative_to(root)): sha256_file(f) for f in sorted(root.rglob("*")) if f.is_file()}


def _inputs(work: Path, tmp: Path) -> None:
    """params.yaml, data/images, models/tokenizer.pt, models/var-dD.pt and train_var's metrics."""
    import torch

    from pipeline.images import DataParams
    from pipeline.stages import data
    from pipeline.tokenizer.checkpoint import save_tokenizer
    from pipeline.training.checkpoint import save_var
    from tests.conftest import randomize_
    from tests.helpers import write_image_folder
    from tests.test_fit import write_runs
    from varcore import VAR, VARConfig, VQVAE, VQVAEConfig
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for sec, val in TINY.items():
        params[sec] = {**params[sec], **val}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".dvcignore", work / ".dvcignore")
    root = write_image_folder(tmp / "imgs", classes=3, per_class=20, size=16)
    data.run(DataParams(source="image_folder", root=str(root), image_size=16, val_fraction=0.5),
             data.Paths(work / "data" / "images", tmp / "data.json"))
    vq_cfg = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, Cvae=8, vocab_size=64,
                         patch_nums=(1, 2, 3, 4))
    torch.manual_seed(0)
    save_tokenizer(work / "models" / "tokenizer.pt", VQVAE(vq_cfg))
    tok_sha = sha256_file(work / "models" / "tokenizer.pt")
    runs = write_runs(tmp / "train", DEPTHS, evals=False)
    shutil.copytree(runs.train, work / "metrics" / "train")
    (work / "runs" / "train").mkdir(parents=True)
    for d in DEPTHS:
        var = randomize_(VAR(VARConfig(depth=d, vocab_size=64, Cvae=8, patch_nums=vq_cfg.patch_nums, num_classes=3)))
        save_var(work / "models" / f"var-d{d}.pt", var, ["class0", "class1", "class2"], {"tokenizer_sha256": tok_sha})
        record = json.loads((runs.train_records / f"d{d}.json").read_text())
        record["model_sha256"] = sha256_file(work / "models" / f"var-d{d}.pt")    # what fit checks evaluate@D against
        (work / "runs" / "train" / f"d{d}.json").write_text(json.dumps(record))


ORDER = ("check_params", "train_classifier", "evaluate_reference", *(f"evaluate@{d}" for d in DEPTHS), "zeroshot",
         "fit", "report")      # dvc.yaml's


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each stage here run once, uninterrupted, in dvc.yaml's order: (Stages, the folder, per stage
    its declared outputs, their files' sha256, the seconds of its ``main`` and the outputs it renamed
    into place)."""
    tmp = tmp_path_factory.mktemp("stage_runs")
    work = tmp / "ref"
    work.mkdir()
    stages = Stages(tmp / "logs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VARSCALE_TRACKING", "off")     # the data stage, called here, logs nothing
        _inputs(work, tmp)
    params = yaml.safe_load((work / "params.yaml").read_text())
    runs = {}
    for name in ORDER:
        run = stages.run(work, name)
        assert run["code"] == 0, f"{name}:\n{run['log']}"
        outs = stage_command(name, params)[2]
        run["files"] = {k: v for k, v in tree(work).items() if any(k == o or k.startswith(o + "/") for o in outs)}
        runs[name] = {**run, "outs": outs}
    yield stages, work, runs
    stages.stop()


def test_every_stage_has_a_kill_test_and_writes_its_outputs_by_rename(reference):
    """Every stage of dvc.yaml is killed here or in test_dvc_pipeline.py / test_train_ray.py, and each
    stage here writes each of its output files by renaming a whole temp file onto it
    (``pipeline.files.atomic_path``): a reader sees the old file or the new one, never a part."""
    _, _, runs = reference
    assert set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == set(ELSEWHERE) | set(HERE)
    for name, run in runs.items():
        assert run["files"] and sorted(run["renamed"]) == sorted(run["files"]), name


# ---- what evaluate and zeroshot record ----------------------------------------------------------
def test_evaluate_records_settings_seeds_and_the_feature_network(reference):
    """evaluate@1 of a tiny model: per-seed numbers, their mean, FID's spread, the settings, the
    feature network's hash, a picture with one row per class; `main` returns (to MLflow) the metrics
    file. The same seeds give the same bytes again: the rerun of test_killed_stage_loses_nothing."""
    _, work, runs = reference
    m = json.loads((work / "metrics" / "eval" / "d1.json").read_text())
    assert runs["evaluate@1"]["result"] == m
    assert set(m) == {"depth", "fid", "fid_spread", "is_mean", "kid_mean", "precision", "recall"}  # dvc metrics show
    r = json.loads((work / "runs" / "eval" / "d1.json").read_text())
    assert [s["seed"] for s in r["per_seed"]] == [0, 1] and r["samples_per_seed"] == 18
    assert m["fid"] == pytest.approx((r["per_seed"][0]["fid"] + r["per_seed"][1]["fid"]) / 2)
    assert m["fid_spread"] == pytest.approx(abs(r["per_seed"][0]["fid"] - r["per_seed"][1]["fid"]))
    assert r["sampling"] == {"cfg": 1.5, "top_k": 20, "top_p": 0.9, "engine": "auto"}
    assert r["feature_network"]["name"] == "classifier" and len(r["feature_network"]["sha256"]) == 64
    assert 1.0 <= m["is_mean"] <= 3.0 + 1e-6    # IS is bounded by the class count
    from PIL import Image
    with Image.open(work / "metrics" / "eval" / "samples-d1.png") as im:
        assert im.size == (4 * 16, 3 * 16) and im.info["varscale.depth"] == "1"


def test_zeroshot_writes_the_table_record_and_picture(reference):
    """The zeroshot stage: the original is exact in the hole, VAR's in-painting is not; every method
    has its FID; the record's counts and hole share; the picture's rows; too few val images named.
    The same seed gives the same bytes again: the rerun of test_killed_stage_loses_nothing."""
    from pipeline.errors import InputError
    from pipeline.evaluation.config import EvaluateParams, ZeroShotParams
    from pipeline.evaluation.inpainting import METHODS
    from pipeline.stage import parse_paths
    from pipeline.stages import zeroshot
    _, work, runs = reference
    m = json.loads((work / "metrics" / "zeroshot.json").read_text())
    assert runs["zeroshot"]["result"] == m
    assert m["original/mse_hole"] == 0.0 and m["var_inpaint/mse_hole"] > 0
    assert {f"{k}/fid" for k in METHODS} <= set(m)
    r = json.loads((work / "runs" / "zeroshot.json").read_text())
    assert r["images"] == 12 and r["reference_images"] == 30 - 12 and r["lpips"] is False
    assert 0.3 < r["hole_fraction"] < 0.5       # centre quarter, bottom half, right half, cycled over 12 images
    from PIL import Image
    with Image.open(work / "metrics" / "zeroshot.png") as im:
        assert im.size == (4 * 16, 7 * 16) and im.info["varscale.rows"].startswith("original | masked")
    _, argv, _ = stage_command("zeroshot", yaml.safe_load((work / "params.yaml").read_text()))
    _, paths = parse_paths(zeroshot.Paths, argv, "zeroshot")
    bad = zeroshot.ZeroShotConfig(ZeroShotParams(depth=2, images=30), EvaluateParams())
    with pytest.raises(InputError, match="too few for zeroshot.images=30"):
        zeroshot.run(bad, zeroshot.Paths(**{k: work / v for k, v in vars(paths).items()}))


# ---- the kills ------------------------------------------------------------------------------------
def _strays(work: Path, ref: Path) -> dict[str, bool]:
    """Files in ``work`` that the uninterrupted run does not have: whether DVC ignores each (.dvcignore)."""
    from dvc.fs import LocalFileSystem
    from dvc.ignore import DvcIgnoreFilter
    ignore = DvcIgnoreFilter(LocalFileSystem(), str(work))
    return {k: ignore.is_ignored_file(str(work / k)) for k in sorted(set(tree(work)) - set(tree(ref)))}


def _assert_old_or_new(work: Path, old: dict[str, str], new: dict[str, str], when: str) -> None:
    """Each output file is whole: its old version or the uninterrupted run's."""
    now = {k: sha256_file(work / k) if (work / k).is_file() else None for k in new}
    assert {k: v for k, v in now.items() if v not in (old[k], new[k])} == {}, when


@pytest.mark.parametrize("name", [n for n in ORDER if n.partition("@")[2] in ("", str(EVAL_DEPTH))])
def test_killed_stage_loses_nothing(reference, name, tmp_path):
    """kill -9 of the stage a random time into its run, then again just before a random one of its
    output renames (the worst moment: a whole temp file beside the old output); after each kill
    every output is its old version or the new one, whole. The rerun as `dvc repro` runs it (the
    declared outputs deleted first) ends with the uninterrupted run's outputs byte for byte, leaves
    everything else as it was, and what the kills left behind are temp files DVC ignores."""
    stages, ref, runs = reference
    want = runs[name]["files"]
    work = tmp_path / "work"
    shutil.copytree(ref, work)
    for k in want:        # an earlier run's outputs, as a run by hand finds them (dvc repro deletes them)
        (work / k).write_bytes(f"old {k}\n".encode())
    old = {k: sha256_file(work / k) for k in want}
    rng = random.Random(name)
    delay = stages.kill_at_random_time(work, name, runs[name]["seconds"], rng)
    _assert_old_or_new(work, old, want, f"killed {delay:.3f} s into main")
    k = rng.randrange(len(runs[name]["renamed"]))
    killed = stages.run(work, name, kill_at=k)
    assert killed["code"] == -signal.SIGKILL and killed["renamed"] == runs[name]["renamed"][:k], killed["log"]
    _assert_old_or_new(work, old, want, f"killed before renaming {runs[name]['renamed'][k]}")
    stray = _strays(work, ref)
    assert stray and all(stray.values()), stray      # at least the k-th output's temp file, which DVC ignores

    for out in runs[name]["outs"]:        # the rerun: dvc repro deletes the declared outputs, runs the command
        shutil.rmtree(work / out) if (work / out).is_dir() else (work / out).unlink(missing_ok=True)
    rerun = stages.run(work, name)
    assert rerun["code"] == 0, rerun["log"]
    assert {k: v for k, v in tree(work).items() if k not in stray} == tree(ref)
    assert set(_strays(work, ref)) <= set(stray)
