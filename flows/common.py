"""What the stage flows share: their logger, metrics files, and a stage's locked, tracked MLflow run.

Kept free of the training code, so that the data stages' code deps in dvc.yaml stay their own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from llm.files import write_json_atomic
from llm.lineage import lineage_tags
from llm.lock import StageLock, stage_lock
from llm.tracking import LOCK_TOKEN_TAG, MLflowTracker, fail_stale_runs


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (its lines reach the Prefect UI), else a plain one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A stage's metrics file for `dvc metrics show/diff`, written atomically."""
    write_json_atomic(path, metrics)


def run_tags(stage: str, params_file: str, held: StageLock) -> dict[str, str]:
    """A stage run's tags: its lineage, and the token of the lock its process holds, by which a later
    run that takes the lock over after a kill finds the run left RUNNING and marks it FAILED."""
    return {**lineage_tags(stage, params_file), LOCK_TOKEN_TAG: held.holder["token"]}


@contextmanager
def tracked_run(stage: str, *, out_dir: str | Path, experiment: str, params_file: str,
                params_to_log: Mapping[str, Any], run_id: str | None = None) -> Iterator[MLflowTracker]:
    """One MLflow run of a stage (`run_id`: continue that one), holding the lock of its output folder. The
    runs that an execution killed in the folder left RUNNING are marked FAILED, except the one continued.
    The lineage tags are set again at the end, for a stage that writes the very data they hash (download
    writes data/raw/manifest.json)."""
    with stage_lock(out_dir, stage) as held:
        if held.stale:
            fail_stale_runs(experiment, held.stale.get("token"), keep=run_id)
        with MLflowTracker(experiment, stage, tags=run_tags(stage, params_file, held), run_id=run_id) as tracker:
            tracker.log_params(params_to_log)
            yield tracker
            tracker.set_tags(lineage_tags(stage, params_file))

