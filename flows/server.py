"""The servers a command's stages talk to, for the length of the command: what `scripts/pipeline` runs
`dvc repro` under.

    python -m flows.server dvc repro [ARGS]        (scripts/pipeline does this)

Every stage is a Prefect flow run holding an MLflow run, and without servers each stage's process pays
for both on its own (`python -m benchmarks.overhead`):
- Prefect: with no server configured (PREFECT_API_URL unset, in the environment and in the Prefect
  profile), each stage would start a temporary server of its own. Instead one `prefect server start`
  serves the command. It keeps its runs in the Prefect home's database (PREFECT_HOME), so a
  `prefect server start` later shows them.
- MLflow: with no store configured (MLFLOW_TRACKING_URI unset), each stage would open the project's
  SQLite store itself, importing SQLAlchemy and Alembic and checking the schema. Instead one
  `mlflow server` serves that same file, and the stages write their artifacts straight to `mlartifacts/`
  as they would without it (the server serves none), so the store ends up the same either way and
  `mlflow ui` shows it afterwards.
Both listen on free ports of 127.0.0.1, start side by side, and stop when the command ends, however it
ends. A server or store configured in the environment is used as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import filelock

from flows import RUN_SERVER_ENV, SERVER_STARTUP_TIMEOUT_S, stop_with_this_process
from llm.store import (ARTIFACT_LOCATION_ENV, QUIET_ENV, artifact_location, project_store_uri, sqlite_path,
                       store_lock, with_busy_timeout)


class ServerError(RuntimeError):
    pass


def configured_api_url() -> str | None:
    """The Prefect API the stages would use: PREFECT_API_URL from the environment or the active profile."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@dataclasses.dataclass
class Server:
    """A server process, in a session of its own so that stopping it stops the workers it started too, and
    stopped by a watchdog if this process is killed before it can stop it. Its output goes to a temporary
    file, read back if it fails: a pipe that nobody reads would fill and stall it. `env` is what its clients
    need to use it; `instead`, what a user can configure in its place."""

    name: str
    health_url: str
    env: dict[str, str]
    instead: str
    process: subprocess.Popen
    watchdog: subprocess.Popen
    output: IO[bytes]
    # Held from before the process starts until it answers: a store it creates or migrates meanwhile.
    lock: filelock.FileLock | None = None

    @classmethod
    def start(cls, name: str, argv: Sequence[str], *, health_url: str, client_env: Mapping[str, str],
              instead: str, env: Mapping[str, str], lock: filelock.FileLock | None = None) -> Server:
        if lock is not None:
            try:
                lock.acquire()
            except filelock.Timeout as exc:
                raise ServerError(f"{name} did not start: another process held {lock.lock_file} for "
                                  f"{lock.timeout:.0f} s; {instead}") from exc
        output = tempfile.TemporaryFile()
        try:
            process = subprocess.Popen(list(argv), env=dict(env), stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            output.close()
            if lock is not None:
                lock.release()
            raise
        watchdog = stop_with_this_process(process.pid, group=True)
        return cls(name, health_url, dict(client_env), instead, process, watchdog, output, lock)

    def last_output(self, chars: int = 3000) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")[-chars:]

    def wait_until_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            while not _healthy(self.health_url):
                if self.process.poll() is not None:
                    raise ServerError(f"{self.name} exited ({self.process.returncode}) before it answered:\n"
                                      f"{self.last_output()}")
                if time.monotonic() > deadline:
                    raise ServerError(f"{self.name} did not answer {self.health_url} in {timeout_s:.0f} s; "
                                      f"{self.instead}")
                time.sleep(0.25)
        finally:
            self._release()

    def stop(self) -> None:
        self.watchdog.kill()  # first: once the server is gone, its process group's id may be another's
        self.watchdog.wait()
        self.watchdog.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._release()
        self.output.close()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def start_prefect(env: Mapping[str, str]) -> Server:
    """`prefect server start` on a free port of 127.0.0.1, its runs kept in the Prefect home. Its clients are
    told it is a server for the one command (RUN_SERVER_ENV), which stops when the command ends."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return Server.start("the Prefect server", argv, health_url=f"{api_url}/health",
                        client_env={"PREFECT_API_URL": api_url, RUN_SERVER_ENV: api_url},
                        instead="set PREFECT_API_URL to a running Prefect server instead", env=env)


def start_mlflow(env: Mapping[str, str], root: str | Path | None = None) -> Server:
    """`mlflow server` for the project's SQLite store (the project at `root`, else DVC_ROOT or the working
    directory) on a free port of 127.0.0.1. It creates or migrates the store under the store's lock, as a
    stage opening it would."""
    uri = with_busy_timeout(project_store_uri(root))
    db = sqlite_path(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts = artifact_location(uri)
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", uri, "--default-artifact-root", artifacts, "--no-serve-artifacts",
            "--workers", "1", "--uvicorn-opts", "--no-access-log"]
    # Its job runner (a second process, for GenAI evaluation jobs) is nothing a stage uses.
    server_env = {**QUIET_ENV, **env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server_env.pop("MLFLOW_TRACKING_URI", None)
    return Server.start("the MLflow server", argv, health_url=f"{url}/health",
                        client_env={"MLFLOW_TRACKING_URI": url, ARTIFACT_LOCATION_ENV: artifacts},
                        instead="set MLFLOW_TRACKING_URI to a running MLflow server or another store instead",
                        env=server_env, lock=store_lock(db))


@contextlib.contextmanager
def serving(starts: Sequence[Callable[[], Server]], timeout_s: float = SERVER_STARTUP_TIMEOUT_S
            ) -> Iterator[list[Server]]:
    """The servers `starts` start, side by side, answering; each is stopped at the end, however it ends."""
    servers: list[Server] = []
    try:
        for start in starts:
            servers.append(start())
        for server in servers:
            server.wait_until_healthy(timeout_s)
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()


def unconfigured(env: Mapping[str, str], root: str | Path | None = None, *, prefect: bool = True
                 ) -> list[Callable[[], Server]]:
    """How to start the servers `env` configures none of: Prefect's (where `prefect`), and an MLflow server
    for the project's store (the project at `root`), for `serving`."""
    starts = []
    if prefect and not configured_api_url():
        starts.append(lambda: start_prefect(env))
    if not env.get("MLFLOW_TRACKING_URI"):
        starts.append(lambda: start_mlflow(env, root))
    return starts


def client_env(servers: Sequence[Server]) -> dict[str, str]:
    """The settings that send a stage to `servers`: their env, merged."""
    return {key: value for server in servers for key, value in server.env.items()}


def run_with_servers(command: Sequence[str]) -> int:
    """Run `command` against the configured Prefect server and MLflow store, or servers started for it where
    none is configured; its exit code."""
    with serving(unconfigured(os.environ)) as servers:
        for server in servers:
            url = server.health_url.removesuffix("/health").removesuffix("/api")
            print(f"server: {server.name} for this run at {url}", file=sys.stderr, flush=True)
        return subprocess.run(command, env={**os.environ, **client_env(servers)}).returncode


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    # A SIGTERM (a CI timeout, `kill`) ends the command and then the servers too, as a Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run_with_servers(command)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
