"""What keeping freed memory gains training on a CPU: the trainer under glibc's default malloc against
`keep_freed_memory` (llm/hardware.py), which `llm.train.Trainer` sets for its whole process on a CPU.

    python -m benchmarks.allocator [--rounds 3] [--params recipes/book-ch05.yaml] [--steps 6] [--warmup 2]

Every training step frees and reallocates the same large buffers: the gradients (set to None after each
step), the embedding's zero-filled gradient, autocast's bf16 copies of the weights. By default glibc
serves each one above its mmap threshold (32 MB at most) with a fresh mapping and unmaps it when freed,
so every page of it faults again on its first write, at every step. The model and the training settings
are a params file's `model` and `pretrain` sections: by default the book recipe's (`gpt2-book` at context
256, batch 2, AdamW at lr 4e-4, no clipping), whose (50,257, 768) gradients are 154 MB each;
`--params params.yaml` is the default pipeline's (`cpu-small`, batch 8).

Each side runs the real Trainer in a fresh process of its own, since the setting holds for the whole
process and cannot be undone; on the default side the Trainer's one call to `keep_freed_memory` is
replaced by a no-op, and nothing else differs. Both train the same model from the same seed on the same
windows of the corpus (tinyshakespeare repeated to `--megabytes`, tokenized by the tokenize stage's
code), on the CPU in the params' precision (`auto`: bf16 where the CPU computes it natively): `--warmup`
steps untimed, then `--steps` timed, each step reported (its tokens/s covers the optimizer step alone),
no evaluation, sample or checkpoint but the trainer's last. The rounds take the two sides in turn, the
order swapped each round, and both must report the same losses to the bit. Printed: each side's tokens/s
over the timed steps and its peak memory, per round. Last line: `allocator_speedup=R`, the median of the
rounds' ratios of tokens/s (kept over default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

MODES = ("default", "keep")


def worker(mode: str, shards: Path, params_file: Path, warmup: int, steps: int) -> None:
    import dataclasses

    import torch

    import llm.train
    from benchmarks.common import emit
    from llm.config import load_params
    from llm.hardware import precision_name
    from llm.model import GPT
    from llm.shards import RandomWindows, TokenStream
    from llm.tracking import MemoryTracker

    if mode == "default":
        llm.train.keep_freed_memory = lambda: False  # the Trainer's one call: glibc's defaults stay
    params = load_params(params_file)
    torch.manual_seed(0)
    model = GPT(params.model.build())
    context, batch = model.config.context_length, params.pretrain.batch_size
    windows = RandomWindows(TokenStream.from_manifest(shards, "train"), context, batch, seed=0)
    val = [RandomWindows(TokenStream.from_manifest(shards, "val"), context, batch, seed=0).next_batch()]
    config = dataclasses.replace(params.pretrain, device="cpu", max_steps=warmup + steps, log_interval=1,
                                 eval_interval=10**9, eval_batches=1, sample_interval=0,
                                 checkpoint_interval=10**9, checkpoint_interval_s=None)
    with tempfile.TemporaryDirectory() as out:
        trainer = llm.train.Trainer(model, windows, val, config, out, settings={"bench": 1}, tracker=MemoryTracker())
        history = trainer.fit().progress.history
    emit({"precision": precision_name(trainer.dtype), "shape": f"{model.config.n_layer} layers, n_embd "
          f"{model.config.n_embd}, batch {config.global_batch_size} x {context}",
          # each timed step processed the same tokens: their mean rate is the harmonic mean of the steps'
          "tokens_per_s": statistics.harmonic_mean([rate for step, rate in history["tokens_per_s"] if step > warmup]),
          "losses": [loss for _, loss in history["train_loss"]]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--params", type=Path, default=Path("recipes/book-ch05.yaml"),
                        help="the params file whose model and pretrain sections are trained")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--megabytes", type=int, default=1, help="size of the corpus tokenized")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.shards, args.params, args.warmup, args.steps)
        return 0

    from benchmarks.common import run_worker
    from benchmarks.tokenize import build_corpus
    from llm.config import TokenizeConfig
    from llm.hardware import has_glibc
    from llm.tokenize import tokenize_corpus

    if not has_glibc():
        raise SystemExit("keep_freed_memory() changes nothing here (the C library is not glibc): nothing to compare")
    shape = ["--params", str(args.params.resolve()), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenize_corpus(build_corpus(Path(tmp), args.megabytes), Path(tmp) / "shards", TokenizeConfig())
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            results = {mode: run_worker("benchmarks.allocator", "--worker", mode, "--shards", str(Path(tmp) / "shards"),
                                        *shape) for mode in order}
            default, keep = results["default"], results["keep"]
            if default["losses"] != keep["losses"]:
                raise SystemExit(f"the two sides' losses differ: {json.dumps(default['losses'])} and "
                                 f"{json.dumps(keep['losses'])}")
            ratios.append(keep["tokens_per_s"] / default["tokens_per_s"])
            print(f"round {round_ + 1}: {args.params} ({keep['shape']}), {keep['precision']}, "
                  f"{args.steps} steps timed after {args.warmup}, the same losses on both sides (last "
                  f"{keep['losses'][-1]:.4f}); "
                  f"default {default['tokens_per_s']:6.0f} tokens/s, peak {default['peak_rss_mib']:6.0f} MiB; "
                  f"kept {keep['tokens_per_s']:6.0f} tokens/s, peak {keep['peak_rss_mib']:6.0f} MiB: "
                  f"{ratios[-1]:.2f}x", flush=True)
    print(f"allocator_speedup={statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
