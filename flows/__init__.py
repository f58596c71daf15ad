"""Prefect flows, one per pipeline stage: thin glue that loads params, calls `llm`, and writes outputs.

Run a stage with `python -m flows.<stage>` (that is what `dvc.yaml` does). With no `PREFECT_API_URL`,
Prefect starts a temporary local API for the run, which ends with the stage's process, even a killed
one; set it to a running `prefect server start` to keep the runs and skip that start-up.
"""

import atexit as _atexit
import gc as _gc
import logging as _logging
import os

# Set before Prefect is imported: offline, its telemetry logs an error on every run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The library logs through the standard `llm.*` loggers; this sends those lines to Prefect's UI too.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llm")
# How long a Prefect server may take to answer: the stage's temporary one and the one that scripts/pipeline
# starts (flows/server.py). Prefect's default for a temporary server, 20 s, failed stages ("Timed out while
# attempting to connect to ephemeral Prefect API server"): on 2 cores busy with other work, a fresh
# PREFECT_HOME's first start takes longer.
SERVER_STARTUP_TIMEOUT_S = 120
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(SERVER_STARTUP_TIMEOUT_S))
# The API of the Prefect server that flows/server.py started for a command (scripts/pipeline's), which stops
# when the command ends: set by it for the command's stages, which then leave Prefect's heartbeats off
# (flows.common.heartbeats_wanted says why).
RUN_SERVER_ENV = "LLM_PREFECT_RUN_SERVER"


class _QuietTemporaryServerNotice(_logging.Filter):
    """Prefect prints its advice to run a dedicated server each time a stage starts a temporary one:
    five times a pipeline. The README says it once (\"What you can look at\"), so the stages drop it."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Starting temporary server on")


_logging.getLogger("prefect").addFilter(_QuietTemporaryServerNotice())


# Prefect's temporary server (started when no PREFECT_API_URL is set) is a child process that Prefect stops
# at exit; a stage killed with SIGKILL never exits, and the server would run on, orphaned. The servers that
# flows/server.py starts for a command, in sessions of their own, likewise. So each gets a watchdog that
# holds a pipe from this process: when this process is gone, however it ended, the pipe closes and the
# watchdog stops the server (with "group": the server's whole process group, the workers it started).
_WATCHDOG = """
import os, signal, sys, time
pid, kill = int(sys.argv[1]), os.killpg if sys.argv[2] == "group" else os.kill
sys.stdin.buffer.read()  # returns once the process that started the server is gone: it held the other end
try:
    kill(pid, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        kill(pid, 0)
    kill(pid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


_watchdogs: list = []


def stop_with_this_process(pid: int, *, group: bool = False):
    """A watchdog that stops process `pid` (or, with `group`, its process group) once this process is gone.
    Keep the returned Popen as long as this process needs the watchdog (its pipe closes with it); kill it
    to call the watchdog off, as once the server is stopped."""
    import subprocess
    import sys

    # Its own session: a Ctrl-C in the terminal reaches the stage and the server, not the watchdog.
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(pid), "group" if group else "process"],
                            stdin=subprocess.PIPE, start_new_session=True)


def _guard_temporary_servers() -> None:
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return  # a running server is used: nothing is started (and the server module is not imported)
    from prefect.server.api.server import SubprocessASGIServer

    start = SubprocessASGIServer.start

    def start_guarded(self, *args, **kwargs):
        start(self, *args, **kwargs)
        if self.server_process is not None and getattr(self, "_guarded_pid", None) != self.server_process.pid:
            self._guarded_pid = self.server_process.pid
            _watchdogs.append(stop_with_this_process(self.server_process.pid))  # kept for the process's life

    SubprocessASGIServer.start = start_guarded


_guard_temporary_servers()


# At exit the interpreter runs one last garbage collection over every object still alive: in a stage's
# process, the hundreds of thousands that make up Prefect, MLflow and torch, only to free memory the OS
# takes back anyway. Frozen (gc.freeze), they are left out of it: most of a no-op stage's exit
# (python -m benchmarks.overhead). Only collection is skipped: the exit handlers still run, Prefect's
# sending its last logs and events among them, and the stages' outputs are closed and on disk before.
_atexit.register(_gc.freeze)
