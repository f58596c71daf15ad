"""One run of a stage at a time: a lock on the stage's output folder that names its holder.

Two runs of one stage at once (two terminals, `python -m flows.pretrain` beside `dvc repro`) would write
the same temporary files and rotate each other's checkpoints. So a stage takes `stage_lock(out_dir)`
first, and a second run fails at once with a message that says who holds it and how to clear it:

    with stage_lock("data/checkpoints/pretrain", "pretrain") as lock:
        ...                         # lock.holder["token"] tags what this run makes (its MLflow run)

The lock is an OS file lock (`filelock`) on `.<name>.lock` beside the folder, so the kernel releases it
when its process dies, even by SIGKILL: a dead holder's lock is taken over by the next run, which is
told what the dead one had recorded (`lock.stale`), its token included, so that it can end what the
dead one left open. The holder's PID, host and start time are in
`.<name>.lock.json` beside it, written atomically once the lock is held and removed on release.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from llm.files import write_json_atomic


class StageLocked(RuntimeError):
    """Another run of the stage holds its output folder."""


@dataclass
class StageLock:
    folder: Path
    lock_file: Path
    holder_file: Path
    holder: dict[str, Any]
    stale: dict[str, Any] | None = None  # what a holder that died without releasing had recorded

    def record(self, **facts: Any) -> None:
        """Add `facts` to the holder file, for whoever takes the lock over should this process die."""
        self.holder.update(facts)
        write_json_atomic(self.holder_file, self.holder)


def lock_paths(folder: str | Path) -> tuple[Path, Path]:
    """The lock file and the holder file of `folder`: hidden siblings, so that they are never part of
    a DVC output folder."""
    folder = Path(folder).absolute()
    return folder.with_name(f".{folder.name}.lock"), folder.with_name(f".{folder.name}.lock.json")


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has not written its details yet"
    command = " ".join(holder.get("command") or [])
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f" ({command})" if command else ""))


@contextlib.contextmanager
def stage_lock(folder: str | Path, stage: str) -> Iterator[StageLock]:
    """Hold the lock of `folder` for the duration of the block, or fail at once if another run holds it."""
    lock_file, holder_file = lock_paths(folder)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StageLocked(
            f"{folder} is in use by another run of the {stage} stage: {describe_holder(_read_holder(holder_file))}. "
            f"Wait for it to finish or stop it. If no such process is running (the folder is on a shared "
            f"file system whose other host went down), delete {lock_file} and rerun") from None
    try:
        stale = _read_holder(holder_file)  # left by a holder that died holding the lock
        holder = {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": sys.argv, "token": uuid.uuid4().hex}
        state = StageLock(Path(folder), lock_file, holder_file, holder, stale)
        state.record()
        yield state
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()
