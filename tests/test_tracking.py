"""Tracking: where the store lives, lineage tags, concurrent writers, and a locked or unavailable store,
all on real SQLite stores."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llm.checkpoint import REGISTRY_FILE, read_registration, write_registration
from llm.lineage import code_version, flatten, lineage_tags
from llm.registry import log_gpt_model, registered_version
from llm.store import TrackingUnavailable, artifact_location, project_root, sqlite_path, tracking_uri, with_busy_timeout
from llm.tracking import MemoryTracker, MLflowTracker
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
    (tmp_path / "params.yaml").write_text("tokenize: {seed: 2}\n")  # a tracked file changed, not committed
    assert lineage_tags("pretrain")["pipeline.dirty"] == "True"
    assert code_version(tmp_path / "data") == (commit, True)  # a folder inside the repository


def test_code_version_outside_a_git_repository_is_unknown(tmp_path):
    assert code_version(tmp_path) == (None, None)


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


def test_sqlite_uris_get_a_busy_timeout_that_reaches_sqlite3(tmp_path):
    from mlflow.store.db.utils import create_sqlalchemy_engine

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    timed = with_busy_timeout(uri)
    assert timed == f"{uri}?timeout=30"
    assert with_busy_timeout(f"{uri}?timeout=5") == f"{uri}?timeout=5"
    assert with_busy_timeout("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    # The paths read from the URI (the lock file, mlartifacts/) are the same with the option.
    assert sqlite_path(timed) == sqlite_path(uri) == tmp_path / "mlflow.db"
    assert artifact_location(timed) == (tmp_path / "mlartifacts").as_uri()
    # MLflow builds its engine this way; sqlite3 reports the wait it was given, in ms (its default is 5000).
    engine = create_sqlalchemy_engine(timed)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    engine.dispose()


# --- a locked or unavailable store ------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A fresh SQLite store of the test's own; returns its database file."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return db


@contextmanager
def exclusive_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the write lock on the store, as a second `dvc exp` run does while it
    writes; the lock goes when the block ends, or earlier where the caller commits."""
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("COMMIT")
        holder.close()


@contextmanager
def short_busy_wait(ms: int = 100) -> Iterator[None]:
    """MLflow sets `PRAGMA busy_timeout = 20000` on every session it opens: a test whose lock outlasts
    that would take minutes. This rewrites the statement so that a lock outlasts the wait in `ms`."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def shorten(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("PRAGMA BUSY_TIMEOUT"):
            statement = f"PRAGMA busy_timeout = {ms};"
        return statement, parameters

    event.listen(Engine, "before_cursor_execute", shorten, retval=True)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", shorten)


def held_points(run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llm.tracking" and r.levelno == logging.WARNING]


@pytest.mark.slow
def test_a_store_locked_for_seconds_waits_and_loses_nothing(store):
    # MLflow's own busy wait covers a lock of a few seconds: the calls only take longer.
    with MLflowTracker("locked", "pretrain") as tracker:
        with exclusive_lock(store) as holder:
            threading.Timer(1.5, lambda: holder.execute("COMMIT")).start()
            for step in range(5):
                tracker.log_metrics({"loss": 5.0 - step}, step=step)
        assert held_points(tracker.run_id, "loss") == [(step, 5.0 - step) for step in range(5)]


@pytest.mark.slow
def test_a_lock_longer_than_the_wait_is_retried_and_buffered_then_logged_once(store, caplog):
    history = {"loss": [(step, 10.0 - step) for step in range(12)], "lr": [(step, 0.1) for step in range(12)]}
    with MLflowTracker("locked", "pretrain", retries=1, retry_delay_s=0.01, retry_every_s=0) as tracker:
        with short_busy_wait():
            with exclusive_lock(store):
                for step in range(6):  # every try fails: nothing raises, training goes on
                    tracker.log_metrics({"loss": history["loss"][step][1], "lr": 0.1}, step=step)
                tracker.log_text("a sample", "samples/step-000005.txt")
            for step in range(6, 12):  # the first call after the lock logs what was kept, with its own
                tracker.log_metrics({"loss": history["loss"][step][1], "lr": 0.1}, step=step)
        assert held_points(tracker.run_id, "loss") == history["loss"]
        assert tracker.sync_history(history) == 0  # nothing lacks, and nothing is logged twice
        assert held_points(tracker.run_id, "loss") == history["loss"]
        assert held_points(tracker.run_id, "lr") == history["lr"]
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert f"MLflow store sqlite:///{store}?timeout=30 is unavailable: " in warnings[0]
    assert "database is locked" in warnings[0] and "Training continues" in warnings[0]
    assert "answers again" in warnings[1]
    import mlflow

    text = mlflow.artifacts.load_text(f"{mlflow.get_run(tracker.run_id).info.artifact_uri}/samples/step-000005.txt")
    assert text == "a sample"


@pytest.mark.slow
def test_a_store_unavailable_to_the_end_fails_only_the_sync_with_a_clear_error(store, caplog, tmp_path):
    history = {"loss": [(step, 3.0 - 0.1 * step) for step in range(8)], "val_loss": [(0, 4.0), (7, float("nan"))]}
    with MLflowTracker("unavailable", "pretrain", retries=1, retry_delay_s=0.01, retry_every_s=0) as tracker:
        tracker.log_metrics({"loss": history["loss"][0][1]}, step=0)  # one point before the store goes
        with short_busy_wait():
            with exclusive_lock(store):
                for step in range(1, 8):
                    tracker.log_metrics({"loss": history["loss"][step][1]}, step=step)
                tracker.log_text("a sample", "samples/step-000007.txt")
                with pytest.raises(TrackingUnavailable) as info:
                    tracker.sync_history(history, tmp_path / "checkpoint" / "history.json")
            message = str(info.value)
            assert f"MLflow store sqlite:///{store}?timeout=30 cannot be written" in message
            assert "database is locked" in message and str(tmp_path / "checkpoint" / "history.json") in message
            assert "Rerun the stage" in message
            assert len(tracking_warnings(caplog)) == 1  # one warning for the whole outage, not one per step
            # The rerun: the store answers again, and the run gets what it lacks, once.
            assert tracker.sync_history(history) == 7 + 2  # the points kept in memory, then the rest
        assert held_points(tracker.run_id, "loss") == history["loss"]
        val = held_points(tracker.run_id, "val_loss")
        assert val[0] == (0, 4.0) and val[1][0] == 7 and val[1][1] != val[1][1]  # NaN kept as NaN
        assert tracker.sync_history(history) == 0


# --- registry.json beside a checkpoint --------------------------------------------------------------


@pytest.mark.parametrize("content", [b'{"registered_model": "gpt-base", "vers', b"not json", b"[1, 2]", b"",
                                     b'{"registered_model": "gpt-base", "run_id": "abc"}', b'{"version": "\xff"}'],
                         ids=["truncated", "not-json", "a-list", "empty", "key-missing", "not-utf8"])
def test_an_unreadable_registration_is_warned_about_and_treated_as_absent(tmp_path, caplog, content):
    (tmp_path / REGISTRY_FILE).write_bytes(content)
    assert read_registration(tmp_path) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "llm.checkpoint"]
    assert str(tmp_path / REGISTRY_FILE) in warning and "registered again" in warning


def test_a_registration_reads_back(tmp_path):
    write_registration(tmp_path, "gpt-base", "3", "abc")
    assert read_registration(tmp_path) == {"registered_model": "gpt-base", "version": "3", "run_id": "abc"}
    assert read_registration(tmp_path / "elsewhere") is None


@pytest.mark.slow
def test_a_checkpoint_with_a_truncated_registration_is_registered_again(store, tmp_path):
    import torch

    from llm.checkpoint import save_model
    from llm.model import GPT, model_config

    torch.manual_seed(0)
    save_model(GPT(model_config("tiny")), tmp_path / "ckpt")
    with MLflowTracker("registry", "pretrain") as tracker:
        version = log_gpt_model(tmp_path / "ckpt", "gpt-base")
        write_registration(tmp_path / "ckpt", "gpt-base", version, tracker.run_id)
    with MLflowTracker("registry", "evaluate"):
        assert registered_version(tmp_path / "ckpt", "gpt-base", "pretrain") == version  # as recorded
        text = (tmp_path / "ckpt" / REGISTRY_FILE).read_text()
        (tmp_path / "ckpt" / REGISTRY_FILE).write_text(text[: len(text) // 2])
        again = registered_version(tmp_path / "ckpt", "gpt-base", "pretrain")
    assert int(again) == int(version) + 1


def test_a_runs_inputs_are_mlflow_datasets_with_their_sha256_and_a_checkpoint_links_its_model(store, tmp_path):
    import json

    import mlflow

    from llm.checkpoint import save_model
    from llm.files import sha256_file
    from llm.instructions import Record, Split, write_split
    from llm.lineage import checkpoint_input, source_inputs, split_inputs
    from llm.model import GPT, model_config

    raw = tmp_path / "raw"
    (raw / "instructions").mkdir(parents=True)
    (raw / "instructions" / "data.json").write_text("[]")
    url = "https://example.org/data.json"
    entry = {"name": "data", "url": url, "sha256": sha256_file(raw / "instructions" / "data.json")}
    (raw / "instructions" / "manifest.json").write_text(json.dumps({"sources": [entry, {**entry, "name": "other"}]}))
    records = [Record(f"instruction {i}", "", f"output {i}") for i in range(5)]
    write_split(tmp_path / "split.json", Split(records[:3], records[3:4], records[4:]))
    save_model(GPT(model_config("tiny")), tmp_path / "ckpt")
    with MLflowTracker("inputs", "pretrain") as tracker:
        write_registration(tmp_path / "ckpt", "gpt-base", log_gpt_model(tmp_path / "ckpt", "gpt-base"), tracker.run_id)
    assert checkpoint_input(tmp_path / "nothing-here", "start") is None  # from scratch: no input

    with MLflowTracker("inputs", "finetune") as tracker:
        tracker.log_inputs([*source_inputs(raw, "instructions", ["data"]),
                            *split_inputs(tmp_path / "split.json", "data"),
                            checkpoint_input(tmp_path / "ckpt", "start"), None])
    run = mlflow.MlflowClient().get_run(tracker.run_id)
    logged = {d.dataset.name: (d.dataset.digest, d.dataset.source, {t.key: t.value for t in d.tags})
              for d in run.inputs.dataset_inputs}
    assert set(logged) == {"data", "data/train", "data/val", "data/test", "checkpoint ckpt"}
    digest, source, tags = logged["data"]
    assert (digest, json.loads(source)) == (entry["sha256"][:36], {"url": url})
    assert tags == {"mlflow.data.context": "source", "sha256": entry["sha256"]}
    weights = sha256_file(tmp_path / "ckpt" / "model.safetensors")
    assert logged["checkpoint ckpt"][2] == {"mlflow.data.context": "start", "sha256": weights}
    assert json.loads(logged["checkpoint ckpt"][1]) == {"uri": (tmp_path / "ckpt").as_uri()}
    train = [dataclasses.asdict(r) for r in records[:3]]
    assert logged["data/train"][2]["sha256"] == hashlib.sha256(json.dumps(
        train, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert len({logged[f"data/{s}"][0] for s in ("train", "val", "test")}) == 3
    source = mlflow.MlflowClient().get_model_version("gpt-base", "1").source  # models:/<the logged model's id>
    assert [f"models:/{m.model_id}" for m in run.inputs.model_inputs] == [source]
