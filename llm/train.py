"""The training loop shared by pretraining and fine-tuning, with exact resume.

    trainer = Trainer(model, train_batches, val_batches, config, out_dir, settings={...}, tracker=...)
    result = trainer.fit()

One optimizer step accumulates `global_batch_size / (batch_size * world_size)` micro-batches under bf16
autocast where the device runs it fast (`precision: auto`; the result's `precision_used` says which),
clips the gradient norm, and steps AdamW on a warmup + cosine schedule. Every `log_interval` steps it
reports loss, learning rate, gradient norm, tokens/s and MFU to the tracker (no MLflow here), and shows
them on a progress bar; it evaluates on fixed val batches, writes sample generations, and saves
resumable checkpoints.

Resume is exact: a checkpoint holds the weights, the optimizer and scheduler, the data position and the
history, and the random state needs no saving because dropout is reseeded from (seed, rank, step) at
every step. Checkpoints go to `out_dir/resume/step-NNNNNN/` through `llm.checkpoint.ResumeStore`,
written whole and durable; a run restarted on the same `out_dir` with equal `settings` (what shapes the
weights; `RUN_ONLY_SETTINGS` in llm/config.py lists what may change) continues from the latest one, so a
run killed at any moment ends with the weights of a run never interrupted. Checkpoints of other settings
are moved aside, never deleted, and training starts over.

A NaN or infinite loss stops training before the optimizer applies it, leaving the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import safetensors.torch
import torch
from torch import Tensor, nn
from tqdm import tqdm

from llm import distributed, faults
from llm.checkpoint import MODEL_FILE, ResumeStore, history_from_json, settings_digest, unwrap, write_final
from llm.config import TrainConfig
from llm.distributed import Dist
from llm.hardware import autocast, keep_freed_memory, peak_flops, precision_name, resolve_device, train_dtype
from llm.model import eval_mode
from llm.optim import adamw, clip_gradients, warmup_cosine
from llm.sampler import check_global_batch

if TYPE_CHECKING:  # the protocol only: tracking code does not shape the weights, nor the fingerprint
    from llm.tracking import Tracker

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
Sampler = Callable[[nn.Module, int], dict[str, str]]  # (model, step) -> {artifact name: text}
Export = Callable[[nn.Module], nn.Module]  # the trained model -> the model to save (e.g. LoRA merged)
# Measures the model at every evaluation, besides the val loss (e.g. a classifier's accuracies); called in
# eval mode, without gradients, under the training precision.
Evaluator = Callable[[nn.Module], dict[str, float]]
# The loss of a batch, and figures to report beside it (e.g. preference tuning's rewards), computed from
# the model as the loop holds it (compiled, DDP-wrapped: call it, not its methods). The loop reports each
# figure averaged like the loss: `train_<name>` over the steps since the last report, `val_<name>` over the
# val batches.
Objective = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


def next_token_objective(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The model's own loss (next-token cross-entropy, or a classifier's), with nothing beside it."""
    return model(x, y), {}


class BatchSource(Protocol):
    """Training batches in a resumable order (llm.shards.RandomWindows is one)."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# What the loop reports of its steps and val batches; any other name in a history is an evaluator's.
_STEP_METRICS = frozenset({"train_loss", "lr", "grad_norm", "tokens_per_s", "tokens", "mfu", "peak_flops",
                           "val_loss"})


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
    # The train losses of the steps since the last report: saved, so that a resumed run reports the
    # same mean over the same steps as a run never interrupted.
    pending_losses: list[float] = field(default_factory=list)
    pending_figures: dict[str, list[float]] = field(default_factory=dict)  # the objective's, likewise
    # The dtype of each process that computed part of the run, in order ("fp32", "bf16"): precision may
    # change on resume, and auto picks by the host, so a run resumed elsewhere may have used both.
    precisions: list[str] = field(default_factory=list)

    def record(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((self.step, value))

    def computed_in(self, precision: str) -> None:
        if self.precisions[-1:] != [precision]:
            self.precisions.append(precision)

    @property
    def precision_used(self) -> str:
        """What metrics files and the MLflow run record: "bf16", "fp32", or e.g. "fp32 then bf16"."""
        return " then ".join(self.precisions)


@dataclass(frozen=True)
class TrainResult:
    progress: Progress
    metrics: dict[str, float]  # the final figures, for metrics/<stage>.json
    model: nn.Module  # the trained GPT (unwrapped from compile and DDP), on the training device

    @property
    def precision_used(self) -> str:
        """What the metrics file records beside the metrics: Progress.precision_used."""
        return self.progress.precision_used


def accumulation_steps(config: TrainConfig, world_size: int) -> int:
    return check_global_batch(config.batch_size, config.global_batch_size, world_size)


def total_steps(config: TrainConfig, context_length: int) -> int:
    if config.max_tokens is None:
        return config.max_steps  # 0 trains nothing: the starting model is evaluated and saved as is
    return max(1, math.ceil(config.max_tokens / (config.global_batch_size * context_length)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete resumable checkpoint under `out_dir`, if any."""
    return ResumeStore(out_dir).latest()


def resumable_run_id(out_dir: str | Path, settings: Mapping[str, Any]) -> str | None:
    """The tracking run of the checkpoint a restart would resume, so that it continues that run."""
    return ResumeStore(out_dir).run_id(settings_digest(settings))


class Trainer:
    def __init__(self, model: nn.Module, train_batches: BatchSource, val_batches: list[Batch],
                 config: TrainConfig, out_dir: str | Path, *, settings: Mapping[str, Any], tracker: Tracker,
                 tokenizer: str = "gpt2", sampler: Sampler | None = None, run_id: str | None = None,
                 dist: Dist = Dist(), checkpoint_extra: dict | None = None, export: Export | None = None,
                 evaluator: Evaluator | None = None, objective: Objective = next_token_objective):
        self.config, self.out_dir, self.tracker, self.dist = config, Path(out_dir), tracker, dist
        # The loop owns the process group it starts: it ends it when fit() returns or fails.
        self.device, self._started_group = distributed.init(dist, resolve_device(config.device))
        self.dtype = train_dtype(self.device, config.precision)
        if self.device.type == "cpu":
            keep_freed_memory()  # else every step page-faults its large buffers afresh (llm/hardware.py)
        self.gpt = unwrap(model).to(self.device)
        self.model: nn.Module = self.gpt
        if config.compile:
            self.model = torch.compile(self.model)
        if dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.train_batches, self.val_batches, self.sampler = train_batches, val_batches, sampler
        self.tokenizer, self.checkpoint_extra, self.export = tokenizer, checkpoint_extra or {}, export
        self.evaluator, self.objective = evaluator, objective
        self.accum = accumulation_steps(config, dist.world_size)
        self.max_steps = total_steps(config, self.gpt.config.context_length)
        self.optimizer = adamw(self.gpt, config.lr, config.weight_decay, (config.beta1, config.beta2),
                               self.device.type)
        self.scheduler = warmup_cosine(self.optimizer, config.warmup_steps, self.max_steps,
                                       config.min_lr / config.lr)
        self.settings = dict(settings)
        self.store = ResumeStore(out_dir, config.keep_checkpoints, config.keep_superseded)
        self.progress = Progress(fingerprint=settings_digest(settings), run_id=run_id)
        self._saved_at = time.monotonic()  # the last checkpoint's end, or the loop's start

    # --- the loop -----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            if self._started_group:
                distributed.shutdown()

    def _fit(self) -> TrainResult:
        resumed = self._resume()  # replaces self.progress: read it only after
        cfg, progress = self.config, self.progress
        if not resumed or progress.step < self.max_steps:  # a resumed run with no step left computes nothing
            progress.computed_in(precision_name(self.dtype))
        if not resumed:
            self._report(self.evaluation())  # the starting point of the curve
        window_time, window_tokens = 0.0, 0
        self._saved_at = time.monotonic()
        bar = tqdm(total=self.max_steps, initial=progress.step, desc="train", unit="step",
                   disable=None if self.dist.is_main else True)
        with bar:
            while progress.step < self.max_steps:
                started = time.perf_counter()
                loss, grad_norm, tokens, figures = self._optimizer_step()
                window_time += time.perf_counter() - started
                progress.pending_losses.append(loss)
                for name, value in figures.items():
                    progress.pending_figures.setdefault(name, []).append(value)
                window_tokens += tokens
                progress.step += 1
                progress.tokens += tokens
                bar.update(1)
                last = progress.step == self.max_steps
                if self._reports(progress.step):
                    rate = window_tokens / window_time
                    losses = progress.pending_losses
                    metrics = {"train_loss": sum(losses) / len(losses),
                               "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                               "tokens_per_s": rate, "tokens": float(progress.tokens),
                               **{f"train_{name}": sum(values) / len(values)
                                  for name, values in progress.pending_figures.items()}}
                    # Measured (on a CPU) at the first report, not at start-up, when the process is
                    # still busy starting things (Prefect's temporary server) and the peak reads low.
                    # The peak goes beside the MFU: on a shared CPU the measured rate moves with the host's
                    # load, and two runs' MFU compare only against their own peaks.
                    peak = peak_flops(self.device, self.dtype)
                    if peak:
                        metrics["mfu"] = rate * self.gpt.flops_per_token() / peak
                        metrics["peak_flops"] = peak
                    self._report(metrics)
                    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                                    tok_s=f"{rate:,.0f}")
                    progress.pending_losses, progress.pending_figures = [], {}
                    window_time, window_tokens = 0.0, 0
                if progress.step % cfg.eval_interval == 0 or last:
                    self._report(self.evaluation())
                if self.sampler and cfg.sample_interval and (progress.step % cfg.sample_interval == 0 or last):
                    self._write_samples()
                if progress.step % cfg.checkpoint_interval == 0 or last or self._checkpoint_due():
                    self.save_checkpoint()
                faults.pause_point("train.step")
        self.save_final()
        return TrainResult(progress, self.final_metrics(), self.gpt)

    def _optimizer_step(self) -> tuple[float, float, int, dict[str, float]]:
        """One optimizer step over `accum` micro-batches: (mean loss, gradient norm (NaN on a step that
        neither clips nor reports), tokens processed, the objective's mean figures)."""
        cfg, progress = self.config, self.progress
        # Dropout draws from the global generator: seeding it per step makes the random stream a
        # function of the step, so a resumed run needs no saved RNG state and each rank gets its own.
        torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank + progress.step)
        self.model.train()
        total = torch.zeros((), device=self.device)
        sums: dict[str, Tensor] = {}
        tokens = 0  # fine-tuning batches are padded to their own lengths: count them, do not assume
        for micro in range(self.accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.train_batches.next_batch())
            sync = micro == self.accum - 1 or not self.dist.enabled
            with (contextlib.nullcontext() if sync else self.model.no_sync()), autocast(self.device, self.dtype):
                loss, figures = self.objective(self.model, x, y)
                loss = loss / self.accum
            loss.backward()
            total += loss.detach()
            for name, value in figures.items():
                sums[name] = sums.get(name, 0) + value.detach().float() / self.accum
            tokens += x.numel()
        loss_value, tokens_value, *figure_values = distributed.mean(
            torch.stack([total, torch.tensor(float(tokens), device=self.device), *sums.values()]),
            self.dist).tolist()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            last = self.store.latest()
            raise TrainingDiverged(
                f"loss is {loss_value} at step {progress.step + 1}; stopped before applying it. The last good "
                f"checkpoint is {last or 'none yet'}. Lower the learning rate (lr {cfg.lr}), raise warmup_steps, "
                f"or set precision: fp32")
        # The norm is a pass over every gradient: with clipping off, only a step that reports it pays it.
        if cfg.grad_clip > 0 or self._reports(progress.step + 1):
            grad_norm = clip_gradients(self.gpt, cfg.grad_clip)
        else:
            grad_norm = math.nan
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, round(tokens_value * self.dist.world_size), dict(zip(sums, figure_values))

    def _checkpoint_due(self) -> bool:
        """Whether `checkpoint_interval_s` has passed since the last checkpoint (or the loop's start)."""
        interval_s = self.config.checkpoint_interval_s
        if interval_s is None:
            return False
        due = time.monotonic() - self._saved_at >= interval_s
        if self.dist.enabled:  # the main process's clock decides: all save or none, as the barrier needs
            due = bool(distributed.broadcast(torch.tensor(float(due), device=self.device), self.dist).item())
        return due

    def _reports(self, step: int) -> bool:
        """Whether the step that ends at `step` reports its figures (loss, gradient norm, tokens/s)."""
        return step % self.config.log_interval == 0 or step == self.max_steps

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The mean loss over the fixed val batches, `val_loss`, and each of the objective's figures as
        `val_<name>` (every process computes the same)."""
        losses: list[Tensor] = []
        figures: dict[str, list[Tensor]] = {}
        with eval_mode(self.gpt):
            for x, y in self.val_batches:
                with autocast(self.device, self.dtype):
                    loss, measured = self.objective(self.gpt, x.to(self.device), y.to(self.device))
                losses.append(loss.float())
                for name, value in measured.items():
                    figures.setdefault(name, []).append(value.float())
        if not losses:
            return {"val_loss": float("nan")}
        return {"val_loss": torch.stack(losses).mean().item(),
                **{f"val_{name}": torch.stack(values).mean().item() for name, values in figures.items()}}

    def evaluation(self) -> dict[str, float]:
        """The val loss and figures, and what the evaluator measures."""
        metrics = self.evaluate()
        if self.evaluator:
            with torch.no_grad(), eval_mode(self.gpt), autocast(self.device, self.dtype):
                measured = self.evaluator(self.gpt)
            metrics.update(measured)
        return metrics

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
        evaluated = [name for name in history if name not in _STEP_METRICS]  # the evaluator's, if any
        for name in ("train_loss", "val_loss", "tokens_per_s", "mfu", "peak_flops", *evaluated):
            if history.get(name):
                metrics[name] = history[name][-1][1]
        metrics["params"] = float(self.gpt.num_params(non_embedding=False))
        return metrics

    # --- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint (main process only) and keep the newest `keep_checkpoints`."""
        progress = self.progress
        folder = self.store.folder / f"step-{progress.step:06d}"
        if self.dist.is_main:
            folder = self.store.save(
                progress.step, self.gpt, self.tokenizer,
                tensors={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                state={"step": progress.step, "tokens": progress.tokens, "fingerprint": progress.fingerprint,
                       "run_id": progress.run_id, "batches": self.train_batches.state_dict(),
                       "history": progress.history, "pending_losses": progress.pending_losses,
                       "pending_figures": progress.pending_figures,
                       "precisions": progress.precisions,
                       "settings": self.settings})
        distributed.barrier(self.dist)
        self._saved_at = time.monotonic()
        return folder

    def _resume(self) -> bool:
        # The main process reads first: it alone sets unreadable or superseded checkpoints aside, and the
        # other ranks then find what it kept.
        resumed = None
        if self.dist.is_main:
            self.store.clean()
            resumed = self.store.load(self.progress.fingerprint, self.settings, self.device)
        distributed.barrier(self.dist)
        if not self.dist.is_main:
            resumed = self.store.load(self.progress.fingerprint, self.settings, self.device, set_aside=False)
        if resumed is None:
            return False
        safetensors.torch.load_model(self.gpt, resumed.folder / MODEL_FILE, device=str(self.device))
        self.optimizer.load_state_dict(resumed.tensors["optimizer"])
        self.scheduler.load_state_dict(resumed.tensors["scheduler"])
        state = resumed.state
        self.train_batches.load_state_dict(state["batches"])
        self.progress = Progress(step=state["step"], tokens=state["tokens"], fingerprint=state["fingerprint"],
                                 run_id=self.progress.run_id or state.get("run_id"),
                                 history=history_from_json(state["history"]),
                                 pending_losses=list(state.get("pending_losses", [])),
                                 pending_figures={k: list(v) for k, v in state.get("pending_figures", {}).items()},
                                 # a checkpoint older than this record: the dtype of its steps is unknown
                                 precisions=list(state.get("precisions", ["unknown"])))
        log.info("resumed from %s at step %d", resumed.folder, self.progress.step)
        return True

    def save_final(self) -> None:
        """The trained model at the top of `out_dir` (the folder other stages and commands read), passed
        through `export` first, with its training history beside it."""
        if self.dist.is_main:
            extra = {"step": self.progress.step, "tokens": self.progress.tokens, **self.checkpoint_extra}
            model = self.export(self.gpt) if self.export else self.gpt
            try:
                write_final(model, self.out_dir, self.tokenizer, extra, self.progress.history)
            except Exception as exc:
                error = self.store.write_error(f"the trained model to {self.out_dir}", exc)
                if error is exc:
                    raise
                raise error from exc
        distributed.barrier(self.dist)
