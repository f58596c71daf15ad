"""Where the MLflow store lives, and the store errors that pass: for every module that talks to MLflow.

The store: `$MLFLOW_TRACKING_URI`, else a SQLite file `mlflow.db` at the project root, its artifacts in
`mlartifacts/` beside it. `scripts/pipeline` serves that file to its stages from one `mlflow server`
(flows/server.py), whose clients still write artifacts to `mlartifacts/`, as they would without it. The
root is found from DVC's `DVC_ROOT` or the working directory, and an experiment run in a temporary copy
under `<root>/.dvc/tmp/exps/` resolves to the same `<root>`, so `dvc exp run --temp` and queued
experiments log to the store that `mlflow ui` shows. A new SQLite store is created under a file lock:
processes starting at once would otherwise race its schema migrations.

    mlflow ui --backend-store-uri sqlite:///mlflow.db     # from the project root

Several stages writing one SQLite file at once wait for each other (a busy timeout), and store calls that
still fail for a passing reason ("database is locked", a dropped connection) are retried (`retrying`).
MLflow is imported lazily, only when a store is opened.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

if TYPE_CHECKING:
    from filelock import FileLock

log = logging.getLogger(__name__)
T = TypeVar("T")

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # else a DNS lookup on every log_model, slow offline
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


# ---------------------------------------------------------------------------------------------------
# Where the store lives


def project_root(start: str | Path | None = None) -> Path:
    """The project's root; for a DVC experiment's temporary copy, the project it was copied from."""
    path = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = path.parts
    if ".dvc" in parts:  # <root>/.dvc/tmp/exps/<tmp>/...
        return Path(*parts[: parts.index(".dvc")])
    return path


def project_store_uri(root: str | Path | None = None) -> str:
    """The project's own store: `mlflow.db` at its root."""
    return f"sqlite:///{project_root(root) / 'mlflow.db'}"


def tracking_uri(root: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or project_store_uri(root)


# sqlite3 waits this long for another writer's lock (its default is 5 s). MLflow's sessions set their own
# 20 s, but opening a store (schema checks, migrations) runs on the connection's setting, given in the URI.
BUSY_TIMEOUT_S = 30


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (absolute, options dropped); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]  # SQLAlchemy, too, reads what follows ? as options
    return Path(path).resolve() if path and path != ":memory:" else None


def with_busy_timeout(uri: str, seconds: float = BUSY_TIMEOUT_S) -> str:
    """A `sqlite:///` URI with `?timeout=` added, which SQLAlchemy passes on as `sqlite3.connect(timeout=)`;
    a URI that sets its own timeout, and any other store, are returned as they are."""
    if sqlite_path(uri) is None:
        return uri
    base, _, query = uri.partition("?")
    if any(key == "timeout" for key, _ in parse_qsl(query)):
        return uri
    return f"{base}?{query + '&' if query else ''}timeout={seconds:g}"


# Set for the stages by the server that serves a SQLite store (flows/server.py): that store's artifact location.
ARTIFACT_LOCATION_ENV = "LLM_ARTIFACT_LOCATION"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (`mlartifacts/`, absolute, whatever
    the working directory), also when the pipeline's server serves that store ($LLM_ARTIFACT_LOCATION);
    any other server chooses its own."""
    db = sqlite_path(uri)
    if db is None:
        return os.environ.get(ARTIFACT_LOCATION_ENV) or None
    return (db.parent / "mlartifacts").as_uri()


def store_lock(db: Path) -> FileLock:
    """The lock a SQLite store is created and migrated under: processes opening a new store at once would
    otherwise race its schema migrations."""
    from filelock import FileLock

    return FileLock(f"{db}.lock", timeout=300)


def display_uri(uri: str) -> str:
    """The store's URI for messages, a password in it masked."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def configure(uri: str | None = None) -> str:
    """Quiet MLflow, make sure the store exists and is migrated (once, under a lock), and select it.
    Returns the URI selected: for SQLite, with its busy timeout."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow

    uri = with_busy_timeout(uri or tracking_uri())
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        with store_lock(db):
            client = mlflow.MlflowClient(uri)
            retrying("open the store", lambda: client.search_experiments(max_results=1))  # creates, migrates
    mlflow.set_tracking_uri(uri)  # MLflow exports it as MLFLOW_TRACKING_URI too, for subprocesses
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, created with its artifacts at the project root where it is new."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = retrying("read the experiment", lambda: client.get_experiment_by_name(name))
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(mlflow.get_tracking_uri()))
    except Exception:  # another process created it in between
        experiment = retrying("read the experiment", lambda: client.get_experiment_by_name(name))
        if experiment is None:
            raise
        return experiment.experiment_id


# ---------------------------------------------------------------------------------------------------
# Store errors that pass: retried, and never fatal to training


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be written, after retries."""


# As an HTTP store's server words them, where it answers with an error code that says less.
_TRANSIENT_MESSAGES = ("database is locked", "database is busy", "database table is locked",
                       "connection refused", "connection reset")
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ENOSPC, errno.ESTALE, errno.ETIMEDOUT}


def is_transient(error: BaseException) -> bool:
    """Whether a store error may pass on retry: a locked or busy SQLite file, a database or network
    connection that failed, a full disk. MLflow wraps the cause, so the whole chain is looked at."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sqlite3.OperationalError, sqlalchemy.exc.OperationalError,
                                sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError,
                                ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(current, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True  # an HTTP store that did not answer
        if isinstance(current, MlflowException):
            if current.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
                return True
            if any(text in current.message.lower() for text in _TRANSIENT_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False


def _drop_mlflow_tracebacks(record: logging.LogRecord) -> bool:
    # MLflow logs each failed SQLite session with a full traceback at ERROR; ours says it once, shorter.
    return not record.getMessage().startswith("SQLAlchemy database error")


@contextmanager
def _quiet_store_errors() -> Iterator[None]:
    logger = logging.getLogger("mlflow.store.db.utils")
    logger.addFilter(_drop_mlflow_tracebacks)
    try:
        yield
    finally:
        logger.removeFilter(_drop_mlflow_tracebacks)


def retrying(what: str, call: Callable[[], T], *, retries: int = 3, delay_s: float = 0.5) -> T:
    """`call()`, tried again up to `retries` times (waiting `delay_s`, doubling) while it fails with a
    transient store error; the last error is raised. `what` names the call in the debug log."""
    for attempt in range(retries + 1):
        try:
            with _quiet_store_errors():
                return call()
        except Exception as error:
            if attempt == retries or not is_transient(error):
                raise
            log.debug("could not %s (%s); retrying in %.1f s", what, short_error(error), delay_s * 2**attempt)
            time.sleep(delay_s * 2**attempt)
    raise AssertionError("unreachable")


def short_error(error: BaseException) -> str:
    """The first line of an error: SQLAlchemy's go on with the whole statement."""
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__
