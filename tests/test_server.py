"""flows.server: one real Prefect server for a command's length, or the configured one, as scripts/pipeline runs."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import ROOT

# What the command sees: the API it was given, answering.
PROBE = ("import os, urllib.request; url = os.environ.get('PREFECT_API_URL'); print(url); "
         "print(urllib.request.urlopen(url + '/health', timeout=5).read().decode())")


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.server", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.slow
def test_a_command_gets_a_server_of_its_own_which_stops_with_it(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = run([sys.executable, "-c", PROBE + "; raise SystemExit(3)"], env)
    assert done.returncode == 3, done.stderr  # the command's own exit code
    url, health = done.stdout.split()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api") and health == "true"
    assert f"a Prefect server for this run at {url}" in done.stderr
    with pytest.raises(OSError):  # stopped with the command
        urllib.request.urlopen(f"{url}/health", timeout=2)
    assert (tmp_path / "prefect").is_dir()  # its runs stay in the Prefect home


@pytest.mark.slow
def test_a_configured_server_is_used_as_it_is(prefect_server):
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    done = run([sys.executable, "-c", PROBE], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [prefect_server, "true"] and "a Prefect server for this run" not in done.stderr


def test_no_command_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "flows.server"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "python -m flows.server dvc repro" in done.stderr
