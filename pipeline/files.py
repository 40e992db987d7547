"""Atomic file output and checksums: every stage output is written to a temp path and renamed.

A write that fails (disk full, a killed process) leaves the previous file at the path untouched
and no partial file under its name; a full disk is reported as :class:`OutputError` naming the
file, the bytes it needs and the space left.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, OutputError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full_error(path: Path, needed: int | None, written: int = 0) -> OutputError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    need = f"needs {_mb(needed)}" if needed else f"needs more than the {_mb(written)} written"
    return OutputError(f"{path}: disk full while writing it ({need}, {_mb(free)} free in {path.parent}); "
                       f"the previous {path.name}, if any, is unchanged: free space and rerun")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        written = tmp_path.stat().st_size if tmp_path.exists() else 0
        raise disk_full_error(path, getattr(e, "varscale_needed", None), written) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block, for ``what`` (written
    into the file with the pid); when another process holds it, raise :class:`OutputError` at once
    naming the file, that process and what it runs. The lock goes with the process, even on kill -9."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid, _, running = f.read().strip().partition(" ")
            raise OutputError(f"{path}: locked by process {pid or 'unknown'} ({running or 'unknown'}); wait for it to "
                              "end (or stop it) and rerun") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {what}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_bytes(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)``; a full disk raises ``OSError`` carrying the size needed."""
    try:
        path.write_bytes(data)
    except OSError as e:
        if e.errno in DISK_FULL:
            e.varscale_needed = len(data)
        raise


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically with bytes that depend only on ``obj``: torch names the archive
    after the file it writes, so saving straight to a random temp name would change the sha256."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        write_bytes(tmp, buf.getvalue())


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        write_bytes(tmp, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def read_manifest(path: str | Path, stage: str) -> dict[str, Any]:
    """A stage's JSON manifest; absent or unreadable: :class:`ArtifactError` naming it and the stage to rerun."""
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise ArtifactError(f"{path}: {e} (run `dvc repro {stage}`)") from e


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
