"""The model's shape and switches (`ModelConfig`), GPT-2's and the book's shapes as named presets, and
`model_config`, which builds a validated config from a preset and overrides.

Apart from llm/model.py, which builds a GPT from it, so that what reads a config without building a model
imports no torch: the params schema (llm/config.py), and through it the data stages.

    from llm.model_config import model_config
    config = model_config("cpu-small", dropout=0.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from llm.validation import ConfigError, Problem, check_positive, check_range, from_mapping

AttentionKind = Literal["auto", "sdpa", "explicit"]
# causal: a GPT, each position predicting the next token from those before it. masked: an encoder (BERT's
# objective), every position seeing the whole sequence, predicting the tokens that were masked out of it.
Objective = Literal["causal", "masked"]
Pooling = Literal["last", "mean", "first"]
WeightInit = Literal["gpt2", "book"]


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape and switches; saved as the "model" object of a checkpoint's config.json."""

    vocab_size: int
    context_length: int  # the most positions the model sees at once (GPT-2: n_positions)
    n_embd: int
    n_head: int
    n_layer: int
    dropout: float = 0.0
    qkv_bias: bool = True  # biases on the query, key and value projections (GPT-2 has them)
    tie_weights: bool = True  # the head shares the token embedding matrix, as in GPT-2
    attention: AttentionKind = "auto"  # auto: SDPA, or the explicit product where that is faster
    # gpt2: GPT-2's N(0, 0.02), zero biases, residual projections scaled down by depth. book: PyTorch's
    # default of each layer, as the book's GPTModel keeps it (Linear: uniform within 1/sqrt(fan_in);
    # Embedding: N(0, 1); LayerNorm: ones and zeros). Only construction reads it: loaded weights replace it.
    init: WeightInit = "gpt2"
    # masked: the token embedding has one row more than the tokenizer's vocab_size, the mask token's (id
    # vocab_size, `mask_token_id`); the head still predicts the vocab_size real tokens only. A config.json
    # without the field is of a causal model: every checkpoint written before encoders existed.
    objective: Objective = "causal"
    # A classifier (the book's chapter 6): the head maps n_embd to num_classes, and a sequence is
    # classified from its last real token (or the mean over its real tokens, or its first token, which
    # only an encoder's sees the whole text). None: a language model.
    num_classes: int | None = None
    pooling: Pooling = "last"

    def problems(self) -> Iterator[Problem]:
        for key in ("vocab_size", "context_length", "n_embd", "n_head", "n_layer"):
            yield from check_positive(key, getattr(self, key))
        if self.n_head > 0 and self.n_embd > 0 and self.n_embd % self.n_head:
            yield "n_embd", f"must be divisible by n_head ({self.n_head}), got {self.n_embd}"
        yield from check_range("dropout", self.dropout, 0, 1, closed="[)")
        if self.num_classes is not None:
            yield from check_range("num_classes", self.num_classes, 2)
            if self.tie_weights:
                yield "tie_weights", "must be false for a classifier: its head cannot share the token embedding"

    @property
    def is_classifier(self) -> bool:
        return self.num_classes is not None

    @property
    def is_encoder(self) -> bool:
        return self.objective == "masked"

    @property
    def mask_token_id(self) -> int:
        """The encoder's mask token: the id after the tokenizer's last."""
        if not self.is_encoder:
            raise ValueError("a causal model has no mask token: it is an encoder's (objective: masked)")
        return self.vocab_size

    @property
    def embedding_rows(self) -> int:
        """Rows of the token embedding: the tokenizer's ids, and an encoder's mask token."""
        return self.vocab_size + self.is_encoder

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "model config") -> ModelConfig:
        """Build and validate a config from a mapping (a config.json's "model" section)."""
        return from_mapping(cls, data, source=source)


_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, tie_weights=True, dropout=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI's GPT-2 shapes; the names match Hugging Face's openai-community/<name> weights.
    "gpt2": {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_head": 16, "n_embd": 1024},  # 355M
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {**_GPT2, "n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
    # The book's GPT_CONFIG_124M: GPT-2's shape without qkv biases or weight tying (163M parameters), and
    # the book's initialisation.
    "gpt2-book": {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768, "dropout": 0.1,
                  "qkv_bias": False, "tie_weights": False, "init": "book"},
    # Small enough for a CPU: `tiny` for tests, `cpu-small` to pretrain on a laptop in minutes.
    "tiny": {**_GPT2, "context_length": 64, "n_layer": 2, "n_head": 2, "n_embd": 64},
    "cpu-small": {**_GPT2, "context_length": 256, "n_layer": 4, "n_head": 4, "n_embd": 256, "dropout": 0.1},
}


def model_config(preset: str | None = None, **overrides: Any) -> ModelConfig:
    """The config of `preset` with `overrides` applied, validated (errors name the key)."""
    if preset is None:
        base: dict[str, Any] = {}
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        known = ", ".join(PRESETS)
        raise ConfigError([("preset", f"unknown preset {preset!r}; known presets: {known}")], "model config")
    return ModelConfig.from_dict({**base, **overrides})
