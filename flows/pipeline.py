"""The whole pipeline as one Prefect flow: `dvc repro`, so that DVC decides what is stale, then
optionally `dvc push` of data and checkpoints to the DVC remote.

    python -m flows.pipeline            run it once (the same as `dvc repro`, as a Prefect flow run)
    python -m flows.pipeline --push     and push to the remote afterwards
    python -m flows.schedule            serve it on params.yaml's schedule (see flows/schedule.py)

Each stage DVC runs is a flow run of its own (flows/<stage>.py), beside this one in the Prefect UI. Where
no MLflow store is configured, the stages log to the project's through one `mlflow server` for the run
(flows/server.py), as under scripts/pipeline.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import stage_logger
from flows.server import client_env, serving, unconfigured
from llm.config import load_params


@task(cache_policy=NO_CACHE, task_run_name="dvc {args[0]}")
def dvc(args: list[str], repo: str, servers: dict[str, str] | None = None) -> str:
    """Run a dvc command in `repo` with this interpreter's environment first on PATH (the stages run
    `python -m flows.<stage>`) and `servers`' settings (flows/server.py); fail with its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", **(servers or {})}
    run = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    output = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {repo} (exit {run.returncode}):\n{output[-4000:]}")
    return output


@flow(name="pipeline")
def pipeline(repo: str = ".", push: bool | None = None) -> list[str]:
    """Reproduce the stale stages; returns the names of the stages that ran."""
    repo = str(Path(repo).resolve())
    push = load_params(Path(repo) / "params.yaml").schedule.push if push is None else push
    # The stages log to the project's MLflow store through one server for the run, as under scripts/pipeline;
    # Prefect's is the one this flow runs against.
    with serving(unconfigured(os.environ, repo, prefect=False)) as servers:
        output = dvc(["repro"], repo, client_env(servers))
    ran = re.findall(r"Running stage '([^']+)'", output)
    stage_logger().info("dvc repro ran %s", ", ".join(ran) if ran else "nothing: every stage was up to date")
    if push:
        stage_logger().info(dvc(["push"], repo).strip().splitlines()[-1])
    return ran


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--push", action=argparse.BooleanOptionalAction, default=None,
                        help="push to the DVC remote afterwards (default: params.yaml's schedule.push)")
    pipeline(push=parser.parse_args().push)
