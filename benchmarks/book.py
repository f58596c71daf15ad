"""The book's chapter 5 pretraining run: the book's own loop against the pipeline's pretrain stage, in one run.

    python -m benchmarks.book [--epochs 10] [--seed 123[,124,...]] [--precision auto | fp32 | bf16] [--rounds 1]

Both sides train the book's GPT_CONFIG_124M (163M parameters: 12 layers, 12 heads, n_embd 768, context
256, dropout 0.1, no qkv biases, an untied head) from the same starting weights (PyTorch's default
initialisation drawn after torch.manual_seed(123): tests/test_model.py checks that the `gpt2-book` preset
draws the book's) on the-verdict, fetched by llm.download from recipes/book-ch05.yaml's source (the
mirror in $LLM_MIRROR_DIR where there is no network), for `--epochs` of the book's epochs:
- the book: benchmarks/book_ch05.py, the book's GPTModel trained by its `train_model_simple` as the
  book's notebook runs it: fp32, the full logits then F.cross_entropy, AdamW (lr 4e-4, weight decay 0.1),
  batches of 2 fixed stride-256 windows of the first 90% of the text's characters, shuffled, 9 an epoch;
  train and val evaluated over 5 batches every 5 steps, a greedy 50-token sample after every epoch;
- the pipeline: `llm.pretrain.run_pretrain` with the recipe's params as they are (precision auto: bf16
  autocast on a CPU that runs it fast; SDPA attention; the head and loss fused; fused AdamW), on shards
  that `llm.tokenize.tokenize_corpus` writes from the same file with the recipe's tokenize section (its
  last 10% of characters held out), for the same number of steps; its evaluation at step 0, every 5
  steps, a sample every epoch, its resumable checkpoints (when the recipe's checkpoint_interval and
  checkpoint_interval_s say) and the final model included.
The recipe is checked against the book's settings first (a benchmark of other settings is no comparison).
`--seed` replaces the book's 123 on both sides, which then start from the weights drawn after it: the
order of the windows and the dropout draws change with it, and so do both curves, and with them the
step at which each side reaches the target (how far: the README; benchmarks/book_curves.py gives both sides
the same windows in the same order, to tell the draw from the training). Several seeds, comma-separated, run
`--rounds` rounds each, one seed after another, and each round's equal-loss target comes from its own
seed's curves: the median over seeds is the figure that does not hang on one draw.
`--precision` replaces the recipe's training precision (auto): `fp32` measures on any host what a host
without native bf16 runs (auto picks fp32 there), as `benchmarks.train --dtype fp32` does.

Timed, on each side: from building the model to the end of training (the book: its notebook's training
cell; ours: run_pretrain whole, but not the MLflow logging and Prefect flow that the stage wraps it in).
Not timed: reading the text, building the book's loaders, tokenizing the shards.

Speed at equal val loss, the headline: each side's val curve is its val loss at each evaluation, with the
seconds since its start. The target is the worse side's best val loss plus 0.1,
    target = max(min(book's val losses), min(ours)) + 0.1,
a loss both sides reach; each side's time is that of its first evaluation at or below the target, and
`book_speedup` = the book's time / ours. Each side's val loss is its own measure of the same windows: the
book's over its val loader (the held-out text's 2 windows at stride 256), ours over the pipeline's fixed val
batches, which with the recipe's `windows: fixed` are those windows too, each 2 tokens later (the book cuts
the text inside a word, the tokenize stage after it: tests/test_recipes.py checks it token for token). The
train losses each reports differ: the book's over 5 shuffled batches in eval mode, ours the mean over the
steps since the last report, with dropout on. For a like comparison the two final models are then measured
alike: eval mode, fp32, the mean loss over the book's 18 train windows and its 2 val windows.

The sides run one after the other, so a change in the host's load between them falls on one side only
(the load average is printed at each side's start and end). `--rounds 2` pairs them: each round runs both,
the first the book then ours, the second ours then the book, and so on (over all the seeds' rounds), and
the ratios are the medians of the rounds' (a seed's curves are the same in each of its rounds: only the
times differ).

Both wall times, final losses and curves are printed. The book's loop takes most of a run: the full 10
epochs took 8 minutes in all on 2 idle cores with AMX, and about an hour on 2 busy cores without it.
Last line: `book_speedup=R` (goal: at least 3), the median over the rounds (of every seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
from torch.utils.data import DataLoader

from benchmarks import book_ch05 as book
from llm.config import PRECISIONS, Params, load_params
from llm.download import fetch, manifest_entry, source_path, write_manifests
from llm.pretrain import run_pretrain
from llm.tokenize import tokenize_corpus
from llm.tracking import MemoryTracker

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "book-ch05.yaml"
MARGIN = 0.1  # the target: the worse side's best val loss plus this


@dataclass(frozen=True)
class Point:
    seconds: float  # since the side started
    step: int  # optimizer steps taken
    train_loss: float
    val_loss: float


@dataclass(frozen=True)
class Side:
    name: str
    seconds: float
    curve: list[Point]
    train_loss: float  # the final model's, measured alike on both sides (eval mode, fp32)
    val_loss: float

    def best(self) -> Point:
        return min(self.curve, key=lambda p: p.val_loss)

    def first_at(self, target: float) -> Point:
        return next(p for p in self.curve if p.val_loss <= target)


class TimedTracker(MemoryTracker):
    """A MemoryTracker that also notes when each report arrived (time.perf_counter())."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        self.times.append(time.perf_counter())


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def fetch_corpus(params: Params, raw: Path) -> Path:
    """data/raw as the download stage leaves it, with the recipe's corpus sources only; the one text file."""
    sources = [s for s in params.download.sources if s.role == "corpus"]
    if len(sources) != 1 or sources[0].kind != "text":
        raise SystemExit(f"{RECIPE}: the book pretrains on one text file (the-verdict); its download section has "
                         f"corpus sources {[s.name for s in sources]}")
    entries = [manifest_entry(s, fetch(s.url, source_path(raw, s), s.sha256, timeout_s=params.download.timeout_s),
                              raw) for s in sources]
    write_manifests(raw, entries)
    return raw / entries[0]["file"]


def check_recipe(params: Params, steps_per_epoch: int) -> None:
    """Refuse a recipe whose settings are not the book's, naming each that differs."""
    cfg, model, train = book.GPT_CONFIG_124M, params.model.build(), params.pretrain
    wanted = {
        "model.vocab_size": (model.vocab_size, cfg["vocab_size"]),
        "model.context_length": (model.context_length, cfg["context_length"]),
        "model.n_embd": (model.n_embd, cfg["emb_dim"]), "model.n_head": (model.n_head, cfg["n_heads"]),
        "model.n_layer": (model.n_layer, cfg["n_layers"]), "model.dropout": (model.dropout, cfg["drop_rate"]),
        "model.qkv_bias": (model.qkv_bias, cfg["qkv_bias"]), "model.tie_weights": (model.tie_weights, False),
        "model.init": (model.init, "book"), "tokenize.val_fraction": (params.tokenize.val_fraction,
                                                                       round(1 - book.TRAIN_RATIO, 6)),
        "pretrain.init_from": (train.init_from, "scratch"), "pretrain.seed": (train.seed, book.SEED),
        "pretrain.windows": (train.windows, "fixed"),  # the book's DataLoader: stride = max_length
        "pretrain.batch_size": (train.batch_size, book.BATCH_SIZE),
        "pretrain.global_batch_size": (train.global_batch_size, book.BATCH_SIZE),
        "pretrain.lr": (train.lr, book.LEARNING_RATE), "pretrain.min_lr": (train.min_lr, book.LEARNING_RATE),
        "pretrain.warmup_steps": (train.warmup_steps, 0), "pretrain.weight_decay": (train.weight_decay,
                                                                                   book.WEIGHT_DECAY),
        "pretrain.beta1": (train.beta1, 0.9), "pretrain.beta2": (train.beta2, 0.999),  # torch's AdamW defaults
        "pretrain.grad_clip": (train.grad_clip, 0.0), "pretrain.max_tokens": (train.max_tokens, None),
        "pretrain.max_steps": (train.max_steps, book.NUM_EPOCHS * steps_per_epoch),
        "pretrain.eval_interval": (train.eval_interval, book.EVAL_FREQ),
        "pretrain.eval_batches": (train.eval_batches, book.EVAL_ITER),
        "pretrain.sample_interval": (train.sample_interval, steps_per_epoch),
        "pretrain.sample_prompt": (train.sample_prompt, book.START_CONTEXT),
        "pretrain.sample_tokens": (train.sample_tokens, book.SAMPLE_TOKENS),
    }
    differ = [f"{key} is {ours!r}, the book's {theirs!r}" for key, (ours, theirs) in wanted.items() if ours != theirs]
    if differ:
        raise SystemExit(f"{RECIPE} is not the book's run; set it back:\n  " + "\n  ".join(differ))


def mean_loss(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loader: DataLoader) -> float:
    with torch.no_grad():
        return sum(loss(x, y).item() for x, y in loader) / len(loader)


def run_book(loaders: tuple[DataLoader, DataLoader], measure: tuple[DataLoader, DataLoader],
             tokenizer: tiktoken.Encoding, epochs: int, seed: int) -> Side:
    started = time.perf_counter()
    model, history = book.main(*loaders, tokenizer, num_epochs=epochs, seed=seed,
                               log=lambda line: print(f"  {time.perf_counter() - started:6.0f} s  {line}", flush=True))
    seconds = time.perf_counter() - started
    curve = [Point(t - started, step + 1, tr, va) for t, step, tr, va in
             zip(history.times, history.steps, history.train_losses, history.val_losses)]
    model.eval()
    device = next(model.parameters()).device
    train_loss, val_loss = (mean_loss(lambda x, y: book.calc_loss_batch(x, y, model, device), loader)
                            for loader in measure)
    return Side("book", seconds, curve, train_loss, val_loss)


def run_ours(params: Params, shards: Path, out: Path, measure: tuple[DataLoader, DataLoader], steps: int) -> Side:
    params = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, max_steps=steps))
    tracker = TimedTracker()
    started = time.perf_counter()
    result = run_pretrain(params, shards, out, tracker=tracker)
    seconds = time.perf_counter() - started
    train = dict(tracker.series("train_loss"))
    curve = [Point(t - started, step, train.get(step, float("nan")), m["val_loss"])
             for t, (step, m) in zip(tracker.times, tracker.metrics) if "val_loss" in m]
    for point in curve:
        train_loss = "-" if math.isnan(point.train_loss) else f"{point.train_loss:.3f}"  # none before step 1
        print(f"  {point.seconds:6.0f} s  step {point.step:3d}: train loss {train_loss}, val loss {point.val_loss:.3f}")
    last_sample = max(tracker.texts) if tracker.texts else None
    if last_sample:
        print(f"  {last_sample}: {tracker.texts[last_sample]!r}")
    print(f"  precision {result.precision_used}, {result.metrics.get('tokens_per_s', 0):,.0f} tokens/s at the end")
    model = result.model.eval()
    device = next(model.parameters()).device
    train_loss, val_loss = (mean_loss(lambda x, y: model(x.to(device), y.to(device)), loader) for loader in measure)
    return Side("ours", seconds, curve, train_loss, val_loss)


def seed_list(text: str) -> list[int]:
    """`--seed`'s value: one seed or several, comma-separated, each an integer."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds are integers, comma-separated (123 or 123,124,125), got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"each seed once, got {text!r}")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=book.NUM_EPOCHS, help="the book's epochs, on both sides")
    parser.add_argument("--seed", type=seed_list, default=[book.SEED],
                        help="the starting weights, window order and dropout of both sides (the book's: 123); "
                        "several, comma-separated, run --rounds rounds each")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="the pipeline side's training precision instead of the recipe's (fp32: as a host "
                        "without native bf16 trains)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of both sides, each round in the other order (2: the book, ours, ours, the book); "
                        "the ratios are the rounds' medians")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    sys.stdout.reconfigure(line_buffering=True)  # a run logged to a file shows its progress as it goes
    started = time.perf_counter()
    params = load_params(RECIPE)
    caps = torch.cpu.get_capabilities()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {caps.get('cpu_name', 'CPU')}, AVX512-BF16 "
          f"{'yes' if caps.get('avx512_bf16') else 'no'}; load average {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        text_path = fetch_corpus(params, Path(tmp) / "raw")
        text = text_path.read_text(encoding="utf-8")
        tokenizer = tiktoken.get_encoding("gpt2")
        loaders = book.book_loaders(text, tokenizer)
        train_loader, val_loader = loaders
        steps_per_epoch = len(train_loader)
        check_recipe(params, steps_per_epoch)
        params = dataclasses.replace(params, pretrain=dataclasses.replace(
            params.pretrain, precision=args.precision or params.pretrain.precision))
        split_idx = int(book.TRAIN_RATIO * len(text))
        context = book.GPT_CONFIG_124M["context_length"]
        measure = (book.create_dataloader_v1(text[:split_idx], tokenizer, book.BATCH_SIZE, context, context,
                                             shuffle=False, drop_last=False), val_loader)
        tokenized = tokenize_corpus(Path(tmp) / "raw", Path(tmp) / "shards", params.tokenize)
        splits = tokenized.manifest["splits"]
        print(f"{text_path.name}: {len(text):,} characters; the book: {len(train_loader.dataset)} train windows "
              f"({steps_per_epoch} batches an epoch), {len(val_loader.dataset)} val windows; the pipeline's shards: "
              f"{splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens; {RECIPE.name} "
              f"has the book's settings ({params.pretrain.max_steps} steps = {book.NUM_EPOCHS} epochs)")

        steps = args.epochs * steps_per_epoch
        rounds: list[tuple[int, dict[str, Side]]] = []  # (seed, its sides)
        for number, seed in enumerate(seed for seed in args.seed for _ in range(args.rounds)):
            seeded = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, seed=seed))
            sides: dict[str, Side] = {}
            for name in ("book", "ours") if number % 2 == 0 else ("ours", "book"):
                if name == "book":
                    print(f"round {number + 1}: the book's loop, {args.epochs} epochs ({steps} steps), fp32, seed "
                          f"{seed}:")
                    sides[name] = run_book(loaders, measure, tokenizer, args.epochs, seed)
                else:
                    print(f"round {number + 1}: the pipeline's pretrain stage, {steps} steps, precision "
                          f"{seeded.pretrain.precision}, seed {seed}:")
                    out = Path(tmp) / f"pretrain-{number + 1}"  # a fresh folder: the stage resumes what it finds
                    sides[name] = run_ours(seeded, Path(tmp) / "shards", out, measure, steps)
                    shutil.rmtree(out)
                print(f"  {sides[name].seconds:.0f} s; load average {load_average()}")
                gc.collect()
            rounds.append((seed, sides))

    first_rounds: dict[int, dict[str, Side]] = {}  # the losses: a seed fixes both sides' curves
    for seed, sides in rounds:
        first_rounds.setdefault(seed, sides)
    for seed, sides in first_rounds.items():
        ref, ours = sides["book"], sides["ours"]
        for side, how in ((ref, "eval mode, 5 shuffled batches"), (ours, "the mean over the last steps, dropout on")):
            last = side.curve[-1]
            print(f"seed {seed}: {side.name} at its last evaluation (step {last.step}): train loss "
                  f"{last.train_loss:.3f} ({how}), val loss {last.val_loss:.3f}; best val {side.best().val_loss:.3f} "
                  f"at step {side.best().step}")
        print(f"seed {seed}: the final models measured alike (eval mode, fp32, the book's {len(measure[0].dataset)} "
              f"train and {len(measure[1].dataset)} val windows): the book train {ref.train_loss:.3f} val "
              f"{ref.val_loss:.3f}; ours train {ours.train_loss:.3f} val {ours.val_loss:.3f}")
    walls, equals = [], []
    for number, (seed, sides) in enumerate(rounds, 1):
        ref, ours = sides["book"], sides["ours"]
        target = max(ref.best().val_loss, ours.best().val_loss) + MARGIN
        at = {side.name: side.first_at(target) for side in (ref, ours)}
        walls.append(ref.seconds / ours.seconds)
        equals.append(at["book"].seconds / at["ours"].seconds)
        print(f"round {number} (seed {seed}, {'the book' if number % 2 else 'ours'} first): wall time: the book "
              f"{ref.seconds:.0f} s, ours {ours.seconds:.0f} s ({walls[-1]:.2f}x); equal val loss: target "
              f"{target:.3f} (the worse best + {MARGIN}), the book reaches it at step {at['book'].step} after "
              f"{at['book'].seconds:.0f} s, ours at step {at['ours'].step} after {at['ours'].seconds:.0f} s "
              f"({equals[-1]:.2f}x)")
    if len(rounds) > 1:
        print(f"the medians of {len(rounds)} rounds: wall {statistics.median(walls):.2f}x, equal val loss "
              f"{statistics.median(equals):.2f}x")
    print(f"benchmark took {time.perf_counter() - started:.0f} s")
    print(f"book_speedup={statistics.median(equals):.2f}")


if __name__ == "__main__":
    main()
