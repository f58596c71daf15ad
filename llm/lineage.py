"""Lineage: which code, settings and data made a run, as the same tags and flat params on every stage's run."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm.files import sha256_file

def _git(*args: str, cwd: Path) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def lineage_tags(stage: str, params_file: str | Path = "params.yaml",
                 data_manifest: str | Path = "data/raw/manifest.json") -> dict[str, str]:
    """Which code, settings and data made a run: commit, params hash, data hash, DVC stage."""
    here = Path.cwd()
    tags = {"pipeline.stage": stage}
    commit = _git("rev-parse", "HEAD", cwd=here)
    if commit:
        tags["mlflow.source.git.commit"] = tags["pipeline.commit"] = commit
        tags["pipeline.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no", cwd=here)))
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
