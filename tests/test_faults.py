"""Faults injected into every stage: each real stage, killed with SIGKILL three times at seeded moments
(inside a shard or checkpoint write among them), then rerun, ends with what an uninterrupted run makes.

The moments are named pause points (llm/faults.py): the stage process stops there, the test kills it,
and reruns it in the same folder. Each stage starts from the reference run's upstream outputs, so a
difference is this stage's own. Compared with the uninterrupted run: shards byte for byte, final weights
bit for bit, metrics and answers equal (timings aside); no `.tmp-` leftovers; and in MLflow one FINISHED
run per stage, a killed one either continued by its rerun or marked FAILED, never left RUNNING.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from ruamel.yaml import YAML

from tests.conftest import ROOT, SHARED_DATA, shared_file
from tests.project import stage_env

SEED = 20261201
STAGES = ["download", "tokenize", "pretrain", "finetune", "evaluate"]
TIMINGS = {"tokens_per_s", "mfu", "peak_flops", "eval_tokens_per_s"}  # the only figures allowed to differ

SETTINGS = {
    "download": {"sources": [
        {"name": "the-verdict", "url": "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/"
                                       "01_main-chapter-code/the-verdict.txt",
         "sha256": "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", "role": "corpus"},
        {"name": "instruction-data", "url": "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                                            "01_main-chapter-code/instruction-data.json",
         "sha256": "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", "kind": "json",
         "role": "instructions"}]},
    "tokenize": {"tokens_per_shard": 1024},
    "model": {"preset": "tiny", "dropout": 0.1},
    "pretrain": {"max_steps": 12, "batch_size": 4, "global_batch_size": 4, "eval_interval": 6, "eval_batches": 2,
                 "sample_interval": 6, "sample_tokens": 4, "checkpoint_interval": 3, "log_interval": 2,
                 "warmup_steps": 2, "device": "cpu", "precision": "fp32"},
    "finetune": {"epochs": None, "max_steps": 8, "batch_size": 4, "global_batch_size": 4, "eval_interval": 4,
                 "eval_batches": 2, "sample_interval": 0, "checkpoint_interval": 2, "log_interval": 2,
                 "max_length": 64, "device": "cpu", "precision": "fp32"},
    "evaluate": {"test_records": 6, "max_new_tokens": 6, "examples": 2, "batch_size": 4, "generate_batch_size": 2,
                 "device": "cpu", "precision": "fp32"},
}

# Where each stage is killed, in order: (pause point, the most times it may be reached before the kill).
# The seeded draw picks the time; each kill is followed by a rerun in the same folder.
KILLS = {
    "download": [("download.copy", 1), ("download.copy", 1), ("download.manifest", 2)],
    "tokenize": [("shard.write", 5), ("shard.write", 5), ("shards.replace", 1)],
    "pretrain": [("train.step", 4), ("checkpoint.write", 2), ("final.replace", 3)],
    "finetune": [("train.step", 3), ("checkpoint.write", 2), ("final.replace", 3)],
    "evaluate": [("evaluate.generate", 4), ("evaluate.generate", 4), ("evaluate.write", 1)],
}

# What each stage reads from the stages before it, copied from the reference run.
UPSTREAM = {
    "download": [],
    "tokenize": ["data/raw"],
    "pretrain": ["data/shards"],
    "finetune": ["data/raw", "data/checkpoints/pretrain/model.safetensors", "data/checkpoints/pretrain/config.json"],
    "evaluate": ["data/shards", "data/checkpoints/pretrain/model.safetensors",
                 "data/checkpoints/pretrain/config.json", "data/checkpoints/finetune/model.safetensors",
                 "data/checkpoints/finetune/config.json", "data/checkpoints/finetune/split.json"],
}


def new_project(folder: Path) -> Path:
    params = YAML(typ="safe").load(ROOT / "params.yaml")
    for section, values in SETTINGS.items():
        params[section].update(values)
    folder.mkdir(parents=True)
    YAML().dump(params, folder / "params.yaml")
    return folder


def env_for(project: Path, prefect_api_url: str, **extra: str) -> dict[str, str]:
    return stage_env(prefect_api_url, PYTHONPATH=str(ROOT), LLM_MIRROR_DIR=str(SHARED_DATA), OMP_NUM_THREADS="1",
                     MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", **extra)


def run(project: Path, stage: str, env: dict[str, str], timeout_s: float = 300) -> None:
    done = subprocess.run([sys.executable, "-m", f"flows.{stage}"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def run_and_kill(project: Path, stage: str, env: dict[str, str], point: str, timeout_s: float = 300) -> None:
    """Run `stage` until it pauses at `point` (e.g. `checkpoint.write:2`), then SIGKILL it."""
    marker = project / f".paused-{point}"
    process = subprocess.Popen([sys.executable, "-m", f"flows.{stage}"], cwd=project, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               env={**env, "LLM_PAUSE_AT": point, "LLM_PAUSE_FILE": str(marker)})
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"{stage} ended ({process.returncode}) before reaching {point}:\n"
                                 f"{process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{stage} did not reach {point} in {timeout_s} s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()
    marker.unlink()


def kill_points(stage: str) -> list[str]:
    rng = random.Random(f"{SEED}-{stage}")
    return [f"{point}:{rng.randint(1, most)}" for point, most in KILLS[stage]]


def copy_upstream(reference: Path, project: Path, stage: str) -> None:
    for name in UPSTREAM[stage]:
        src, dest = reference / name, project / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_timings(data):
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if k not in TIMINGS}
    return data


def stage_runs(project: Path, stage: str) -> list[str]:
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm-pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`pipeline.stage` = '{stage}'")
    return sorted(r.info.status for r in runs)


def outputs(project: Path, stage: str) -> dict:
    """What must be identical to the uninterrupted run: bytes of files, and metrics without timings."""
    found: dict = {"metrics": without_timings(json.loads((project / f"metrics/{stage}.json").read_text()))}
    if stage == "download":
        found["files"] = files(project / "data/raw")
    elif stage == "tokenize":
        found["files"] = files(project / "data/shards")
    elif stage in ("pretrain", "finetune"):
        folder = project / "data/checkpoints" / stage
        found["files"] = {name: (folder / name).read_bytes() for name in ("model.safetensors", "config.json")}
        found["history"] = without_timings(json.loads((folder / "history.json").read_text()))
        if stage == "finetune":
            found["files"]["split.json"] = (folder / "split.json").read_bytes()
    else:
        found["files"] = {"responses.json": (project / "data/eval/responses.json").read_bytes()}
    return found


def run_reference(project: Path, prefect_api_url: str, done: dict[str, threading.Event]) -> None:
    """The whole pipeline, never interrupted; `done[stage]` is set as each stage finishes."""
    env = env_for(project, prefect_api_url)
    try:
        for stage in STAGES:
            run(project, stage, env)
            done[stage].set()
    finally:  # on a failure, let the waiting chains go on (and fail at once on their missing inputs)
        for event in done.values():
            event.set()


def kill_three_times_then_finish(reference: Path, root: Path, stage: str, prefect_api_url: str,
                                 upstream_done: threading.Event | None) -> dict:
    project = new_project(root / stage)
    if upstream_done is not None:
        assert upstream_done.wait(timeout=600), f"the reference run did not get to {stage}"
    copy_upstream(reference, project, stage)
    env = env_for(project, prefect_api_url)
    points = kill_points(stage)
    for point in points:
        run_and_kill(project, stage, env, point)
    run(project, stage, env)
    return {"points": points, "outputs": outputs(project, stage), "runs": stage_runs(project, stage),
            "leftovers": sorted(str(p.relative_to(project)) for p in project.rglob(".tmp-*"))}


@pytest.mark.slow
def test_every_stage_killed_three_times_ends_as_if_never_interrupted(tmp_path, prefect_server):
    shared_file("the-verdict.txt")
    reference = new_project(tmp_path / "reference")
    # Each stage's kill-and-rerun chain starts as soon as the reference run has made its inputs, and runs
    # beside the reference's next stages and the other chains; each chain itself is sequential.
    done = {stage: threading.Event() for stage in STAGES}
    with ThreadPoolExecutor(len(STAGES) + 1) as pool:
        whole = pool.submit(run_reference, reference, prefect_server, done)
        futures = {stage: pool.submit(kill_three_times_then_finish, reference, tmp_path, stage, prefect_server,
                                      done[STAGES[i - 1]] if i else None)
                   for i, stage in enumerate(STAGES)}
        whole.result()
        results = {stage: future.result() for stage, future in futures.items()}
    problems = []
    for stage, result in results.items():
        expected = outputs(reference, stage)
        for kind, values in result["outputs"].items():
            if values != expected[kind]:
                differ = sorted(k for k in set(values) | set(expected[kind]) if values.get(k) != expected[kind].get(k))
                problems.append(f"{stage} killed at {result['points']}: {kind} differ: {differ}")
        if result["leftovers"]:
            problems.append(f"{stage}: temporary files left behind: {result['leftovers']}")
        statuses = result["runs"]
        if statuses.count("FINISHED") != 1 or set(statuses) - {"FINISHED", "FAILED"}:
            problems.append(f"{stage}: MLflow runs {statuses}, expected one FINISHED and any others FAILED")
    assert not problems, "\n".join(problems)
    assert all(len(r["points"]) >= 3 for r in results.values())
