"""Atomic, durable file and folder writes, and hashing.

A stage killed at any moment must never leave a file that looks whole but is not: everything is written
under a temporary name in the same folder, fsynced, and renamed into place (a rename within one file
system is atomic), and the folder holding the new name is fsynced too, so that after a power cut the
rename is there or it is not, and the bytes behind it are the ones written. Temporary names start with
`.tmp-` so that readers and cleanup can recognise them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")


def remove_leftovers_of(path: Path) -> None:
    """Delete the temporaries that killed writers of `path` left beside it. Only one process writes a
    given path at a time (each stage holds the lock of its outputs: llm/lock.py), so these are dead."""
    if not path.parent.is_dir():
        return
    ours = re.compile(re.escape(f"{TMP_PREFIX}{path.name}.") + r"[0-9a-f]{8}")  # temporary_sibling's names only
    for leftover in path.parent.glob(f"{TMP_PREFIX}{path.name}.*"):
        if not ours.fullmatch(leftover.name):
            continue  # another writer's (a download's resumable part file)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make the names in folder `path` durable: a rename is only on disk once its folder is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under `folder`, and `folder` itself."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(root)


def replace_durably(src: str | Path, dest: str | Path) -> None:
    """Rename `src` (already fsynced) to `dest` and make the rename itself durable."""
    os.replace(src, dest)
    fsync_dir(Path(dest).parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`, durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers_of(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, durably.

    Everything in the new folder is fsynced before it takes the name. The old folder is moved aside
    before the new one is renamed in, so a crash in between leaves either the old folder or the new one
    under a `.tmp-` name, never a mix of both; the old one is deleted only once the new name is durable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers_of(path)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = temporary_sibling(path) if path.exists() else None
        if old is not None:
            os.replace(path, old)
        replace_durably(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: str | Path) -> None:
    """Delete what killed writers left behind in `folder` (not recursive)."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(f"{TMP_PREFIX}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
