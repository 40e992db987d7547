"""The training state in a Ray Train checkpoint, and resuming from the newest good one.

A checkpoint directory ``step-NNNNNNNNN`` holds ``state.pt`` (model, optimiser, :class:`TrainState`)
and ``state.pt.sha256``. Resuming tries the newest checkpoint first and, if it cannot be read or
its bytes do not match their digest (a truncated write, a flipped bit), warns with its path and
falls back to the one before it: a corrupt latest checkpoint costs the steps since the previous
one, never the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import OutputError
from ..files import DISK_FULL, disk_full_error, sha256_bytes, sha256_file, write_bytes

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
DIGEST_SUFFIX = ".sha256"


@dataclass
class TrainState:
    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)         # validation points
    train_curve: list[dict[str, float]] = field(default_factory=list)   # train-loss points
    loss_sum: float = 0.0          # local train-loss sum since the last train-curve point
    loss_count: int = 0
    train_seconds: float = 0.0     # time in the training loop, summed over resumed runs
    plan: dict[str, Any] = field(default_factory=dict)                  # the resolved execution plan


def save_state(directory: Path, model: nn.Module, optim: torch.optim.Optimizer, state: TrainState) -> None:
    """Full (unsharded) state and its sha256; every rank must call this (FSDP gathers), only rank 0
    gets data and writes."""
    import io
    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for g in osd.get("param_groups", []):   # a CUDA-graph step's settings; the resumed step sets its own
        if torch.is_tensor(g.get("lr")):
            g["lr"] = float(g["lr"])
        g["capturable"] = False
    if msd:
        buf = io.BytesIO()
        torch.save({"model": msd, "optim": osd, "state": state.__dict__}, buf)
        path = directory / STATE_FILE
        try:
            write_bytes(path, buf.getvalue())
            write_bytes(path.with_name(STATE_FILE + DIGEST_SUFFIX), (sha256_bytes(buf.getvalue()) + "\n").encode())
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise disk_full_error(path, len(buf.getvalue())) from e


SPACE_MARGIN = 1 << 20   # bytes of slack beyond a checkpoint's own size


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def check_space(storage: Path, needed: int, what: str) -> None:
    """Refuse, before Ray copies anything, a checkpoint that the storage cannot hold: an
    :class:`OutputError` naming the folder, the size needed and the space free. Ray would otherwise
    fail inside its own copy, with a half-written checkpoint folder beside the good ones."""
    import shutil
    probe = next((p for p in (storage, *storage.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise OutputError(f"{storage}: disk too full to write {what} (needs {(needed + SPACE_MARGIN) / 2**20:.1f} "
                          f"MiB, {free / 2**20:.1f} MiB free); the checkpoints already there are unchanged: free "
                          f"space and rerun (training resumes from the last of them)")


def read_state_file(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's payload: ``model`` (state dict), ``optim``, ``state`` (step, curves). Data only
    (``weights_only=True``); a digest mismatch or unreadable file raises ``ValueError`` naming it."""
    path = Path(directory) / STATE_FILE
    digest = path.with_name(STATE_FILE + DIGEST_SUFFIX)
    if digest.is_file() and sha256_file(path) != digest.read_text().strip():
        raise ValueError(f"{path}: sha256 does not match {digest.name} (corrupt checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated zip, code-carrying pickle, missing file
        raise ValueError(f"{path}: cannot read the training state: {str(e).splitlines()[0]}") from e


def load_state(directory: Path, model: nn.Module, optim: torch.optim.Optimizer) -> TrainState:
    ckpt = read_state_file(directory)
    set_state_dict(model, optim, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optim"],
                   options=StateDictOptions(full_state_dict=True))
    return TrainState(**ckpt["state"])


def step_of(name: str) -> int:
    """The step of a checkpoint folder ``step-NNNNNNNNN`` (or ``step-NNNNNNNNN-<suffix>``)."""
    return int(name[5:14])


def newest_first(latest) -> Iterator[Any]:
    """``latest`` (a ``ray.train.Checkpoint``), then the run's other ``step-*`` checkpoints up to its
    step, newest first."""
    import pyarrow.fs as pafs
    import ray.train
    yield latest
    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    others = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                     and i.base_name.startswith("step-") and i.base_name != name
                     and step_of(i.base_name) <= step_of(name)), key=lambda n: (step_of(n), n), reverse=True)
    for n in others:
        yield ray.train.Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem)


def resume(latest, model: nn.Module, optim: torch.optim.Optimizer, rank: int = 0) -> tuple[TrainState, str]:
    """The state of the newest readable checkpoint (loaded into ``model`` and ``optim``), or a fresh
    state when there is none; unreadable ones are skipped with a warning naming them. Also a suffix
    for the names of the checkpoints to come: empty, or when one was skipped a tag of it (the steps
    after the one resumed from are checkpointed again, and Ray still tracks the skipped folders, so
    the new ones must not take their names; every rank computes the same tag)."""
    if latest is None:
        return TrainState(), ""
    tag = "-" + sha256_bytes(latest.path.encode())[:8]
    for i, ckpt in enumerate(newest_first(latest)):
        try:
            with ckpt.as_directory() as d:
                state = load_state(Path(d), model, optim)
        except ValueError as e:
            log.warning("rank %d: skipping checkpoint %s: %s", rank, ckpt.path, e)
            continue
        log.info("rank %d: resumed from %s at step %d", rank, ckpt.path, state.step)
        return state, tag if i > 0 else ""
    log.warning("rank %d: no readable checkpoint beside %s; training starts over", rank, latest.path)
    return TrainState(), tag
