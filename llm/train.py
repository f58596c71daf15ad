"""The training loop shared by pretraining and fine-tuning, with exact resume.

    trainer = Trainer(model, train_batches, val_batches, config, out_dir, fingerprint=..., tracker=...)
    result = trainer.fit()

One optimizer step accumulates `global_batch_size / (batch_size * world_size)` micro-batches under bf16
autocast where the device runs it fast, clips the gradient norm, and steps AdamW on a warmup + cosine
schedule. Every `log_interval` steps it reports loss, learning rate, gradient norm, tokens/s and MFU to
the tracker (no MLflow here), and shows them on a progress bar; it evaluates on fixed val batches,
writes sample generations, and saves resumable checkpoints.

Resume is exact: a checkpoint holds the weights, the optimizer and scheduler, the data position and the
history, and the random state needs no saving because dropout is reseeded from (seed, rank, step) at
every step. Checkpoints go to `out_dir/resume/step-NNNNNN/`, written atomically; a run restarted on the
same `out_dir` with the same `fingerprint` (a hash of everything that shapes the run) continues from the
latest one, so a run killed at any moment ends with the weights of a run never interrupted. A checkpoint
with another fingerprint belongs to other settings: it is set aside and training starts over.

A NaN or infinite loss stops training before the optimizer applies it, leaving the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import safetensors.torch
import torch
from torch import Tensor, nn
from tqdm import tqdm

from llm import distributed
from llm.checkpoint import CONFIG_FILE, MODEL_FILE, unwrap, write_model_files
from llm.config import TrainConfig
from llm.distributed import Dist
from llm.files import atomic_dir, read_json, remove_temporaries, temporary_sibling, write_json_atomic
from llm.hardware import autocast, peak_flops, resolve_device, train_dtype
from llm.model import eval_mode
from llm.optim import adamw, warmup_cosine
from llm.tracking import Tracker

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
STATE_FILE = "state.pt"
TRAINER_FILE = "trainer.json"

Batch = tuple[Tensor, Tensor]
Sampler = Callable[[nn.Module, int], dict[str, str]]  # (model, step) -> {artifact name: text}
Export = Callable[[nn.Module], nn.Module]  # the trained model -> the model to save (e.g. LoRA merged)
HISTORY_FILE = "history.json"


class BatchSource(Protocol):
    """Training batches in a resumable order (llm.shards.RandomWindows is one)."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Progress:
    """What a checkpoint records besides tensors; `history` holds every reported metric by name."""

    step: int = 0
    tokens: int = 0
    fingerprint: str = ""
    run_id: str | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def record(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((self.step, value))


@dataclass(frozen=True)
class TrainResult:
    progress: Progress
    metrics: dict[str, float]  # the final figures, for metrics/<stage>.json
    model: nn.Module  # the trained GPT (unwrapped from compile and DDP), on the training device


def code_sha256() -> str:
    """A hash of the library's source. Part of every run's fingerprint: DVC reruns a training stage when
    its code changes, and the rerun must then train, not resume the finished run of the old code."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def accumulation_steps(config: TrainConfig, world_size: int) -> int:
    per_step = config.batch_size * world_size
    if config.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {config.global_batch_size} must be a multiple of batch_size "
                         f"{config.batch_size} x {world_size} processes")
    return config.global_batch_size // per_step


def total_steps(config: TrainConfig, context_length: int) -> int:
    if config.max_tokens is None:
        return config.max_steps  # 0 trains nothing: the starting model is evaluated and saved as is
    return max(1, math.ceil(config.max_tokens / (config.global_batch_size * context_length)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete resumable checkpoint under `out_dir`, if any."""
    folder = Path(out_dir) / RESUME_DIR
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return found[-1] if found else None


def resumable_run_id(out_dir: str | Path, fingerprint: str) -> str | None:
    """The tracking run of the checkpoint a restart would resume, so that it continues that run."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        return None
    state = read_json(checkpoint / TRAINER_FILE)
    return state.get("run_id") if state.get("fingerprint") == fingerprint else None


class Trainer:
    def __init__(self, model: nn.Module, train_batches: BatchSource, val_batches: list[Batch],
                 config: TrainConfig, out_dir: str | Path, *, fingerprint: str, tracker: Tracker,
                 tokenizer: str = "gpt2", sampler: Sampler | None = None, run_id: str | None = None,
                 dist: Dist = Dist(), checkpoint_extra: dict | None = None, export: Export | None = None):
        self.config, self.out_dir, self.tracker, self.dist = config, Path(out_dir), tracker, dist
        self.device = distributed.init(dist, resolve_device(config.device))
        self.dtype = train_dtype(self.device, config.precision)
        self.gpt = unwrap(model).to(self.device)
        self.model: nn.Module = self.gpt
        if config.compile:
            self.model = torch.compile(self.model)
        if dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.train_batches, self.val_batches, self.sampler = train_batches, val_batches, sampler
        self.tokenizer, self.checkpoint_extra, self.export = tokenizer, checkpoint_extra or {}, export
        self.accum = accumulation_steps(config, dist.world_size)
        self.max_steps = total_steps(config, self.gpt.config.context_length)
        self.optimizer = adamw(self.gpt, config.lr, config.weight_decay, (config.beta1, config.beta2),
                               self.device.type)
        self.scheduler = warmup_cosine(self.optimizer, config.warmup_steps, self.max_steps,
                                       config.min_lr / config.lr)
        self.progress = Progress(fingerprint=fingerprint, run_id=run_id)

    # --- the loop -----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        resumed = self._resume()  # replaces self.progress: read it only after
        cfg, progress = self.config, self.progress
        if not resumed:
            self._report({"val_loss": self.evaluate()})  # the starting point of the curve
        window_losses: list[float] = []
        window_time, window_tokens = 0.0, 0
        bar = tqdm(total=self.max_steps, initial=progress.step, desc="train", unit="step",
                   disable=None if self.dist.is_main else True)
        with bar:
            while progress.step < self.max_steps:
                started = time.perf_counter()
                loss, grad_norm, tokens = self._optimizer_step()
                window_time += time.perf_counter() - started
                window_losses.append(loss)
                window_tokens += tokens
                progress.step += 1
                progress.tokens += tokens
                bar.update(1)
                last = progress.step == self.max_steps
                if progress.step % cfg.log_interval == 0 or last:
                    rate = window_tokens / window_time
                    metrics = {"train_loss": sum(window_losses) / len(window_losses),
                               "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                               "tokens_per_s": rate, "tokens": float(progress.tokens)}
                    # Measured (on a CPU) at the first report, not at start-up, when the process is
                    # still busy starting things (Prefect's temporary server) and the peak reads low.
                    peak = peak_flops(self.device, self.dtype)
                    if peak:
                        metrics["mfu"] = rate * self.gpt.flops_per_token() / peak
                    self._report(metrics)
                    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                                    tok_s=f"{rate:,.0f}")
                    window_losses, window_time, window_tokens = [], 0.0, 0
                if progress.step % cfg.eval_interval == 0 or last:
                    self._report({"val_loss": self.evaluate()})
                if self.sampler and cfg.sample_interval and (progress.step % cfg.sample_interval == 0 or last):
                    self._write_samples()
                if progress.step % cfg.checkpoint_interval == 0 or last:
                    self.save_checkpoint()
        self.save_final()
        return TrainResult(progress, self.final_metrics(), self.gpt)

    def _optimizer_step(self) -> tuple[float, float, int]:
        """One optimizer step over `accum` micro-batches: (mean loss, gradient norm, tokens processed)."""
        cfg, progress = self.config, self.progress
        # Dropout draws from the global generator: seeding it per step makes the random stream a
        # function of the step, so a resumed run needs no saved RNG state and each rank gets its own.
        torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank + progress.step)
        self.model.train()
        total = torch.zeros((), device=self.device)
        tokens = 0  # fine-tuning batches are padded to their own lengths: count them, do not assume
        for micro in range(self.accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.train_batches.next_batch())
            sync = micro == self.accum - 1 or not self.dist.enabled
            with (contextlib.nullcontext() if sync else self.model.no_sync()), autocast(self.device, self.dtype):
                loss = self.model(x, y) / self.accum
            loss.backward()
            total += loss.detach()
            tokens += x.numel()
        loss_value, tokens_value = distributed.mean(
            torch.stack([total, torch.tensor(float(tokens), device=self.device)]), self.dist).tolist()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            last = latest_checkpoint(self.out_dir)
            raise TrainingDiverged(
                f"loss is {loss_value} at step {progress.step + 1}; stopped before applying it. The last good "
                f"checkpoint is {last or 'none yet'}. Lower the learning rate (lr {cfg.lr}), raise warmup_steps, "
                f"or set precision: fp32")
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.gpt.parameters(), clip).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, round(tokens_value * self.dist.world_size)

    @torch.no_grad()
    def evaluate(self) -> float:
        """The mean loss over the fixed val batches (every process computes the same)."""
        losses = []
        with eval_mode(self.gpt):
            for x, y in self.val_batches:
                with autocast(self.device, self.dtype):
                    losses.append(self.gpt(x.to(self.device), y.to(self.device)).float())
        return torch.stack(losses).mean().item() if losses else float("nan")

    def _report(self, metrics: dict[str, float]) -> None:
        self.progress.record(metrics)
        if self.dist.is_main:
            self.tracker.log_metrics(metrics, step=self.progress.step)

    def _write_samples(self) -> None:
        if not self.dist.is_main:
            return
        for name, text in self.sampler(self.gpt, self.progress.step).items():
            self.tracker.log_text(text, name)

    def final_metrics(self) -> dict[str, float]:
        history = self.progress.history
        metrics = {"steps": float(self.progress.step), "tokens": float(self.progress.tokens)}
        for name in ("train_loss", "val_loss", "tokens_per_s", "mfu"):
            if history.get(name):
                metrics[name] = history[name][-1][1]
        metrics["params"] = float(self.gpt.num_params(non_embedding=False))
        return metrics

    # --- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint (main process only) and keep the newest `keep_checkpoints`."""
        folder = self.out_dir / RESUME_DIR / f"step-{self.progress.step:06d}"
        if self.dist.is_main:
            with atomic_dir(folder) as tmp:
                write_model_files(self.gpt, tmp, self.tokenizer, extra={"step": self.progress.step})
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                           tmp / STATE_FILE)
                write_json_atomic(tmp / TRAINER_FILE, {
                    "step": self.progress.step, "tokens": self.progress.tokens,
                    "fingerprint": self.progress.fingerprint, "run_id": self.progress.run_id,
                    "batches": self.train_batches.state_dict(), "history": self.progress.history})
            for old in sorted((self.out_dir / RESUME_DIR).glob("step-*"))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
        distributed.barrier(self.dist)
        return folder

    def _resume(self) -> bool:
        remove_temporaries(self.out_dir)
        remove_temporaries(self.out_dir / RESUME_DIR)
        checkpoint = latest_checkpoint(self.out_dir)
        if checkpoint is None:
            return False
        state = read_json(checkpoint / TRAINER_FILE)
        if state["fingerprint"] != self.progress.fingerprint:
            log.warning("%s was made with other settings or data; starting over", checkpoint)
            distributed.barrier(self.dist)
            if self.dist.is_main:
                shutil.rmtree(self.out_dir / RESUME_DIR)
            return False
        safetensors.torch.load_model(self.gpt, checkpoint / MODEL_FILE, device=str(self.device))
        tensors = torch.load(checkpoint / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        self.train_batches.load_state_dict(state["batches"])
        self.progress = Progress(step=state["step"], tokens=state["tokens"], fingerprint=state["fingerprint"],
                                 run_id=self.progress.run_id or state.get("run_id"),
                                 history={k: [tuple(p) for p in v] for k, v in state["history"].items()})
        log.info("resumed from %s at step %d", checkpoint, self.progress.step)
        return True

    def save_final(self) -> None:
        """The trained model at the top of `out_dir` (the folder other stages and commands read), passed
        through `export` first, with its training history beside it."""
        if self.dist.is_main:
            extra = {"step": self.progress.step, "tokens": self.progress.tokens, **self.checkpoint_extra}
            model = self.export(self.gpt) if self.export else self.gpt
            tmp = temporary_sibling(self.out_dir / "final")  # a .tmp- name: a killed run's leftover is cleaned
            tmp.mkdir(parents=True)
            try:
                write_model_files(model, tmp, self.tokenizer, extra=extra)
                write_json_atomic(tmp / HISTORY_FILE, self.progress.history)
                for name in (MODEL_FILE, HISTORY_FILE, CONFIG_FILE):  # config.json last: it names the model
                    (tmp / name).replace(self.out_dir / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier(self.dist)

