"""Tracking: the small interface training reports through, and the one module that talks to MLflow.

Training loops take a `Tracker` (log metrics per step, text, files) and never import MLflow; tests pass a
`MemoryTracker`, stages pass an `MLflowTracker`. MLflow is imported lazily, only when a run starts.

The store: `$MLFLOW_TRACKING_URI`, else a SQLite file `mlflow.db` at the project root, its artifacts in
`mlartifacts/` beside it. The root is found from DVC's `DVC_ROOT` or the working directory, and an
experiment run in a temporary copy under `<root>/.dvc/tmp/exps/` resolves to the same `<root>`, so
`dvc exp run --temp` and queued experiments log to the store that `mlflow ui` shows. A new SQLite store is
created under a file lock: processes starting at once would otherwise race its schema migrations.

    mlflow ui --backend-store-uri sqlite:///mlflow.db     # from the project root
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # else a DNS lookup on every log_model, slow offline
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


class Tracker(Protocol):
    """What a training loop reports to."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...


class MemoryTracker:
    """Keeps everything in lists: for tests, and for callers that want the history back."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.texts: dict[str, str] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts[artifact_file] = text

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, m[name]) for step, m in self.metrics if name in m]


# ---------------------------------------------------------------------------------------------------
# Where the store lives


def project_root(start: str | Path | None = None) -> Path:
    """The project's root; for a DVC experiment's temporary copy, the project it was copied from."""
    path = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = path.parts
    if ".dvc" in parts:  # <root>/.dvc/tmp/exps/<tmp>/...
        return Path(*parts[: parts.index(".dvc")])
    return path


def tracking_uri(root: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store (`mlartifacts/`, absolute, whatever the working directory);
    a server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def configure(uri: str | None = None) -> str:
    """Quiet MLflow, make sure the store exists and is migrated (once, under a lock), and select it."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow
    from filelock import FileLock

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock", timeout=300):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the schema
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, created with its artifacts at the project root where it is new."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(mlflow.get_tracking_uri()))
    except Exception:  # another process created it in between
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# ---------------------------------------------------------------------------------------------------
# Lineage: the same tags on every stage's run


def _git(*args: str, cwd: Path) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def file_sha256(path: str | Path) -> str | None:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def lineage_tags(stage: str, params_file: str | Path = "params.yaml",
                 data_manifest: str | Path = "data/raw/manifest.json") -> dict[str, str]:
    """Which code, settings and data made a run: commit, params hash, data hash, DVC stage."""
    here = Path.cwd()
    tags = {"pipeline.stage": stage}
    commit = _git("rev-parse", "HEAD", cwd=here)
    if commit:
        tags["mlflow.source.git.commit"] = tags["pipeline.commit"] = commit
        tags["pipeline.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no", cwd=here)))
    for key, path in (("pipeline.params_sha256", params_file), ("pipeline.data_sha256", data_manifest)):
        digest = file_sha256(path)
        if digest:
            tags[key] = digest
    for env, key in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.experiment")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"pretrain": {"lr": 3e-4}} -> {"pretrain.lr": "0.0003"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


# ---------------------------------------------------------------------------------------------------
# A run


class MLflowTracker(AbstractContextManager):
    """One MLflow run: `with MLflowTracker(experiment, run_name, tags=...) as tracker: ...`.

    Passing the `run_id` of an earlier run continues it (a resumed training run keeps one MLflow run).
    The run ends FINISHED, or FAILED when the block raises.
    """

    def __init__(self, experiment: str, run_name: str, *, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None):
        self.experiment, self.run_name, self.tags, self.requested_run_id = experiment, run_name, tags or {}, run_id
        self.run_id: str | None = None

    def __enter__(self) -> MLflowTracker:
        import mlflow

        configure()
        experiment_id = ensure_experiment(self.experiment)
        run_id = self.requested_run_id if self._run_exists(self.requested_run_id) else None
        run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                               run_name=None if run_id else self.run_name, tags=dict(self.tags))
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    @staticmethod
    def _run_exists(run_id: str | None) -> bool:
        if not run_id:
            return False
        import mlflow

        try:
            mlflow.MlflowClient().get_run(run_id)
            return True
        except Exception:
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = flatten(params)
        logged = mlflow.MlflowClient().get_run(self.run_id).data.params
        new = {k: v[:6000] for k, v in flat.items() if k not in logged}  # a resumed run has them already
        if new:
            mlflow.log_params(new)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        import mlflow

        mlflow.log_text(text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))


# ---------------------------------------------------------------------------------------------------
# Models: a checkpoint folder logged as an MLflow pyfunc, registered, and loaded back


def _pip_requirements() -> list[str]:
    # Explicit: MLflow would otherwise infer them in a slow subprocess, and warn about torch's +cpu label.
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]
    return [f"torch=={torch_version}", f"tiktoken=={version('tiktoken')}", f"safetensors=={version('safetensors')}",
            f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}"]


def log_gpt_model(checkpoint_dir: str | Path, registered_name: str | None = None,
                  version_tags: Mapping[str, str] | None = None) -> str | None:
    """Log the checkpoint's model (weights and config only) to the active run as a text-generating
    pyfunc, and register it under `registered_name`; returns the new version number."""
    import shutil
    import tempfile
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from llm.checkpoint import CONFIG_FILE, MODEL_FILE
    from llm.pyfunc import DEFAULT_PARAMS

    package = Path(__file__).resolve().parent
    signature = infer_signature(pd.DataFrame({"prompt": ["Every effort moves you"]}), ["a completion"],
                                params=DEFAULT_PARAMS)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"  # only the model: the folder may also hold resume state
        checkpoint.mkdir()
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copy2(Path(checkpoint_dir) / name, checkpoint / name)
        with warnings.catch_warnings():
            # It asks for type hints and an input example, which would make it run the model at logging
            # time: the explicit signature above already describes inputs, params and outputs.
            warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(package / "pyfunc.py"), artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(package)], pip_requirements=_pip_requirements(), signature=signature,
                registered_model_name=registered_name)
    if registered_name is None:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (version_tags or {}).items():
        client.set_model_version_tag(registered_name, version, key, value)
    return version


def load_logged_gpt(model_uri: str, device: str = "cpu"):
    """The project's GPT from a logged model (`runs:/<id>/model`, `models:/<name>/<version>`, ...)."""
    import mlflow

    from llm.checkpoint import load_model

    # The checkpoint itself, in fp32: the pyfunc would give the model it serves, in bf16 where fast.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    return load_model(local / "artifacts" / "checkpoint", device)


# ---------------------------------------------------------------------------------------------------
# The registry: which version a stage registered, and the champion alias

REGISTRY_FILE = "registry.json"  # written beside a checkpoint: the registered model version it became
CHAMPION = "champion"


def write_registration(checkpoint_dir: str | Path, name: str, version: str, run_id: str) -> None:
    from llm.files import write_json_atomic

    write_json_atomic(Path(checkpoint_dir) / REGISTRY_FILE,
                      {"registered_model": name, "version": version, "run_id": run_id})


def registered_version(checkpoint_dir: str | Path, name: str, stage: str) -> str:
    """The registry version of the checkpoint in `checkpoint_dir`, as its stage recorded it. Where this
    store does not have it (a checkpoint pulled with `dvc pull` into a clone with a fresh store), the
    checkpoint is logged from the active run and registered now."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = Path(checkpoint_dir) / REGISTRY_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        try:
            found = mlflow.MlflowClient().get_model_version(name, recorded["version"])
            if recorded["registered_model"] == name and found.run_id == recorded["run_id"]:
                return str(found.version)
        except MlflowException:
            pass
    return str(log_gpt_model(checkpoint_dir, name, {"stage": stage, "registered_by": "evaluate"}))


def promote_if_better(name: str, version: str, scores: Mapping[str, float],
                      alias: str = CHAMPION) -> tuple[bool, str | None]:
    """Record `scores` on the version (tags `eval.<name>`), and move `alias` to it when every score it
    shares with the alias holder is at least as high, or when no version holds the alias.
    Returns (promoted, the version that held the alias before, if any)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    for key, value in scores.items():
        client.set_model_version_tag(name, version, f"eval.{key}", repr(float(value)))
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and str(holder.version) != str(version):
        theirs = {k.removeprefix("eval."): float(v) for k, v in holder.tags.items() if k.startswith("eval.")}
        if any(scores[key] < theirs[key] for key in scores if key in theirs):
            return False, str(holder.version)
    client.set_registered_model_alias(name, alias, version)
    return True, None if holder is None else str(holder.version)


LOCK_TOKEN_TAG = "pipeline.lock_token"  # the stage lock (llm/lock.py) the run's process held


def fail_stale_runs(experiment: str, lock_token: str | None, keep: str | None = None) -> list[str]:
    """Mark FAILED the runs that a killed process left RUNNING: those tagged with the token of the stage
    lock it held (taken over now), except `keep`, the run about to be resumed. Returns their ids."""
    if not lock_token:
        return []
    import mlflow

    configure()
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=100,
                              filter_string=f"tags.`{LOCK_TOKEN_TAG}` = '{lock_token}' and attributes.status = 'RUNNING'")
    failed = [run.info.run_id for run in runs if run.info.run_id != keep]
    for run_id in failed:
        client.set_tag(run_id, "pipeline.failure", "its process was killed; a later run took over")
        client.set_terminated(run_id, status="FAILED")
    return failed
