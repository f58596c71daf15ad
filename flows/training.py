"""The tracked run of a training stage (pretrain, finetune, classify, preference): MLflow run, metrics, loss
plots, registry; and how its process runs it, under torchrun too (`run_training_stage`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import Flow

from flows.common import run_stage, stage_logger, tracked_run, write_metrics
from llm import distributed
from llm.config import load_params
from llm.checkpoint import HISTORY_FILE, write_registration
from llm.distributed import Dist
from llm.lineage import DataInput
from llm.plots import write_loss_plots
from llm.registry import log_gpt_model
from llm.tracking import MemoryTracker, MLflowTracker, Tracker
from llm.train import TrainResult, resumable_run_id


def tracked_training(
    stage: str, *, experiment: str, params_file: str, params_to_log: Mapping[str, Any],
    settings: Mapping[str, Any], out_dir: str, metrics_file: str, plots_dir: str, registered_model: str,
    train: Callable[[Tracker, Dist, str | None], TrainResult],
    score: Callable[[MLflowTracker, TrainResult], dict[str, float]] | None = None,
    inputs: Callable[[], Sequence[DataInput | None]] | None = None,
) -> dict:
    """Run `train` as one MLflow run (continued after a kill), log whatever of its history the run lacks,
    then write its metrics and loss plots, log the model and register it. `score`, if given, measures the
    trained model in the run (logging what it draws) and returns figures for the metrics file. `inputs`
    gives the run's data and starting checkpoint for MLflow's Datasets panel, once training has written
    what they include (a stage's split.json). The dtype
    training computed in (`precision: auto` picks it by the host) is the run's tag `precision_used` and a
    key of the metrics file. Under torchrun only rank 0 locks, tracks, logs and writes."""
    dist = distributed.from_env()
    # A resumed run continues its MLflow run; under torchrun the other ranks report to memory only.
    run = (tracked_run(stage, out_dir=out_dir, experiment=experiment, params_file=params_file,
                       params_to_log=params_to_log, run_id=resumable_run_id(out_dir, settings))
           if dist.is_main else nullcontext(MemoryTracker()))
    with run as t:
        result = train(t, dist, getattr(t, "run_id", None))
        if not dist.is_main:
            return result.metrics
        # Points the store did not take during training (or a killed run never logged): logged now,
        # or the stage fails here, with the model and its history.json saved.
        t.sync_history(result.progress.history, Path(out_dir) / HISTORY_FILE)
        if inputs:
            t.log_inputs(inputs())
        for path in write_loss_plots(plots_dir, result.progress.history, stage):
            t.log_artifact(path, "plots")
        if score:
            scored = score(t, result)
            t.log_metrics(scored, step=result.progress.step)
            result = dataclasses.replace(result, metrics={**result.metrics, **scored})
        version = log_gpt_model(out_dir, registered_model, {"stage": stage, "run_id": t.run_id},
                                serving=load_params(params_file).serving)
        t.set_tags({"registered_model_version": str(version), "precision_used": result.precision_used})
        write_registration(out_dir, registered_model, str(version), t.run_id)
    recorded = {**result.metrics, "precision_used": result.precision_used}  # a string: not an MLflow metric
    write_metrics(metrics_file, recorded)
    stage_logger().info("%s: %s, in %s; registered %s version %s", stage,
                        ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()), result.precision_used,
                        registered_model, version)
    return recorded


def run_training_stage(stage: Flow[..., dict]) -> dict:
    """`run_stage` for a training stage, which torchrun may start as several processes: rank 0 runs it as
    the Prefect flow run, the other ranks run the same code bare (their part of `tracked_training`)."""
    if distributed.from_env().is_main:
        return run_stage(stage)
    return stage.fn()
