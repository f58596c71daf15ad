"""One run per stage output folder: a second run is refused naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from llm.lock import StageLocked, lock_paths, stage_lock
from tests.conftest import ROOT

HOLD = """
import sys, time
from llm.lock import stage_lock
with stage_lock(sys.argv[1], "pretrain") as held:
    held.record(note="the holder")
    print("held", flush=True)
    time.sleep(600)
"""


def hold(folder) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_is_refused_naming_the_holder_and_how_to_clear_it(tmp_path):
    folder = tmp_path / "data/checkpoints/pretrain"
    holder = hold(folder)
    try:
        started = time.strftime("%Y-%m-%d %H:", time.gmtime())
        with pytest.raises(StageLocked) as info:
            with stage_lock(folder, "pretrain"):
                pass
        message = str(info.value)
        assert message.startswith(f"{folder} is in use by another run of the pretrain stage: PID {holder.pid} on "
                                  f"host {socket.gethostname()}, started {started}")
        lock_file, _ = lock_paths(folder)
        assert message.endswith(f"delete {lock_file} and rerun")
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_what_it_recorded(tmp_path):
    folder = tmp_path / "shards"
    holder = hold(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with stage_lock(folder, "pretrain") as held:
        assert held.stale["pid"] == holder.pid and held.stale["note"] == "the holder" and len(held.stale["token"]) == 32
        assert json.loads(lock_paths(folder)[1].read_text())["pid"] == os.getpid()
    assert not lock_paths(folder)[1].exists()  # a clean exit leaves no holder behind
    with stage_lock(folder, "pretrain") as held:
        assert held.stale is None
