"""The model registry: a checkpoint folder logged as an MLflow pyfunc, registered, loaded back; the champion.

    version = log_gpt_model("data/checkpoints/finetune", "gpt-instruct", {"stage": "finetune"})
    registered_version("data/checkpoints/finetune", "gpt-instruct", "finetune")  # as its stage recorded it
    log_exports("gpt-instruct", version, "data/exports")  # the export stage's files, on the version
    champion("gpt-instruct")                         # (version, its eval.* scores), or None

Which version deserves the champion alias is the evaluate stage's rule (llm/evaluate.py); here is how
the registry records scores and moves the alias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm.config import ServingConfig

def _pip_requirements() -> list[str]:
    # Explicit: MLflow would otherwise infer them in a slow subprocess, and warn about torch's +cpu label.
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]
    return [f"torch=={torch_version}", f"tiktoken=={version('tiktoken')}", f"safetensors=={version('safetensors')}",
            f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}"]


def log_gpt_model(checkpoint_dir: str | Path, registered_name: str | None = None,
                  version_tags: Mapping[str, str] | None = None, serving: ServingConfig | None = None) -> str | None:
    """Log the checkpoint's model (weights and config only) to the active run as a pyfunc, and register it
    under `registered_name`; returns the new version number. A language model becomes a text generator
    (llm/pyfunc.py), an instruction-tuned one (its config names a `prompt_style`) an MLflow ChatModel
    (llm/pyfunc_chat.py), a classifier a text classifier (llm/pyfunc_classifier.py), an encoder a mask
    filler (llm/pyfunc_fill.py). The model refuses requests above `serving`'s caps (default:
    ServingConfig's)."""
    import dataclasses
    import shutil
    import tempfile
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from llm.checkpoint import CONFIG_FILE, MODEL_FILE, read_config
    from llm.config import ServingConfig
    from llm.pyfunc import default_params, serving_limits

    package = Path(__file__).resolve().parent
    saved = read_config(checkpoint_dir)
    caps = dataclasses.asdict(serving or ServingConfig())
    input_example = None
    if saved.model.is_classifier:
        labels = list(saved.extra["labels"])
        outputs = pd.DataFrame([{"label": labels[0], "probability": 1.0,
                                 **{f"p_{k}": float(k == labels[0]) for k in labels}}])
        python_model = package / "pyfunc_classifier.py"
        signature = infer_signature(pd.DataFrame({"text": ["a text"]}), outputs)
    elif saved.model.is_encoder:
        from llm.pyfunc_fill import COLUMNS, DEFAULT_PARAMS as FILL_PARAMS

        python_model = package / "pyfunc_fill.py"
        outputs = pd.DataFrame([(0, 1, 1, " Paris", 0.5)], columns=COLUMNS)
        signature = infer_signature(pd.DataFrame({"text": ["The capital of France is [MASK]."]}), outputs,
                                    params=FILL_PARAMS)
    elif "prompt_style" in saved.extra:  # an instruction model (finetune, preference): it chats
        from llm.pyfunc_chat import INPUT_EXAMPLE

        # A ChatModel's signature is MLflow's chat schema; logging checks the model answers the example.
        python_model, signature, input_example = package / "pyfunc_chat.py", None, INPUT_EXAMPLE
    else:
        python_model = package / "pyfunc.py"
        signature = infer_signature(pd.DataFrame({"prompt": ["Every effort moves you"]}), ["a completion"],
                                    params=default_params(serving_limits(caps)))
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
                name="model", python_model=str(python_model), artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(package)], pip_requirements=_pip_requirements(), signature=signature,
                input_example=input_example, model_config=caps,
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

    # The checkpoint itself, not the pyfunc: that would give a wrapper that only generates text.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    return load_model(local / "artifacts" / "checkpoint", device)


# ---------------------------------------------------------------------------------------------------
# The registry: which version a stage registered, and the champion alias

CHAMPION = "champion"


def registered_version(checkpoint_dir: str | Path, name: str, stage: str, serving: ServingConfig | None = None) -> str:
    """The registry version of the checkpoint in `checkpoint_dir`, as its stage recorded it. Where this
    store does not have it (a checkpoint pulled with `dvc pull` into a clone with a fresh store), or the
    record is missing or unreadable, the checkpoint is logged from the active run (with `serving`'s caps)
    and registered now."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from llm.checkpoint import read_registration

    recorded = read_registration(checkpoint_dir)
    if recorded is not None and recorded["registered_model"] == name:
        try:
            found = mlflow.MlflowClient().get_model_version(name, recorded["version"])
            if found.run_id == recorded["run_id"]:
                return str(found.version)
        except MlflowException:
            pass
    return str(log_gpt_model(checkpoint_dir, name, {"stage": stage, "registered_by": "evaluate"}, serving))


def logged_model_id(name: str, version: str) -> str | None:
    """The id of the logged model (MLflow 3's `m-...`) that a registered version holds; None for a version
    registered from a run's artifacts. The SQL store leaves the version's `model_id` empty, but its source
    names the model."""
    import mlflow

    found = mlflow.MlflowClient().get_model_version(name, version)
    if found.model_id:
        return found.model_id
    source = found.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def log_exports(name: str, version: str, folder: str | Path, artifact_path: str = "exports") -> str:
    """Log the files in `folder` as artifacts of the registered version's own model (MLflow 3's logged
    model, beside its MLmodel), so the version carries its exports; returns their artifact URI, which the
    version's `exports` tag also holds."""
    import mlflow

    client = mlflow.MlflowClient()
    model_id = logged_model_id(name, version)
    if model_id:
        client.log_model_artifacts(model_id, str(folder), artifact_path)
        uri = f"{client.get_logged_model(model_id).artifact_location.rstrip('/')}/{artifact_path}"
    else:  # a version registered from a run's artifacts rather than a logged model
        run_id = client.get_model_version(name, version).run_id
        client.log_artifacts(run_id, str(folder), artifact_path)
        uri = f"runs:/{run_id}/{artifact_path}"
    client.set_model_version_tag(name, version, "exports", uri)
    return uri


def record_scores(name: str, version: str, scores: Mapping[str, float]) -> None:
    """Tag the version with its evaluation's scores (`eval.<name>`), which later promotions compare with."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in scores.items():
        client.set_model_version_tag(name, version, f"eval.{key}", repr(float(value)))


def champion(name: str, alias: str = CHAMPION) -> tuple[str, dict[str, float]] | None:
    """The version that holds `alias` and the scores it was promoted with (its `eval.*` tags); None when no
    version holds it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        holder = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return str(holder.version), {k.removeprefix("eval."): float(v) for k, v in holder.tags.items()
                                 if k.startswith("eval.")}


def set_champion(name: str, version: str, alias: str = CHAMPION) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


# ---------------------------------------------------------------------------------------------------
# The evaluate stage's choice, for the export stage

BEST_FILE = "best.json"  # which model the stage found best: what the export stage exports


@dataclasses.dataclass(frozen=True)
class Best:
    """The evaluate stage's best instruction model (the champion when promoted), as `BEST_FILE` records it."""

    stage: str
    checkpoint: str  # its checkpoint folder
    registered_model: str
    version: str
    champion: bool  # whether it holds the champion alias (it was promoted)
    primary_score: str


def write_best(folder: str | Path, best: Best) -> None:
    from llm.files import write_json_atomic

    write_json_atomic(Path(folder) / BEST_FILE, dataclasses.asdict(best))


def read_best(path: str | Path) -> Best:
    """The evaluate stage's record of its best model, or an error that says how to make one."""
    from llm.files import read_json

    path = Path(path)
    try:
        return Best(**read_json(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the evaluate stage writes it (`dvc repro evaluate`)") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not the evaluate stage's record of its best model ({exc}); rerun the evaluate "
                         f"stage (`dvc repro -f evaluate`) to write it again") from None
