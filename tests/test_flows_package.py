"""What importing `flows` sets up in a stage's process: Prefect's advice to run a dedicated server is not
repeated (the README gives it once), a temporary server has time to start on a busy host, and the
interpreter's last garbage collection is skipped at exit."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import flows  # noqa: F401  (installs the filter)
from tests.conftest import ROOT


def test_the_temporary_server_notice_is_dropped_and_other_lines_kept(caplog):
    logger = logging.getLogger("prefect")
    with caplog.at_level(logging.INFO, logger="prefect"):
        logger.propagate, old = True, logger.propagate
        try:
            logger.info("Starting temporary server on http://127.0.0.1:8049\nSee https://www.prefect.io/docs")
            logger.info("Stopping temporary server on http://127.0.0.1:8049")
        finally:
            logger.propagate = old
    assert [r.getMessage() for r in caplog.records] == ["Stopping temporary server on http://127.0.0.1:8049"]


def test_a_stage_process_freezes_what_is_alive_at_exit():
    # The exit handlers run as at exit; what they leave frozen is out of the last collection.
    code = ("import atexit, gc, flows\n"
            "print(gc.get_freeze_count())\n"
            "atexit._run_exitfuncs()\n"
            "print(gc.get_freeze_count())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before == 0
    assert after > 10_000  # Prefect's modules alone


def stage_startup_timeout_s(**env: str) -> int:
    """The temporary server's start-up timeout that Prefect reads in a stage's process."""
    code = ("import flows\n"
            "from prefect.settings import get_current_settings\n"
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_EPHEMERAL")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return int(out.stdout)


def test_a_temporary_server_gets_longer_than_prefects_20_s_to_start_and_a_users_value_wins():
    # Prefect's 20 s failed a download stage on 2 cores busy with other work (tests/test_temporary_server.py
    # under CI's parallel workers): "Timed out while attempting to connect to ephemeral Prefect API server".
    assert stage_startup_timeout_s() == 120
    assert stage_startup_timeout_s(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="45") == 45
