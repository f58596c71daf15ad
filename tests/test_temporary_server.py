"""A stage killed with SIGKILL leaves no temporary Prefect server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SHARED_DATA


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_stage_takes_its_temporary_server_with_it(tmp_path):
    (tmp_path / "params.yaml").write_text("tracking: {experiment: server-test}\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect"), LLM_MIRROR_DIR=str(SHARED_DATA),
               LLM_PAUSE_AT="download.manifest:1", LLM_PAUSE_FILE=str(tmp_path / "paused"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    log = tmp_path / "stage.log"
    with log.open("wb") as out:
        stage = subprocess.Popen([sys.executable, "-m", "flows.download"], cwd=tmp_path, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not (tmp_path / "paused").exists():  # the flow runs: its temporary server is up
        assert stage.poll() is None and time.monotonic() < deadline, (
            f"the stage ended before its pause point; its output ends:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    servers = [pid for pid in children_of(stage.pid) if "uvicorn" in cmdline(pid)]
    assert len(servers) == 1, [cmdline(pid) for pid in children_of(stage.pid)]
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    deadline = time.monotonic() + 15
    while alive(servers[0]):
        assert time.monotonic() < deadline, f"the temporary server {servers[0]} outlived its killed stage"
        time.sleep(0.1)
