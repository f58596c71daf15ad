"""A stage killed where no handler runs (SIGKILL) leaves its MLflow run RUNNING and its Prefect flow run
Running; the next run of the stage ends them, FAILED and Crashed (flows/common.py). A stage's flow run sends
Prefect heartbeats only where a server that outlives it can read them. Real processes, a real Prefect
server and a real MLflow store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import mlflow

from flows import RUN_SERVER_ENV
from flows.common import heartbeats_wanted
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


# A stage's process as `python -m flows.<stage>` runs it; it prints its flow run's id. The task's events
# are sent after the flow run's first heartbeat, where it sends one, and by the same client.
HEARTBEAT_STAGE = """
from prefect import flow, runtime, task
from flows.common import run_stage

@task
def step() -> None:
    pass

@flow(name="heartbeats")
def stage() -> str:
    step()
    return str(runtime.flow_run.id)

print(run_stage(stage))
"""


def test_heartbeats_are_sent_only_where_a_server_that_outlives_the_stage_reads_them(prefect_server):
    from prefect import get_client
    from prefect.events.filters import EventFilter
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not heartbeats_wanted()  # no server: the stage's temporary one ends with it
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
            assert heartbeats_wanted()  # the user's choice

    env = stage_env(prefect_server, PYTHONPATH=str(ROOT))
    envs = {"scripts/pipeline's server": {**env, RUN_SERVER_ENV: prefect_server},
            "a server the user runs": env,
            "the user's frequency": {**env, RUN_SERVER_ENV: prefect_server, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}
    stages = {case: subprocess.Popen([sys.executable, "-c", HEARTBEAT_STAGE], env=case_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for case, case_env in envs.items()}
    flow_runs = {}
    for case, process in stages.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        flow_runs[case] = out.split()[-1]

    def sent(flow_run: str) -> set[str]:
        page = client.read_events(EventFilter(any_resource={"id": [f"prefect.flow-run.{flow_run}"]}), limit=50)
        return {event.event for event in page.events}

    expected = {"scripts/pipeline's server": False, "a server the user runs": True, "the user's frequency": True}
    beats = {}
    with get_client(sync_client=True) as client:
        for case, flow_run in flow_runs.items():
            # The server stores events in batches, and not always in the order they were sent: wait for the
            # task's, and where a heartbeat is due for that too (a busy host once stored it later).
            wanted = {"prefect.task-run.Completed"} | ({"prefect.flow-run.heartbeat"} if expected[case] else set())
            deadline = time.monotonic() + 60
            while not wanted <= (events := sent(flow_run)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert "prefect.task-run.Completed" in events, (case, events)
            beats[case] = "prefect.flow-run.heartbeat" in events
    assert beats == expected
