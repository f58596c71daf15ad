"""The bf16 head's forward product by vocabulary blocks or in one, over row counts and widths: what
llm/loss.py's VOCAB_BLOCK decides on.

    python -m benchmarks.headblocks [--repeats 5] [--rows 256,512,1024,2048] [--widths 256,768] [--block 4096]

The fused head + loss computes the logits h @ W^T (N, V) of the hidden states h (N, C) and the head's
weight W (V, C) before turning them into the loss and its gradient. In bf16 on a CPU, oneDNN's one
product over GPT-2's 50,257 vocabulary rows runs well below the rate of the same product cut into blocks of
a few thousand rows, each written into its columns of the logits (`llm.loss.head_logits`). Each shape is
timed on `llm.loss.linear_cross_entropy` as training runs it (forward and backward, bf16 autocast, eager,
an fp32 weight of GPT-2's 50,257 rows), VOCAB_BLOCK 0 (one product) against `--block`, the two in turn each
repeat, so that a busy spell of the host lands on both; both must give the same gradients to bf16
rounding. Under torch.compile the blocks are concatenated inside the graph: benchmarks.train times that in
its whole step. In fp32 one product already runs at the CPU's peak, and llm.loss keeps it.

`cpu-small` at the pipeline's batch 8 x 256 (benchmarks.train's shape) is N 2,048, C 256; the book's
chapter 5 run (recipes/book-ch05.yaml) is N 512, C 768. Last line: `headblocks_train_shape=R`, one
product's time over the blocks' at N 2,048, C 256.
"""

from __future__ import annotations

import argparse
import sys

import torch

import llm.loss
from benchmarks.headgrad import VOCAB, add_sweep_arguments, print_sweep, sweep
from llm.hardware import keep_freed_memory

TRAIN_SHAPE = (2048, 256)  # (N, C)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser, "256,512,1024,2048")
    parser.add_argument("--block", type=int, default=llm.loss.VOCAB_BLOCK, help="vocabulary rows per product")
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error(f"--block must be at least 1 vocabulary row, got {args.block}")
    keep_freed_memory()  # as the trainer runs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the fused loss forward + backward, bf16 "
          f"autocast, V {VOCAB:,}: one product against blocks of {args.block:,} vocabulary rows, median of "
          f"{args.repeats}")
    settings = {"one": {"VOCAB_BLOCK": 0}, "blocks": {"VOCAB_BLOCK": args.block}}
    print_sweep(sweep(args.rows, args.widths, settings, args.repeats, "one", "blocks"),
                lambda rows, width, timings, ratio: f"N {rows:5,} C {width:4}: one product {timings['one']}, "
                f"blocks {timings['blocks']}: one/blocks {ratio:.2f}", "headblocks_train_shape", TRAIN_SHAPE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
