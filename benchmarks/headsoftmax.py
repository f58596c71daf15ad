"""The bf16 fused head + loss with its softmax in place on the bf16 logits or on fp32 chunks of them, over
row counts and widths: what llm/loss.py's IN_PLACE_DTYPES decides on for bf16.

    python -m benchmarks.headsoftmax [--repeats 5] [--rows 256,512,1024,2048] [--widths 256,768]

The fused head + loss writes the bf16 logits (N, V) into the gradient's buffer, then turns them into the
gradient, softmax - one-hot. Two ways, in eager mode:
- chunks: 128 rows at a time are upcast to fp32, ATen's softmax makes them the gradient in place, and they
  are cast back into the buffer: three passes over each chunk's memory, two of them in fp32;
- in place: ATen's softmax runs on the bf16 logits themselves, computing each row in fp32 and rounding
  each probability once: one pass over the bf16 buffer, the same gradient.
Each is timed on `llm.loss.linear_cross_entropy` as training runs it (forward and backward, bf16 autocast,
an fp32 weight of GPT-2's 50,257 rows), the path forced through IN_PLACE_DTYPES; the two in turn, each
repeat, so that a busy spell of the host lands on both. Both must give the same gradients to bf16
rounding. The book's chapter 5 run (recipes/book-ch05.yaml, eager) is N 512, C 768; `cpu-small` at the
pipeline's batch 8 x 256 is N 2,048, C 256. Under torch.compile neither runs: Inductor fuses its own
kernel. Last line: `headsoftmax_book_shape=R`, the chunks' time over in place's at N 512, C 768.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.headgrad import BOOK_SHAPE, VOCAB, add_sweep_arguments, print_sweep, sweep
from llm.hardware import keep_freed_memory

PATHS = {"chunks": {"IN_PLACE_DTYPES": (torch.float32,)},
         "in place": {"IN_PLACE_DTYPES": (torch.float32, torch.bfloat16)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser, "256,512,1024,2048")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the trainer runs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the fused loss forward + backward, bf16 "
          f"autocast, eager, V {VOCAB:,}: the softmax on fp32 chunks against in place on bf16, median of "
          f"{args.repeats}")
    print_sweep(sweep(args.rows, args.widths, PATHS, args.repeats, "chunks", "in place"),
                lambda rows, width, timings, ratio: f"N {rows:5,} C {width:4}: chunks {timings['chunks']}, "
                f"in place {timings['in place']}: chunks/in place {ratio:.2f}", "headsoftmax_book_shape", BOOK_SHAPE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
