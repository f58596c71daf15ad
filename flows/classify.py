"""The classify stage: a text classifier fine-tuned from the pretrained GPT (the book's chapter 6).

    python -m flows.classify                                      (what `dvc repro classify` runs)
    torchrun --standalone --nproc_per_node=N -m flows.classify    (DDP; rank 0 logs and writes)

Reads the pretrain stage's model (or `classify.init_from`) and the classification data from `data/raw/`,
writes the classifier with `split.json` to `data/checkpoints/classify/`, its scores on train, val and test
to `metrics/classify.json` with a Markdown report beside them (`metrics/classify.md`), and loss, accuracy
and confusion-matrix plots to `plots/classify/`. MLflow gets the run, the plots, a table of the test texts
it gets wrong, and the model, registered as `classify.registered_model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.training import run_training_stage, tracked_training
from llm.classify import final_scores, run_classify, run_settings, write_report
from llm.checkpoint import SPLIT_FILE
from llm.config import load_params
from llm.lineage import source_inputs, split_inputs
from llm.plots import plot_confusion
from llm.starting import starting_input
from llm.tracking import MLflowTracker
from llm.train import TrainResult


@flow(name="classify")
def classify(params_file: str = "params.yaml", raw_dir: str = "data/raw",
             pretrain_dir: str = "data/checkpoints/pretrain", out_dir: str = "data/checkpoints/classify",
             metrics_file: str = "metrics/classify.json", plots_dir: str = "plots/classify") -> dict:
    params = load_params(params_file)
    settings = run_settings(params, raw_dir, pretrain_dir)  # hashes the starting weights: once

    def score(tracker: MLflowTracker, result: TrainResult) -> dict[str, float]:
        scored = final_scores(result.model, out_dir, params.classify.batch_size)
        plot = Path(plots_dir) / "confusion.png"
        plot_confusion(plot, scored.confusion, scored.labels, "classify: test confusion matrix")
        tracker.log_artifact(plot, "plots")
        tracker.log_table(scored.wrong, "misclassified_test.json")
        tracker.log_artifact(write_report(Path(metrics_file).with_suffix(".md"), scored, plot))
        return scored.metrics

    return tracked_training(
        "classify", experiment=params.tracking.experiment, params_file=params_file,
        params_to_log={"classify": dataclasses.asdict(params.classify)},
        settings=settings, out_dir=out_dir, metrics_file=metrics_file, plots_dir=plots_dir,
        registered_model=params.classify.registered_model, score=score,
        inputs=lambda: [*source_inputs(raw_dir, "classification", [params.classify.data]),
                        *split_inputs(Path(out_dir) / SPLIT_FILE, params.classify.data),
                        starting_input(params.classify.init_from, settings["start"], pretrain_dir, "classify")],
        train=lambda tracker, dist, run_id: run_classify(params, raw_dir, pretrain_dir, out_dir, tracker=tracker,
                                                         dist=dist, run_id=run_id, settings=settings))


if __name__ == "__main__":
    run_training_stage(classify)
