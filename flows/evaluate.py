"""The evaluate stage: measure both models, promote the fine-tuned one if it is at least as good, report.

    python -m flows.evaluate                                       (what `dvc repro evaluate` runs)

Writes `data/eval/` (responses.json in the book's shape, report.md, losses.png) and
`metrics/evaluate.json` (for `dvc metrics show/diff`; `precision_used` says whether it computed in fp32,
the default, or bf16), logs all of it to MLflow (the precision as the run's tag `precision_used`), and gives
the evaluated fine-tuned version the `champion` alias when its scores are at least the current champion's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.common import stage_logger, tracked_run, write_metrics
from llm import faults
from llm.config import EvaluateConfig, load_params
from llm.download import redact_url
from llm.evaluate import RESPONSES_FILE, evaluate_models
from llm.files import atomic_dir
from llm.report import Evaluation, write_report
from llm.responses import write_responses
from llm.tracking import promote_if_better, registered_version

SCORES = ("exact_match", "rouge_l_f1", "judge_score")  # what promotion compares; losses are not scores


def loggable_config(config: EvaluateConfig) -> dict:
    """The evaluate settings as MLflow records them: the judge's URL without credentials or query."""
    logged = dataclasses.asdict(config)
    if logged["judge"]["url"]:
        logged["judge"]["url"] = redact_url(logged["judge"]["url"])
    return logged


@flow(name="evaluate")
def evaluate(params_file: str = "params.yaml", base_dir: str = "data/checkpoints/pretrain",
             finetuned_dir: str = "data/checkpoints/finetune", shards_dir: str = "data/shards",
             out_dir: str = "data/eval", metrics_file: str = "metrics/evaluate.json") -> dict:
    params = load_params(params_file)
    base_name, tuned_name = params.pretrain.registered_model, params.finetune.registered_model
    with tracked_run("evaluate", out_dir=out_dir, experiment=params.tracking.experiment, params_file=params_file,
                     params_to_log={"evaluate": loggable_config(params.evaluate)}) as t:
        measured = evaluate_models(params.evaluate, base_dir, finetuned_dir, shards_dir)
        metrics = measured.metrics()
        t.log_metrics(metrics, step=0)
        base_version = registered_version(base_dir, base_name, "pretrain", params.serving)
        version = registered_version(finetuned_dir, tuned_name, "finetune", params.serving)
        promoted, previous = promote_if_better(tuned_name, version, {k: metrics[k] for k in SCORES if k in metrics})
        t.set_tags({"evaluated_model": f"{tuned_name}/{version}", "promoted": str(promoted),
                    "precision_used": measured.precision})
        with atomic_dir(out_dir) as tmp:
            write_responses(tmp / RESPONSES_FILE, measured.responses)
            report = write_report(tmp, Evaluation(
                base_model=f"{base_name} version {base_version}", finetuned_model=f"{tuned_name} version {version}",
                promoted=promoted, base_loss=measured.base_loss, finetuned_loss=measured.finetuned_loss,
                scores=measured.scores, judge=measured.judge, histories=measured.histories,
                examples=measured.examples))
            faults.pause_point("evaluate.write")
        for path in sorted(Path(out_dir).iterdir()):
            t.log_artifact(path, "eval")
    recorded = {**metrics, "precision_used": measured.precision}  # a string: MLflow's metrics take numbers only
    write_metrics(metrics_file, recorded)
    verdict = ("promoted to champion" if promoted else f"not promoted: version {previous} stays champion")
    stage_logger().info("evaluate: %s version %s %s; report %s; judge %s", tuned_name, version, verdict,
                        Path(out_dir) / report.name, measured.judge.summary())
    return recorded


if __name__ == "__main__":
    evaluate()
