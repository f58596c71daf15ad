"""Small data made for tests: token shards in a temporary folder, instruction examples, a tracker that dies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llm.files import write_json_atomic
from llm.instructions import Example
from llm.shards import ShardWriter
from llm.tracking import MemoryTracker


def make_shards(root: Path, train: np.ndarray, val: np.ndarray, *, tokens_per_shard: int = 4096,
                vocab_size: int = 50257, tokenizer: str = "gpt2") -> Path:
    """A data/shards folder with one document per split, as the tokenize stage writes it."""
    splits = {}
    for split, tokens in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(root / split, tokens_per_shard)
        writer.add(np.asarray(tokens, dtype=np.uint16), ends_document=True)
        shards = writer.close()
        splits[split] = {"docs": 1, "tokens": int(len(tokens)), "shards": shards}
    write_json_atomic(root / "manifest.json", {"tokenizer": tokenizer, "vocab_size": vocab_size,
                                               "eot_token": vocab_size - 1, "dtype": "uint16", "splits": splits})
    return root


def patterned_tokens(count: int, period: int = 23, seed: int = 0) -> np.ndarray:
    """A learnable stream: a random phrase of `period` tokens repeated, so loss can fall fast."""
    phrase = np.random.default_rng(seed).integers(0, 500, size=period)
    return np.resize(phrase, count)


def copy_examples(count: int, eot: int = 511, seed: int = 0) -> list[Example]:
    """Instruction examples over ids below `eot` that a tiny model learns fast: the prompt is a few
    words between markers 1 and 2, the response repeats them, then end-of-text."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        words = [int(w) for w in rng.integers(3, 40, size=int(rng.integers(3, 12)))]
        examples.append(Example((1, *words, 2, *words, eot), prompt_len=len(words) + 2))
    return examples


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: a tiny model gains nothing from a second, which on a busy shared CPU
    spins waiting for a core and makes a training test ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Killed(Exception):
    """What `DiesAtStep` raises: a run killed in the middle of training."""


class DiesAtStep(MemoryTracker):
    """A tracker whose run dies when asked to log the metrics of `step`."""

    def __init__(self, step: int):
        super().__init__()
        self.dies_at = step

    def log_metrics(self, metrics, step):
        if step == self.dies_at:
            raise Killed
        super().log_metrics(metrics, step)
