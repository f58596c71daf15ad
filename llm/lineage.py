"""Lineage: which code, settings and data made a run, as the same tags and flat params on every stage's run,
and its inputs (DataInput) as MLflow datasets: the raw sources, the token shards, the splits, the
checkpoints, each with the sha256 the pipeline computes of it (llm.tracking logs them).

    tracker.log_inputs([*source_inputs("data/raw", "instructions"), shards_input("data/shards", "train"),
                        *split_inputs("data/checkpoints/finetune/split.json", "instructions"),
                        checkpoint_input("data/checkpoints/pretrain", "start")])
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.files import read_json, sha256_file


def _git(*args: str, cwd: Path) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version(cwd: str | Path | None = None) -> tuple[str | None, bool | None]:
    """The git commit checked out at `cwd` (the working directory by default), and whether tracked files
    differ from it; (None, None) outside a git repository or without git."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    if commit is None:
        return None, None
    return commit, bool(_git("status", "--porcelain", "--untracked-files=no", cwd=cwd))


def lineage_tags(stage: str, params_file: str | Path = "params.yaml",
                 data_manifest: str | Path = "data/raw/manifest.json") -> dict[str, str]:
    """Which code, settings and data made a run: commit, params hash, data hash, DVC stage."""
    tags = {"pipeline.stage": stage}
    commit, dirty = code_version()
    if commit:
        tags["mlflow.source.git.commit"] = tags["pipeline.commit"] = commit
        tags["pipeline.dirty"] = str(dirty)
    for key, path in (("pipeline.params_sha256", params_file), ("pipeline.data_sha256", data_manifest)):
        if Path(path).is_file():
            tags[key] = sha256_file(path)
    for env, key in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.experiment")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"pretrain": {"lr": 3e-4}} -> {"pretrain.lr": "0.0003"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


# ---------------------------------------------------------------------------------------------------
# A run's inputs


@dataclass(frozen=True)
class DataInput:
    """One input of a stage's run, as MLflow's Datasets panel shows it."""

    name: str
    source: str  # where it is: the URL it was downloaded from, or a local path
    sha256: str  # of its bytes (a file), or of its manifest (shards), or of its records (a split)
    context: str  # how the run uses it: source, train, eval, start, evaluated, exported
    registered: tuple[str, str] | None = None  # a checkpoint's (registered model, version), if it has one


def source_inputs(raw_dir: str | Path, role: str | None = None, names: Sequence[str] | None = None,
                  context: str = "source") -> list[DataInput]:
    """The downloaded sources of `role` (None: every role; `names`: those only), by URL and sha256 from
    the download stage's manifest."""
    path = Path(raw_dir) / (role or "") / "manifest.json"
    entries = read_json(path)["sources"] if path.is_file() else []
    return [DataInput(e["name"], e["url"], e["sha256"], context) for e in entries
            if names is None or e["name"] in names]


def shards_input(shards_dir: str | Path, context: str) -> DataInput:
    """The token shards, by the sha256 of their manifest (which holds each source's and shard's figures)."""
    manifest = Path(shards_dir) / "manifest.json"
    return DataInput("shards", str(Path(shards_dir)), sha256_file(manifest), context)


def split_inputs(split_file: str | Path, data: str,
                 splits: Sequence[str] = ("train", "val", "test")) -> list[DataInput]:
    """Each split of a stage's `split.json` as a dataset `<data>/<split>`, by the sha256 of its records."""
    split = read_json(split_file)
    return [DataInput(f"{data}/{name}", str(Path(split_file)), _records_sha256(split[name]), name)
            for name in splits]


def _records_sha256(records: Any) -> str:
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def checkpoint_input(folder: str | Path, context: str, sha256: str | None = None) -> DataInput | None:
    """A checkpoint folder by its weights' sha256 (`sha256`, where the caller has it already), and its
    registered version where its stage recorded one; None for a folder without weights."""
    from llm.checkpoint import MODEL_FILE, read_registration  # not at import: the data stages need no torch

    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        return None
    recorded = read_registration(folder)
    registered = (recorded["registered_model"], recorded["version"]) if recorded else None
    return DataInput(f"checkpoint {folder.name}", str(folder), sha256 or sha256_file(folder / MODEL_FILE), context,
                     registered)
