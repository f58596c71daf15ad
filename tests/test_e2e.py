"""The whole journey, as a new user takes it: a real `git clone`, the README's pipeline command offline
through the mirror (on tiny settings), and everything it promises afterwards."""

from __future__ import annotations

import json
import re
import sys
import time

import mlflow
import pytest
from ruamel.yaml import YAML

from tests.conftest import SHARED_DATA, shared_file
from tests.project import dvc, git, make_repo, stage_env, stages_run

STAGES = ["download", "tokenize", "pretrain", "finetune", "classify", "preference", "evaluate", "export"]
TINY = {
    # A val split of 1% (about 3,700 tokens): the evaluate stage measures every model's perplexity over
    # all of it, which at the default 10% was a fifth of this test's time.
    "tokenize": {"val_fraction": 0.01},
    "model": {"preset": "tiny"},
    "pretrain": {"max_steps": 6, "batch_size": 4, "global_batch_size": 4, "eval_interval": 3, "eval_batches": 2,
                 "sample_interval": 6, "checkpoint_interval": 3, "log_interval": 2, "warmup_steps": 2},
    "finetune": {"epochs": None, "max_steps": 4, "batch_size": 4, "global_batch_size": 4, "eval_interval": 2,
                 "eval_batches": 2, "sample_interval": 4, "checkpoint_interval": 2, "log_interval": 2,
                 "max_length": 64},
    "classify": {"epochs": None, "max_steps": 4, "batch_size": 4, "global_batch_size": 4, "eval_interval": 2,
                 "eval_batches": 2, "checkpoint_interval": 2, "log_interval": 2, "max_length": 32},
    "preference": {"epochs": None, "max_steps": 4, "batch_size": 4, "global_batch_size": 4, "eval_interval": 2,
                   "eval_batches": 2, "sample_interval": 4, "checkpoint_interval": 2, "log_interval": 2,
                   "max_length": 64},
    "evaluate": {"test_records": 4, "max_new_tokens": 8, "examples": 2, "batch_size": 4},
}


def set_params(path, changes: dict) -> None:
    yaml = YAML()
    params = yaml.load(path)
    for section, values in changes.items():
        params[section].update(values)
    yaml.dump(params, path)


@pytest.mark.slow
def test_a_fresh_clone_runs_the_pipeline_and_keeps_its_promises(tmp_path, prefect_server):
    import subprocess

    shared_file("tinyshakespeare.txt")  # the mirror must be there: this runs offline
    source = make_repo(tmp_path / "source")
    subprocess.run(["git", "clone", "-q", str(source), str(tmp_path / "clone")], check=True)
    clone = tmp_path / "clone"
    set_params(clone / "params.yaml", TINY)
    git(clone, "commit", "-qam", "tiny settings for the test")
    env = stage_env(prefect_server, LLM_VENV=sys.prefix, LLM_MIRROR_DIR=str(SHARED_DATA))
    env.pop("MLFLOW_TRACKING_URI", None)  # the default: a SQLite store at the clone's root
    started = time.time()

    run = subprocess.run(["scripts/pipeline"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert stages_run(run.stdout + run.stderr) == STAGES
    assert "the MLflow server for this run at http://127.0.0.1:" in run.stderr  # the stages' store, served

    for path in ("data/raw/manifest.json", "data/shards/manifest.json", "data/checkpoints/pretrain/model.safetensors",
                 "data/checkpoints/finetune/model.safetensors", "data/checkpoints/finetune/split.json",
                 "data/eval/report.md", "data/eval/responses.json", "plots/pretrain/loss.png",
                 "data/checkpoints/classify/split.json", "plots/classify/confusion.png", "plots/classify/accuracy.png",
                 "metrics/classify.md", "data/checkpoints/preference/split.json", "plots/preference/reward_margin.png",
                 "data/eval/responses_preference.json", "data/exports/hf/model.safetensors",
                 "data/exports/gpt-instruct.gguf", "data/exports/gpt-instruct.Modelfile"):
        assert (clone / path).is_file(), path
    for stage in STAGES:
        assert json.loads((clone / f"metrics/{stage}.json").read_text()), stage
    assert len(json.loads((clone / "data/eval/responses.json").read_text())) == 4

    client = mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(STAGES)
    commits = {r.data.tags["pipeline.commit"] for r in runs}
    assert len(commits) == 1 and all(r.info.status == "FINISHED" and r.data.metrics for r in runs)
    assert len({r.data.tags["pipeline.params_sha256"] for r in runs}) == 1
    # Lineage in MLflow's own terms: each run's inputs are datasets, by sha256, and models (the UI's Datasets panel).
    inputs = {r.info.run_name: {d.dataset.name: {t.key: t.value for t in d.tags} for d in r.inputs.dataset_inputs}
              for r in runs}
    manifest = {e["name"]: e["sha256"] for e in json.loads((clone / "data/raw/manifest.json").read_text())["sources"]}
    assert {name: tags["sha256"] for name, tags in inputs["download"].items()} == manifest
    assert set(inputs["tokenize"]) == {"the-verdict", "tinyshakespeare"} and "shards" in inputs["pretrain"]
    assert {"instruction-data", "instruction-data/train", "instruction-data/test", "checkpoint pretrain"} <= set(
        inputs["finetune"])
    assert inputs["finetune"]["checkpoint pretrain"]["mlflow.data.context"] == "start"
    assert "checkpoint finetune" in inputs["preference"] and "sms-spam/train" in inputs["classify"]
    assert {"shards", "instruction-data/test", "checkpoint finetune"} <= set(inputs["evaluate"])
    (finetuned,) = [r for r in runs if r.info.run_name == "finetune"]
    base_version = client.get_registered_model("gpt-base").latest_versions[0]
    model_inputs = client.get_run(finetuned.info.run_id).inputs.model_inputs  # search_runs leaves them out
    assert [f"models:/{m.model_id}" for m in model_inputs] == [base_version.source]
    champion = client.get_model_version_by_alias("gpt-instruct", "champion")
    (evaluated,) = [r for r in runs if r.info.run_name == "evaluate"]
    assert champion.tags["stage"] == evaluated.data.tags["best_stage"]  # the better of SFT and DPO
    assert champion.tags["exports"].endswith("/exports")  # the export stage's files, logged on the champion
    assert len(client.search_model_versions("name='gpt-instruct'")) == 2  # SFT and DPO, one version each
    preference = json.loads((clone / "metrics/preference.json").read_text())
    assert {"test_preference_accuracy", "test_reward_margin", "val_chosen_reward"} <= set(preference)
    assert client.get_registered_model("gpt-base").latest_versions
    classifier = client.get_registered_model("gpt-classifier").latest_versions[0]
    assert classifier.tags["stage"] == "classify"
    scores = json.loads((clone / "metrics/classify.json").read_text())
    assert 0 <= scores["test_accuracy"] <= 1 and {"test_f1_ham", "test_f1_spam", "val_loss"} <= set(scores)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from datetime import datetime, timezone

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as prefect:
        since = datetime.fromtimestamp(started, tz=timezone.utc)
        flow_runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=since)))
        names = {prefect.read_flow(r.flow_id).name for r in flow_runs if r.state.is_completed()}
    assert set(STAGES) <= names

    again = dvc(clone, "repro", env=env)
    assert stages_run(again) == [] and "Data and pipelines are up to date" in again

    # Code is a dep too: an edit to the model makes the stages that run it stale, and not the data stages.
    with (clone / "llm/model.py").open("a") as module:
        module.write("# edited\n")
    stale = re.findall(r"^(\w+):\s*$", dvc(clone, "status", env=env), flags=re.MULTILINE)
    assert set(stale) == {"pretrain", "finetune", "classify", "preference", "evaluate", "export"}
    git(clone, "checkout", "llm/model.py")

    # Share the results: the lock, metrics and plots in git, data and checkpoints in the DVC remote.
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "pipeline results")
    dvc(clone, "push", env=env)
    assert (tmp_path / "llm-pipeline-dvc-remote").is_dir()  # the default remote: a folder beside the clone

    # An experiment on a fine-tuning setting reruns exactly finetune, what starts from it, and evaluate.
    variant = dvc(clone, "exp", "run", "-n", "faster-lr", "-S", "finetune.lr=0.0005", "-S", "finetune.min_lr=0.0005",
                  env=env)
    assert stages_run(variant) == ["finetune", "preference", "evaluate", "export"]
    assert "faster-lr" in dvc(clone, "exp", "show", "--md", env=env)
    assert "rouge_l_f1" in dvc(clone, "metrics", "diff", "--all", env=env)
    dvc(clone, "plots", "diff", "-o", str(tmp_path / "plots"), env=env)
    assert (tmp_path / "plots" / "index.html").is_file()

    # The README's comparison: an encoder pretrained on the same shards, and classify fine-tuning it.
    encoder = dvc(clone, "exp", "run", "-n", "encoder", "-S", "+model.objective=masked", "-S", "classify.pooling=mean",
                  "classify", env=env)
    assert stages_run(encoder) == ["pretrain", "classify"]
    pretrained = json.loads((clone / "metrics/pretrain.json").read_text())
    assert {"val_accuracy", "val_top5_accuracy"} <= set(pretrained)
    assert json.loads((clone / "data/checkpoints/classify/config.json").read_text())["model"]["objective"] == "masked"
    compared = dvc(clone, "exp", "diff", "--all", "faster-lr", "encoder", "--md", env=env)
    assert "test_accuracy" in compared and "model.objective" in compared
    assert client.get_registered_model("encoder-base").latest_versions

    # Another clone pulls the data and checkpoints, and has nothing to reproduce.
    subprocess.run(["git", "clone", "-q", str(clone), str(tmp_path / "clone2")], check=True)
    dvc(tmp_path / "clone2", "pull", env=env)
    assert stages_run(dvc(tmp_path / "clone2", "repro", env=env)) == []
