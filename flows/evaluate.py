"""The evaluate stage: measure the base model and every instruction model, promote the best, report.

    python -m flows.evaluate                                       (what `dvc repro evaluate` runs)

Writes `data/eval/` (responses.json of the SFT model and responses_preference.json of the DPO model, in
the book's shape; report.md with base, SFT and DPO side by side; losses.png; best.json, the best model,
which the export stage exports) and `metrics/evaluate.json`
(for `dvc metrics show/diff`; `precision_used` says whether it computed in fp32, the default, or bf16),
and logs all of it to MLflow. The champion: of this run's instruction models, the best by the primary
score (the judge's when a judge scored them all, else ROUGE-L F1) gets the `champion` alias of its
registered model when that score is at least the current holder's. With `evaluate.hellaswag` naming a
download source (role: hellaswag), each causal model is scored on its HellaSwag items too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.common import run_stage, stage_logger, tracked_run, write_metrics
from llm import faults
from llm.checkpoint import MODEL_FILE, SPLIT_FILE, read_config
from llm.config import EvaluateConfig, load_params
from llm.download import downloaded_source, redact_url
from llm.evaluate import evaluate_models, promote_best, write_evaluation
from llm.files import atomic_dir
from llm.hellaswag import read_items
from llm.lineage import checkpoint_input, shards_input, source_inputs, split_inputs
from llm.registry import Best, registered_version, write_best


def loggable_config(config: EvaluateConfig) -> dict:
    """The evaluate settings as MLflow records them: the judge's URL without credentials or query."""
    logged = dataclasses.asdict(config)
    if logged["judge"]["url"]:
        logged["judge"]["url"] = redact_url(logged["judge"]["url"])
    return logged


@flow(name="evaluate")
def evaluate(params_file: str = "params.yaml", base_dir: str = "data/checkpoints/pretrain",
             finetuned_dir: str = "data/checkpoints/finetune", preference_dir: str = "data/checkpoints/preference",
             shards_dir: str = "data/shards", raw_dir: str = "data/raw", out_dir: str = "data/eval",
             metrics_file: str = "metrics/evaluate.json") -> dict:
    params = load_params(params_file)
    log = stage_logger()
    swag = params.evaluate.hellaswag
    # Read before any model is loaded: a source the download stage did not fetch fails at once.
    swag_items = None if swag is None else read_items(
        downloaded_source(raw_dir, "hellaswag", swag, "evaluate.hellaswag")[0])
    tuned_dirs = {"finetune": finetuned_dir}
    if (Path(preference_dir) / MODEL_FILE).is_file():
        tuned_dirs["preference"] = preference_dir
    else:
        log.info("evaluate: no preference model in %s (`dvc repro preference` makes one); evaluating the "
                 "finetune model alone", preference_dir)
    names = {"finetune": params.finetune.registered_model, "preference": params.preference.registered_model}
    base_name = params.pretrain.registry_name(read_config(base_dir).model.objective)
    with tracked_run("evaluate", out_dir=out_dir, experiment=params.tracking.experiment, params_file=params_file,
                     params_to_log={"evaluate": loggable_config(params.evaluate)}) as t:
        measured = evaluate_models(params.evaluate, base_dir, tuned_dirs, shards_dir, swag_items)
        metrics = measured.metrics()
        t.log_metrics(metrics, step=0)
        base_version = registered_version(base_dir, base_name, "pretrain", params.serving)
        versions = {stage: registered_version(folder, names[stage], stage, params.serving)
                    for stage, folder in tuned_dirs.items()}
        promotion = promote_best(measured, names, versions)
        t.log_inputs([shards_input(shards_dir, "eval"),
                      *split_inputs(Path(finetuned_dir) / SPLIT_FILE, params.finetune.instructions, ("test",)),
                      *(checkpoint_input(folder, "evaluated") for folder in (base_dir, *tuned_dirs.values())),
                      *(source_inputs(raw_dir, "hellaswag", [swag], "eval") if swag else [])])
        t.set_tags({"evaluated_models": ", ".join(f"{names[s]}/{v} ({s})" for s, v in versions.items()),
                    "best_stage": promotion.best, "primary_score": promotion.key, "promoted": str(promotion.promoted),
                    "precision_used": measured.precision})
        with atomic_dir(out_dir) as tmp:
            report = write_evaluation(tmp, measured, f"{base_name} version {base_version}",
                                      {s: f"{names[s]} version {v}" for s, v in versions.items()}, promotion)
            best = promotion.best
            write_best(tmp, Best(stage=best, checkpoint=str(tuned_dirs[best]), registered_model=names[best],
                                 version=versions[best], champion=promotion.promoted, primary_score=promotion.key))
            faults.pause_point("evaluate.write")
        for path in sorted(Path(out_dir).iterdir()):
            t.log_artifact(path, "eval")
    recorded = {**metrics, "precision_used": measured.precision}  # a string: MLflow's metrics take numbers only
    write_metrics(metrics_file, recorded)
    verdict = ("promoted to champion" if promotion.promoted
               else f"not promoted: version {promotion.previous} stays champion")
    log.info("evaluate: best by %s is the %s model, %s version %s, %s; report %s; judge %s", promotion.key, best,
             names[best], versions[best], verdict, Path(out_dir) / report.name, measured.tuned[best].judge.summary())
    return recorded


if __name__ == "__main__":
    run_stage(evaluate)
