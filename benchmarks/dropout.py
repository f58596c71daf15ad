"""Dropout on a CPU: llm.dropout's bulk-drawn mask against torch.nn.Dropout, in one run.

    python -m benchmarks.dropout [--repeats 5] [--dtype auto | fp32 | bf16]

Two measurements, each as paired rounds (every candidate once a round, in turn; the median of
`--repeats` rounds after a warm-up):
- one dropout layer, forward and backward, at the two kinds of site in the book's model (gpt2-book at
  context 256, batch 2): the attention weights (2, 12, 256, 256) and the hidden states (2, 256, 768),
  both in the training dtype (llm/model.py keeps the attention weights in the scores' dtype);
- a whole training step of that model (dropout 0.1; forward, backward, fused AdamW; bf16 autocast where
  the CPU computes bf16 natively, `--dtype auto`), with torch.nn.Dropout in every dropout's place (what
  the book's and nanoGPT's models use), with llm.dropout's, and with dropout off (p = 0), the floor: what
  is left of dropout's cost is each side's step over it.
Three copies of the model (2.6 GB each with AdamW's state); about a minute on 2 cores.

Last line: `dropout_step_speedup=R`, the step with torch.nn.Dropout over the step with ours.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import time_interleaved
from llm.config import PRECISIONS
from llm.dropout import Dropout
from llm.hardware import autocast, bf16_is_fast, keep_freed_memory, train_dtype
from llm.model import GPT, model_config
from llm.optim import adamw

P = 0.1
BATCH, CONTEXT = 2, 256


def layer_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module(x).backward(torch.ones_like(x))

    return step


def with_torch_dropout(model: nn.Module) -> nn.Module:
    """The model with torch.nn.Dropout of the same p in place of each of llm.dropout's."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    return model


def training_step(model: nn.Module, dtype: torch.dtype) -> Callable[[], None]:
    optimizer = adamw(model, 4e-4, 0.1, (0.9, 0.999), "cpu")
    x, y = (torch.randint(0, model.config.vocab_size, (BATCH, CONTEXT)) for _ in range(2))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, dtype):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=PRECISIONS, default="auto",
                        help="the training dtype, as pretrain.precision names it (auto: bf16 where native)")
    args = parser.parse_args()
    keep_freed_memory()  # as the trainer runs
    native = bf16_is_fast(torch.device("cpu"))
    dtype = train_dtype(torch.device("cpu"), args.dtype)  # the trainer's own choice of dtype
    name = str(dtype).removeprefix("torch.")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native}; dropout {P}; "
          f"training dtype {name}")

    sites = {f"attention weights (2, 12, 256, 256) {name}": torch.randn(BATCH, 12, CONTEXT, CONTEXT, dtype=dtype),
             f"hidden states (2, 256, 768) {name}": torch.randn(BATCH, CONTEXT, 768, dtype=dtype)}
    for site, x in sites.items():
        x.requires_grad_(True)
        times = time_interleaved({"torch": layer_step(nn.Dropout(P), x), "ours": layer_step(Dropout(P), x)},
                                 repeats=args.repeats * 4)
        print(f"one layer, {site}: torch.nn.Dropout {times['torch']}, ours {times['ours']}; "
              f"{times['torch'].median / times['ours'].median:.2f}x")

    torch.manual_seed(123)
    config = model_config("gpt2-book", context_length=CONTEXT)
    ours = GPT(config)
    torch_side = with_torch_dropout(GPT(config))
    torch_side.load_state_dict(ours.state_dict())
    off = GPT(model_config("gpt2-book", context_length=CONTEXT, dropout=0.0))
    off.load_state_dict(ours.state_dict())
    times = time_interleaved({"torch": training_step(torch_side.train(), dtype),
                              "ours": training_step(ours.train(), dtype),
                              "off": training_step(off.train(), dtype)}, repeats=args.repeats)
    floor = times["off"].median
    print(f"training step, gpt2-book at batch {BATCH} x {CONTEXT}, {name}: torch.nn.Dropout {times['torch']}, "
          f"ours {times['ours']}, dropout off {times['off']}")
    for side in ("torch", "ours"):
        share = (times[side].median - floor) / times[side].median
        print(f"  {side}: dropout's cost over the step without it: {(times[side].median - floor) * 1e3:.0f} ms, "
              f"{share:.0%} of the step")
    print(f"dropout_step_speedup={times['torch'].median / times['ours'].median:.2f}")


if __name__ == "__main__":
    main()
