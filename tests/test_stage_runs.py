"""A stage killed where no handler runs (SIGKILL) leaves its MLflow run RUNNING and its Prefect flow run
Running; the next run of the stage ends them, FAILED and Crashed (flows/common.py). Real processes, a real
Prefect server and a real MLflow store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import mlflow

from llm.lock import lock_paths
from tests.conftest import ROOT
from tests.project import stage_env

# A stage as the flows write one: a flow holding the stage's tracked run, which "hang" keeps open.
STAGE = """
import sys, time
from prefect import flow
from flows.common import tracked_run

@flow(name="stage-runs")
def stage(out_dir: str, hang: bool) -> None:
    with tracked_run("pretrain", out_dir=out_dir, experiment="stage-runs", params_file="params.yaml",
                     params_to_log={"hang": hang}):
        print("running", flush=True)
        if hang:
            time.sleep(600)

stage(sys.argv[1], sys.argv[2] == "hang")
"""


def start(out_dir, how: str, env: dict[str, str]) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", STAGE, str(out_dir), how], cwd=out_dir.parent, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "running", process.stderr.read()
    return process


def test_the_next_run_ends_what_a_killed_stage_left_running(tmp_path, prefect_server):
    from prefect import get_client

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = stage_env(prefect_server, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=store)
    out_dir = tmp_path / "checkpoints"
    killed = start(out_dir, "hang", env)
    holder = json.loads(lock_paths(out_dir)[1].read_text())
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(uuid.UUID(holder["prefect_flow_run"])).state.is_running()
        finished = start(out_dir, "finish", env)
        assert finished.wait(timeout=120) == 0, finished.stderr.read()
        crashed = client.read_flow_run(uuid.UUID(holder["prefect_flow_run"])).state
        runs = client.read_flow_runs()
    assert crashed.is_crashed()
    assert crashed.message.startswith("the pretrain stage's process ended without reporting (killed, or its host "
                                      "went down); the run that took its lock over, flow run ")
    rerun = next(r for r in runs if r.id != uuid.UUID(holder["prefect_flow_run"])
                 and r.parameters.get("out_dir") == str(out_dir))
    assert rerun.state.is_completed() and str(rerun.id) in crashed.message

    mlflow_runs = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("stage-runs").experiment_id])
    by_flow_run = {r.data.tags["pipeline.prefect_flow_run"]: r.info.status for r in mlflow_runs}
    assert by_flow_run == {holder["prefect_flow_run"]: "FAILED", str(rerun.id): "FINISHED"}
