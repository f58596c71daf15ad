"""The pretrain flow through Prefect's local API into a real MLflow store."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest
import torch
from ruamel.yaml import YAML

from llm.checkpoint import load_model
from llm.registry import load_logged_gpt
from tests.data import make_shards, patterned_tokens

PARAMS = {
    "model": {"preset": "tiny", "vocab_size": 512, "context_length": 32},
    "pretrain": {"batch_size": 4, "global_batch_size": 8, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2,
                 "log_interval": 2, "eval_interval": 4, "eval_batches": 2, "sample_interval": 6, "sample_tokens": 4,
                 "sample_prompt": " the and of", "checkpoint_interval": 6, "precision": "fp32", "device": "cpu",
                 "registered_model": "test-base"},
    "tracking": {"experiment": "test-pretrain"},
}


@pytest.mark.slow
def test_pretrain_flow_tracks_registers_and_writes_dvc_outputs(tmp_path, monkeypatch, prefect_server):
    from flows.pretrain import pretrain

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    make_shards(tmp_path / "data/shards", patterned_tokens(6000), patterned_tokens(800), vocab_size=512)
    YAML().dump(PARAMS, tmp_path / "params.yaml")

    metrics = pretrain()

    assert json.loads((tmp_path / "metrics/pretrain.json").read_text()) == metrics
    assert metrics["steps"] == 12 and metrics["val_loss"] < 5.5 and metrics["precision_used"] == "fp32"
    with open(tmp_path / "plots/pretrain/val_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 4, 8, 12]
    assert (tmp_path / "plots/pretrain/loss.png").read_bytes()[:4] == b"\x89PNG"

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test-pretrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert run.data.params["pretrain.lr"] == "0.003" and run.data.params["model.n_layer"] == "2"
    assert run.data.tags["pipeline.stage"] == "pretrain" and "pipeline.params_sha256" in run.data.tags
    assert run.data.tags["precision_used"] == "fp32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4, 6, 8, 10, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/step-000006.txt", "samples/step-000012.txt"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/loss.png"}

    (version,) = client.search_model_versions("name='test-base'")
    assert version.run_id == run.info.run_id and version.tags["stage"] == "pretrain"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = load_logged_gpt(f"models:/test-base/{version.version}")
    ours = load_model(tmp_path / "data/checkpoints/pretrain")
    idx = torch.randint(0, 512, (2, 32))
    assert torch.equal(logged(idx), ours(idx))
