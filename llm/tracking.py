"""Tracking: the small interface training reports through, and the MLflow run every stage logs to.

Training loops take a `Tracker` (log metrics per step, text, files) and never import MLflow; tests pass a
`MemoryTracker`, stages pass an `MLflowTracker`. MLflow is imported lazily, only when a run starts; the
store it writes to is llm.store's, the lineage tags llm.lineage's, and models go to the registry through
llm.registry. Those four modules are the only ones that talk to MLflow.

Tracking never kills training. Store calls that fail for a passing reason are retried (llm.store), and
when the store stays unavailable `MLflowTracker` keeps the training metrics in memory, warns once and lets
training go on. `MLflowTracker.sync_history` then logs whatever of the trainer's history the run lacks;
only if the store still cannot be written does it raise `TrackingUnavailable`, after the model is saved
with that history beside it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llm.lineage import DataInput, flatten
from llm.store import (TrackingUnavailable, configure, display_uri, ensure_experiment, is_transient, retrying,
                       short_error)

log = logging.getLogger(__name__)
T = TypeVar("T")


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
# A run

MAX_BATCH = 1000  # metrics per log_batch request: MLflow's limit
DIGEST_CHARS = 36  # the longest dataset digest MLflow's SQL stores hold


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
                        short_error(error))
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
                            "again", display_uri(self.uri), short_error(error))
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
            f"the MLflow store {display_uri(self.uri)} cannot be written: {short_error(error)}. "
            f"Run {self.run_id} lacks "
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

    def log_inputs(self, inputs: Sequence[DataInput | None]) -> None:
        """The run's inputs as MLflow datasets, which the UI lists in the run's Datasets panel: each by
        name, source (URL or path) and digest (its sha256, cut to the store's 36 characters; the whole of
        it is the input's `sha256` tag), with its context (`mlflow.data.context`). A checkpoint that has a
        registered version is logged as that version's model too, so the UI links the run to it."""
        import json

        import mlflow
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json, resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag, LoggedModelInput
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from llm.registry import logged_model_id

        client = mlflow.MlflowClient()
        datasets, models = [], []
        for item in (i for i in inputs if i is not None):
            if item.source.startswith(("http://", "https://")):
                source = HTTPDatasetSource(item.source)
            elif "://" in item.source:
                source = resolve_dataset_source(item.source)
            else:  # a local path, as a file:// URI (MLflow has two sources that read one, alike)
                source = get_dataset_source_from_json(json.dumps({"uri": Path(item.source).resolve().as_uri()}),
                                                      "local")
            dataset = MetaDataset(source, name=item.name, digest=item.sha256[:DIGEST_CHARS])
            datasets.append(DatasetInput(dataset._to_mlflow_entity(), tags=[
                InputTag(MLFLOW_DATASET_CONTEXT, item.context), InputTag("sha256", item.sha256)]))
            if item.registered is not None:
                model_id = self._retrying("read the model version", lambda item=item: logged_model_id(*item.registered))
                if model_id:
                    models.append(LoggedModelInput(model_id))
        if datasets:
            self._retrying("log the inputs", lambda: client.log_inputs(self.run_id, datasets=datasets,
                                                                       models=models or None))

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
