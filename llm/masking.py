"""BERT's masked-language-model objective: batches corrupted as they are drawn, and the masked-token metrics.

    masking = Masking(rate=0.15, mask_fraction=0.8, random_fraction=0.1)
    batches = MaskedBatches(RandomWindows(train, T, 8, seed), masking, model.config, seed=1337)
    x, y = batches.next_batch()   # x: the corrupted ids; y: the original id where chosen, IGNORE_INDEX elsewhere
    loss = model(x, y)            # an encoder's (objective: masked) masked-token cross-entropy

Of a batch's real positions, `rate` are chosen (each on its own, and at least one per row, as BERT's
`max(1, ...)`); of those, `mask_fraction` become the mask token, `random_fraction` a random token of the
vocabulary, and the rest stay as they are. The loss is taken on the chosen positions only. The shards
stay GPT-2 token shards: the same `tokenize` output feeds a GPT and an encoder.

The draws are a function of (seed, stream, batch number) only, like every batch source here: a resumed
run corrupts its batches exactly as an uninterrupted one would, and the val batches are corrupted the
same way at every evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llm.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from llm.model import GPT, ModelConfig
    from llm.shards import TokenStream
    from llm.train import Batch, BatchSource

VAL_STREAM = 0  # the val batches' draws; rank r's training draws are stream r + 1
TOP_K = 5  # top-k accuracy's k


@dataclass(frozen=True)
class Masking:
    """BERT's corruption: `rate` of the positions chosen; of those, `mask_fraction` replaced by the mask
    token, `random_fraction` by a random token, the rest left as they are."""

    rate: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1


def corrupt(tokens: Tensor, masking: Masking, config: ModelConfig, rng: np.random.Generator,
            real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The encoder's (inputs, targets) for token ids `tokens` (B, T); `real` (B, T) is False at padding,
    which is never chosen (default: every position is real)."""
    shape = tuple(tokens.shape)
    real_np = np.ones(shape, dtype=bool) if real is None else real.cpu().numpy().astype(bool)
    draw = rng.random(shape)
    chosen = (draw < masking.rate) & real_np
    # At least one target in every row with real tokens: a row's lowest draw, as BERT's max(1, ...) does.
    lowest = np.where(real_np, draw, np.inf).argmin(axis=1)
    empty = ~chosen.any(axis=1) & real_np.any(axis=1)
    chosen[np.flatnonzero(empty), lowest[empty]] = True
    kind = rng.random(shape)  # which replacement a chosen position gets
    to_mask = chosen & (kind < masking.mask_fraction)
    to_random = chosen & (kind >= masking.mask_fraction) & (kind < masking.mask_fraction + masking.random_fraction)
    random_ids = rng.integers(0, config.vocab_size, shape)  # real tokens only, never the mask token
    ids = tokens.cpu().numpy()
    inputs = np.where(to_mask, config.mask_token_id, np.where(to_random, random_ids, ids))
    targets = np.where(chosen, ids, IGNORE_INDEX)
    return torch.from_numpy(inputs).to(tokens.dtype), torch.from_numpy(targets).to(torch.int64)


def draws(seed: int, stream: int, index: int) -> np.random.Generator:
    """The random numbers of batch `index` of `stream`: a function of the three only."""
    return np.random.default_rng([seed, stream, index])


class MaskedBatches:
    """A batch source's windows, corrupted for an encoder (a llm.train.BatchSource, resumable).

    `source` gives (inputs, targets) windows, as llm.shards.RandomWindows does; its inputs are the
    sequences to corrupt, its targets (the next tokens) are not used."""

    def __init__(self, source: BatchSource, masking: Masking, config: ModelConfig, seed: int, rank: int = 0):
        self.source, self.masking, self.config, self.seed, self.rank = source, masking, config, seed, rank
        self.drawn = 0

    def next_batch(self) -> Batch:
        tokens, _ = self.source.next_batch()
        batch = corrupt(tokens, self.masking, self.config, draws(self.seed, self.rank + 1, self.drawn))
        self.drawn += 1
        return batch

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.drawn = state["drawn"]


def masked_val_batches(batches: Sequence[Batch], masking: Masking, config: ModelConfig, seed: int) -> list[Batch]:
    """Val windows corrupted once, the same at every evaluation (targets of the windows are not used)."""
    return [corrupt(x, masking, config, draws(seed, VAL_STREAM, i)) for i, (x, _) in enumerate(batches)]


@dataclass(frozen=True)
class MaskedMetrics:
    loss: float  # mean cross-entropy per chosen position, in nats
    accuracy: float  # the original token ranked first
    top5_accuracy: float  # ... among the first TOP_K
    targets: int  # chosen positions scored


@torch.no_grad()
def masked_token_metrics(model: GPT, batches: Iterable[Batch]) -> MaskedMetrics:
    """An encoder's loss and accuracies over every chosen position of `batches`, each position weighing
    the same (not each batch), in float32."""
    device = model.head_weight.device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros(2, dtype=torch.int64, device=device)  # first, within top-k
    count = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        chosen = y != IGNORE_INDEX
        hidden = model.forward_hidden(x)[chosen]  # (N, C)
        logits = F.linear(hidden, model.head_weight).float()  # (N, vocab_size)
        target = y[chosen]
        loss += F.cross_entropy(logits, target, reduction="sum").double()
        ranked = logits.topk(TOP_K, dim=-1).indices  # (N, TOP_K)
        hits += torch.stack([(ranked[:, 0] == target).sum(), (ranked == target[:, None]).any(-1).sum()])
        count += int(target.numel())
    if count == 0:
        raise ValueError("no masked positions to score: the batches hold no chosen targets")
    first, within = hits.tolist()
    return MaskedMetrics(loss=loss.item() / count, accuracy=first / count, top5_accuracy=within / count,
                         targets=count)


def split_metrics(model: GPT, stream: TokenStream, batch_size: int, seed: int,
                  masking: Masking = Masking()) -> MaskedMetrics:
    """An encoder's masked-token figures over a whole split (the evaluate stage's, where a GPT gets its
    perplexity): its consecutive windows of context_length tokens (the few after the last full window
    left out), each corrupted by `seed`, the same in every run."""
    T = model.config.context_length
    count = len(stream) // T
    if count == 0:
        raise ValueError(f"the split holds {len(stream)} tokens, fewer than one window of context_length {T}")
    windows = torch.from_numpy(np.stack([stream.window(i * T, T) for i in range(count)]).astype(np.int64))
    batches = (corrupt(windows[i:i + batch_size], masking, model.config, draws(seed, VAL_STREAM, i))
               for i in range(0, count, batch_size))
    return masked_token_metrics(model, batches)
