"""Perplexity: a model's next-token loss over a whole token split, every target counted exactly once.

    stream = TokenStream.from_manifest("data/shards", "val")
    result = perplexity(model, stream, context_length=model.config.context_length, batch_size=8)
    result.loss, result.perplexity          # mean cross-entropy per target (nats), and exp(loss)
    perplexity(..., token_bytes=token_byte_lengths(enc)).bits_per_byte   # bits per UTF-8 byte

The split is cut into consecutive, non-overlapping windows of `context_length` tokens
(`sequential_batches`), so each of its len(stream) - 1 next-token targets is predicted once,
from the tokens before it in its window: the book's loaders cut text the same way (stride =
context_length). A sliding window would give every target more context, and a lower perplexity, at up to
context_length times the cost.

The loss is the sum of the per-target losses over the number of targets, a token-weighted mean. The
mean of per-batch means (what `model(idx, targets)` returns) would weigh the padded last window's few
targets as much as a full batch's, so each target's loss is asked for (`reduction="none"`) and summed here.
They come from the model's own head + loss (llm/loss.py), which without gradients turns the logits into
losses a chunk of rows at a time: a batch's (B, T, vocab) logits (412 MB in fp32 for 8 windows of 256 over
GPT-2's vocabulary), and their log-softmax as large, are never held.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from torch import nn

from llm.loss import IGNORE_INDEX
from llm.model import eval_mode
from llm.shards import TokenStream, to_batch


@dataclass(frozen=True)
class PerplexityResult:
    loss: float  # mean cross-entropy per target token, in nats
    perplexity: float  # exp(loss)
    tokens: int  # targets scored: every token of the split but the first
    tokens_per_s: float
    # The targets' loss in bits over their UTF-8 bytes: independent of the tokenizer, so models of other
    # vocabularies compare (nanochat's measure). NaN when no token lengths were given. Special tokens
    # (end-of-text) have no bytes and count in neither sum, as nanochat counts them.
    bits_per_byte: float = math.nan
    bytes: int = 0  # the bytes of the targets bits_per_byte is over


def perplexity(
    model: nn.Module,
    stream: TokenStream,
    context_length: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    token_bytes: torch.Tensor | None = None,
) -> PerplexityResult:
    """Loss and perplexity of `model` over all of `stream`, and with `token_bytes` (each token id's length
    in bytes, `token_byte_lengths`) bits per byte. `model(idx, targets, reduction="none")` gives each
    target's loss (B, T), 0 where the target is IGNORE_INDEX, as `llm.model.GPT` does.

    `model` must already be on `device`. `autocast_dtype` (e.g. torch.bfloat16 on a GPU) runs the
    forward under autocast; the cross-entropy is always summed in float32 and accumulated in float64.
    """
    if len(stream) < 2:
        raise ValueError(f"the split holds {len(stream)} token(s): perplexity needs at least 2 (one "
                         "next-token target); tokenize more text into it")
    device = torch.device(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with_bytes = torch.zeros((), dtype=torch.float64, device=device)  # the loss of targets that have bytes
    lengths = None if token_bytes is None else token_bytes.to(device)
    tokens, nbytes = 0, 0
    start = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with eval_mode(model), torch.inference_mode(), autocast:
        for inputs, targets in sequential_batches(stream, context_length, batch_size):
            targets = targets.to(device)
            losses = model(inputs.to(device), targets, reduction="none").flatten().float()  # 0 where ignored
            targets = targets.flatten()
            counted = targets != IGNORE_INDEX
            total += losses.sum()
            tokens += int(counted.sum())
            if lengths is not None:
                size = lengths[targets.clamp(min=0)] * counted
                with_bytes += losses[size > 0].sum()
                nbytes += int(size.sum())
    loss = total.item()  # waits for the device: the timing below covers all of the work
    elapsed = time.perf_counter() - start
    mean = loss / tokens
    bpb = with_bytes.item() / (math.log(2) * nbytes) if nbytes else math.nan
    return PerplexityResult(loss=mean, perplexity=_exp(mean), tokens=tokens, tokens_per_s=tokens / elapsed,
                            bits_per_byte=bpb, bytes=nbytes)


def token_byte_lengths(enc: tiktoken.Encoding, vocab_size: int | None = None) -> torch.Tensor:
    """Each token id's length in UTF-8 bytes (vocab_size,), 0 for special tokens and ids past the
    tokenizer's: what bits per byte divides by."""
    special = {enc.encode_single_token(token) for token in enc.special_tokens_set}
    lengths = torch.zeros(vocab_size or enc.n_vocab, dtype=torch.int64)
    for i in range(min(len(lengths), enc.n_vocab)):
        if i in special:
            continue
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # an id the encoding leaves unused
            pass
    return lengths


def sequential_batches(stream: TokenStream, context_length: int, batch_size: int,
                       pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every next-token prediction of the split exactly once, in order: len(stream) - 1 targets.

    The last window is padded: its inputs with `pad_id`, its targets with IGNORE_INDEX.
    """
    total = len(stream) - 1  # the first token is never a target
    rows: list[np.ndarray] = []
    for start in range(0, total, context_length):
        length = min(context_length, total - start)
        row = np.full(context_length + 1, IGNORE_INDEX, dtype=np.int64)
        row[:length + 1] = stream.window(start, length + 1)
        rows.append(row)
        if len(rows) == batch_size:
            yield _padded_batch(rows, pad_id)
            rows = []
    if rows:
        yield _padded_batch(rows, pad_id)


def _padded_batch(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = to_batch(rows)
    inputs = inputs.masked_fill(inputs == IGNORE_INDEX, pad_id)
    return inputs, targets


def _exp(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:  # a diverged model's loss over ~709 nats
        return math.inf
