"""The order in which fine-tuning stages draw their examples: epochs of a seeded shuffle, resumable, DDP-aware.

    batches = EpochBatches(examples, collate, batch_size=8, seed=123, global_batch_size=8)
    x, y = batches.next_batch()            # what llm.train.Trainer asks of a batch source
    state = batches.state_dict()           # saved in each checkpoint; load_state_dict resumes exactly

Each epoch is a new permutation, a function of (seed, epoch) only, so a resumed run needs nothing but
the epoch and the position within it. Like the book's DataLoader (drop_last=True), an epoch drops the
last global batch when incomplete: every optimizer step then lies within one epoch, `steps_per_epoch` is
exact, and the few examples left out differ from epoch to epoch. Under DDP, rank r takes rows r,
r + world_size, ... of each draw, so the ranks together see what one process would with
batch_size * world_size. The instruction (llm.instructions) and classification (llm.classify) stages
share it; they differ only in how a list of examples becomes a batch (`collate`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from llm.config import TuneConfig

T = TypeVar("T")
C = TypeVar("C", bound="TuneConfig")
Batch = tuple["Tensor", "Tensor"]  # a string: the params schema imports this module, and no torch


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    """Optimizer steps in one pass over `n_examples` (the last incomplete global batch is dropped)."""
    steps = n_examples // global_batch_size
    if steps == 0:
        raise ValueError(f"{n_examples} training examples are fewer than one global batch of "
                         f"{global_batch_size}; lower global_batch_size or use more records")
    return steps


def steps_for_epochs(config: C, n_examples: int) -> C:
    """`config` with `max_steps` set by its `epochs` (passes over `n_examples`), where it sets them."""
    if config.epochs is None:
        return config
    steps = math.ceil(config.epochs * steps_per_epoch(n_examples, config.global_batch_size))
    return dataclasses.replace(config, max_steps=max(1, steps), max_tokens=None)


def global_batch_problem(batch_size: int, global_batch_size: int, world_size: int = 1) -> str | None:
    """What is wrong with a global batch that the processes' micro-batches do not divide, if anything."""
    if global_batch_size % (batch_size * world_size):
        return f"must be a multiple of batch_size ({batch_size}), got {global_batch_size}" if world_size == 1 else (
            f"must be a multiple of batch_size {batch_size} x {world_size} processes, got {global_batch_size}")
    return None


def check_global_batch(batch_size: int, global_batch_size: int, world_size: int) -> int:
    """The micro-batches each process accumulates per optimizer step; refuses a global batch that the
    processes' micro-batches do not divide."""
    if global_batch_problem(batch_size, global_batch_size, world_size):
        raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of batch_size "
                         f"{batch_size} x {world_size} processes")
    return global_batch_size // (batch_size * world_size)


class EpochBatches(Generic[T]):
    """Training batches of `examples` in epochs of a seeded shuffle, resumable (a llm.train.BatchSource).

    `global_batch_size` is the examples per optimizer step over all processes (default: one draw,
    batch_size * world_size); `collate` turns this rank's share of a draw into (inputs, targets).
    """

    def __init__(self, examples: Sequence[T], collate: Callable[[list[T]], Batch], batch_size: int, seed: int, *,
                 global_batch_size: int | None = None, rank: int = 0, world_size: int = 1):
        draw = batch_size * world_size
        global_batch_size = global_batch_size or draw
        check_global_batch(batch_size, global_batch_size, world_size)
        self.examples, self.collate, self.batch_size, self.seed = list(examples), collate, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch_size = steps_per_epoch(len(self.examples), global_batch_size) * global_batch_size
        self.epoch, self.position = 0, 0  # position: examples of this epoch already served, over all ranks
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(len(self.examples))[:self.epoch_size]
        return self._order

    def next_batch(self) -> Batch:
        """The next (inputs, targets) of this rank."""
        order = self._epoch_order()
        draw = order[self.position:self.position + self.batch_size * self.world_size]
        self.position += len(draw)
        if self.position == len(order):  # epoch_size is a multiple of the draw: no draw spans two epochs
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return self.collate([self.examples[i] for i in draw[self.rank::self.world_size]])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._order = None
