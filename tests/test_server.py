"""flows.server: real Prefect and MLflow servers for a command's length, or the configured ones, as
scripts/pipeline runs them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from filelock import FileLock

from flows.server import Server, ServerError, free_port
from tests.conftest import ROOT

# What the command sees: the servers it was given, answering, and an MLflow run it logs with an artifact.
PROBE = """
import os, urllib.request
from llm.tracking import MLflowTracker
for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
    url = os.environ[name]
    urllib.request.urlopen(url + "/health", timeout=5).read()
    print(url)
with MLflowTracker("probe", "served") as tracker:
    tracker.log_metrics({"loss": 1.5}, step=0)
    tracker.log_text("hello", "notes.txt")
raise SystemExit(3)
"""


def run(args: list[str], env: dict[str, str], cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.server", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.slow
def test_a_command_gets_servers_of_its_own_which_stop_with_it_and_leave_the_store_as_without(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store: mlflow.db at the root (the working directory)
    done = run([sys.executable, "-c", PROBE], env, cwd=tmp_path)
    assert done.returncode == 3, done.stderr  # the command's own exit code
    prefect_url, mlflow_url = done.stdout.split()
    assert prefect_url.startswith("http://127.0.0.1:") and prefect_url.endswith("/api")
    assert mlflow_url.startswith("http://127.0.0.1:")
    assert f"the Prefect server for this run at {prefect_url.removesuffix('/api')}" in done.stderr
    assert f"the MLflow server for this run at {mlflow_url}" in done.stderr
    for url in (prefect_url, mlflow_url):
        with pytest.raises(OSError):  # stopped with the command
            urllib.request.urlopen(f"{url}/health", timeout=2)
    assert (tmp_path / "prefect").is_dir()  # Prefect's runs stay in the Prefect home
    # The run is in the project's SQLite file, its artifacts in mlartifacts/ beside it: as a stage that opens
    # the file itself leaves them, so either way of running the pipeline gives one store.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("probe")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    (served,) = client.search_runs([experiment.experiment_id])
    assert served.info.run_name == "served" and served.data.metrics == {"loss": 1.5}
    assert (tmp_path / "mlartifacts" / served.info.run_id / "artifacts" / "notes.txt").read_text() == "hello"


@pytest.mark.slow
def test_configured_servers_are_used_as_they_are(prefect_server):
    env = {**os.environ, "PREFECT_API_URL": prefect_server}  # and the test session's MLFLOW_TRACKING_URI
    done = run([sys.executable, "-c", "import os; print(os.environ['PREFECT_API_URL'], "
                "os.environ['MLFLOW_TRACKING_URI'], os.environ.get('LLM_ARTIFACT_LOCATION'))"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [prefect_server, os.environ["MLFLOW_TRACKING_URI"], "None"]
    assert "for this run" not in done.stderr


# A runner that starts a server as flows.server does (a real HTTP server, in a session of its own), then waits.
RUNNER = """
import sys, time
from flows.server import Server
url = f"http://127.0.0.1:{sys.argv[1]}/"
server = Server.start("a file server", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", sys.argv[1]],
                      health_url=url, client_env={}, instead="use another", env={})
server.wait_until_healthy(60)
print(url, flush=True)
time.sleep(600)
"""


def test_a_server_stops_when_its_runner_and_the_runners_group_are_killed():
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(free_port())], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        url = runner.stdout.readline().strip()
        urllib.request.urlopen(url, timeout=5).read()
        os.killpg(runner.pid, signal.SIGKILL)  # as a CI job's kill of its process group: no cleanup runs
        runner.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=1).read()
            except OSError:
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"the server at {url} outlived its killed runner by 30 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
        runner.stdout.close()


def lock_is_free(path) -> bool:
    """Whether another process can take the lock now."""
    probe = ("import sys; from filelock import FileLock, Timeout\n"
             "try:\n    FileLock(sys.argv[1], timeout=0).acquire()\nexcept Timeout:\n    sys.exit(1)")
    return subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0


def test_a_server_holds_its_lock_until_it_answers(tmp_path):
    port = free_port()
    lock = tmp_path / "store.lock"
    server = Server.start("a file server", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                          health_url=f"http://127.0.0.1:{port}/", client_env={}, instead="use another",
                          env=os.environ, lock=FileLock(lock))
    try:
        assert not lock_is_free(lock)  # a store it creates is not opened by anyone else meanwhile
        server.wait_until_healthy(timeout_s=60)
        assert lock_is_free(lock)
    finally:
        server.stop()
    assert server.process.returncode is not None


def test_a_server_that_exits_before_answering_is_an_error_that_shows_its_output(tmp_path):
    lock = tmp_path / "store.lock"
    server = Server.start("the MLflow server", [sys.executable, "-c", "print('no such store'); raise SystemExit(4)"],
                          health_url=f"http://127.0.0.1:{free_port()}/health", client_env={},
                          instead="set MLFLOW_TRACKING_URI instead", env=os.environ, lock=FileLock(lock))
    try:
        with pytest.raises(ServerError, match=r"the MLflow server exited \(4\) before it answered:\nno such store"):
            server.wait_until_healthy(timeout_s=60)
    finally:
        server.stop()
    assert lock_is_free(lock)


def test_no_command_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "flows.server"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "python -m flows.server dvc repro" in done.stderr


def test_a_server_that_does_not_answer_in_time_is_an_error_that_names_the_fix():
    server = Server.start("the Prefect server", [sys.executable, "-c", "import time; time.sleep(60)"],
                          health_url=f"http://127.0.0.1:{free_port()}/api/health", client_env={},
                          instead="set PREFECT_API_URL to a running Prefect server instead", env=os.environ)
    try:
        with pytest.raises(ServerError, match=r"the Prefect server did not answer http://127\.0\.0\.1:\d+/api/health "
                                              r"in 1 s; set PREFECT_API_URL to a running Prefect server instead"):
            server.wait_until_healthy(timeout_s=1)
    finally:
        server.stop()
    assert server.process.returncode == -15  # stopped by its SIGTERM, not left running


def test_a_store_locked_by_another_process_is_an_error_that_names_the_lock(tmp_path):
    lock = tmp_path / "mlflow.db.lock"
    with FileLock(lock):  # as a stage creating the store holds it
        with pytest.raises(ServerError, match=rf"the MLflow server did not start: another process held "
                                              rf"{re.escape(str(lock))} for 1 s; set MLFLOW_TRACKING_URI"):
            Server.start("the MLflow server", [sys.executable, "-c", "pass"], health_url="http://127.0.0.1:1/",
                         client_env={}, instead="set MLFLOW_TRACKING_URI to another store instead", env=os.environ,
                         lock=FileLock(lock, timeout=1))
