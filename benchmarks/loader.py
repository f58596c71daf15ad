"""Random-window training batches: memory-mapped shards against the book's list of tensor windows.

    python -m benchmarks.loader [--mb 32] [--context-length 256] [--batch-size 8]

Tokenizes a corpus of `--mb` MB (tinyshakespeare repeated) into shards, then, each in a process of its
own so that peak memories are their own:
- reference: the book's `GPTDatasetV1` (chapter 2): every window built up front as a pair of tensors in
  Python lists, served by a shuffling `DataLoader`;
- ours: `RandomWindows` over memory-mapped shards, windows cut on demand.
Prints set-up time, batch throughput and peak memory of both. Last line: `loader_vs_book=R` (tokens/s
ratio, ours over the book's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, run_worker
from benchmarks.tokenize import build_corpus


def book_worker(shards: Path, context_length: int, batch_size: int, batches: int) -> None:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from llm.shards import TokenStream

    class GPTDatasetV1(Dataset):  # as in the book, but handed token ids instead of encoding the text itself
        def __init__(self, token_ids, max_length, stride):
            self.input_ids, self.target_ids = [], []
            for i in range(0, len(token_ids) - max_length, stride):
                self.input_ids.append(torch.tensor(token_ids[i:i + max_length]))
                self.target_ids.append(torch.tensor(token_ids[i + 1:i + max_length + 1]))

        def __len__(self):
            return len(self.input_ids)

        def __getitem__(self, idx):
            return self.input_ids[idx], self.target_ids[idx]

    start = time.perf_counter()
    stream = TokenStream.from_manifest(shards, "train")
    token_ids = stream.window(0, len(stream)).tolist()
    dataset = GPTDatasetV1(token_ids, context_length, context_length)
    del token_ids
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    setup = time.perf_counter() - start
    emit({"setup_s": setup, **_drain(iter(loader), batches, batch_size * context_length)})


def ours_worker(shards: Path, context_length: int, batch_size: int, batches: int) -> None:
    from llm.shards import RandomWindows, TokenStream

    start = time.perf_counter()
    windows = RandomWindows(TokenStream.from_manifest(shards, "train"), context_length, batch_size, seed=0)
    setup = time.perf_counter() - start

    def forever():
        while True:
            yield windows.next_batch()

    emit({"setup_s": setup, **_drain(forever(), batches, batch_size * context_length)})


def _drain(batches_iter, batches: int, tokens_per_batch: int) -> dict:
    for _ in range(10):  # warm-up
        next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        x, y = next(batches_iter)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": batches * tokens_per_batch / seconds, "batches": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--worker", choices=["book", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.context_length, args.batch_size, args.batches)
    if args.worker:
        (book_worker if args.worker == "book" else ours_worker)(args.shards, *shape)
        return

    from llm.config import TokenizeConfig
    from llm.tokenize import tokenize_corpus

    with tempfile.TemporaryDirectory() as tmp:
        raw = build_corpus(Path(tmp), args.mb)
        result = tokenize_corpus(raw, Path(tmp) / "shards", TokenizeConfig())
        flags = ["--shards", str(Path(tmp) / "shards"), "--context-length", str(args.context_length),
                 "--batch-size", str(args.batch_size), "--batches", str(args.batches)]
        book = run_worker("benchmarks.loader", "--worker", "book", *flags)
        ours = run_worker("benchmarks.loader", "--worker", "ours", *flags)
    print(f"train split: {result.metrics['train_tokens']:,} tokens; batches of {args.batch_size} x "
          f"{args.context_length}")
    for name, r in (("book (list of tensor windows)", book), ("ours (memory-mapped shards)", ours)):
        print(f"{name}: set-up {r['setup_s']:.2f} s, {r['tokens_per_s']:,.0f} tokens/s, "
              f"peak RSS {r['peak_rss_mib']:,.0f} MiB")
    print(f"loader_vs_book={ours['tokens_per_s'] / book['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
