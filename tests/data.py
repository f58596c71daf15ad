"""Small token shards made in a test's temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llm.files import write_json_atomic
from llm.shards import ShardWriter


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
