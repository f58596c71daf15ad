"""The pipeline served on its cron schedule by a real local Prefect server: registered and run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.server import free_port
from tests.conftest import ROOT
from tests.project import git

CRON = "*/5 * * * *"


def wait_until(check, what: str, timeout_s: float = 120, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process ended early:\n{process.stdout.read()}")
        try:
            result = check()
            if result:
                return result
        except Exception:
            pass
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.5)


def tiny_dvc_project(repo: Path) -> Path:
    repo.mkdir()
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text(f"schedule:\n  cron: '{CRON}'\n  deployment: test-nightly\n")
    # The stage writes the MLflow store it was given: the pipeline's server for the project's store.
    (repo / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: python -c \"import os; open('out.txt', 'w')"
                                   ".write(os.environ['MLFLOW_TRACKING_URI'])\"\n    outs: [out.txt]\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a tiny pipeline")
    return repo


@pytest.mark.slow
def test_the_schedule_is_served_with_the_params_cron_and_a_run_completes(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = tiny_dvc_project(tmp_path / "repo")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI")  # the default: the project's own store, mlflow.db at its root
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = None
    try:
        wait_until(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200,
                   "the Prefect server answers", process=server)
        served = subprocess.Popen([sys.executable, "-m", "flows.schedule"], cwd=repo, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deployment = wait_until(lambda: client.read_deployment_by_name("pipeline/test-nightly"),
                                        "the deployment is registered", process=served)
            assert [s.schedule.cron for s in deployment.schedules] == [CRON]
            assert deployment.parameters == {"repo": str(repo.resolve()), "push": False}
            run = run_deployment("pipeline/test-nightly", timeout=180)
        assert run.state.is_completed(), run.state
        assert (repo / "out.txt").read_text().startswith("http://127.0.0.1:")  # dvc repro ran the stage
        assert (repo / "mlflow.db").is_file()  # the server's store: the project's own
    finally:
        for process in (served, server):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
