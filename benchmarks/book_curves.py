"""The book's chapter 5 training and the pipeline's trainer over the same windows: do their val curves agree?

    python -m benchmarks.book_curves [--seeds 8] [--steps 90] [--shape small | book] [--precision auto | fp32 | bf16]

benchmarks.book times the two sides each over its own draws (the order of the windows and the dropout masks
come from each side's random stream), and the step at which each reaches the equal-loss target moves with
those draws: with seeds 123-125 ours reached it at steps 50, 55 and 40, the book at 36, 41 and 41. Slower
learning, or the draw? With dropout off, tests/test_book_benchmark.py shows the trainer taking the book's
steps to fp32 rounding. This measures what remains with dropout on: for each seed, both sides start from
the same weights (the book's initialisation after torch.manual_seed(seed)) and see the same windows in the
same order (the book's 18 train windows, reshuffled each epoch by one generator of that seed), and each
keeps everything else of its own:
- the book: benchmarks/book_ch05.py's GPTModel and its training step (`calc_loss_batch`, torch's AdamW at
  lr 4e-4 with weight decay 0.1 on every parameter), nn.Dropout's masks, fp32;
- ours: `llm.train.Trainer` with recipes/book-ch05.yaml's pretrain settings (weight decay on matrices only,
  llm/dropout.py's masks, the fused head and loss) in `--precision` (the recipe's auto: bf16 where the CPU
  runs it natively).
Every 5 steps both val losses are measured over the book's val windows (eval mode). `--shape small` (the
default: 4 layers, 4 heads, n_embd 256, context 256) runs 8 seeds in about 10 minutes on 2 cores; `--shape
book`, the book's 163M-parameter model, about 5 minutes a seed.

Prints each seed's curves' best and final losses, then the mean curves over the seeds with their standard
errors, and the mean of the seeds' paired differences (ours - the book, at each evaluation) with its
standard error, which says whether a gap is more than the draw of the masks. Last line: `curve_gap=G`,
the widest mean difference between the two curves over the evaluations, in val loss (the benchmark's
target margin is 0.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import tiktoken
import torch
from torch import Tensor

from benchmarks import book_ch05 as book
from benchmarks.book import RECIPE, fetch_corpus
from llm.config import PRECISIONS, Params, load_params
from llm.model import GPT, model_config
from llm.tracking import MemoryTracker
from llm.train import Batch, Trainer

SHAPES = {"small": {"n_layer": 4, "n_head": 4, "n_embd": 256}, "book": {"n_layer": 12, "n_head": 12, "n_embd": 768}}
EVAL_EVERY = 5


class FixedOrder:
    """The trainer's batch source over given batches, in their order; resumable by position."""

    def __init__(self, batches: list[Batch]):
        self.batches, self.position = batches, 0

    def next_batch(self) -> Batch:
        self.position += 1
        return self.batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def epoch_order(windows: list[tuple[Tensor, Tensor]], steps: int, seed: int) -> list[Batch]:
    """`steps` batches of the book's size over `windows`, reshuffled each epoch, the last partial batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = len(windows) // book.BATCH_SIZE
    batches: list[Batch] = []
    while len(batches) < steps:
        order = torch.randperm(len(windows), generator=generator).tolist()
        for i in range(per_epoch):
            picked = [windows[j] for j in order[i * book.BATCH_SIZE:(i + 1) * book.BATCH_SIZE]]
            batches.append((torch.stack([x for x, _ in picked]), torch.stack([y for _, y in picked])))
    return batches[:steps]


def book_curve(shape: dict[str, int], batches: list[Batch], val: Batch, seed: int) -> list[float]:
    """The book's step over `batches`; its val loss every EVAL_EVERY steps."""
    config = {**book.GPT_CONFIG_124M, "emb_dim": shape["n_embd"], "n_heads": shape["n_head"],
              "n_layers": shape["n_layer"]}
    torch.manual_seed(seed)
    model = book.GPTModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=book.LEARNING_RATE, weight_decay=book.WEIGHT_DECAY)
    device, curve = torch.device("cpu"), []
    for step, (x, y) in enumerate(batches, start=1):
        model.train()
        optimizer.zero_grad()
        book.calc_loss_batch(x, y, model, device).backward()
        optimizer.step()
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                curve.append(book.calc_loss_batch(*val, model, device).item())
    return curve


def our_curve(params: Params, shape: dict[str, int], batches: list[Batch], val: Batch, seed: int,
              precision: str | None, out_dir: Path) -> list[float]:
    """The pipeline's trainer with the recipe's settings (`params`) over `batches`; its val loss every
    EVAL_EVERY steps."""
    config = dataclasses.replace(params.pretrain, seed=seed, max_steps=len(batches), device="cpu",
                                 precision=precision or params.pretrain.precision, eval_interval=EVAL_EVERY,
                                 log_interval=EVAL_EVERY, eval_batches=1, sample_interval=0,
                                 checkpoint_interval=len(batches))
    torch.manual_seed(seed)
    model = GPT(model_config(params.model.preset, context_length=params.model.context_length, **shape))
    tracker = MemoryTracker()
    Trainer(model, FixedOrder(batches), [val], config, out_dir, settings={}, tracker=tracker).fit()
    return [loss for step, loss in tracker.series("val_loss") if step > 0]


def mean_and_error(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    columns = list(zip(*curves))
    means = [statistics.mean(column) for column in columns]
    errors = [statistics.stdev(column) / len(column) ** 0.5 if len(column) > 1 else float("nan") for column in columns]
    return means, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 1 to N, each a pair of runs")
    parser.add_argument("--steps", type=int, default=book.NUM_EPOCHS * 9, help="optimizer steps (the book's 90)")
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--precision", choices=PRECISIONS, help="ours' training precision instead of the recipe's")
    args = parser.parse_args()
    if args.seeds < 1 or args.steps < EVAL_EVERY:
        parser.error(f"--seeds must be at least 1 and --steps at least {EVAL_EVERY}")
    sys.stdout.reconfigure(line_buffering=True)
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(RECIPE)
        text = fetch_corpus(params, Path(tmp) / "raw").read_text(encoding="utf-8")
        train_loader, val_loader = book.book_loaders(text, tiktoken.get_encoding("gpt2"))
        windows = list(train_loader.dataset)
        val = (torch.stack([x for x, _ in val_loader.dataset]), torch.stack([y for _, y in val_loader.dataset]))
        precision = args.precision or "the recipe's"
        print(f"the {args.shape} shape ({shape}), {args.steps} steps over the book's {len(windows)} train windows; "
              f"val: its {len(val[0])} windows; ours in precision {precision}")
        books, ours = [], []
        for seed in range(1, args.seeds + 1):
            batches = epoch_order(windows, args.steps, seed)
            books.append(book_curve(shape, batches, val, seed))
            ours.append(our_curve(params, shape, batches, val, seed, args.precision, Path(tmp) / f"ours-{seed}"))
            print(f"seed {seed}: the book best {min(books[-1]):.3f}, final {books[-1][-1]:.3f}; "
                  f"ours best {min(ours[-1]):.3f}, final {ours[-1][-1]:.3f}")
    (book_mean, book_error), (our_mean, our_error) = mean_and_error(books), mean_and_error(ours)
    gap, gap_error = mean_and_error([[o - b for b, o in zip(theirs, mine)] for theirs, mine in zip(books, ours)])
    print(f"mean val loss over {args.seeds} seeds (standard error; of ours - book, the seeds' paired differences'):")
    print("  step     the book         ours             ours - book")
    for i, (b, be, o, oe, g, ge) in enumerate(zip(book_mean, book_error, our_mean, our_error, gap, gap_error)):
        print(f"  {(i + 1) * EVAL_EVERY:4d}   {b:6.3f} ({be:.3f})   {o:6.3f} ({oe:.3f})   {g:+.3f} ({ge:.3f})")
    widest = max(range(len(gap)), key=lambda i: abs(gap[i]))
    if args.seeds > 1 and gap_error[widest] > 0:
        print(f"the widest gap, at step {(widest + 1) * EVAL_EVERY}: {gap[widest]:+.3f}, "
              f"{abs(gap[widest]) / gap_error[widest]:.1f} standard errors of the paired differences")
    print(f"curve_gap={abs(gap[widest]):.3f}")


if __name__ == "__main__":
    main()
