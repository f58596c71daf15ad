"""The model a training stage starts from: random weights, OpenAI's GPT-2, or a checkpoint folder.

    model, tokenizer = starting_model("pretrain", "data/checkpoints/pretrain", section="finetune")

`init_from` is `scratch` (pretraining only), a GPT-2 size (gpt2 ... gpt2-xl: OpenAI's weights, fetched
through llm.download), a stage's name (`pretrain` for the stages after it, `finetune` for preference
tuning) or a checkpoint folder. `starting_weights` is what a run's fingerprint records of it: a
checkpoint's weights by their hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.checkpoint import MODEL_FILE, load_model, read_config, require_causal
from llm.files import sha256_file
from llm.lineage import DataInput, checkpoint_input
from llm.model import GPT


def start_folder(init_from: str, stage_dir: str | Path, section: str, stage: str = "pretrain") -> Path:
    """The checkpoint folder `init_from` names (`stage`, e.g. pretrain: that stage's, in `stage_dir`),
    which must exist."""
    folder = Path(stage_dir if init_from == stage else init_from)
    if not folder.is_dir():
        hint = f"run the {stage} stage first (`dvc repro {stage}`)" if init_from == stage else "fix the path"
        raise FileNotFoundError(f"{section}.init_from: {folder} is not a checkpoint folder; {hint}")
    return folder


def starting_model(init_from: str, stage_dir: str | Path, *, section: str, stage: str = "pretrain",
                   causal_for: str | None = None, **overrides: Any) -> tuple[GPT, str]:
    """The trained model `init_from` names (a GPT-2 size, `stage` for that stage's model in `stage_dir`,
    or a folder) and its tokenizer; `overrides` change settings that leave the weights as they are
    (dropout, attention), None keeping the model's own. `causal_for` (e.g. "instruction tuning") refuses
    an encoder, before its weights are read."""
    from llm import gpt2_weights

    overrides = {key: value for key, value in overrides.items() if value is not None}
    if init_from in gpt2_weights.SIZES:
        weights = gpt2_weights.download_gpt2(init_from)
        return gpt2_weights.gpt2_from_files(weights, gpt2_weights.model_config(init_from, **overrides)), "gpt2"
    folder = start_folder(init_from, stage_dir, section, stage)
    saved = read_config(folder)
    if causal_for:
        require_causal(saved.model, f"{section}.init_from: {folder}", causal_for)
    return load_model(folder, **overrides), saved.tokenizer


def starting_weights(init_from: str, stage_dir: str | Path | None = None, section: str = "",
                     stage: str = "pretrain") -> str:
    """What a run starts from, for its fingerprint: scratch or a GPT-2 size by name, a folder by its
    weights' sha256 (a folder not there yet by its path: the run will fail on it anyway)."""
    from llm.gpt2_weights import SIZES

    if init_from == "scratch" or init_from in SIZES:
        return init_from
    folder = start_folder(init_from, stage_dir, section, stage) if stage_dir is not None else Path(init_from)
    return sha256_file(folder / MODEL_FILE) if (folder / MODEL_FILE).is_file() else str(folder)


def starting_input(init_from: str, weights: str, stage_dir: str | Path | None = None, section: str = "",
                   stage: str = "pretrain") -> DataInput | None:
    """What a run starts from, as an MLflow input: a checkpoint folder (and its registered version), or a
    GPT-2 size by its URL and pinned sha256; None from scratch (or a GPT-2 size with no pinned hash).
    `weights` is what `starting_weights` recorded of it in the run's fingerprint (a folder's weights by
    their sha256), so that the weights are hashed once a run."""
    from llm import gpt2_weights

    if init_from == "scratch":
        return None
    if init_from in gpt2_weights.SIZES:
        sha256 = gpt2_weights.SHA256[init_from]
        return DataInput(init_from, gpt2_weights.URL.format(size=init_from), sha256, "start") if sha256 else None
    folder = start_folder(init_from, stage_dir, section, stage) if stage_dir is not None else Path(init_from)
    return checkpoint_input(folder, "start", sha256=weights)
