"""The finetune stage: instruction fine-tuning of the pretrained model, tracked in MLflow.

    python -m flows.finetune                                      (what `dvc repro finetune` runs)
    torchrun --standalone --nproc_per_node=N -m flows.finetune    (DDP; rank 0 logs and writes)

Reads the pretrain stage's model (or `finetune.init_from`) and the instruction data from `data/raw/`,
writes the fine-tuned model (LoRA merged) with `split.json` to `data/checkpoints/finetune/`, metrics to
`metrics/finetune.json` and loss curves to `plots/finetune/`; registers `finetune.registered_model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.training import run_training_stage, tracked_training
from llm.checkpoint import SPLIT_FILE
from llm.config import load_params
from llm.finetune import run_finetune, run_settings
from llm.lineage import source_inputs, split_inputs
from llm.starting import starting_input


@flow(name="finetune")
def finetune(params_file: str = "params.yaml", raw_dir: str = "data/raw",
             pretrain_dir: str = "data/checkpoints/pretrain", out_dir: str = "data/checkpoints/finetune",
             metrics_file: str = "metrics/finetune.json", plots_dir: str = "plots/finetune") -> dict:
    params = load_params(params_file)
    settings = run_settings(params, raw_dir, pretrain_dir)  # hashes the starting weights: once
    return tracked_training(
        "finetune", experiment=params.tracking.experiment, params_file=params_file,
        params_to_log={"finetune": dataclasses.asdict(params.finetune)},
        settings=settings, out_dir=out_dir, metrics_file=metrics_file,
        plots_dir=plots_dir, registered_model=params.finetune.registered_model,
        inputs=lambda: [*source_inputs(raw_dir, "instructions", [params.finetune.instructions]),
                        *split_inputs(Path(out_dir) / SPLIT_FILE, params.finetune.instructions),
                        starting_input(params.finetune.init_from, settings["start"], pretrain_dir, "finetune")],
        train=lambda tracker, dist, run_id: run_finetune(params, raw_dir, pretrain_dir, out_dir, tracker=tracker,
                                                         dist=dist, run_id=run_id, settings=settings))


if __name__ == "__main__":
    run_training_stage(finetune)
