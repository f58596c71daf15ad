"""One Prefect server for the length of a command: what `scripts/pipeline` runs `dvc repro` under.

    python -m flows.server dvc repro [ARGS]        (scripts/pipeline does this)

Every stage is a Prefect flow run. With no server configured (PREFECT_API_URL unset, in the environment
and in the Prefect profile), each stage's process would start a temporary server of its own, seconds of
every stage's start (`python -m benchmarks.overhead`). Instead this starts one `prefect server start` on a
free port of 127.0.0.1, runs the command with PREFECT_API_URL pointing at it, and stops the server when
the command ends, however it ends. The server keeps its runs in the Prefect home's database
(PREFECT_HOME), so a `prefect server start` later shows them. With a server configured, the command runs
as it is, against that one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence

from flows import SERVER_STARTUP_TIMEOUT_S


class ServerError(RuntimeError):
    pass


def configured_api_url() -> str | None:
    """The Prefect API the stages would use: PREFECT_API_URL from the environment or the active profile."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server(
    env: Mapping[str, str] | None = None, timeout_s: float = SERVER_STARTUP_TIMEOUT_S
) -> Iterator[str]:
    """A `prefect server start` on a free port of 127.0.0.1, up and answering; yields its API URL."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=dict(env or os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(api_url):
            if server.poll() is not None:
                raise ServerError(f"prefect server start exited ({server.returncode}) before it answered:\n"
                                  f"{server.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise ServerError(f"the Prefect server on port {port} did not answer {api_url}/health in "
                                  f"{timeout_s:.0f} s; set PREFECT_API_URL to a running server instead")
            time.sleep(0.25)
        yield api_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server.stdout.close()


def run_with_server(command: Sequence[str]) -> int:
    """Run `command` against the configured Prefect server, or against one started for it; its exit code."""
    if configured_api_url():
        return subprocess.run(command).returncode
    with prefect_server() as api_url:
        print(f"server: a Prefect server for this run at {api_url} (its UI: {api_url.removesuffix('/api')})",
              file=sys.stderr, flush=True)
        return subprocess.run(command, env={**os.environ, "PREFECT_API_URL": api_url}).returncode


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    # A SIGTERM (a CI timeout, `kill`) ends the command and then the server too, as a Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run_with_server(command)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
