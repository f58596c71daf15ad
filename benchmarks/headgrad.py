"""The bf16 weight gradient of the fused head + loss in its two layouts, over row counts and widths: what
llm/loss.py's DIRECT_GRAD_WEIGHT_ROWS decides on.

    python -m benchmarks.headgrad [--repeats 5] [--rows 256,512,1024,1536,2048] [--widths 256,768]

Under bf16 autocast the head's weight is an fp32 parameter (V, C) and its gradient comes from a bf16
product of the gradient of the logits G (N, V) and the hidden states h (N, C), cast to fp32:
- direct: G^T h, which comes out (V, C), in the weight's layout, so that the cast is a plain pass;
- transposed: (h^T G)^T, oneDNN's faster product as N grows, but its (C, V) result needs a transposing
  cast into the weight's (V, C), a pass whose cost does not shrink with N.
Each is timed on `llm.loss.linear_cross_entropy` as training runs it (forward and backward, bf16 autocast,
an fp32 weight of GPT-2's 50,257 rows), the layout forced through the threshold; the two in turn, each
repeat, so that a busy spell of the host lands on both. Both must give the same gradients to bf16
rounding. A row says which layout the threshold picks at its N and whether that was the faster here.
The book's chapter 5 run (recipes/book-ch05.yaml) is N 512 (batch 2 x 256), C 768; `cpu-small` at the
pipeline's batch 8 x 256 is N 2,048, C 256. Last line: `headgrad_book_shape=R`, the transposed layout's
time over the direct one's at N 512, C 768 (what the book's recipe gains per step from the threshold).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Mapping

import torch

import llm.loss
from benchmarks.common import Timing, time_interleaved
from llm.hardware import keep_freed_memory
from llm.loss import linear_cross_entropy

VOCAB = 50257
BOOK_SHAPE = (512, 768)  # (N, C)
LAYOUTS = {"direct": sys.maxsize, "transposed": 0}  # DIRECT_GRAD_WEIGHT_ROWS that forces each


def step(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **settings: object):
    """The fused loss forward and backward in bf16 autocast, as training runs it, with llm.loss's module
    settings (DIRECT_GRAD_WEIGHT_ROWS=..., VOCAB_BLOCK=..., IN_PLACE_DTYPES=...) set for each run: the
    gradients of hidden and weight. The caller restores the settings."""
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        for name, value in settings.items():
            setattr(llm.loss, name, value)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets)
        return torch.autograd.grad(loss, (hidden, weight))

    return run


def time_settings(rows: int, width: int, settings: Mapping[str, Mapping[str, object]],
                  repeats: int) -> dict[str, Timing]:
    """The fused loss over N `rows` hidden states of width C `width` and an fp32 head of GPT-2's vocabulary
    (random, seeded), under each of `settings` (a label: llm.loss module settings), timed in turn; their
    gradients must agree to bf16 rounding. llm.loss's settings are left as they were found."""
    found = {name: getattr(llm.loss, name) for values in settings.values() for name in values}
    try:
        torch.manual_seed(0)
        hidden = torch.randn(rows, width, requires_grad=True)
        weight = (torch.randn(VOCAB, width) * 0.02).requires_grad_()
        targets = torch.randint(VOCAB, (rows,))
        runs = {label: step(hidden, weight, targets, **values) for label, values in settings.items()}
        first, *others = (run() for run in runs.values())
        for grads in others:
            for got, want in zip(grads, first):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-2)  # bf16's rounding
        return time_interleaved(runs, repeats=repeats)
    finally:
        for name, value in found.items():
            setattr(llm.loss, name, value)


def sweep(rows: str, widths: str, settings: Mapping[str, Mapping[str, object]], repeats: int, numerator: str,
          denominator: str) -> Iterator[tuple[tuple[int, int], dict[str, Timing], float]]:
    """`time_settings` at each (N, C) of the comma-separated `rows` and `widths` (widths outermost): the
    shape, its timings, and the median time of the `numerator` setting over the `denominator`'s."""
    for width in (int(w) for w in widths.split(",")):
        for row_count in (int(r) for r in rows.split(",")):
            timings = time_settings(row_count, width, settings, repeats)
            yield (row_count, width), timings, timings[numerator].median / timings[denominator].median


def add_sweep_arguments(parser: argparse.ArgumentParser, rows: str) -> None:
    """The shapes a sweep times (--rows, --widths: comma-separated N and C) and its --repeats."""
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default=rows, help="N: tokens per micro-batch")
    parser.add_argument("--widths", default="256,768", help="C: n_embd")


def print_sweep(results: Iterator[tuple[tuple[int, int], dict[str, Timing], float]],
                line: Callable[[int, int, dict[str, Timing], float], str], headline: str,
                headline_shape: tuple[int, int]) -> None:
    """`line(N, C, timings, ratio)` for each shape of a `sweep` as it is timed, then `headline=R`, the ratio
    at `headline_shape`, where it was among the shapes."""
    ratios = {}
    for (rows, width), timings, ratio in results:
        ratios[rows, width] = ratio
        print(line(rows, width, timings, ratio), flush=True)
    if headline_shape in ratios:
        print(f"{headline}={ratios[headline_shape]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser, "256,512,1024,1536,2048")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the trainer runs
    threshold = llm.loss.DIRECT_GRAD_WEIGHT_ROWS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DIRECT_GRAD_WEIGHT_ROWS = {threshold}; "
          f"the fused loss forward + backward, bf16 autocast, V {VOCAB:,}, median of {args.repeats}")
    settings = {name: {"DIRECT_GRAD_WEIGHT_ROWS": direct_rows} for name, direct_rows in LAYOUTS.items()}

    def line(rows: int, width: int, timings: dict[str, Timing], ratio: float) -> str:
        picked = "direct" if rows <= threshold else "transposed"
        faster = "direct" if ratio > 1 else "transposed"
        return (f"N {rows:5,} C {width:4}: direct {timings['direct']}, transposed {timings['transposed']}: "
                f"transposed/direct {ratio:.2f}; the threshold picks {picked}"
                f"{'' if picked == faster else ', the slower here'}")

    print_sweep(sweep(args.rows, args.widths, settings, args.repeats, "transposed", "direct"), line,
                "headgrad_book_shape", BOOK_SHAPE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
