"""Checkpoint folders: a model's weights and config, written atomically, read with clear errors.

A checkpoint is a folder, the format every stage reads and writes:

    model.safetensors   the weights (a tied matrix is stored once)
    config.json         {"model": {ModelConfig fields}, "tokenizer": "gpt2", ...extra keys}

Other files may sit beside these (the trainer adds optimizer, RNG and data-position state). To write
them all as one atomic folder, call `write_model_files` inside `llm.files.atomic_dir`:

    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, extra={"step": step})
        ...write the trainer's own files into tmp...

    model = load_model("data/checkpoints/pretrain")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from llm.config import ConfigError
from llm.files import atomic_dir, write_json_atomic
from llm.model import GPT, ModelConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_RESERVED_KEYS = ("model", "tokenizer")


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class CheckpointConfig:
    """What a checkpoint's config.json says: the model, its tokenizer, and whatever else was saved."""

    model: ModelConfig
    tokenizer: str = "gpt2"
    extra: dict[str, Any] = field(default_factory=dict)


def unwrap(model: nn.Module) -> GPT:
    """The GPT inside a torch.compile (`_orig_mod`) or DDP (`module`) wrapper."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a GPT (or a compiled / DDP-wrapped one), got {type(model).__name__}")
        model = inner
    return model


def write_model_files(
    model: nn.Module, folder: str | Path, tokenizer: str = "gpt2", extra: dict[str, Any] | None = None
) -> None:
    """Write model.safetensors and config.json into `folder` (not atomic by itself; see module doc)."""
    gpt = unwrap(model)
    extra = extra or {}
    clash = [key for key in _RESERVED_KEYS if key in extra]
    if clash:
        raise ValueError(f"extra must not set {', '.join(clash)}: save_model writes those keys itself")
    folder = Path(folder)
    safetensors.torch.save_model(gpt, str(folder / MODEL_FILE))
    write_json_atomic(folder / CONFIG_FILE, {"model": gpt.config.to_dict(), "tokenizer": tokenizer, **extra})


def save_model(
    model: nn.Module, out_dir: str | Path, tokenizer: str = "gpt2", extra: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint folder at `out_dir`, replacing any folder there only once it is complete."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, tokenizer, extra)
    return out_dir


def read_config(ckpt_dir: str | Path) -> CheckpointConfig:
    """Read and validate a checkpoint's config.json."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint: {CONFIG_FILE} is missing (expected "
                              f"{MODEL_FILE} and {CONFIG_FILE}, as written by llm.checkpoint.save_model)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): the file is damaged; "
                              f"{_redo(path, None)}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        # Most often another library's config.json (Hugging Face's has the model fields at the top level).
        if isinstance(data, dict) and data:
            keys = [str(k) for k in data]
            found = f"keys {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
        else:
            found = _kind(data)
        raise CheckpointError(f"{path} is not a checkpoint config of this project: it must hold an object with a "
                              f"\"model\" object (the model config), as llm.checkpoint.save_model writes, but it "
                              f"holds {found}; for OpenAI's GPT-2 weights set init_from: gpt2 (or another GPT-2 "
                              f"size) instead")
    stage = data.get("stage") if isinstance(data.get("stage"), str) else None
    tokenizer = data.get("tokenizer", "gpt2")
    if not isinstance(tokenizer, str):
        raise CheckpointError(f"{path}: \"tokenizer\" must be a tokenizer name such as \"gpt2\", got "
                              f"{tokenizer!r}; fix it, or {_redo(path, stage)}")
    try:
        model = ModelConfig.from_dict(data["model"], source=f"{path} (model)")
    except ConfigError as exc:
        # Not a settings mistake of the user's: the file was written for another model or by another version
        # of this code, so say which file and key, and how to get a checkpoint this code reads.
        lines = [f"model.{key}: {message}" if key else message for key, message in exc.problems]
        raise CheckpointError(f"{path}: its \"model\" section is not a model this code can build (written for "
                              f"another model, or by another version of the code?); fix the keys below, or "
                              f"{_redo(path, stage)}:{bulleted(lines, limit=len(lines))}") from None
    extra = {k: v for k, v in data.items() if k not in _RESERVED_KEYS}
    return CheckpointConfig(model=model, tokenizer=tokenizer, extra=extra)


def load_model(ckpt_dir: str | Path, device: torch.device | str = "cpu", **overrides: Any) -> GPT:
    """The GPT saved in checkpoint folder `ckpt_dir`, on `device`, in eval mode.

    `overrides` change settings that leave the weights as they are, e.g. `dropout=0.1` to fine-tune a
    checkpoint saved without dropout, or `attention="explicit"`.
    """
    saved = read_config(ckpt_dir)
    config = saved.model
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides}, source="load_model overrides")
    weights = Path(ckpt_dir) / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir} has {CONFIG_FILE} but {MODEL_FILE} is missing")
    stage = saved.extra.get("stage") if isinstance(saved.extra.get("stage"), str) else None
    model = GPT.empty(config, device)
    try:
        mismatches = _mismatches(model, weights)
        if not mismatches:
            safetensors.torch.load_model(model, weights, strict=True, device=str(device))
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(_damaged(weights, exc, stage)) from exc
    if mismatches:
        config_path = Path(ckpt_dir) / CONFIG_FILE
        raise CheckpointError(
            f"{weights} does not fit the model that {config_path} describes (the two files are not of one model); "
            f"fix the \"model\" section of {config_path} to match the weights, or "
            f"{_redo(Path(ckpt_dir), stage)}:{bulleted(mismatches)}")
    return model.eval()


def _damaged(weights: Path, exc: Exception, stage: str | None) -> str:
    """What to say about a weights file safetensors cannot read: a cut-off copy or download, or another format."""
    detail = str(exc).removeprefix("Error while deserializing header: ")
    size = f"{weights.stat().st_size:,} bytes" if weights.is_file() else "unreadable"
    return (f"{weights} is damaged: it is truncated or not a safetensors file ({size}; safetensors says: {detail}); "
            f"{_redo(weights, stage)}")


def _redo(path: Path, stage: str | None) -> str:
    """How to get a good copy of a checkpoint file back: DVC tracks the stages' checkpoints."""
    rerun = f"`dvc repro {stage}`" if stage else "`dvc repro`"
    return (f"rerun the stage that wrote it ({rerun}), or restore it with `dvc checkout {path}` "
            f"(`dvc pull {path}` if the DVC cache lacks it)")


def _kind(value: Any) -> str:
    names = {dict: "an empty object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def bulleted(lines: list[str], limit: int = 5) -> str:
    """The first `limit` lines, each on a new indented line, and how many more there are."""
    more = [f"and {len(lines) - limit} more"] if len(lines) > limit else []
    return "".join(f"\n  {line}" for line in lines[:limit] + more)


def _mismatches(model: GPT, weights: Path) -> list[str]:
    """Tensors the model needs that the file lacks, has in another shape, or has in excess."""
    with safetensors.safe_open(weights, framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_weights and "wte.weight" in saved:
        expected.pop("lm_head.weight")  # a tied matrix is stored once, under either name
    elif model.config.tie_weights:
        expected.pop("wte.weight")
    problems = [f"{name}: missing" for name in expected if name not in saved]
    problems += [f"{name}: {list(saved[name])} in the file, {list(shape)} in the model"
                 for name, shape in expected.items() if name in saved and saved[name] != shape]
    problems += [f"{name}: in the file but not in the model" for name in saved if name not in expected]
    return problems
