"""Tracking without MLflow: each stage's run as a journal file, replayed into a store later.

A GPU node that cannot reach the team's MLflow server (or has no MLflow installed) runs the
stages with ``VARSCALE_TRACKING=journal:<dir>``. Every stage run then writes one JSON-lines file
``<dir>/<run name>-<utc time>-<random id>.jsonl`` (start with tags and params, metrics with their
steps and times, tags, the end and its status) and copies its artifacts beside it
(``<dir>/<same stem>/``). Each line is appended and flushed as it happens, so a killed stage
leaves a journal that replays up to its last line (its run is marked ``KILLED``).

``python -m pipeline.tracking_journal <dir>`` replays every journal into the configured store
(:mod:`pipeline.tracking`): one child run per journal, under the parent run of the commit and
params hash the journal recorded, with the original step numbers and timestamps, so GPU runs
compare beside CPU runs in the MLflow UI. A journal that was replayed once is skipped
(tag ``varscale.journal``), so replaying a folder twice adds nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

log = logging.getLogger(__name__)
PREFIX = "journal:"


def now_ms() -> int:
    return int(time.time() * 1000)


def journal_dir(mode: str) -> Path | None:
    """The folder of ``journal:<dir>``, None for any other mode."""
    if not mode.startswith(PREFIX):
        return None
    folder = mode[len(PREFIX):]
    if not folder:
        raise InputError("VARSCALE_TRACKING=journal: names no folder (journal:<dir>, e.g. journal:runs/journal)")
    return Path(folder)


@dataclass
class Journal:
    """One stage run's journal: ``path`` (the JSON-lines file) and its artifact folder."""

    path: Path
    artifacts: Path = field(init=False)

    def __post_init__(self) -> None:
        self.artifacts = self.path.with_suffix("")

    @classmethod
    def open(cls, folder: Path, run_name: str, stage: str, tags: dict[str, str], params: dict[str, Any]) -> "Journal":
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        journal = cls(folder / f"{run_name}-{stamp}-{uuid.uuid4().hex[:8]}.jsonl")
        journal.write({"event": "start", "stage": stage, "run_name": run_name, "tags": tags,
                       "params": {k: str(v)[:500] for k, v in params.items()}})
        return journal

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": now_ms()}) + "\n")
            f.flush()

    def metrics(self, scalars: dict[str, float], step: int | None) -> None:
        self.write({"event": "metrics", "metrics": scalars, "step": step})

    def params(self, params: dict[str, str]) -> None:
        self.write({"event": "params", "params": params})

    def tags(self, tags: dict[str, str]) -> None:
        self.write({"event": "tags", "tags": tags})

    def artifact(self, path: str | Path, artifact_path: str | None, parent: bool = False) -> None:
        """A copy of ``path`` beside the journal (the original may change before the replay)."""
        src = Path(path)
        dest = self.artifacts / (artifact_path or "") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        self.write({"event": "artifact", "file": str(dest.relative_to(self.path.parent)),
                    "artifact_path": artifact_path, "parent": parent})

    def end(self, status: str) -> None:
        self.write({"event": "end", "status": status})


# ---- replay -----------------------------------------------------------------------------------
def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's records; a last line cut short by a kill is dropped, any other bad line is an error."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: last line cut short (a killed stage); replaying the %d before it", path, i)
                break
            raise InputError(f"{path}:{i + 1}: not a journal line ({e.msg})") from None
    if not records or records[0].get("event") != "start":
        raise InputError(f"{path}: not a varscale tracking journal (its first line is no 'start' record)")
    return records


def replayed(client, experiment_id: str, journal_id: str) -> bool:
    found = client.search_runs([experiment_id], filter_string=f"tags.`varscale.journal` = '{journal_id}'",
                               max_results=1)
    return bool(found)


def replay_one(client, experiment_id: str, path: Path) -> str | None:
    """One journal as one MLflow child run; returns its run id (None when it was replayed before)."""
    from mlflow.entities import Metric, Param, RunTag

    from .tracking import parent_run_id
    records = read_journal(path)
    start = records[0]
    journal_id = f"{path.parent.name}/{path.name}"
    if replayed(client, experiment_id, journal_id):
        log.info("%s: replayed before, skipped", path)
        return None
    tags = start["tags"]
    parent = parent_run_id(client, experiment_id, commit=tags.get("varscale.git_commit", "unknown"),
                           params_digest=tags.get("varscale.params_hash", "none"))
    run = client.create_run(experiment_id, start_time=start["time"], run_name=start["run_name"],
                            tags={**tags, "mlflow.parentRunId": parent, "varscale.journal": journal_id})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in start["params"].items()])
    status, end_time = "KILLED", records[-1]["time"]
    for r in records[1:]:
        if r["event"] == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, float(v), r["time"], r["step"] or 0)
                                              for k, v in r["metrics"].items()])
        elif r["event"] == "params":
            client.log_batch(run_id, params=[Param(k, v) for k, v in r["params"].items()])
        elif r["event"] == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in r["tags"].items()])
        elif r["event"] == "artifact":
            client.log_artifact(parent if r["parent"] else run_id, str(path.parent / r["file"]), r["artifact_path"])
        elif r["event"] == "end":
            status, end_time = r["status"], r["time"]
    client.set_terminated(run_id, status=status, end_time=end_time)
    log.info("%s -> run %s (%s, %d records)", path, run_id, status, len(records))
    return run_id


def journals(folder: Path) -> Iterator[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: no such journal folder")
    found = sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"{folder}: holds no *.jsonl journal")
    yield from found


def replay(folder: Path) -> list[str]:
    """Every journal of ``folder`` (oldest first) into the configured store; the new run ids."""
    from .tracking import connect, experiment_id
    from .tracking_store import retry_locked
    client = connect()
    exp = retry_locked(experiment_id, client)
    return [run for p in journals(folder) if (run := replay_one(client, exp, p)) is not None]


def main(argv: list[str] | None = None) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description="Replay VARSCALE_TRACKING=journal:<dir> journals into MLflow "
                                             "(MLFLOW_TRACKING_URI, default the checkout's mlflow.db)")
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    try:
        runs = replay(args.folder)
    except InputError as e:
        raise SystemExit(f"tracking_journal: {e}") from None
    log.info("%d run(s) replayed from %s", len(runs), args.folder)
    return runs


if __name__ == "__main__":
    main()
