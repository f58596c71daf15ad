"""What the stage flows share: their logger, metrics files, and the tracked run of a training stage."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from llm import distributed
from llm.distributed import Dist
from llm.files import write_json_atomic
from llm.plots import write_loss_plots
from llm.tracking import MemoryTracker, MLflowTracker, Tracker, lineage_tags, log_gpt_model, write_registration
from llm.train import TrainResult, resumable_run_id


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (its lines reach the Prefect UI), else a plain one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A stage's metrics file for `dvc metrics show/diff`, written atomically."""
    write_json_atomic(path, metrics)


@contextmanager
def tracked_run(stage: str, *, experiment: str, params_file: str,
                params_to_log: Mapping[str, Any]) -> Iterator[MLflowTracker]:
    """One MLflow run for a stage that does not train; its lineage tags are set again at the end, for
    a stage that writes the very data they hash (download writes data/raw/manifest.json)."""
    with MLflowTracker(experiment, stage, tags=lineage_tags(stage, params_file)) as tracker:
        tracker.log_params(params_to_log)
        yield tracker
        tracker.set_tags(lineage_tags(stage, params_file))


def tracked_training(
    stage: str, *, experiment: str, params_file: str, params_to_log: Mapping[str, Any], fingerprint: str,
    out_dir: str, metrics_file: str, plots_dir: str, registered_model: str,
    train: Callable[[Tracker, Dist, str | None], TrainResult],
) -> dict:
    """Run `train` as one MLflow run (continued after a kill), then write its metrics and loss plots,
    log the model and register it. Under torchrun only rank 0 tracks, logs and writes."""
    dist = distributed.from_env()
    run_id = resumable_run_id(out_dir, fingerprint)
    tracker = (MLflowTracker(experiment, stage, tags=lineage_tags(stage, params_file), run_id=run_id)
               if dist.is_main else nullcontext(MemoryTracker()))
    try:
        with tracker as t:
            if dist.is_main:
                t.log_params(params_to_log)
            result = train(t, dist, getattr(t, "run_id", None))
            if not dist.is_main:
                return result.metrics
            for path in write_loss_plots(plots_dir, result.progress.history, stage):
                t.log_artifact(path, "plots")
            version = log_gpt_model(out_dir, registered_model, {"stage": stage, "run_id": t.run_id})
            t.set_tags({"registered_model_version": str(version)})
            write_registration(out_dir, registered_model, str(version), t.run_id)
    finally:
        distributed.shutdown()
    write_metrics(metrics_file, result.metrics)
    stage_logger().info("%s: %s; registered %s version %s", stage,
                        ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()), registered_model, version)
    return result.metrics
