"""The tokenize stage: encode the downloaded corpus into Arrow token shards for train and val.

    python -m flows.tokenize            (what `dvc repro tokenize` runs)

Reads `data/raw/corpus/`, writes `data/shards/{train,val}/*.arrow` with `data/shards/manifest.json`, and
`metrics/tokenize.json` (docs, tokens, tokens/s).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.common import run_stage, stage_logger, tracked_run, write_metrics
from llm.config import load_params
from llm.lineage import source_inputs
from llm.tokenize import tokenize_corpus


@flow(name="tokenize")
def tokenize(
    params_file: str = "params.yaml",
    raw_dir: str = "data/raw",
    shards_dir: str = "data/shards",
    metrics_file: str = "metrics/tokenize.json",
) -> dict:
    params = load_params(params_file)
    with tracked_run("tokenize", out_dir=shards_dir, experiment=params.tracking.experiment, params_file=params_file,
                     params_to_log={"tokenize": dataclasses.asdict(params.tokenize)}) as tracker:
        result = tokenize_corpus(raw_dir, shards_dir, params.tokenize)
        tracker.log_inputs(source_inputs(raw_dir, "corpus"))
        metrics = result.metrics
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(Path(shards_dir) / "manifest.json")
    stage_logger().info(
        "%s docs, %s tokens (train %s, val %s) at %s tokens/s",
        *(f"{metrics[k]:,}" for k in ("docs", "tokens", "train_tokens", "val_tokens", "tokens_per_s")),
    )
    write_metrics(metrics_file, metrics)
    return metrics


if __name__ == "__main__":
    run_stage(tokenize)
