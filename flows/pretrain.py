"""The pretrain stage: train the GPT on the token shards, tracked in MLflow.

    python -m flows.pretrain                                      (what `dvc repro pretrain` runs)
    torchrun --standalone --nproc_per_node=N -m flows.pretrain    (DDP; rank 0 logs and writes)

Writes the model to `data/checkpoints/pretrain/` (resumable state under `resume/`), the final figures to
`metrics/pretrain.json`, and loss curves to `plots/pretrain/` (CSV for `dvc plots`, PNG). A rerun after a
kill continues from the last checkpoint, in the same MLflow run. The model is logged to MLflow and
registered as `pretrain.registered_model` (an encoder, model.objective: masked, as
`pretrain.registered_encoder`).
"""

from __future__ import annotations

import dataclasses

from prefect import flow

from flows.training import run_training_stage, tracked_training
from llm.config import load_params
from llm.lineage import shards_input
from llm.pretrain import run_pretrain, run_settings
from llm.starting import starting_input


@flow(name="pretrain")
def pretrain(params_file: str = "params.yaml", shards_dir: str = "data/shards",
             out_dir: str = "data/checkpoints/pretrain", metrics_file: str = "metrics/pretrain.json",
             plots_dir: str = "plots/pretrain") -> dict:
    params = load_params(params_file)
    settings = run_settings(params, shards_dir)  # hashes the shards' manifest and the code: once
    model = params.model.build()
    return tracked_training(
        "pretrain", experiment=params.tracking.experiment, params_file=params_file,
        params_to_log={"model": model.to_dict(), "pretrain": dataclasses.asdict(params.pretrain),
                       "tokenize": dataclasses.asdict(params.tokenize)},
        settings=settings, out_dir=out_dir, metrics_file=metrics_file,
        plots_dir=plots_dir, registered_model=params.pretrain.registry_name(model.objective),
        inputs=lambda: [shards_input(shards_dir, "train"),
                        starting_input(params.pretrain.init_from, settings["start"], section="pretrain")],
        train=lambda tracker, dist, run_id: run_pretrain(params, shards_dir, out_dir, tracker=tracker, dist=dist,
                                                         run_id=run_id, settings=settings))


if __name__ == "__main__":
    run_training_stage(pretrain)
