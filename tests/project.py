"""Run the project as a user would: a copy in a fresh git repository, real `dvc` commands in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, SHARED_DATA

# Outputs of a local run that a fresh checkout would not have.
_LOCAL_STATE = re.compile(r"^(dvc\.lock|metrics/|data/(raw|shards|checkpoints|eval)/)")


def make_repo(dest: Path) -> Path:
    """Copy the project's files (tracked, and untracked but not ignored) into a new git repo at `dest`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if _LOCAL_STATE.match(name) or not (ROOT / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "project under test")
    return dest


def git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    return subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def stage_env(prefect_api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for stages run as subprocesses: the venv first, offline mirrors, quiet tools."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.setdefault("LLM_MIRROR_DIR", str(SHARED_DATA))
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if prefect_api_url:  # reuse the test session's Prefect API instead of one temporary server per stage
        env["PREFECT_API_URL"] = prefect_api_url
    env.update(extra)
    return env


def dvc(repo: Path, *args: str, env: dict[str, str], timeout_s: float = 900) -> str:
    """Run `dvc ARGS` in `repo`; fail with its whole output if it fails."""
    run = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
    if run.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return run.stdout + run.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)
