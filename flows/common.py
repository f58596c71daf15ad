"""What the stage flows share: their logger, metrics files, a stage's locked, tracked MLflow run, and how
a stage's process runs its flow (`run_stage`).

A stage killed where no handler runs (SIGKILL, the kernel's out-of-memory killer, a host going down)
leaves its MLflow run RUNNING and its Prefect flow run Running: neither hears it end. The stage's lock
(llm/lock.py) records both, and the next run of the stage, taking the lock over, ends them: the MLflow run
FAILED, the flow run Crashed, so that neither UI shows a dead stage as still at work.

Kept free of the training code, so that the data stages' code deps in dvc.yaml stay their own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from prefect import Flow, runtime
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

from flows import RUN_SERVER_ENV
from llm.files import write_json_atomic
from llm.lineage import lineage_tags
from llm.lock import StageLock, stage_lock
from llm.tracking import LOCK_TOKEN_TAG, MLflowTracker, fail_stale_runs

R = TypeVar("R")  # what a stage's flow returns


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (its lines reach the Prefect UI), else a plain one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def heartbeats_wanted() -> bool:
    """Whether a stage's flow run should send Prefect its heartbeats: where a server that outlives the stage
    could read them, or where the user set their frequency.

    Heartbeats are for Prefect's zombie-run detection: an automation on the server that marks Crashed a flow
    run that stopped beating (Prefect Cloud's is managed; Prefect's guide has a self-hosted server's user
    create one, and set PREFECT_FLOWS_HEARTBEAT_FREQUENCY). A stage's temporary server (no PREFECT_API_URL)
    ends with the stage, and the server flows/server.py starts for a command (RUN_SERVER_ENV) with the
    command: neither can read them once a stage dies, and the next run of a stage killed outright marks its
    flow run Crashed itself (`crash_stale_flow_run`). There they cost the stage the end of its flow run,
    which waits for the heartbeat thread to wake from its last second of sleep (benchmarks/overhead.py)."""
    settings = get_current_settings()
    if "heartbeat_frequency" in settings.flows.model_fields_set:  # the environment, a profile, prefect.toml
        return True
    url = settings.api.url
    return bool(url) and url != os.environ.get(RUN_SERVER_ENV)


def run_stage(stage: Flow[..., R]) -> R:
    """Run a stage's flow with its default parameters, as `python -m flows.<stage>` does: with Prefect's
    heartbeats only where they are wanted (`heartbeats_wanted`)."""
    off = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    with nullcontext() if heartbeats_wanted() else temporary_settings(updates=off):
        return stage()


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A stage's metrics file for `dvc metrics show/diff`, written atomically."""
    write_json_atomic(path, metrics)


FLOW_RUN_TAG = "pipeline.prefect_flow_run"  # the MLflow run's tag: the id of the Prefect flow run around it
FLOW_RUN_KEY = "prefect_flow_run"  # ... and the stage lock's record of it (llm/lock.py's holder file)


def run_tags(stage: str, params_file: str, held: StageLock) -> dict[str, str]:
    """A stage run's tags: its lineage, the Prefect flow run it runs in, and the token of the lock its
    process holds, by which a later run that takes the lock over after a kill finds the run left RUNNING
    and marks it FAILED."""
    flow_run = held.holder.get(FLOW_RUN_KEY)
    return {**lineage_tags(stage, params_file), LOCK_TOKEN_TAG: held.holder["token"],
            **({FLOW_RUN_TAG: flow_run} if flow_run else {})}


def crash_stale_flow_run(flow_run_id: str | None, stage: str, found_by: str | None) -> bool:
    """Mark Crashed the Prefect flow run of a stage's process that died holding its lock, which Prefect
    would otherwise show Running for good; True where it did. `found_by` is the flow run that took the
    lock over. A flow run already final (the process died after Prefect heard it end), or kept in another
    Prefect database than the one in use now, is left as it is."""
    if not flow_run_id:
        return False
    from prefect import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            found = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return False
        if found.state is not None and found.state.is_final():
            return False
        message = (f"the {stage} stage's process ended without reporting (killed, or its host went down); "
                   f"the run that took its lock over, flow run {found_by}, found it")
        client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    return True


@contextmanager
def tracked_run(stage: str, *, out_dir: str | Path, experiment: str, params_file: str,
                params_to_log: Mapping[str, Any], run_id: str | None = None) -> Iterator[MLflowTracker]:
    """One MLflow run of a stage (`run_id`: continue that one), holding the lock of its output folder. The
    runs that an execution killed in the folder left RUNNING are marked FAILED, except the one continued,
    and its Prefect flow run Crashed.
    The lineage tags are set again at the end, for a stage that writes the very data they hash (download
    writes data/raw/manifest.json)."""
    with stage_lock(out_dir, stage) as held:
        if flow_run := runtime.flow_run.get_id():
            held.record(**{FLOW_RUN_KEY: flow_run})
        if held.stale:
            fail_stale_runs(experiment, held.stale.get("token"), keep=run_id)
            crash_stale_flow_run(held.stale.get(FLOW_RUN_KEY), stage, found_by=flow_run)
        with MLflowTracker(experiment, stage, tags=run_tags(stage, params_file, held), run_id=run_id) as tracker:
            tracker.log_params(params_to_log)
            yield tracker
            tracker.set_tags(lineage_tags(stage, params_file))

