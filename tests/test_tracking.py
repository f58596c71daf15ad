"""Tracking: where the store lives, lineage tags, and concurrent writers on a real SQLite store."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from llm.tracking import MemoryTracker, flatten, lineage_tags, project_root, tracking_uri
from tests.conftest import ROOT


def test_experiment_copies_resolve_to_the_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    assert project_root(copy) == tmp_path
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12"))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_nested_params():
    assert flatten({"pretrain": {"lr": 3e-4, "sched": {"warmup": 10}}, "seed": 1}) == {
        "pretrain.lr": "0.0003", "pretrain.sched.warmup": "10", "seed": "1"}


def test_lineage_tags_name_commit_params_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "params.yaml").write_text("tokenize: {}\n")
    subprocess.run(["git", "add", "params.yaml"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e.invalid", "commit", "-qm", "x"], check=True)
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/manifest.json").write_text("{}")
    monkeypatch.setenv("DVC_STAGE", "pretrain")
    tags = lineage_tags("pretrain")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["pipeline.commit"] == tags["mlflow.source.git.commit"] == commit
    assert tags["pipeline.dirty"] == "False"
    assert tags["dvc.stage"] == "pretrain"
    assert len(tags["pipeline.params_sha256"]) == len(tags["pipeline.data_sha256"]) == 64


def test_memory_tracker_keeps_series():
    tracker = MemoryTracker()
    tracker.log_metrics({"loss": 2.0, "lr": 0.1}, step=1)
    tracker.log_metrics({"loss": 1.5}, step=2)
    assert tracker.series("loss") == [(1, 2.0), (2, 1.5)]


WRITER = textwrap.dedent("""
    import sys
    from llm.tracking import MLflowTracker
    name = sys.argv[1]
    with MLflowTracker("concurrency", name, tags={"writer": name}) as tracker:
        tracker.log_params({"writer": name, "section": {"value": 1}})
        for step in range(40):
            tracker.log_metrics({"loss": 10.0 - step * 0.1}, step=step)
        tracker.log_text("hello from " + name, "notes.txt")
""")


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    import mlflow

    env = {"DVC_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    for round_ in ("fresh store", "existing store"):
        names = [f"{round_}-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, n], cwd=tmp_path, env=env,
                                  stderr=subprocess.PIPE, text=True) for n in names]
        for proc in procs:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("concurrency")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(
        f"{r}-{i}" for r in ("fresh store", "existing store") for i in range(2))
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(40))
        assert run.data.params == {"writer": run.info.run_name, "section.value": "1"}
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/notes.txt")
        assert text == f"hello from {run.info.run_name}"
