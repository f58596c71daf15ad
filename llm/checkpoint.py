"""The on-disk layout of checkpoints, and the one module that writes, rotates and reads them.

A checkpoint is a folder, the format every stage reads and writes:

    model.safetensors   the weights (a tied matrix is stored once)
    config.json         {"model": {ModelConfig fields}, "tokenizer": "gpt2", ...extra keys}

A training stage's output folder (`data/checkpoints/<stage>/`) holds its final model as such a
checkpoint, with what other stages read beside it, and the resumable state under `resume/`:

    model.safetensors, config.json   the trained model (the DVC-tracked output)
    history.json                     every metric the trainer reported: {name: [[step, value], ...]}
    split.json                       the records fine-tuning held out (llm.instructions.write_split)
    registry.json                    the MLflow model version the model became
    resume/step-NNNNNN/              resumable checkpoints: the model files, state.pt (optimizer and
                                     scheduler), trainer.json (step, data position, history, settings)
    resume/superseded-<digest>/      checkpoints of other settings, set aside rather than deleted
    resume/unreadable-step-NNNNNN/   a checkpoint that could not be read back, set aside

`ResumeStore` owns `resume/`: every checkpoint is written whole and durable before it takes its name, the
oldest is deleted only after the newest is durable, an unreadable newest one is reported and the previous
one used, and checkpoints of other settings are moved aside, never deleted on sight.

    model = load_model("data/checkpoints/pretrain")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from llm import faults
from llm.validation import ConfigError, bulleted
from llm.files import (atomic_dir, fsync_dir, fsync_file, read_json, remove_temporaries, replace_durably,
                       temporary_sibling, write_json_atomic)
from llm.model import GPT, ModelConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
SPLIT_FILE = "split.json"
REGISTRY_FILE = "registry.json"
RESUME_DIR = "resume"
STATE_FILE = "state.pt"
TRAINER_FILE = "trainer.json"
_STEP_PREFIX = "step-"
_SUPERSEDED_PREFIX = "superseded-"
_UNREADABLE_PREFIX = "unreadable-"
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


def require_language_model(saved: CheckpointConfig, ckpt_dir: str | Path) -> None:
    """Refuse a classifier or an encoder where text is to be generated, saying what to do with it instead."""
    if saved.model.is_classifier:
        classes = ", ".join(saved.extra.get("labels") or []) or f"{saved.model.num_classes} of them"
        raise CheckpointError(f"{ckpt_dir} is a classifier (classes: {classes}), not a language model: classify texts "
                              f"with `python -m llm.classify --checkpoint {ckpt_dir} TEXT`")
    if saved.model.is_encoder:
        raise CheckpointError(f"{ckpt_dir} is an encoder (model.objective: masked), not a causal language model: "
                              f"it predicts masked tokens and cannot generate text; fill in masks with "
                              f"`python -m llm.fill --checkpoint {ckpt_dir} \"The capital of France is [MASK].\"`")


def require_causal(config: ModelConfig, source: str | Path, purpose: str) -> None:
    """Refuse an encoder where `purpose` (e.g. "instruction tuning") needs a causal language model."""
    if config.is_encoder:
        raise CheckpointError(
            f"{source} is an encoder (model.objective: masked), but {purpose} needs a causal language model "
            f"(objective: causal): start from a GPT (the pretrain stage's with model.objective: causal, a GPT-2 "
            f"size such as gpt2, or a causal checkpoint folder); an encoder fine-tunes with the classify stage")


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


# ---------------------------------------------------------------------------------------------------
# A training stage's final model and history


def write_final(model: nn.Module, out_dir: str | Path, tokenizer: str, extra: dict[str, Any],
                history: Mapping[str, list]) -> None:
    """The trained model and its history at the top of `out_dir`, each file durable before it takes its
    name, config.json last (it names the model). Resume state and other files there are left alone."""
    out_dir = Path(out_dir)
    tmp = temporary_sibling(out_dir / "final")  # a .tmp- name: a killed run's leftover is cleaned up
    tmp.mkdir(parents=True)
    try:
        write_model_files(model, tmp, tokenizer, extra=extra)
        write_json_atomic(tmp / HISTORY_FILE, history)
        fsync_file(tmp / MODEL_FILE)  # the JSON files are durable already: write_json_atomic syncs them
        for name in (MODEL_FILE, HISTORY_FILE, CONFIG_FILE):
            faults.pause_point("final.replace")
            replace_durably(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_history(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The metrics history saved beside a trained model, or {} where there is none."""
    path = Path(folder) / HISTORY_FILE
    if not path.is_file():
        return {}
    try:
        return history_from_json(read_json(path))
    except (ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); rerun the stage that wrote it") from exc


def history_from_json(data: Mapping[str, list]) -> dict[str, list[tuple[int, float]]]:
    """A metrics history as JSON holds it ({name: [[step, value], ...]}) back in the trainer's form."""
    return {name: [tuple(point) for point in points] for name, points in data.items()}


# ---------------------------------------------------------------------------------------------------
# Which registered model version a checkpoint became (written by the training stages, read by evaluate)


def write_registration(checkpoint_dir: str | Path, name: str, version: str, run_id: str) -> None:
    write_json_atomic(Path(checkpoint_dir) / REGISTRY_FILE,
                      {"registered_model": name, "version": version, "run_id": run_id})


def read_registration(checkpoint_dir: str | Path) -> dict[str, str] | None:
    """What `write_registration` recorded beside the checkpoint; None where there is no record, or one
    that cannot be read (truncated, not JSON, keys missing), which is warned about and treated as absent."""
    path = Path(checkpoint_dir) / REGISTRY_FILE
    if not path.is_file():
        return None
    try:
        recorded = read_json(path)
        return {key: str(recorded[key]) for key in ("registered_model", "version", "run_id")}
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeError are ValueErrors
        log.warning("%s cannot be read (%s: %s); the checkpoint is treated as unregistered and registered again",
                    path, type(error).__name__, error)
        return None


# ---------------------------------------------------------------------------------------------------
# Resumable checkpoints


class CheckpointWriteError(RuntimeError):
    """A resumable checkpoint could not be written (a full disk, say); the previous ones are intact."""


def settings_digest(settings: Mapping[str, Any]) -> str:
    """The fingerprint of a run's settings: equal digests, equal runs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """What differs between two runs' settings, in words: `pretrain.lr: 0.001 -> 0.0005`."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += changed_settings(a, b, f"{name}.")
        elif a != b:
            changes.append(f"{name}: {_short(a)} -> {_short(b)}")
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else f"{text[:12]}..."


@dataclass(frozen=True)
class Resumed:
    """A checkpoint read back whole: its folder, trainer.json, and state.pt's tensors."""

    folder: Path
    state: dict[str, Any]
    tensors: dict[str, Any]


class ResumeStore:
    """The resumable checkpoints of one training output folder: `out_dir/resume/step-NNNNNN/`."""

    def __init__(self, out_dir: str | Path, keep: int = 2, keep_superseded: int = 2):
        self.out_dir, self.folder = Path(out_dir), Path(out_dir) / RESUME_DIR
        self.keep, self.keep_superseded = keep, keep_superseded

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"{_STEP_PREFIX}*") if p.is_dir())

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def clean(self) -> None:
        """Delete what killed writers left behind: temporaries are never whole checkpoints."""
        remove_temporaries(self.out_dir)
        remove_temporaries(self.folder)

    def save(self, step: int, model: nn.Module, tokenizer: str, tensors: dict[str, Any],
             state: dict[str, Any]) -> Path:
        """Write checkpoint `step` whole and durable, then delete all but the newest `keep`."""
        folder = self.folder / f"{_STEP_PREFIX}{step:06d}"
        try:
            with atomic_dir(folder) as tmp:
                write_model_files(model, tmp, tokenizer, extra={"step": step})
                torch.save(tensors, tmp / STATE_FILE)
                write_json_atomic(tmp / TRAINER_FILE, state)
                faults.pause_point("checkpoint.write")
        except Exception as exc:  # OSError, or the same error wrapped by safetensors' or torch's writer
            error = self.write_error(f"the checkpoint of step {step} under {self.folder}", exc)
            if error is exc:
                raise
            raise error from exc
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old)
        return folder

    def write_error(self, what: str, exc: Exception) -> Exception:
        """`exc` as the error a user can act on, if the file system caused it (a full disk, say)."""
        if not _is_write_failure(exc):
            return exc
        previous = self.latest()
        kept = f"The checkpoint {previous} is intact" if previous else "No earlier checkpoint exists"
        return CheckpointWriteError(f"could not write {what}: {exc}. {kept}; free disk space (or raise the "
                                    f"file size limit) and rerun to continue from it")

    def run_id(self, fingerprint: str) -> str | None:
        """The tracking run of the checkpoint a restart would resume, so that it continues that run."""
        for folder in reversed(self.checkpoints()):
            try:
                state = read_json(folder / TRAINER_FILE)
            except (OSError, ValueError):
                continue
            return state.get("run_id") if state.get("fingerprint") == fingerprint else None
        return None

    def load(self, fingerprint: str, settings: Mapping[str, Any], device: torch.device | str,
             *, set_aside: bool = True) -> Resumed | None:
        """The newest checkpoint that reads back whole, if it belongs to a run of `fingerprint`.

        An unreadable checkpoint is reported and set aside, and the one before it tried. Checkpoints of
        other settings are moved to `resume/superseded-<digest>/`, with a log line that says what changed
        and how to start from them. `set_aside=False` only reads (the other ranks of a DDP run)."""
        for folder in reversed(self.checkpoints()):
            try:
                state = read_json(folder / TRAINER_FILE)
            except (OSError, ValueError) as exc:
                self._unreadable(folder, exc, set_aside)
                continue
            if state.get("fingerprint") != fingerprint:
                if set_aside:
                    self._supersede(state, settings)
                return None
            try:
                tensors = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
                with safetensors.safe_open(folder / MODEL_FILE, framework="pt"):
                    pass  # the header and the file's length agree: not truncated
            except Exception as exc:  # a damaged file: zip (torch) and safetensors errors alike
                self._unreadable(folder, exc, set_aside)
                continue
            return Resumed(folder, state, tensors)
        return None

    def _unreadable(self, folder: Path, exc: BaseException, set_aside: bool) -> None:
        dest = self.folder / f"{_UNREADABLE_PREFIX}{folder.name}"
        log.warning("checkpoint %s cannot be read back (%s: %s); it is moved to %s and the one before it is "
                    "used", folder, type(exc).__name__, exc, dest)
        if set_aside:
            replace_dir(folder, dest)

    def _supersede(self, state: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        old = str(state.get("fingerprint") or "unknown")
        dest = self.folder / f"{_SUPERSEDED_PREFIX}{old[:12]}"
        dest.mkdir(exist_ok=True)
        for folder in self.checkpoints():
            replace_dir(folder, dest / folder.name)
        os.utime(dest)  # the newest set aside is the last to be pruned
        newest = sorted(dest.glob(f"{_STEP_PREFIX}*"))[-1]
        changes = changed_settings(state.get("settings") or {}, settings) or ["(not recorded)"]
        log.warning("the checkpoints in %s were made with other settings:\n  %s\nThey were moved to %s. "
                    "Training starts over; to start from them instead, set init_from: %s", self.folder,
                    "\n  ".join(changes[:10]), dest, newest)
        superseded = sorted(self.folder.glob(f"{_SUPERSEDED_PREFIX}*"), key=lambda p: p.stat().st_mtime)
        for extra in superseded[:max(0, len(superseded) - self.keep_superseded)]:
            log.warning("deleting %s: more than keep_superseded (%d) sets of superseded checkpoints",
                        extra, self.keep_superseded)
            shutil.rmtree(extra)


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder `src` to `dest`, replacing a folder there, durably."""
    if dest.exists():
        old = temporary_sibling(dest)
        os.replace(dest, old)
        shutil.rmtree(old)
    os.replace(src, dest)
    fsync_dir(dest.parent)
    fsync_dir(src.parent)


def _is_write_failure(exc: BaseException) -> bool:
    """An error from the file system (disk full, file too large, read-only) rather than from the code."""
    while exc is not None:
        if isinstance(exc, OSError):
            return True
        text = str(exc).lower()
        if any(s in text for s in ("file too large", "no space", "write failed", "ioerror", "errno")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
