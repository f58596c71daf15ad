"""What keeping freed memory gains the evaluate stage on a CPU: its perplexity under glibc's default malloc
against `keep_freed_memory` (llm/hardware.py), which the stage sets as the trainer does.

    python -m benchmarks.allocator [--rounds 3] [--megabytes 1]

The corpus (tinyshakespeare repeated to `--megabytes`) is tokenized by the tokenize stage's code with its
default 10% val split. Each side then runs in a fresh process of its own, since the setting holds for the
whole process and cannot be undone: a `cpu-small` GPT (seeded; perplexity's speed does not depend on the
weights) scores the whole val split with `llm.perplexity.perplexity` at the evaluate stage's default batch
of 8 windows in fp32, as the stage does. Each batch's (8, 256, 50,257) logits and their log-softmax are
412 MB each; by default glibc maps each afresh and unmaps it when freed, so every page faults again at
every batch. The rounds take the two sides in turn, the order swapped each round, and both must give the
same loss to the bit. Printed: each side's tokens/s and peak memory per round. Last line:
`allocator_speedup=R`, the median of the rounds' ratios of tokens/s (kept over default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

MODES = ("default", "keep")


def worker(mode: str, shards: Path) -> None:
    import torch

    from benchmarks.common import emit
    from llm.hardware import keep_freed_memory
    from llm.model import GPT, model_config
    from llm.perplexity import perplexity
    from llm.shards import TokenStream

    kept = keep_freed_memory() if mode == "keep" else False
    torch.manual_seed(0)
    model = GPT(model_config("cpu-small"))
    result = perplexity(model, TokenStream.from_manifest(shards, "val"), model.config.context_length, batch_size=8)
    emit({"kept": kept, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s, "loss": result.loss})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=1, help="size of the corpus tokenized")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.shards)
        return 0

    from benchmarks.common import run_worker
    from benchmarks.tokenize import build_corpus
    from llm.config import TokenizeConfig
    from llm.tokenize import tokenize_corpus

    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenize_corpus(build_corpus(Path(tmp), args.megabytes), Path(tmp) / "shards", TokenizeConfig())
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            results = {mode: run_worker("benchmarks.allocator", "--worker", mode, "--shards", str(Path(tmp) / "shards"))
                       for mode in order}
            default, keep = results["default"], results["keep"]
            if not keep["kept"]:
                raise SystemExit("keep_freed_memory() changed nothing here (not glibc): nothing to compare")
            if keep["loss"] != default["loss"]:
                raise SystemExit(f"the two sides' losses differ: {default['loss']!r} and {keep['loss']!r}")
            ratios.append(keep["tokens_per_s"] / default["tokens_per_s"])
            print(f"round {round_ + 1}: {default['tokens']} val tokens, loss {default['loss']:.6f} on both sides; "
                  f"default {default['tokens_per_s']:7.0f} tokens/s, peak {default['peak_rss_mib']:6.0f} MiB; "
                  f"kept {keep['tokens_per_s']:7.0f} tokens/s, peak {keep['peak_rss_mib']:6.0f} MiB: "
                  f"{ratios[-1]:.2f}x", flush=True)
    print(f"allocator_speedup={statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
