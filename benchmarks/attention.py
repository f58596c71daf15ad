"""Explicit-mask attention (the book's) against PyTorch's scaled_dot_product_attention, in one run.

    python -m benchmarks.attention

Times a training step's forward and backward (no optimizer step) with config.attention = "explicit"
and = "sdpa", same weights, dropout 0, on a batch of 8 full-context sequences of the `cpu-small` shape
(4 layers, 4 heads, n_embd 256, context 256), twice: with a 256-token vocabulary, so that attention
is a visible share of the step, and with GPT-2's 50,257 tokens, where the head and loss take most of
the step. Median of 5 interleaved repeats after a warm-up (about 40 s on 2 cores). The last line is
the ratio for the first (explicit time / sdpa time; above 1: SDPA is faster):
`attention_sdpa_vs_explicit=...`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import time_interleaved
from llm.model import GPT, model_config

BATCH = 8


def training_step(model: GPT) -> Callable[[], None]:
    idx = torch.randint(0, model.config.vocab_size, (BATCH, model.config.context_length))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(idx, idx).backward()

    return step


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"forward+backward of a batch of {BATCH} x 256 tokens")
    ratios = []
    for vocab_size in (256, 50257):
        sdpa = GPT(model_config("cpu-small", vocab_size=vocab_size, dropout=0.0, attention="sdpa"))
        explicit = GPT(model_config("cpu-small", vocab_size=vocab_size, dropout=0.0, attention="explicit"))
        explicit.load_state_dict(sdpa.state_dict())
        times = time_interleaved({"explicit": training_step(explicit), "sdpa": training_step(sdpa)})
        ratios.append(times["explicit"].median / times["sdpa"].median)
        print(f"cpu-small shape, vocab {vocab_size}: explicit/sdpa {ratios[-1]:.2f}x")
        for name, timing in times.items():
            print(f"  {name:8s} {timing}")
    print(f"attention_sdpa_vs_explicit={ratios[0]:.2f}")


if __name__ == "__main__":
    main()
