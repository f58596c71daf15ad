"""The pretrain stage: train the GPT on the token shards, tracked in MLflow.

    python -m flows.pretrain                                      (what `dvc repro pretrain` runs)
    torchrun --standalone --nproc_per_node=N -m flows.pretrain    (DDP; rank 0 logs and writes)

Writes the model to `data/checkpoints/pretrain/` (resumable state under `resume/`), the final figures to
`metrics/pretrain.json`, and loss curves to `plots/pretrain/` (CSV for `dvc plots`, PNG). A rerun after a
kill continues from the last checkpoint, in the same MLflow run. The model is logged to MLflow and
registered as `pretrain.registered_model`.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

from prefect import flow

from flows.common import stage_logger, write_metrics
from llm import distributed
from llm.config import load_params
from llm.plots import write_loss_plots
from llm.pretrain import fingerprint, run_pretrain
from llm.tracking import MemoryTracker, MLflowTracker, lineage_tags, log_gpt_model
from llm.train import resumable_run_id


def _pretrain(params_file: str, shards_dir: str, out_dir: str, metrics_file: str, plots_dir: str) -> dict:
    params = load_params(params_file)
    dist = distributed.from_env()
    run_id = resumable_run_id(out_dir, fingerprint(params, shards_dir))
    tracker = (MLflowTracker(params.tracking.experiment, "pretrain", tags=lineage_tags("pretrain", params_file),
                             run_id=run_id) if dist.is_main else nullcontext(MemoryTracker()))
    try:
        with tracker as t:
            if dist.is_main:
                t.log_params({"model": params.model.build().to_dict(), "pretrain": dataclasses.asdict(params.pretrain),
                              "tokenize": dataclasses.asdict(params.tokenize)})
            result = run_pretrain(params, shards_dir, out_dir, tracker=t, dist=dist,
                                  run_id=getattr(t, "run_id", None))
            if not dist.is_main:
                return result.metrics
            for path in write_loss_plots(plots_dir, result.progress.history, "pretrain"):
                t.log_artifact(path, "plots")
            version = log_gpt_model(out_dir, params.pretrain.registered_model,
                                    {"stage": "pretrain", "run_id": t.run_id})
            t.set_tags({"registered_model_version": str(version)})
    finally:
        distributed.shutdown()
    write_metrics(metrics_file, result.metrics)
    stage_logger().info("pretrain: %s; registered %s version %s", result.metrics,
                        params.pretrain.registered_model, version)
    return result.metrics


@flow(name="pretrain")
def pretrain(params_file: str = "params.yaml", shards_dir: str = "data/shards",
             out_dir: str = "data/checkpoints/pretrain", metrics_file: str = "metrics/pretrain.json",
             plots_dir: str = "plots/pretrain") -> dict:
    return _pretrain(params_file, shards_dir, out_dir, metrics_file, plots_dir)


if __name__ == "__main__":
    # Under torchrun only rank 0 runs as a Prefect flow run; the other ranks run the same code bare.
    if distributed.from_env().is_main:
        pretrain()
    else:
        _pretrain("params.yaml", "data/shards", "data/checkpoints/pretrain", "metrics/pretrain.json",
                  "plots/pretrain")
