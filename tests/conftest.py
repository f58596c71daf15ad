"""Shared test set-up: offline mirrors, Prefect state in a temporary folder, one Prefect test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import llm  # noqa: F401  (makes a relative LLM_MIRROR_DIR or TIKTOKEN_CACHE_DIR absolute, for every test)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

# tiktoken downloads its BPE files on first use; the shared cache makes that work offline.
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session", autouse=True)
def _prefect_home(tmp_path_factory: pytest.TempPathFactory):
    """Keep Prefect's database and settings out of the user's ~/.prefect."""
    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """Stages log to MLflow: send it to a store of the test session's own, never the project's."""
    store = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    yield store
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def prefect_server(_prefect_home):
    """One real local Prefect API for the whole run; yields its URL (subprocesses can use it too)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


def shared_file(name: str) -> Path:
    """A file of the local data mirror; skips the test where the mirror is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the tests need the shared data mirror beside the project")
    return path


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests use tiny models, which gain nothing from a second thread; on a busy shared CPU that thread
    spins waiting for a core and makes a training test many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
