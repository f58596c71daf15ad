"""The preference stage: DPO on the instruction model (the book's chapter 7 bonus), tracked in MLflow.

    python -m flows.preference                                    (what `dvc repro preference` runs)
    torchrun --standalone --nproc_per_node=N -m flows.preference  (DDP; rank 0 logs and writes)

Reads the finetune stage's model (or `preference.init_from`) and the preference pairs from `data/raw/`,
writes the tuned model with `split.json` to `data/checkpoints/preference/`, its DPO figures on the val and
test pairs to `metrics/preference.json`, and loss, reward-margin and preference-accuracy curves to
`plots/preference/`; registers the model as a new version of `preference.registered_model` (the
instruction model's name, tagged stage=preference), for the evaluate stage to compare with the SFT one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.training import run_training_stage, tracked_training
from llm.checkpoint import SPLIT_FILE
from llm.config import load_params
from llm.lineage import source_inputs, split_inputs
from llm.preference import final_scores, run_preference, run_settings
from llm.starting import starting_input
from llm.tracking import MLflowTracker
from llm.train import TrainResult


@flow(name="preference")
def preference(params_file: str = "params.yaml", raw_dir: str = "data/raw",
               finetune_dir: str = "data/checkpoints/finetune", out_dir: str = "data/checkpoints/preference",
               metrics_file: str = "metrics/preference.json", plots_dir: str = "plots/preference") -> dict:
    params = load_params(params_file)
    settings = run_settings(params, raw_dir, finetune_dir)  # hashes the starting weights: once

    def score(tracker: MLflowTracker, result: TrainResult) -> dict[str, float]:
        return final_scores(result.model, params.preference, finetune_dir, out_dir)

    return tracked_training(
        "preference", experiment=params.tracking.experiment, params_file=params_file,
        params_to_log={"preference": dataclasses.asdict(params.preference)},
        settings=settings, out_dir=out_dir, metrics_file=metrics_file, plots_dir=plots_dir,
        registered_model=params.preference.registered_model, score=score,
        inputs=lambda: [*source_inputs(raw_dir, "preference", [params.preference.data]),
                        *split_inputs(Path(out_dir) / SPLIT_FILE, params.preference.data),
                        starting_input(params.preference.init_from, settings["start"], finetune_dir, "preference",
                                       stage="finetune")],
        train=lambda tracker, dist, run_id: run_preference(params, raw_dir, finetune_dir, out_dir, tracker=tracker,
                                                           dist=dist, run_id=run_id, settings=settings))


if __name__ == "__main__":
    run_training_stage(preference)
