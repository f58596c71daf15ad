"""The tokenize stage: encode the downloaded corpus into Arrow token shards for train and val.

    python -m flows.tokenize            (what `dvc repro tokenize` runs)

Reads `data/raw/corpus/`, writes `data/shards/{train,val}/*.arrow` with `data/shards/manifest.json`, and
`metrics/tokenize.json` (docs, tokens, tokens/s).
"""

from __future__ import annotations

from prefect import flow

from flows.common import stage_logger, write_metrics
from llm.config import load_params
from llm.tokenize import tokenize_corpus


@flow(name="tokenize")
def tokenize(
    params_file: str = "params.yaml",
    raw_dir: str = "data/raw",
    shards_dir: str = "data/shards",
    metrics_file: str = "metrics/tokenize.json",
) -> dict:
    config = load_params(params_file).tokenize
    result = tokenize_corpus(raw_dir, shards_dir, config)
    metrics = result.metrics
    stage_logger().info(
        "%s docs, %s tokens (train %s, val %s) at %s tokens/s",
        *(f"{metrics[k]:,}" for k in ("docs", "tokens", "train_tokens", "val_tokens", "tokens_per_s")),
    )
    write_metrics(metrics_file, metrics)
    return metrics


if __name__ == "__main__":
    tokenize()
