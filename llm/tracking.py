"""Tracking: the small interface training reports through, and the one module that talks to MLflow.

Training loops take a `Tracker` (log metrics per step, text, files) and never import MLflow; tests pass a
`MemoryTracker`, stages pass an `MLflowTracker`. MLflow is imported lazily, only when a run starts.

The store: `$MLFLOW_TRACKING_URI`, else a SQLite file `mlflow.db` at the project root, its artifacts in
`mlartifacts/` beside it. The root is found from DVC's `DVC_ROOT` or the working directory, and an
experiment run in a temporary copy under `<root>/.dvc/tmp/exps/` resolves to the same `<root>`, so
`dvc exp run --temp` and queued experiments log to the store that `mlflow ui` shows. A new SQLite store is
created under a file lock: processes starting at once would otherwise race its schema migrations.

    mlflow ui --backend-store-uri sqlite:///mlflow.db     # from the project root

Tracking never kills training. Several stages writing one SQLite file at once wait for each other (a busy
timeout), store calls that still fail for a passing reason ("database is locked", a dropped connection)
are retried, and when the store stays unavailable `MLflowTracker` keeps the training metrics in memory,
warns once and lets training go on. `MLflowTracker.sync_history` then logs whatever of the trainer's
history the run lacks; only if the store still cannot be written does it raise `TrackingUnavailable`,
after the model is saved with that history beside it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

if TYPE_CHECKING:
    from llm.config import ServingConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # else a DNS lookup on every log_model, slow offline
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


class Tracker(Protocol):
    """What a training loop reports to."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...


class MemoryTracker:
    """Keeps everything in lists: for tests, and for callers that want the history back."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.texts: dict[str, str] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts[artifact_file] = text

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, m[name]) for step, m in self.metrics if name in m]


# ---------------------------------------------------------------------------------------------------
# Where the store lives


def project_root(start: str | Path | None = None) -> Path:
    """The project's root; for a DVC experiment's temporary copy, the project it was copied from."""
    path = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = path.parts
    if ".dvc" in parts:  # <root>/.dvc/tmp/exps/<tmp>/...
        return Path(*parts[: parts.index(".dvc")])
    return path


def tracking_uri(root: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


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


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store (`mlartifacts/`, absolute, whatever the working directory);
    a server chooses its own."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "mlartifacts").as_uri()


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
    from filelock import FileLock

    uri = with_busy_timeout(uri or tracking_uri())
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock", timeout=300):
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
            log.debug("could not %s (%s); retrying in %.1f s", what, _short(error), delay_s * 2**attempt)
            time.sleep(delay_s * 2**attempt)
    raise AssertionError("unreachable")


def _short(error: BaseException) -> str:
    """The first line of an error: SQLAlchemy's go on with the whole statement."""
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Lineage: the same tags on every stage's run


def _git(*args: str, cwd: Path) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def file_sha256(path: str | Path) -> str | None:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def lineage_tags(stage: str, params_file: str | Path = "params.yaml",
                 data_manifest: str | Path = "data/raw/manifest.json") -> dict[str, str]:
    """Which code, settings and data made a run: commit, params hash, data hash, DVC stage."""
    here = Path.cwd()
    tags = {"pipeline.stage": stage}
    commit = _git("rev-parse", "HEAD", cwd=here)
    if commit:
        tags["mlflow.source.git.commit"] = tags["pipeline.commit"] = commit
        tags["pipeline.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no", cwd=here)))
    for key, path in (("pipeline.params_sha256", params_file), ("pipeline.data_sha256", data_manifest)):
        digest = file_sha256(path)
        if digest:
            tags[key] = digest
    for env, key in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.experiment")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"pretrain": {"lr": 3e-4}} -> {"pretrain.lr": "0.0003"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


# ---------------------------------------------------------------------------------------------------
# A run

MAX_BATCH = 1000  # metrics per log_batch request: MLflow's limit


def _point(step: int, value: float) -> tuple[int, float | str]:
    """A metric point as the store gives it back, to compare: NaN equals NaN, and an infinity is stored as
    the largest float."""
    value = float(value)
    if math.isnan(value):
        return int(step), "nan"
    if math.isinf(value):
        value = math.copysign(sys.float_info.max, value)
    return int(step), value


class MLflowTracker(AbstractContextManager):
    """One MLflow run: `with MLflowTracker(experiment, run_name, tags=...) as tracker: ...`.

    Passing the `run_id` of an earlier run continues it (a resumed training run keeps one MLflow run).
    The run ends FINISHED, or FAILED when the block raises.

    Store calls are retried on a transient error (`retries` times, waiting from `retry_delay_s`, doubling).
    The calls a training loop makes, `log_metrics` and `log_text`, do not raise for one: what the store
    did not take waits in a buffer, one warning says so, and later calls try again, once and at most every
    `retry_every_s`, so that a store that stays down does not stall every step. `sync_history` then logs
    whatever the run lacks of the trainer's history, and the end of the block whatever is still buffered;
    they raise `TrackingUnavailable` where the store cannot be written.
    """

    def __init__(self, experiment: str, run_name: str, *, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None, retries: int = 3, retry_delay_s: float = 0.5,
                 retry_every_s: float = 60.0):
        self.experiment, self.run_name, self.tags, self.requested_run_id = experiment, run_name, tags or {}, run_id
        self.retries, self.retry_delay_s, self.retry_every_s = retries, retry_delay_s, retry_every_s
        self.run_id: str | None = None
        self.uri = ""  # the store, once the run has started
        self._metrics: list[Any] = []  # mlflow.entities.Metric, not yet in the store
        self._texts: dict[str, str] = {}  # artifact file -> text, not yet in the store
        self._unavailable_since: float | None = None  # while the store is known to be down
        self._last_try = 0.0

    def _retrying(self, what: str, call: Callable[[], T], retries: int | None = None) -> T:
        return retrying(what, call, retries=self.retries if retries is None else retries,
                        delay_s=self.retry_delay_s)

    def __enter__(self) -> MLflowTracker:
        import mlflow

        self.uri = configure()
        experiment_id = ensure_experiment(self.experiment)
        run_id = self.requested_run_id if self._run_exists(self.requested_run_id) else None
        run = self._retrying("start the run", lambda: mlflow.start_run(
            run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else self.run_name,
            tags=dict(self.tags)))
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        unsent: Exception | None = None
        if (self._metrics or self._texts) and not isinstance(exc, TrackingUnavailable):  # that one has tried
            try:
                self._retrying("log the metrics kept", self._send_buffer)
            except Exception as error:
                unsent = error
        status = "FAILED" if exc_type or unsent else "FINISHED"
        try:
            try:
                mlflow.end_run(status=status)  # takes the run off MLflow's stack before it writes the status
            except Exception as error:
                if not is_transient(error):
                    raise
                self._retrying("end the run", lambda: mlflow.MlflowClient().set_terminated(self.run_id, status))
        except Exception as error:
            if exc_type is None and unsent is None and not is_transient(error):
                raise
            # Only the run's status is lost: failing the stage for it would log and register the model again.
            log.warning("could not mark MLflow run %s %s in %s: %s", self.run_id, status, display_uri(self.uri),
                        _short(error))
        if unsent is not None and exc_type is None:
            if not is_transient(unsent):
                raise unsent
            raise self._unavailable(unsent) from unsent
        if unsent is not None:
            log.warning("%s", self._unavailable(unsent))

    def _run_exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            self._retrying("read the run", lambda: mlflow.MlflowClient().get_run(run_id))
            return True
        except MlflowException as error:
            if is_transient(error):
                raise  # an unavailable store would otherwise split a resumed run in two
            return False  # not in this store (a checkpoint from another clone): a new run

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow
        from mlflow.entities import Param

        client = mlflow.MlflowClient()
        flat = flatten(params)
        logged = self._retrying("read the run", lambda: client.get_run(self.run_id).data.params)
        new = [Param(k, v[:6000]) for k, v in flat.items() if k not in logged]  # a resumed run has them already
        if new:
            self._retrying("log params", lambda: client.log_batch(self.run_id, params=new))

    # --- what the training loop calls: never raises for a store that is unavailable ---------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        # A point keeps its timestamp through retries, and the store ignores a point it holds with the same
        # key, step, value and timestamp: a retry after an answer that got lost logs nothing twice.
        now = int(time.time() * 1000)
        self._metrics.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        self._flush()

    def log_text(self, text: str, artifact_file: str) -> None:
        self._texts[artifact_file] = text
        self._flush()

    def _flush(self) -> None:
        down = self._unavailable_since is not None
        if down and time.monotonic() - self._last_try < self.retry_every_s:
            return
        try:
            self._retrying("log metrics", self._send_buffer, retries=0 if down else None)
        except Exception as error:
            if not is_transient(error):
                raise
            self._last_try = time.monotonic()
            if not down:
                self._unavailable_since = self._last_try
                log.warning("MLflow store %s is unavailable: %s. Training continues: its metrics are kept, in "
                            "memory and in the history each checkpoint saves, and logged when the store answers "
                            "again", display_uri(self.uri), _short(error))
            return
        if down:
            log.warning("MLflow store %s answers again after %.0f s; the metrics kept meanwhile are logged",
                        display_uri(self.uri), time.monotonic() - self._unavailable_since)
            self._unavailable_since = None

    def _send_buffer(self) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        while self._metrics:
            batch = self._metrics[:MAX_BATCH]
            client.log_batch(self.run_id, metrics=batch, synchronous=True)
            del self._metrics[:len(batch)]
        for name in list(self._texts):
            client.log_text(self.run_id, self._texts[name], name)
            del self._texts[name]

    def sync_history(self, history: Mapping[str, Sequence[tuple[int, float]]],
                     history_file: str | Path | None = None) -> int:
        """Log every (metric, step, value) of `history` (a trainer's `Progress.history`) that the run does
        not hold yet: points kept while the store was unavailable, and those that a killed run reported
        but never logged before it was resumed. Returns how many points it logged (kept and missing).

        Raises `TrackingUnavailable` if the store cannot be written even after retries; `history_file`
        (where the history is saved) is named in its message."""
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient()
        kept = len(self._metrics)
        try:
            self._retrying("log the metrics kept", self._send_buffer)
            now = int(time.time() * 1000)
            missing = []
            for key, points in history.items():
                held = {_point(m.step, m.value) for m in self._retrying(
                    "read the metric history", lambda key=key: client.get_metric_history(self.run_id, key))}
                for step, value in points:
                    if _point(step, value) not in held:
                        held.add(_point(step, value))
                        missing.append(Metric(key, float(value), now, int(step)))
            self._metrics.extend(missing)
            self._retrying("log the missing metrics", self._send_buffer)
        except Exception as error:
            if not is_transient(error):
                raise
            raise self._unavailable(error, str(history_file or "the checkpoint's history.json")) from error
        self._unavailable_since = None
        return kept + len(missing)

    def _unavailable(self, error: Exception, kept: str | None = None) -> TrackingUnavailable:
        texts = f" and {len(self._texts)} sample texts" if self._texts else ""
        where = f"; they are kept in {kept}" if kept else ""
        return TrackingUnavailable(
            f"the MLflow store {display_uri(self.uri)} cannot be written: {_short(error)}. Run {self.run_id} lacks "
            f"some of its metrics ({len(self._metrics)} points waiting in memory{texts}){where}. "
            f"Rerun the stage once the store can be written (`dvc repro`, or the same command): a training stage "
            f"resumes from its last checkpoint without training again, and logs what the run lacks")

    # --- after training ---------------------------------------------------------------------------------

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        self._retrying("log an artifact", lambda: client.log_artifact(self.run_id, str(path), artifact_path))

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows of the same keys as a table artifact, which the MLflow UI shows as one (`artifact_file`: .json)."""
        import mlflow

        columns = list(rows[0]) if rows else []
        data = {c: [row[c] for row in rows] for c in columns}
        client = mlflow.MlflowClient()
        self._retrying("log a table", lambda: client.log_table(self.run_id, data, artifact_file))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow
        from mlflow.entities import RunTag

        client = mlflow.MlflowClient()
        self._retrying("set tags", lambda: client.log_batch(self.run_id, tags=[RunTag(k, str(v))
                                                                                 for k, v in tags.items()]))


LOCK_TOKEN_TAG = "pipeline.lock_token"  # the stage lock (llm/lock.py) the run's process held


def fail_stale_runs(experiment: str, lock_token: str | None, keep: str | None = None) -> list[str]:
    """Mark FAILED the runs that a killed process left RUNNING: those tagged with the token of the stage
    lock it held (taken over now), except `keep`, the run about to be resumed. Returns their ids."""
    if not lock_token:
        return []
    import mlflow

    configure()
    client = mlflow.MlflowClient()
    found = retrying("read the experiment", lambda: client.get_experiment_by_name(experiment))
    if found is None:
        return []
    stale = f"tags.`{LOCK_TOKEN_TAG}` = '{lock_token}' and attributes.status = 'RUNNING'"
    runs = retrying("find the killed runs", lambda: client.search_runs([found.experiment_id], filter_string=stale,
                                                                       max_results=100))
    failed = [run.info.run_id for run in runs if run.info.run_id != keep]
    for run_id in failed:
        retrying("tag a killed run", lambda: client.set_tag(run_id, "pipeline.failure",
                                                            "its process was killed; a later run took over"))
        retrying("end a killed run", lambda: client.set_terminated(run_id, status="FAILED"))
    return failed


# ---------------------------------------------------------------------------------------------------
# Models: a checkpoint folder logged as an MLflow pyfunc, registered, and loaded back


def _pip_requirements() -> list[str]:
    # Explicit: MLflow would otherwise infer them in a slow subprocess, and warn about torch's +cpu label.
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]
    return [f"torch=={torch_version}", f"tiktoken=={version('tiktoken')}", f"safetensors=={version('safetensors')}",
            f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}"]


def log_gpt_model(checkpoint_dir: str | Path, registered_name: str | None = None,
                  version_tags: Mapping[str, str] | None = None, serving: ServingConfig | None = None) -> str | None:
    """Log the checkpoint's model (weights and config only) to the active run as a pyfunc, and register it
    under `registered_name`; returns the new version number. A language model becomes a text generator
    (llm/pyfunc.py), a classifier a text classifier (llm/pyfunc_classifier.py). The model refuses requests
    above `serving`'s caps (default: ServingConfig's)."""
    import dataclasses
    import shutil
    import tempfile
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from llm.checkpoint import CONFIG_FILE, MODEL_FILE, read_config
    from llm.config import ServingConfig
    from llm.pyfunc import DEFAULT_PARAMS

    package = Path(__file__).resolve().parent
    saved = read_config(checkpoint_dir)
    if saved.model.is_classifier:
        labels = list(saved.extra["labels"])
        outputs = pd.DataFrame([{"label": labels[0], "probability": 1.0,
                                 **{f"p_{k}": float(k == labels[0]) for k in labels}}])
        python_model = package / "pyfunc_classifier.py"
        signature = infer_signature(pd.DataFrame({"text": ["a text"]}), outputs)
    else:
        python_model = package / "pyfunc.py"
        signature = infer_signature(pd.DataFrame({"prompt": ["Every effort moves you"]}), ["a completion"],
                                    params=DEFAULT_PARAMS)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"  # only the model: the folder may also hold resume state
        checkpoint.mkdir()
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copy2(Path(checkpoint_dir) / name, checkpoint / name)
        with warnings.catch_warnings():
            # It asks for type hints and an input example, which would make it run the model at logging
            # time: the explicit signature above already describes inputs, params and outputs.
            warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(python_model), artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(package)], pip_requirements=_pip_requirements(), signature=signature,
                model_config=dataclasses.asdict(serving or ServingConfig()), registered_model_name=registered_name)
    if registered_name is None:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (version_tags or {}).items():
        client.set_model_version_tag(registered_name, version, key, value)
    return version


def load_logged_gpt(model_uri: str, device: str = "cpu"):
    """The project's GPT from a logged model (`runs:/<id>/model`, `models:/<name>/<version>`, ...)."""
    import mlflow

    from llm.checkpoint import load_model

    # The checkpoint itself, not the pyfunc: that would give a wrapper that only generates text.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    return load_model(local / "artifacts" / "checkpoint", device)


# ---------------------------------------------------------------------------------------------------
# The registry: which version a stage registered, and the champion alias

CHAMPION = "champion"


def registered_version(checkpoint_dir: str | Path, name: str, stage: str, serving: ServingConfig | None = None) -> str:
    """The registry version of the checkpoint in `checkpoint_dir`, as its stage recorded it. Where this
    store does not have it (a checkpoint pulled with `dvc pull` into a clone with a fresh store), or the
    record is missing or unreadable, the checkpoint is logged from the active run (with `serving`'s caps)
    and registered now."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from llm.checkpoint import read_registration

    recorded = read_registration(checkpoint_dir)
    if recorded is not None and recorded["registered_model"] == name:
        try:
            found = mlflow.MlflowClient().get_model_version(name, recorded["version"])
            if found.run_id == recorded["run_id"]:
                return str(found.version)
        except MlflowException:
            pass
    return str(log_gpt_model(checkpoint_dir, name, {"stage": stage, "registered_by": "evaluate"}, serving))


def record_scores(name: str, version: str, scores: Mapping[str, float]) -> None:
    """Tag the version with its evaluation's scores (`eval.<name>`), which later promotions compare with."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in scores.items():
        client.set_model_version_tag(name, version, f"eval.{key}", repr(float(value)))


def promote_if_better(name: str, version: str, scores: Mapping[str, float],
                      alias: str = CHAMPION) -> tuple[bool, str | None]:
    """Record `scores` on the version (tags `eval.<name>`), and move `alias` to it when every score it
    shares with the alias holder is at least as high, or when no version holds the alias.
    Returns (promoted, the version that held the alias before, if any)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    record_scores(name, version, scores)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and str(holder.version) != str(version):
        theirs = {k.removeprefix("eval."): float(v) for k, v in holder.tags.items() if k.startswith("eval.")}
        if any(scores[key] < theirs[key] for key in scores if key in theirs):
            return False, str(holder.version)
    client.set_registered_model_alias(name, alias, version)
    return True, None if holder is None else str(holder.version)

